// Torch glue of the fused GenBlock on the CPU: the kernel policy over csrc/kernels/cpu/genblock.*
// and the registration of the entry points of genblock_impl.h (the composition, shared with the
// CUDA build). float32 and float64; the convolutions are ATen (oneDNN for float32) on
// channels_last tensors. Called by mgm_fast/ops/genblock.py, which owns the autograd.Function
// and the dispatch (input validation with errors naming the tensor happens there too).
//
// Both convs of a block have several algorithms (genblock_impl.h): conv1, nearest x2 + conv3x3,
// gi::UpConvAlgo phase | gemm | upsample; conv2, conv3x3 at the output size, gi::ConvAlgo
// conv | gemm. The environment variables MGM_FAST_GENBLOCK_ALGO (conv1) and
// MGM_FAST_GENBLOCK_CONV2_ALGO (conv2) say how each is picked:
//   auto (unset or empty too) -- a cost model of the shape (modelled_algo, fitted to timings of
//     the timed mode): deterministic, the same algorithm for a shape in every process, rank and
//     machine, so two fresh runs with one seed repeat bit for bit;
//   timed -- the first call of a shape (n, cin, cout, h, w, dtype) times the candidates that can
//     win there (forward + backward on a stand-in input of that shape, see time_candidates) and a
//     process-wide cache keeps the fastest (what the cost model is fitted to; the timing of a near
//     tie can flip between processes);
//   an algorithm's name -- that algorithm for every call.
// Choices restored from a checkpoint (genblock_algos_set_cpu) win over auto's and timed's. The
// algorithms agree up to rounding, so the choice changes results by rounding at most; the choice
// ignores the thread count, so a process keeps one algorithm per shape and its results stay
// independent of the thread count (every algorithm is, but for oneDNN's and the GEMMs' weight
// gradients). The forward returns the algorithms it used as one more saved tensor and the backward
// takes it back, so a forward and its backward always run the same ones.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "algo_timing.h"
#include "genblock_impl.h"
#include "kernels/cpu/genblock.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

namespace k = mgm_fast::cpu::genblock;
namespace gi = genblock_impl;

k::Layout layout_of(const at::Tensor& t) {
  return gi::is_pixels(t) ? k::Layout::kPixels : k::Layout::kPlanes;
}

k::Dims dims_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3)}; }

template <typename T>
k::View<const T> cview(const at::Tensor& t) {
  return {t.data_ptr<T>(), dims_of(t), layout_of(t)};
}

template <typename T>
k::View<T> mview(const at::Tensor& t) {
  return {t.data_ptr<T>(), dims_of(t), layout_of(t)};
}

template <typename T>
k::View<const T> cview_opt(const at::Tensor* t) {
  return t != nullptr ? cview<T>(*t) : k::View<const T>{};
}

template <typename T>
k::View<T> mview_opt(at::Tensor* t) {
  return t != nullptr ? mview<T>(*t) : k::View<T>{};
}

void check_dense(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "genblock (cpp backend): ", what, " must be NCHW or channels_last contiguous");
}

// Runs f<T>() for the float dtypes of the cpp backend.
template <typename F>
void dispatch(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    default:
      TORCH_CHECK_TYPE(false, "genblock (cpp backend): float32 or float64 expected, got ",
                       t.scalar_type());
  }
}

template <typename T>
k::BnReluBackward<T> bn_args(const gi::BnBackward& b) {
  k::BnReluBackward<T> a;
  a.x = cview<T>(b.x);
  a.act = cview<T>(b.act);
  a.dact = cview<T>(b.dact);
  TORCH_CHECK(b.gamma.stride(1) == 1, "genblock (cpp backend): gamma needs unit column stride");
  a.gamma = b.gamma.data_ptr<T>();
  a.gamma_stride = b.gamma.stride(0);
  a.scale = b.scale.data_ptr<T>();
  a.mean = b.mean.data_ptr<double>();
  a.rstd = b.rstd.data_ptr<double>();
  a.training = b.training;
  return a;
}

int threads() { return at::get_num_threads(); }

// Per-thread scratch for the largest temporaries of the gemm algorithms: the phase weights and
// their gradient, 16 * cin * cout values each (64 MiB for a 1024 -> 1024 block). Fresh memory of
// that size is mapped anew by every call, and its page faults cost about as much as computing
// it; each thread keeps its last buffer per slot instead (up to kScratchMaxBytes; larger ones
// are plain temporaries). A scratch tensor never leaves the call that asked for it.
enum ScratchSlot : int { kPhaseWeightsSlot = 0, kPhaseWeightsGradSlot = 1, kScratchSlots = 2 };
constexpr int64_t kScratchMaxBytes = int64_t{256} << 20;

at::Tensor scratch(int slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  if (numel * static_cast<int64_t>(options.dtype().itemsize()) > kScratchMaxBytes) {
    return at::empty(sizes, options);
  }
  thread_local std::array<at::Tensor, kScratchSlots> pool;
  at::Tensor& buf = pool[slot];
  if (!buf.defined() || buf.dtype() != options.dtype() || buf.numel() < numel) {
    buf = at::Tensor();  // the old buffer goes first
    buf = at::empty({numel}, options);
  }
  return buf.narrow(0, 0, numel).view(sizes);
}

/// The CPU kernel policy of genblock_impl.h.
struct CpuGenblockKernels {
  static at::ScalarType param_dtype(const at::Tensor& x) { return x.scalar_type(); }

  static std::pair<at::Tensor, at::Tensor> stats(const at::Tensor& x) {
    check_dense(x, "x");
    const int64_t c = x.size(1);
    at::Tensor mean = at::empty({c}, x.options().dtype(at::kDouble));
    at::Tensor var = at::empty({c}, x.options().dtype(at::kDouble));
    dispatch(x, [&](auto z) {
      using T = decltype(z);
      k::channel_stats<T>(cview<T>(x), mean.data_ptr<double>(), var.data_ptr<double>(), threads());
    });
    return {mean, var};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift(
      const at::Tensor& gamma_in, const at::Tensor& beta_in, const at::Tensor& mean,
      const at::Tensor& var, double eps, const at::Tensor& x) {
    at::Tensor gamma = gamma_in, beta = beta_in;
    if (gamma.stride(1) != 1 || beta.stride(1) != 1 || gamma.stride(0) != beta.stride(0)) {
      gamma = gamma.contiguous();
      beta = beta.contiguous();
    }
    const int64_t n = gamma.size(0), c = gamma.size(1);
    at::Tensor rstd = at::empty({c}, mean.options());
    at::Tensor scale = at::empty({n, c}, x.options());
    at::Tensor shift = at::empty({n, c}, x.options());
    const at::Tensor m = mean.contiguous(), v = var.contiguous();
    dispatch(x, [&](auto z) {
      using T = decltype(z);
      k::scale_shift<T>(gamma.data_ptr<T>(), beta.data_ptr<T>(), gamma.stride(0), n, c,
                        m.data_ptr<double>(), v.data_ptr<double>(), eps, rstd.data_ptr<double>(),
                        scale.data_ptr<T>(), shift.data_ptr<T>());
    });
    return {rstd, scale, shift};
  }

  static void affine_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          at::Tensor& out, at::Tensor* copy) {
    dispatch(x, [&](auto z) {
      using T = decltype(z);
      k::affine_relu<T>(cview<T>(x), scale.data_ptr<T>(), shift.data_ptr<T>(), mview<T>(out),
                        mview_opt<T>(copy), threads());
    });
  }

  // BatchNorm2d's update in double, then rounded once (as torch's CPU kernel does).
  static void update_running(const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& mean, const at::Tensor& var, int64_t count,
                             double m) {
    const bool plain = running_mean.is_contiguous() && running_var.is_contiguous() &&
                       running_mean.scalar_type() == running_var.scalar_type() &&
                       (running_mean.scalar_type() == at::kFloat ||
                        running_mean.scalar_type() == at::kDouble);
    if (!plain) return gi::update_running_aten(running_mean, running_var, mean, var, count, m);
    const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
    const double* mu = mean.data_ptr<double>();
    const double* va = var.data_ptr<double>();
    dispatch(running_mean, [&](auto z) {
      using R = decltype(z);
      R* rm = running_mean.data_ptr<R>();
      R* rv = running_var.data_ptr<R>();
      for (int64_t c = 0; c < running_mean.numel(); ++c) {
        rm[c] = static_cast<R>(m * mu[c] + (1.0 - m) * static_cast<double>(rm[c]));
        rv[c] = static_cast<R>(m * va[c] * unbias + (1.0 - m) * static_cast<double>(rv[c]));
      }
    });
    // in-place writes through raw pointers: tell autograd's version counter, like copy_ would
    running_mean.unsafeGetTensorImpl()->bump_version();
    running_var.unsafeGetTensorImpl()->bump_version();
  }

  // Dense gradient of an embedding table: d[y[b]] += dgb[b] (in sample order, deterministic).
  static at::Tensor embedding_grad(const at::Tensor& embed, const at::Tensor& y,
                                   const at::Tensor& dgb) {
    at::Tensor d = at::zeros_like(embed, at::MemoryFormat::Contiguous);
    const at::Tensor src = dgb.to(embed.scalar_type()).contiguous();
    const at::Tensor yy = y.contiguous();
    const int64_t* labels = yy.data_ptr<int64_t>();
    const int64_t rows = embed.size(0), width = embed.size(1);
    dispatch(d, [&](auto z) {
      using T = decltype(z);
      T* out = d.data_ptr<T>();
      const T* in = src.data_ptr<T>();
      for (int64_t b = 0; b < yy.numel(); ++b) {
        TORCH_CHECK_INDEX(labels[b] >= 0 && labels[b] < rows, "genblock: y holds label ", labels[b],
                          ", outside [0, ", rows, ")");
        T* row = out + labels[b] * width;
        for (int64_t j = 0; j < width; ++j) row[j] += in[b * width + j];
      }
    });
    return d;
  }

  // Conv weights go to oneDNN in channels_last, matching the activations (no reorder inside).
  static at::Tensor conv_weight(const at::Tensor& w) {
    return w.contiguous(at::MemoryFormat::ChannelsLast);
  }

  static at::Tensor phase_weights(const at::Tensor& w_in) {
    const at::Tensor w = w_in.contiguous();
    const int64_t cout = w.size(0), cin = w.size(1);
    at::Tensor wp = at::empty({4 * cout, cin, 2, 2}, w.options().memory_format(at::MemoryFormat::ChannelsLast));
    dispatch(w, [&](auto z) {
      using T = decltype(z);
      k::phase_weights<T>(w.data_ptr<T>(), cout, cin, wp.data_ptr<T>(), true, threads());
    });
    return wp;
  }

  static at::Tensor phase_weights_backward(const at::Tensor& dwp_in) {
    const bool cl = gi::is_pixels(dwp_in);
    const at::Tensor dwp = cl ? dwp_in : dwp_in.contiguous();
    const int64_t cout = dwp.size(0) / 4, cin = dwp.size(1);
    at::Tensor dw = at::empty({cout, cin, 3, 3}, dwp.options());
    dispatch(dwp, [&](auto z) {
      using T = decltype(z);
      k::phase_weights_backward<T>(dwp.data_ptr<T>(), cout, cin, dw.data_ptr<T>(), cl, threads());
    });
    return dw;
  }

  // --- the compact phase layout of UpConvAlgo::kGemm (genblock_impl.h)

  // Wp (4, cout, 4*cin), a scratch tensor: row (ph, o) holds the 4 taps x cin of phase ph (the
  // channels_last phase weights, viewed per phase).
  static at::Tensor compact_phase_weights(const at::Tensor& w_in) {
    const at::Tensor w = w_in.contiguous();
    const int64_t cout = w.size(0), cin = w.size(1);
    at::Tensor wp = scratch(kPhaseWeightsSlot, {4, cout, 4 * cin}, w.options());
    dispatch(w, [&](auto z) {
      using T = decltype(z);
      k::phase_weights<T>(w.data_ptr<T>(), cout, cin, wp.data_ptr<T>(), true, threads());
    });
    return wp;
  }

  // dw (cout, cin, 3, 3) from the phase GEMMs' gradient dP (4, n*h*w, cout) and their im2col
  // matrices (4, n*h*w, 4*cin): dWp = dP^T cols (in scratch), then the adjoint of the phase taps.
  static at::Tensor compact_phase_weights_grad(const at::Tensor& dp, const at::Tensor& cols) {
    const int64_t cout = dp.size(2), cin = cols.size(2) / 4;
    at::Tensor dwp = scratch(kPhaseWeightsGradSlot, {4, cout, 4 * cin}, dp.options());
    at::bmm_out(dwp, dp.transpose(1, 2), cols);
    at::Tensor dw = at::empty({cout, cin, 3, 3}, dp.options());
    dispatch(dwp, [&](auto z) {
      using T = decltype(z);
      k::phase_weights_backward<T>(dwp.data_ptr<T>(), cout, cin, dw.data_ptr<T>(), true, threads());
    });
    return dw;
  }

  // (4, n*h*w, 4*c) im2col rows of the 4 phases of a (n, c, h, w).
  static at::Tensor compact_im2col(const at::Tensor& a) {
    check_dense(a, "up-conv input");
    const int64_t n = a.size(0), c = a.size(1), h = a.size(2), w = a.size(3);
    at::Tensor cols = at::empty({4, n * h * w, 4 * c}, a.options());
    dispatch(a, [&](auto z) {
      using T = decltype(z);
      k::phase_im2col<T>(cview<T>(a), cols.data_ptr<T>(), threads());
    });
    return cols;
  }

  // The adjoint of compact_im2col: (n, c, h, w) channels_last.
  static at::Tensor compact_col2im(const at::Tensor& dcols_in, int64_t n, int64_t c, int64_t h,
                                   int64_t w) {
    const at::Tensor dcols = dcols_in.contiguous();
    at::Tensor da = gi::empty4(dcols, n, c, h, w, at::MemoryFormat::ChannelsLast);
    dispatch(dcols, [&](auto z) {
      using T = decltype(z);
      k::phase_col2im<T>(dcols.data_ptr<T>(), mview<T>(da), threads());
    });
    return da;
  }

  // --- ConvAlgo::kGemm: the 3x3 im2col (n*h*w, 9*c) in the (ci, tap) order of a contiguous weight
  static at::Tensor conv3_im2col(const at::Tensor& a) {
    check_dense(a, "conv input");
    const int64_t n = a.size(0), c = a.size(1), h = a.size(2), w = a.size(3);
    at::Tensor cols = at::empty({n * h * w, 9 * c}, a.options());
    dispatch(a, [&](auto z) {
      using T = decltype(z);
      k::conv3x3_im2col<T>(cview<T>(a), cols.data_ptr<T>(), threads());
    });
    return cols;
  }

  static at::Tensor conv3_col2im(const at::Tensor& dcols_in, int64_t n, int64_t c, int64_t h,
                                 int64_t w) {
    const at::Tensor dcols = dcols_in.contiguous();
    at::Tensor da = gi::empty4(dcols, n, c, h, w, at::MemoryFormat::ChannelsLast);
    dispatch(dcols, [&](auto z) {
      using T = decltype(z);
      k::conv3x3_col2im<T>(dcols.data_ptr<T>(), mview<T>(da), threads());
    });
    return da;
  }

  static void compact_phase_epilogue(const at::Tensor& p, const at::Tensor& bias_in,
                                     at::Tensor& out, at::Tensor* mean, at::Tensor* var) {
    TORCH_CHECK(p.is_contiguous(), "compact phase output not contiguous");
    const at::Tensor bias = bias_in.contiguous();
    const k::Dims low{out.size(0), out.size(1), out.size(2) / 2, out.size(3) / 2};
    dispatch(p, [&](auto z) {
      using T = decltype(z);
      k::Epilogue<T> ep;
      ep.bias = bias.data_ptr<T>();
      k::phase_epilogue<T>(p.data_ptr<T>(), low, ep, mview<T>(out),
                           mean != nullptr ? mean->data_ptr<double>() : nullptr,
                           var != nullptr ? var->data_ptr<double>() : nullptr, threads(),
                           k::PhaseLayout::kCompact);
    });
  }

  static void bn_backward_apply_compact_phase(const gi::BnBackward& b, const at::Tensor& k1,
                                              const at::Tensor& k2, at::Tensor& dp,
                                              at::Tensor* dbias) {
    dispatch(b.x, [&](auto z) {
      using T = decltype(z);
      k::bn_relu_backward_apply_phase<T>(bn_args<T>(b), k1.data_ptr<double>(), k2.data_ptr<double>(),
                                         dp.data_ptr<T>(),
                                         dbias != nullptr ? dbias->data_ptr<double>() : nullptr,
                                         threads(), k::PhaseLayout::kCompact);
    });
  }

  template <typename T>
  static k::Epilogue<T> epilogue(const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, bool half) {
    k::Epilogue<T> ep;
    ep.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    if (residual.has_value()) {
      check_dense(*residual, "residual");
      ep.residual = cview<T>(*residual);
      ep.residual_half = half;
    }
    return ep;
  }

  static void phase_epilogue(const at::Tensor& p, const std::optional<at::Tensor>& bias_in,
                             const std::optional<at::Tensor>& residual, bool half, at::Tensor& out,
                             at::Tensor* mean, at::Tensor* var) {
    TORCH_CHECK(p.is_contiguous(at::MemoryFormat::ChannelsLast), "phase conv output not channels_last");
    std::optional<at::Tensor> bias;
    if (bias_in.has_value()) bias = bias_in->contiguous();
    const k::Dims low{out.size(0), out.size(1), out.size(2) / 2, out.size(3) / 2};
    dispatch(p, [&](auto z) {
      using T = decltype(z);
      k::phase_epilogue<T>(p.data_ptr<T>(), low, epilogue<T>(bias, residual, half), mview<T>(out),
                           mean != nullptr ? mean->data_ptr<double>() : nullptr,
                           var != nullptr ? var->data_ptr<double>() : nullptr, threads());
    });
  }

  static void conv_epilogue(const at::Tensor& conv, const std::optional<at::Tensor>& bias_in,
                            const std::optional<at::Tensor>& residual, bool half, at::Tensor& out,
                            at::Tensor* mean, at::Tensor* var) {
    check_dense(conv, "conv output");
    std::optional<at::Tensor> bias;
    if (bias_in.has_value()) bias = bias_in->contiguous();
    dispatch(conv, [&](auto z) {
      using T = decltype(z);
      k::conv_epilogue<T>(cview<T>(conv), epilogue<T>(bias, residual, half), mview<T>(out),
                          mean != nullptr ? mean->data_ptr<double>() : nullptr,
                          var != nullptr ? var->data_ptr<double>() : nullptr, threads());
    });
  }

  static void grad_output_prep(const at::Tensor& g, at::Tensor* copy, at::Tensor* half,
                               at::Tensor* dbias) {
    check_dense(g, "grad_output");
    dispatch(g, [&](auto z) {
      using T = decltype(z);
      k::grad_output_prep<T>(cview<T>(g), mview_opt<T>(copy), mview_opt<T>(half),
                             dbias != nullptr ? dbias->data_ptr<double>() : nullptr, threads());
    });
  }

  static void phase_grad_scatter(const at::Tensor& g, at::Tensor& dp, at::Tensor* dbias) {
    check_dense(g, "grad_output");
    dispatch(g, [&](auto z) {
      using T = decltype(z);
      k::phase_grad_scatter<T>(cview<T>(g), dp.data_ptr<T>(),
                               dbias != nullptr ? dbias->data_ptr<double>() : nullptr, threads());
    });
  }

  static void bn_backward_reduce(const gi::BnBackward& b, const at::Tensor& dgamma,
                                 const at::Tensor& dbeta, at::Tensor& k1, at::Tensor& k2) {
    TORCH_CHECK(dgamma.stride(0) == dbeta.stride(0) && dgamma.stride(1) == 1 && dbeta.stride(1) == 1,
                "genblock (cpp backend): dgamma/dbeta must share a row stride");
    dispatch(b.x, [&](auto z) {
      using T = decltype(z);
      k::bn_relu_backward_reduce<T>(bn_args<T>(b), dgamma.data_ptr<T>(), dbeta.data_ptr<T>(),
                                    dgamma.stride(0), k1.data_ptr<double>(), k2.data_ptr<double>(),
                                    threads());
    });
  }

  static void bn_backward_apply(const gi::BnBackward& b, const at::Tensor& k1, const at::Tensor& k2,
                                const at::Tensor* add, at::Tensor& dx) {
    dispatch(b.x, [&](auto z) {
      using T = decltype(z);
      k::bn_relu_backward_apply<T>(bn_args<T>(b), k1.data_ptr<double>(), k2.data_ptr<double>(),
                                   cview_opt<T>(add), mview<T>(dx), threads());
    });
  }

  static void bn_backward_apply_phase(const gi::BnBackward& b, const at::Tensor& k1,
                                      const at::Tensor& k2, at::Tensor& dp, at::Tensor* dbias) {
    dispatch(b.x, [&](auto z) {
      using T = decltype(z);
      k::bn_relu_backward_apply_phase<T>(bn_args<T>(b), k1.data_ptr<double>(), k2.data_ptr<double>(),
                                         dp.data_ptr<T>(),
                                         dbias != nullptr ? dbias->data_ptr<double>() : nullptr,
                                         threads());
    });
  }
};

// ---------------------------------------------------------------------------------------------
// the algorithms of a block's two convs

using gi::ConvAlgo;
using gi::UpConvAlgo;

constexpr UpConvAlgo kUpConvAlgos[] = {UpConvAlgo::kPhase, UpConvAlgo::kGemm,
                                       UpConvAlgo::kUpsample};
constexpr ConvAlgo kConvAlgos[] = {ConvAlgo::kConv, ConvAlgo::kGemm};

// The candidates besides the default (phase / conv) of auto and timed: the gemm algorithms while
// their im2col matrix stays within kGemmMaxColsBytes or kGemmMaxColsPerWeight times the conv's
// weight (they win on small maps with many channels, where weights outweigh activations), the
// upsampled conv on maps of at most kUpsampleMaxPixels input pixels (where the phase split's
// padding wastes the most: 36% of its positions at 4x4, 21% at 8x8).
constexpr int64_t kGemmMaxColsBytes = int64_t{64} << 20;
constexpr int64_t kGemmMaxColsPerWeight = 4;
constexpr int64_t kUpsampleMaxPixels = 64;

bool gemm_candidate(int64_t cols_numel, int64_t weight_numel, int64_t itemsize) {
  const int64_t limit = std::max(kGemmMaxColsBytes, kGemmMaxColsPerWeight * weight_numel * itemsize);
  return cols_numel * itemsize <= limit;
}

/// The conv1 candidates of a block input (n, cin, h, w) -> cout.
std::vector<int64_t> up_conv_candidates(int64_t n, int64_t cin, int64_t cout, int64_t h, int64_t w,
                                        int64_t itemsize) {
  std::vector<int64_t> candidates{static_cast<int64_t>(UpConvAlgo::kPhase)};
  if (gemm_candidate(16 * n * h * w * cin, 9 * cin * cout, itemsize)) {
    candidates.push_back(static_cast<int64_t>(UpConvAlgo::kGemm));
  }
  if (h * w <= kUpsampleMaxPixels) candidates.push_back(static_cast<int64_t>(UpConvAlgo::kUpsample));
  return candidates;
}

/// The conv2 candidates of a block output (n, c, h, w).
std::vector<int64_t> conv_candidates(int64_t n, int64_t c, int64_t h, int64_t w, int64_t itemsize) {
  std::vector<int64_t> candidates{static_cast<int64_t>(ConvAlgo::kConv)};
  if (gemm_candidate(9 * n * h * w * c, 9 * c * c, itemsize)) {
    candidates.push_back(static_cast<int64_t>(ConvAlgo::kGemm));
  }
  return candidates;
}

/// auto's cost model (CostModel, algo_timing.h): microseconds of a forward + backward of each
/// algorithm, fitted by mgm_fast/algocost.py to the timed mode's timings of 76 convs (46 block
/// shapes: the tiny preset's blocks at batch 8, the host-floor size's at batch 2, the paper
/// preset's at batch 4 and 8, and 30 more, batch 2-32, 8-1024 channels, 4x4-64x64 maps) on a
/// 2-core Intel Xeon (AVX-512, 2 threads), committed as
/// benchmarks/results/cpu-2core-xeon/genblock/algo_timings.json. It picks the fastest candidate
/// for 74 of them (the other two are near ties, within 7 %), and its picks cost 1.2 % more than
/// the best ones. Sizes (modelled_micros) count the columns each algorithm reads: phase a 2x2 conv
/// with 4 cout outputs over the (h+1) x (w+1) padded map, gemm 4 taps per phase on the h x w map,
/// upsample the 3x3 conv of the 2h x 2w map.
constexpr CostModel kUpConvCost[] = {
    {195.8, 1.176e-3, 9.564e-4, 0.0, 7.535e-5, 6.781e-3},  // phase
    {28.9, 8.946e-3, 1.746e-3, 0.0, 2.268e-5, 1.739e-3},   // gemm
    {305.0, 1.465e-2, 0.0, 0.0, 1.889e-5, 3.505e-3}};      // upsample
constexpr CostModel kConv3Cost[] = {
    {163.7, 2.389e-3, 0.0, 0.0, 1.698e-5, 3.916e-3},  // conv
    {13.99, 1.117e-2, 0.0, 0.0, 2.076e-5, 0.0}};      // gemm

/// The modelled microseconds of a conv of the block: piece 0, conv1 of the block input
/// (n, cin, h, w) -> cout; piece 1, conv2 of the block output (n, cin = cout, h, w).
double modelled_micros(int piece, int64_t algo, int64_t n, int64_t cin, int64_t cout, int64_t h,
                       int64_t w) {
  const double nd = static_cast<double>(n), ci = static_cast<double>(cin);
  const double co = static_cast<double>(cout), hd = static_cast<double>(h), wd = static_cast<double>(w);
  const double input = nd * ci * hd * wd, weight = 9.0 * ci * co;
  if (piece == 1) {
    const double cols = 9.0 * nd * hd * wd * ci;
    return kConv3Cost[algo](input, nd * co * hd * wd, cols, cols * co, weight);
  }
  double cols = 0.0;
  switch (static_cast<UpConvAlgo>(algo)) {
    case UpConvAlgo::kPhase: cols = 4.0 * nd * (hd + 1.0) * (wd + 1.0) * ci; break;
    case UpConvAlgo::kGemm: cols = 16.0 * nd * hd * wd * ci; break;
    case UpConvAlgo::kUpsample: cols = 36.0 * nd * hd * wd * ci; break;
  }
  return kUpConvCost[algo](input, 4.0 * nd * co * hd * wd, cols, cols * co, weight);
}

/// auto's pick for a conv of the block (shapes as modelled_micros): the candidate of least
/// modelled time (the first of a tie).
int64_t modelled_algo(int piece, int64_t n, int64_t cin, int64_t cout, int64_t h, int64_t w,
                      int64_t itemsize) {
  const std::vector<int64_t> candidates = piece == 0 ? up_conv_candidates(n, cin, cout, h, w, itemsize)
                                                     : conv_candidates(n, cout, h, w, itemsize);
  int64_t best = candidates.front();
  double best_micros = modelled_micros(piece, best, n, cin, cout, h, w);
  for (const int64_t a : candidates) {
    const double micros = modelled_micros(piece, a, n, cin, cout, h, w);
    if (micros < best_micros) {
      best = a;
      best_micros = micros;
    }
  }
  return best;
}

/// A conv of the block: its name (in genblock_algos_cpu) and its environment variable.
struct PieceInfo {
  const char* name;
  const char* env;
};
constexpr PieceInfo kPieces[2] = {{"conv1", "MGM_FAST_GENBLOCK_ALGO"},
                                  {"conv2", "MGM_FAST_GENBLOCK_CONV2_ALGO"}};

const char* algo_name(int piece, int64_t algo) {
  return piece == 0 ? gi::algo_name(static_cast<UpConvAlgo>(algo))
                    : gi::algo_name(static_cast<ConvAlgo>(algo));
}

int64_t algo_count(int piece) {
  return piece == 0 ? static_cast<int64_t>(std::size(kUpConvAlgos))
                    : static_cast<int64_t>(std::size(kConvAlgos));
}

struct AlgoKey {
  int piece;
  int64_t n, cin, cout, h, w;  // the conv's input (n, cin, h, w) and output channels
  at::ScalarType dtype;
  auto tie() const { return std::tie(piece, n, cin, cout, h, w, dtype); }
  bool operator<(const AlgoKey& o) const { return tie() < o.tie(); }
};

ChoiceCache<AlgoKey>& algo_cache() {
  static ChoiceCache<AlgoKey> cache;
  return cache;
}

/// How a piece's algorithm is picked: its environment variable's algorithm (forced), the timed
/// mode, or auto's cost model (neither).
struct PieceMode {
  bool timed;
  std::optional<int64_t> forced;
};

PieceMode piece_mode(int piece) {
  const PieceInfo& p = kPieces[piece];
  const char* v = std::getenv(p.env);
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return {false, std::nullopt};
  if (std::strcmp(v, "timed") == 0) return {true, std::nullopt};
  std::string names = "auto, timed";
  for (int64_t a = 0; a < algo_count(piece); ++a) {
    if (std::strcmp(v, algo_name(piece, a)) == 0) return {false, a};
    names += std::string(", ") + algo_name(piece, a);
  }
  TORCH_CHECK_VALUE(false, "genblock (cpp backend): ", p.env, "=", v, " is not one of ", names);
  return {false, std::nullopt};
}

/// The fastest of the piece's candidates (algo_timing.h).
template <class Run>
AlgoChoice time_candidates(int piece, const std::vector<int64_t>& candidates, Run run) {
  return time_fastest(candidates, [piece](int64_t a) { return algo_name(piece, a); }, run);
}

/// The conv1 (nearest x2 + conv3x3) candidates of x (n, cin, h, w) and their timing runs: on a
/// constant stand-in activation (the time does not depend on the values, and the global random
/// stream stays untouched) with the block's w1, b1; the BN backward each includes runs on a
/// stand-in too (unit gamma, scale and rstd, zero mean and coefficients).
AlgoChoice time_up_conv(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1) {
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3), cout = w1.size(0);
  const std::vector<int64_t> candidates = up_conv_candidates(n, cin, cout, h, w, x.element_size());
  if (candidates.size() == 1) return {candidates.front(), {}, at::get_num_threads()};
  const at::Tensor act =
      at::full({n, cin, h, w}, 0.5, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const at::TensorOptions dopt = x.options().dtype(at::kDouble);
  at::Tensor hh = gi::empty4(x, n, cout, 2 * h, 2 * w, at::MemoryFormat::ChannelsLast);
  at::Tensor hmean = at::empty({cout}, dopt), hvar = at::empty({cout}, dopt);
  const at::Tensor ones = at::ones({n, cout}, x.options());
  const at::Tensor mean = at::zeros({cout}, dopt), rstd = at::ones({cout}, dopt);
  const at::Tensor k1 = at::zeros({cout}, dopt), k2 = at::zeros({cout}, dopt);
  at::Tensor db = at::empty({cout}, dopt);
  return time_candidates(0, candidates, [&](int64_t a) {
    const auto algo = static_cast<UpConvAlgo>(a);
    gi::up_conv_forward<CpuGenblockKernels>(algo, act, w1, b1, hh, &hmean, &hvar);
    const gi::BnBackward bn{hh, hh, hh, ones, ones, mean, rstd, true};
    gi::up_conv_backward<CpuGenblockKernels>(algo, bn, k1, k2, act, w1, db);
  });
}

/// The conv2 (conv3x3 at the output resolution) candidates and their timing runs (constant
/// stand-in activation and gradient, the block's w2).
AlgoChoice time_conv(const at::Tensor& x, const at::Tensor& w2) {
  const int64_t n = x.size(0), c = w2.size(0), h = 2 * x.size(2), w = 2 * x.size(3);
  const std::vector<int64_t> candidates = conv_candidates(n, c, h, w, x.element_size());
  if (candidates.size() == 1) return {candidates.front(), {}, at::get_num_threads()};
  const at::TensorOptions cl = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  const at::Tensor act = at::full({n, c, h, w}, 0.5, cl), g = at::full({n, c, h, w}, 0.25, cl);
  return time_candidates(1, candidates, [&](int64_t a) {
    const auto algo = static_cast<ConvAlgo>(a);
    gi::conv3x3_forward<CpuGenblockKernels>(algo, act, w2);
    gi::conv3x3_backward<CpuGenblockKernels>(algo, g, act, w2);
  });
}

/// The algorithm of one conv of a block call on x (n, cin, h, w): forced; else the cache's (timed
/// earlier in this process, or restored from a checkpoint); else timed now (timed) or the cost
/// model's (auto, not cached: it is a function of the shape).
template <class Time>
int64_t choose_algo(int piece, const at::Tensor& x, int64_t cout, Time time) {
  const PieceMode m = piece_mode(piece);
  if (m.forced) return *m.forced;
  const int64_t up = piece == 0 ? 1 : 2;
  const AlgoKey key{piece, x.size(0), piece == 0 ? x.size(1) : cout, cout, up * x.size(2),
                    up * x.size(3), x.scalar_type()};
  if (const auto cached = algo_cache().find(key)) return *cached;
  if (!m.timed) return modelled_algo(piece, key.n, key.cin, key.cout, key.h, key.w, x.element_size());
  return algo_cache().insert(key, time());
}

/// The saved algorithms: an int64 tensor (conv1 algorithm, conv2 algorithm).
at::Tensor algo_tensor(UpConvAlgo a1, ConvAlgo a2) {
  at::Tensor t = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  t.data_ptr<int64_t>()[0] = static_cast<int64_t>(a1);
  t.data_ptr<int64_t>()[1] = static_cast<int64_t>(a2);
  return t;
}

std::pair<UpConvAlgo, ConvAlgo> algos_of(const at::Tensor& t) {
  TORCH_CHECK_VALUE(
      t.device().is_cpu() && t.dim() == 1 && t.numel() == 2 && t.scalar_type() == at::kLong,
      "genblock (cpp backend): the saved algorithms must be a CPU int64 tensor of 2 values");
  const at::Tensor c = t.contiguous();
  const int64_t* v = c.data_ptr<int64_t>();
  for (int piece = 0; piece < 2; ++piece) {
    TORCH_CHECK_VALUE(v[piece] >= 0 && v[piece] < algo_count(piece),
                      "genblock (cpp backend): unknown saved ", kPieces[piece].name, " algorithm ",
                      v[piece]);
  }
  return {static_cast<UpConvAlgo>(v[0]), static_cast<ConvAlgo>(v[1])};
}

/// The cache as rows (conv, n, cin, cout, h, w, dtype, threads, chosen, {algorithm: seconds});
/// h, w: the conv's input size (conv1: the block's input; conv2: its output); threads: ATen's
/// thread count when it was chosen.
using AlgoRow = std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t, std::string,
                           int, std::string, std::map<std::string, double>>;

std::vector<AlgoRow> block_algos() {
  std::vector<AlgoRow> rows;
  for (const auto& [k, c] : algo_cache().entries()) {
    rows.emplace_back(kPieces[k.piece].name, k.n, k.cin, k.cout, k.h, k.w,
                      std::string(c10::toString(k.dtype)), c.threads, algo_name(k.piece, c.algo),
                      c.seconds);
  }
  return rows;
}

void clear_block_algos() { algo_cache().clear(); }

/// Rows (conv, n, cin, cout, h, w, dtype, chosen) of an earlier block_algos(), e.g. from a
/// checkpoint: the cache takes these choices as if auto had made them (a resumed run computes with
/// the algorithms of the run it continues, whatever this process's timing would pick).
using AlgoChoiceRow = std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t, std::string,
                                 std::string>;

int piece_named(const std::string& conv) {
  for (int p = 0; p < 2; ++p) {
    if (conv == kPieces[p].name) return p;
  }
  TORCH_CHECK_VALUE(false, "genblock (cpp backend): unknown conv '", conv, "' (conv1 or conv2)");
  return -1;
}

at::ScalarType dtype_named(const std::string& name) {
  for (const at::ScalarType t : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    if (name == c10::toString(t)) return t;
  }
  TORCH_CHECK_VALUE(false, "genblock (cpp backend): unknown dtype '", name, "'");
  return at::kFloat;
}

void set_block_algos(const std::vector<AlgoChoiceRow>& rows) {
  std::map<AlgoKey, AlgoChoice> parsed;
  for (const auto& [conv, n, cin, cout, h, w, dtype_name, chosen] : rows) {
    const int piece = piece_named(conv);
    const at::ScalarType dtype = dtype_named(dtype_name);
    std::optional<int64_t> algo;
    for (int64_t a = 0; a < algo_count(piece); ++a) {
      if (chosen == algo_name(piece, a)) algo = a;
    }
    TORCH_CHECK_VALUE(algo.has_value(), "genblock (cpp backend): unknown ", conv, " algorithm '", chosen, "'");
    parsed[AlgoKey{piece, n, cin, cout, h, w, dtype}] = AlgoChoice{*algo, {}, 0};
  }
  algo_cache().assign(std::move(parsed));
}

/// The algorithm a block call would use for a conv of the shape (conv, n, cin, cout, h, w, dtype
/// as genblock_algos_cpu names them), by name: forced, restored or timed earlier, or auto's model;
/// None when the timed mode has not timed the shape yet.
std::optional<std::string> block_algo(const std::string& conv, int64_t n, int64_t cin, int64_t cout,
                                      int64_t h, int64_t w, const std::string& dtype_name) {
  const int piece = piece_named(conv);
  const at::ScalarType dtype = dtype_named(dtype_name);
  const PieceMode m = piece_mode(piece);
  if (m.forced) return algo_name(piece, *m.forced);
  if (const auto cached = algo_cache().find(AlgoKey{piece, n, cin, cout, h, w, dtype})) {
    return algo_name(piece, *cached);
  }
  if (m.timed) return std::nullopt;
  return algo_name(piece, modelled_algo(piece, n, cin, cout, h, w, c10::elementSize(dtype)));
}

// Inputs of the CPU entry points must be CPU tensors (the Python side dispatches by device).
void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "genblock (cpp backend): ", name,
                    " must be a CPU tensor, got device ", t.device());
}

std::vector<at::Tensor> cbn_relu_conv_forward_cpu(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const at::Tensor& running_mean, const at::Tensor& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, bool upsample) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  pybind11::gil_scoped_release no_gil;
  return gi::piece_forward<CpuGenblockKernels>(x, gamma, beta, weight, bias, residual, running_mean,
                                               running_var, num_batches_tracked, training, momentum,
                                               eps, upsample);
}

std::vector<at::Tensor> cbn_relu_conv_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& act, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
    bool training, bool upsample, bool has_bias, int64_t residual_mode, bool need_x,
    bool need_gamma_beta, bool x_channels_last) {
  check_cpu(grad, "grad_output");
  pybind11::gil_scoped_release no_gil;
  return gi::piece_backward<CpuGenblockKernels>(grad, x, act, weight, gamma, scale, mean, rstd,
                                                training, upsample, has_bias, residual_mode, need_x,
                                                need_gamma_beta, x_channels_last);
}

std::vector<at::Tensor> genblock_forward_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& embed1, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& embed2, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& rm1, const at::Tensor& rv1,
    const std::optional<at::Tensor>& nbt1, const at::Tensor& rm2, const at::Tensor& rv2,
    const std::optional<at::Tensor>& nbt2, bool training, std::optional<double> momentum,
    double eps) {
  check_cpu(x, "x");
  check_cpu(y, "y");
  pybind11::gil_scoped_release no_gil;
  const int64_t cout = w1.size(0);
  const auto a1 =
      static_cast<UpConvAlgo>(choose_algo(0, x, cout, [&] { return time_up_conv(x, w1, b1); }));
  const auto a2 = static_cast<ConvAlgo>(choose_algo(1, x, cout, [&] { return time_conv(x, w2); }));
  std::vector<at::Tensor> out = gi::block_forward<CpuGenblockKernels>(
      x, y, embed1, w1, b1, embed2, w2, b2, w0, b0, rm1, rv1, nbt1, rm2, rv2, nbt2, training,
      momentum, eps, a1, a2);
  out.push_back(algo_tensor(a1, a2));
  return out;
}

std::vector<at::Tensor> genblock_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& act1,
    const at::Tensor& hh, const at::Tensor& act2, const at::Tensor& mean1, const at::Tensor& rstd1,
    const at::Tensor& scale1, const at::Tensor& gb1, const at::Tensor& mean2,
    const at::Tensor& rstd2, const at::Tensor& scale2, const at::Tensor& gb2,
    const at::Tensor& algo, const at::Tensor& embed1, const at::Tensor& w1,
    const at::Tensor& embed2, const at::Tensor& w2, const at::Tensor& w0, bool training,
    bool need_x, bool x_channels_last) {
  check_cpu(grad, "grad_output");
  const auto [a1, a2] = algos_of(algo);
  pybind11::gil_scoped_release no_gil;
  return gi::block_backward<CpuGenblockKernels>(grad, x, y, act1, hh, act2, mean1, rstd1, scale1,
                                                gb1, mean2, rstd2, scale2, gb2, embed1, w1, embed2,
                                                w2, w0, training, need_x, x_channels_last, a1, a2);
}

}  // namespace

void register_genblock(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cbn_relu_conv_forward_cpu", &cbn_relu_conv_forward_cpu, py::arg("x"), py::arg("gamma"),
        py::arg("beta"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("num_batches_tracked"),
        py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("upsample"),
        "Fused conditional BN + ReLU (+ nearest x2) + conv3x3 (+ residual) on the CPU: "
        "[out, xs, act, mean, rstd, scale].");
  m.def("cbn_relu_conv_backward_cpu", &cbn_relu_conv_backward_cpu, py::arg("grad"), py::arg("x"),
        py::arg("act"), py::arg("weight"), py::arg("gamma"), py::arg("scale"), py::arg("mean"),
        py::arg("rstd"), py::arg("training"), py::arg("upsample"), py::arg("has_bias"),
        py::arg("residual_mode"), py::arg("need_x"), py::arg("need_gamma_beta"),
        py::arg("x_channels_last"),
        "Backward of cbn_relu_conv_forward_cpu (x: the channels_last xs it returned): "
        "[dx, dgamma, dbeta, dweight, dbias, dresidual].");
  m.def("genblock_forward_cpu", &genblock_forward_cpu, py::arg("x"), py::arg("y"),
        py::arg("embed1"), py::arg("w1"), py::arg("b1"), py::arg("embed2"), py::arg("w2"),
        py::arg("b2"), py::arg("w0"), py::arg("b0"), py::arg("running_mean1"),
        py::arg("running_var1"), py::arg("num_batches_tracked1"), py::arg("running_mean2"),
        py::arg("running_var2"), py::arg("num_batches_tracked2"), py::arg("training"),
        py::arg("momentum"), py::arg("eps"),
        "Fused GenBlock forward on the CPU: [out, saved tensors for genblock_backward_cpu...]; "
        "the last saved tensor holds the algorithms used, int64 (conv1: 0 phase, 1 gemm, "
        "2 upsample; conv2: 0 conv, 1 gemm).");
  m.def("genblock_backward_cpu", &genblock_backward_cpu, py::arg("grad"), py::arg("x"),
        py::arg("y"), py::arg("act1"), py::arg("h"), py::arg("act2"), py::arg("mean1"),
        py::arg("rstd1"), py::arg("scale1"), py::arg("gb1"), py::arg("mean2"), py::arg("rstd2"),
        py::arg("scale2"), py::arg("gb2"), py::arg("algo"), py::arg("embed1"), py::arg("w1"),
        py::arg("embed2"), py::arg("w2"), py::arg("w0"), py::arg("training"), py::arg("need_x"),
        py::arg("x_channels_last"),
        "Fused GenBlock backward on the CPU (x: the channels_last xs the forward returned; algo: "
        "the algorithms it saved): [dx, dembed1, dw1, db1, dembed2, dw2, db2, dw0, db0].");
  m.def("genblock_algo_cpu", &block_algo, py::arg("conv"), py::arg("n"), py::arg("cin"),
        py::arg("cout"), py::arg("h"), py::arg("w"), py::arg("dtype") = "Float",
        "The algorithm a block call would use for the conv (conv1 or conv2) of this shape (as "
        "genblock_algos_cpu names it: h, w the conv's input size): forced, restored or timed "
        "earlier, or auto's cost model; None when MGM_FAST_GENBLOCK_ALGO / "
        "MGM_FAST_GENBLOCK_CONV2_ALGO is timed and the shape was not timed yet.");
  m.def("genblock_algos_cpu", &block_algos,
        "The conv algorithms the timed mode chose (MGM_FAST_GENBLOCK_ALGO / "
        "MGM_FAST_GENBLOCK_CONV2_ALGO=timed) or a checkpoint restored so far: rows (conv, n, cin, cout, h, w, dtype, threads, chosen, {algorithm: best "
        "forward+backward seconds of the timed candidates}); h, w: the conv's input size; threads: "
        "ATen's thread count when it was chosen (the choice holds for any count).");
  m.def("genblock_algos_set_cpu", &set_block_algos, py::arg("rows"),
        "Takes the choices of rows (conv, n, cin, cout, h, w, dtype, chosen) -- the first six and "
        "the chosen algorithm's name as genblock_algos_cpu lists them -- as the choices for those "
        "shapes, over auto's model and timed's timing (a resumed run uses the algorithms of the "
        "run it continues); threads 0, no times.");
  m.def("genblock_algos_clear_cpu", &clear_block_algos,
        "Forgets the timed and restored choices (the next call of each shape chooses again).");
}

}  // namespace bindings
}  // namespace mgm_fast
