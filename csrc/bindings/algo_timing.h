// Choosing among interchangeable algorithms: the bindings whose op has several ways to compute the
// same values (the GenBlock's convolutions, the plain conv2d op) pick one per shape by a cost model
// fitted to timings (CostModel: deterministic, the same pick in every process), or, in their
// `timed` mode, time the candidates of a shape once (time_fastest) and keep the choice in a
// process-wide cache (ChoiceCache), which a checkpoint's record can also fill.
#pragma once

#include <ATen/Parallel.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace mgm_fast {
namespace bindings {

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// An algorithm's modelled microseconds of one forward + backward, linear in the elements a call
/// touches: a fixed cost per call, the input, the output, the im2col columns, the multiply-adds
/// and the weight. The coefficients are fitted (non-negative least squares on relative error) by
/// mgm_fast/algocost.py to timings of the `timed` mode committed under benchmarks/results/.
struct CostModel {
  double fixed, per_input, per_output, per_col, per_mac, per_weight;
  double operator()(double input, double output, double cols, double macs, double weight) const {
    return fixed + per_input * input + per_output * output + per_col * cols + per_mac * macs +
           per_weight * weight;
  }
};

/// A chosen algorithm, every timed candidate's time in seconds by name (empty when the choice was
/// not timed: a single candidate, or a recorded choice), and ATen's thread count when it was made.
struct AlgoChoice {
  int64_t algo;
  std::map<std::string, double> seconds;
  int threads;
};

/// Times each candidate's `run(algo)` (one forward + backward of the computation) and returns the
/// fastest: a first run (it also creates oneDNN primitives and touches fresh buffers), then a
/// second one unless the first already took 3x the best so far; a candidate's time is its faster
/// run. `name(algo)` names a candidate in the returned times. `candidates` must not be empty.
template <class Name, class Run>
AlgoChoice time_fastest(const std::vector<int64_t>& candidates, Name name, Run run) {
  AlgoChoice choice{candidates.front(), {}, at::get_num_threads()};
  double best = std::numeric_limits<double>::infinity();
  for (int64_t a : candidates) {
    auto t0 = std::chrono::steady_clock::now();
    run(a);
    double t = seconds_since(t0);
    if (t < 3.0 * best) {
      t0 = std::chrono::steady_clock::now();
      run(a);
      t = std::min(t, seconds_since(t0));
    }
    choice.seconds[name(a)] = t;
    if (t < best) {
      best = t;
      choice.algo = a;
    }
  }
  return choice;
}

/// The process-wide choices per shape (Key: ordered by operator<), safe to use from any thread.
template <class Key>
class ChoiceCache {
 public:
  /// The algorithm chosen for `key`, if any.
  std::optional<int64_t> find(const Key& key) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = choices_.find(key);
    return it == choices_.end() ? std::nullopt : std::optional<int64_t>(it->second.algo);
  }

  /// Stores `choice` unless a concurrent first call of the shape stored one first; returns the
  /// stored algorithm (every call of a shape keeps the first choice).
  int64_t insert(const Key& key, AlgoChoice choice) {
    std::lock_guard<std::mutex> lock(mutex_);
    return choices_.emplace(key, std::move(choice)).first->second.algo;
  }

  /// Replaces the choices of these shapes (a checkpoint's record wins over earlier choices).
  void assign(std::map<Key, AlgoChoice> choices) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [key, choice] : choices) choices_[key] = std::move(choice);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    choices_.clear();
  }

  /// A copy of every choice, in key order.
  std::map<Key, AlgoChoice> entries() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return choices_;
  }

 private:
  mutable std::mutex mutex_;
  std::map<Key, AlgoChoice> choices_;
};

}  // namespace bindings
}  // namespace mgm_fast
