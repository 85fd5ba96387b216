// One-time timing of interchangeable algorithms: the bindings whose op has several ways to compute
// the same values (the GenBlock's convolutions, the plain conv2d op) time the candidates on the
// first call of a shape and keep the fastest in a process-wide cache.
#pragma once

#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace mgm_fast {
namespace bindings {

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// The fastest candidate and every candidate's time in seconds, by name.
struct TimedChoice {
  int64_t algo;
  std::map<std::string, double> seconds;
};

/// Times each candidate's `run(algo)` (one forward + backward of the computation) and returns the
/// fastest: a first run (it also creates oneDNN primitives and touches fresh buffers), then a
/// second one unless the first already took 3x the best so far; a candidate's time is its faster
/// run. `name(algo)` names a candidate in the returned times. `candidates` must not be empty.
template <class Name, class Run>
TimedChoice time_fastest(const std::vector<int64_t>& candidates, Name name, Run run) {
  TimedChoice choice{candidates.front(), {}};
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

}  // namespace bindings
}  // namespace mgm_fast
