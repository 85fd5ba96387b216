// Torch glue of the plain convolution op (mgm_fast/ops/conv2d.py) on the CPU: conv2d of a
// channels_last float32 input (groups 1, dilation 1) by one of two ATen algorithms, chosen per
// shape:
//   conv -- at::convolution and at::convolution_backward (oneDNN for float32 on the CPU);
//   gemm -- at::_slow_conv2d_forward and at::_slow_conv2d_backward: im2col and GEMMs.
// oneDNN pays about 200 us per forward + backward on a 2-core Xeon (primitive descriptors, weight
// reorders in three calls) before any arithmetic, more than the whole im2col + GEMM path needs on
// the small maps and narrow layers of the tiny preset; on 32x32 and larger maps oneDNN is up to 5x
// faster. The environment variable MGM_FAST_CONV2D_ALGO chooses how:
//   auto (unset or empty too) -- a cost model fitted to timings (modelled_choice): deterministic,
//     the same algorithm for a shape in every process, rank and machine;
//   timed -- the first call of a shape (input n, c, h, w; weight cout, kh, kw; stride; padding)
//     times both (forward + backward on a stand-in input, algo_timing.h) and a process-wide cache
//     keeps the faster; the timings are what the cost model is fitted to (conv2d_algos_cpu);
//   conv | gemm -- that algorithm for every call.
// gemm is a candidate only while its column matrix stays within kGemmMaxColsBytes. Both algorithms
// compute the same sums, so the choice changes results by float32 rounding at most.
//
// conv2d_algo_cpu(input, weight, bias, stride, padding) -> 0 (conv) or 1 (gemm): the algorithm of a
//   call, which the op then runs as ATen's own op (at::convolution or at::_slow_conv2d_forward)
//   with ATen's autograd: no extra node, no Python in the backward. Traced by torch.compile, the
//   op asks for the algorithm of stand-in tensors of the call's shapes while it traces, and the
//   graph holds that ATen op.
// conv2d_algos_cpu() -> rows (n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, threads, chosen,
//   {algorithm: seconds}) of the cache (timed choices, restored ones); conv2d_algos_set_cpu(rows
//   without threads and times): choices that win over auto's and timed's; conv2d_algos_clear_cpu().
// input: (N, C, H, W) float32 CPU, channels_last; weight (Cout, C, kh, kw) float32, channels_last;
// bias (Cout,) or None.
#include <torch/extension.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "algo_timing.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

constexpr const char* kOp = "conv2d (cpp backend): ";
constexpr const char* kEnv = "MGM_FAST_CONV2D_ALGO";

enum class Algo : int64_t {
  kConv = 0,  // ATen's convolution: oneDNN for float32 CPU tensors
  kGemm = 1,  // ATen's im2col + GEMM convolution (_slow_conv2d)
};
constexpr Algo kAlgos[] = {Algo::kConv, Algo::kGemm};

const char* algo_name(int64_t a) { return a == static_cast<int64_t>(Algo::kGemm) ? "gemm" : "conv"; }

// gemm is timed while its column matrix (N, C kh kw, Ho Wo) stays within this many bytes: beyond,
// the maps are large and oneDNN wins (at the paper preset the matrix would take gigabytes).
constexpr int64_t kGemmMaxColsBytes = int64_t{64} << 20;

/// A convolution's geometry: stride and padding (height, width).
struct Geometry {
  std::array<int64_t, 2> stride, padding;
};

Geometry geometry_of(at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2, kOp, "stride and padding need 2 values each, got ",
                    stride, " and ", padding);
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0, kOp,
                    "stride must be positive and padding non-negative, got ", stride, " and ", padding);
  return {{stride[0], stride[1]}, {padding[0], padding[1]}};
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kOp, name, " must be float32, got ", t.scalar_type());
}

/// The checks of a call's tensors; returns the output's (height, width).
std::array<int64_t, 2> check_call(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const Geometry& g) {
  check_float_cpu(input, "input");
  check_float_cpu(weight, "weight");
  TORCH_CHECK_VALUE(input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast), kOp,
                    "input must be a channels_last (N, C, H, W) tensor, got shape ", input.sizes(), " strides ",
                    input.strides());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == input.size(1), kOp, "weight must be (Cout, ",
                    input.size(1), ", kh, kw) for an input of ", input.size(1), " channels, got ", weight.sizes());
  // ATen's im2col + GEMM backward writes the weight gradient in the input's layout
  TORCH_CHECK_VALUE(weight.is_contiguous(at::MemoryFormat::ChannelsLast), kOp,
                    "weight must be channels_last like the input, got strides ", weight.strides());
  if (bias.has_value()) {
    check_float_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp, "bias must be (", weight.size(0),
                      ",), got ", bias->sizes());
  }
  std::array<int64_t, 2> out{};
  for (int d = 0; d < 2; ++d) {
    out[d] = (input.size(2 + d) + 2 * g.padding[d] - weight.size(2 + d)) / g.stride[d] + 1;
    TORCH_CHECK_VALUE(input.size(2 + d) + 2 * g.padding[d] >= weight.size(2 + d), kOp, "the padded input ",
                      input.sizes(), " (padding ", g.padding[d], ") is smaller than the kernel ", weight.sizes());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// the algorithms

at::Tensor forward_with(Algo algo, const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const Geometry& g) {
  at::Tensor out;
  if (algo == Algo::kGemm) {
    out = at::_slow_conv2d_forward(input, weight, {weight.size(2), weight.size(3)}, bias, g.stride, g.padding);
  } else {
    out = at::convolution(input, weight, bias, g.stride, g.padding, {1, 1}, false, {0, 0}, 1);
  }
  return out.contiguous(at::MemoryFormat::ChannelsLast);  // a no-op for both on channels_last input
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Grads backward_with(Algo algo, const at::Tensor& grad_out_in, const at::Tensor& input, const at::Tensor& weight,
                    const Geometry& g, std::array<bool, 3> mask) {
  const at::Tensor grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  Grads grads;
  if (algo == Algo::kGemm) {
    grads = at::_slow_conv2d_backward(grad_out, input, weight, {weight.size(2), weight.size(3)}, g.stride,
                                      g.padding, mask);
  } else {
    const std::array<int64_t, 1> bias_sizes{weight.size(0)};
    grads = at::convolution_backward(grad_out, input, weight, at::IntArrayRef(bias_sizes), g.stride, g.padding,
                                     {1, 1}, false, {0, 0}, 1, mask);
  }
  auto& [grad_input, grad_weight, grad_bias] = grads;
  if (grad_input.defined()) grad_input = grad_input.contiguous(at::MemoryFormat::ChannelsLast);
  // the optimiser updates the weight in its own layout: hand it the gradient in that layout
  if (grad_weight.defined()) grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
  return grads;
}

// ---------------------------------------------------------------------------------------------
// the choice per shape

struct Key {
  int64_t n, cin, h, w, cout, kh, kw, sh, sw, ph, pw;
  auto tie() const { return std::tie(n, cin, h, w, cout, kh, kw, sh, sw, ph, pw); }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
};

ChoiceCache<Key>& cache() {
  static ChoiceCache<Key> c;
  return c;
}

Key key_of(const at::Tensor& input, const at::Tensor& weight, const Geometry& g) {
  return {input.size(0), input.size(1), input.size(2), input.size(3), weight.size(0), weight.size(2),
          weight.size(3), g.stride[0], g.stride[1], g.padding[0], g.padding[1]};
}

std::optional<Algo> algo_named(const char* name) {
  for (Algo a : kAlgos) {
    if (std::strcmp(name, algo_name(static_cast<int64_t>(a))) == 0) return a;
  }
  return std::nullopt;
}

/// How MGM_FAST_CONV2D_ALGO chooses: auto (unset, empty or "auto": the cost model), timed, or
/// one forced algorithm.
struct Mode {
  bool timed;
  std::optional<Algo> forced;
};

Mode mode() {
  const char* v = std::getenv(kEnv);
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return {false, std::nullopt};
  if (std::strcmp(v, "timed") == 0) return {true, std::nullopt};
  const auto algo = algo_named(v);
  TORCH_CHECK_VALUE(algo.has_value(), kOp, kEnv, "=", v, " is not one of auto, timed, conv, gemm");
  return {false, algo};
}

/// The im2col columns (N, C kh kw, Ho Wo) gemm would allocate, in floats.
int64_t cols_of(const at::Tensor& input, const at::Tensor& weight, std::array<int64_t, 2> out_hw) {
  return input.size(0) * input.size(1) * weight.size(2) * weight.size(3) * out_hw[0] * out_hw[1];
}

/// auto's cost model (CostModel, algo_timing.h): microseconds of a forward + backward (all three
/// gradients) by each algorithm, fitted to the timings of `timed` for 87 shapes on a 2-core Intel
/// Xeon (AVX-512, 2 threads): the tiny preset's convolutions at batch 8, those of the host-floor
/// size at batch 2, and 14 more (batch 2-32, 1-256 channels, 2x2-32x32 maps). It picks the faster
/// algorithm for 85 of them, and its picks cost 0.24 % more than the best ones (oneDNN for all:
/// 32 % more). oneDNN pays about 200 us a call before any arithmetic (descriptors, weight
/// reorders in three calls) and 0.1 ns per column element; im2col + GEMM 20 us and 1.25 ns per
/// column element (it writes and reads the columns). The model is deterministic: every process,
/// rank and machine picks the same algorithm for a shape, so fresh runs with a seed repeat.
constexpr CostModel kConvCost{197.0, 1.53e-3, 1.69e-3, 1.15e-4, 1.10e-5, 3.22e-3};
constexpr CostModel kGemmCost{19.8, 1.32e-3, 2.17e-3, 1.25e-3, 1.01e-5, 1.21e-3};

Algo modelled_choice(const at::Tensor& input, const at::Tensor& weight, const Geometry& g,
                     std::array<int64_t, 2> out_hw) {
  const int64_t cols = cols_of(input, weight, out_hw);
  if (cols * static_cast<int64_t>(sizeof(float)) > kGemmMaxColsBytes) return Algo::kConv;
  const double n = static_cast<double>(input.size(0)), cout = static_cast<double>(weight.size(0));
  const double in = static_cast<double>(input.numel()), out = n * cout * out_hw[0] * out_hw[1];
  // a 1x1 stride-1 convolution reads its input as the columns: no im2col
  const bool im2col = weight.size(2) * weight.size(3) > 1 || g.stride[0] * g.stride[1] > 1 || g.padding[0] + g.padding[1] > 0;
  const double col = im2col ? static_cast<double>(cols) : 0.0;
  const double macs = static_cast<double>(cols) * cout, w = static_cast<double>(weight.numel());
  return kGemmCost(in, out, col, macs, w) < kConvCost(in, out, col, macs, w) ? Algo::kGemm : Algo::kConv;
}

/// Times the candidates of this call's shape on constant stand-ins (the time does not depend on
/// the values, and the global random stream stays untouched) with the call's weight and bias.
AlgoChoice time_shape(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const Geometry& g, std::array<int64_t, 2> out_hw) {
  if (cols_of(input, weight, out_hw) * static_cast<int64_t>(sizeof(float)) > kGemmMaxColsBytes) {
    return {static_cast<int64_t>(Algo::kConv), {}, at::get_num_threads()};
  }
  const at::TensorOptions cl = input.options().memory_format(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = at::full(input.sizes(), 0.5, cl);
  const at::Tensor grad = at::full({input.size(0), weight.size(0), out_hw[0], out_hw[1]}, 0.25, cl);
  const std::vector<int64_t> candidates{static_cast<int64_t>(Algo::kConv), static_cast<int64_t>(Algo::kGemm)};
  return time_fastest(candidates, algo_name, [&](int64_t a) {
    forward_with(static_cast<Algo>(a), x, weight, bias, g);
    backward_with(static_cast<Algo>(a), grad, x, weight, g, {true, true, bias.has_value()});
  });
}

/// The algorithm of a call: forced; else the cache's (timed earlier in this process, or restored
/// from a checkpoint of a timed run); else timed now (timed) or the cost model's (auto, not cached:
/// it is a function of the shape).
Algo choose(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
            const Geometry& g, std::array<int64_t, 2> out_hw) {
  const Mode m = mode();
  if (m.forced) return *m.forced;
  const Key key = key_of(input, weight, g);
  if (const auto cached = cache().find(key)) return static_cast<Algo>(*cached);
  if (!m.timed) return modelled_choice(input, weight, g, out_hw);
  return static_cast<Algo>(cache().insert(key, time_shape(input, weight, bias, g, out_hw)));
}

using AlgoRow = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int, std::string, std::map<std::string, double>>;

std::vector<AlgoRow> algos() {
  std::vector<AlgoRow> rows;
  for (const auto& [k, c] : cache().entries()) {
    rows.emplace_back(k.n, k.cin, k.h, k.w, k.cout, k.kh, k.kw, k.sh, k.sw, k.ph, k.pw, c.threads,
                      algo_name(c.algo), c.seconds);
  }
  return rows;
}

using ChoiceRow = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, std::string>;

/// Rows (n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, chosen) of an earlier algos(), e.g. from a
/// checkpoint: the cache takes these choices as if auto had made them (a resumed run computes with
/// the algorithms of the run it continues, whatever this process's timing would pick).
void set_algos(const std::vector<ChoiceRow>& rows) {
  std::map<Key, AlgoChoice> parsed;
  for (const auto& [n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, chosen] : rows) {
    const auto algo = algo_named(chosen.c_str());
    TORCH_CHECK_VALUE(algo.has_value(), kOp, "unknown algorithm '", chosen, "' (conv or gemm)");
    parsed[Key{n, cin, h, w, cout, kh, kw, sh, sw, ph, pw}] = AlgoChoice{static_cast<int64_t>(*algo), {}, 0};
  }
  cache().assign(std::move(parsed));
}

void clear_algos() { cache().clear(); }

// ---------------------------------------------------------------------------------------------
// entry points

/// The algorithm for a call (forced, cached, or timed now), after the call's checks: the op runs
/// it through ATen's own op and autograd (eagerly, and in the graphs torch.compile traces).
int64_t algo_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 std::vector<int64_t> stride, std::vector<int64_t> padding) {
  const Geometry g = geometry_of(stride, padding);
  const auto out_hw = check_call(input, weight, bias, g);
  pybind11::gil_scoped_release no_gil;
  return static_cast<int64_t>(choose(input, weight, bias, g, out_hw));
}

}  // namespace

void register_conv2d(pybind11::module_& m) {
  using pybind11::arg;
  m.def("conv2d_algo_cpu", &algo_cpu, arg("input"), arg("weight"), arg("bias"), arg("stride"), arg("padding"),
        "The algorithm (0: conv, 1: gemm) for a conv2d call of these tensors: forced, chosen before, or timed now.");
  m.def("conv2d_algos_cpu", &algos,
        "The algorithms chosen so far: rows (n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, threads, chosen, "
        "{algorithm: seconds}).");
  m.def("conv2d_algos_set_cpu", &set_algos, arg("rows"),
        "Take rows (n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, chosen) as the choices for their shapes.");
  m.def("conv2d_algos_clear_cpu", &clear_algos, "Forget every choice (the next call of a shape times again).");
}

}  // namespace bindings
}  // namespace mgm_fast
