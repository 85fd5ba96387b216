// The fused GenBlock composed from ATen convolutions and the memory-bound kernels of one device.
// Device-agnostic: `K` is a kernel policy (CpuGenblockKernels in genblock.cpp, CudaGenblockKernels
// in cuda/genblock_cuda.cpp) whose static functions run csrc/kernels/{cpu,cuda}/genblock.* on
// at::Tensor arguments. The composition below is therefore the same code on both devices, and the
// CPU tests exercise it. Formulas: csrc/kernels/cpu/genblock.h; autograd: mgm_fast/ops/genblock.py.
//
// Layouts: tensors the caller sees (x, the output, the residual, gradients) keep x's memory
// format (NCHW or channels_last). Internal tensors -- prologue activations, conv inputs/outputs,
// the intermediate h of a block -- are channels_last, the format oneDNN and cuDNN convolve
// fastest; the kernels convert on the fly while they read or write.
//
// Entry points (registered as <name>_cpu / <name>_cuda):
//   cbn_relu_conv_forward   one piece: conditional BN + ReLU (+ nearest x2) + conv3x3 (+ residual)
//   cbn_relu_conv_backward  its gradients
//   genblock_forward        a whole GenBlock: piece(up) -> piece(+ 1x1 shortcut at low resolution)
//   genblock_backward       its gradients (embedding rows, weights, biases, x)
//
// Both convs of a block have several algorithms: the first (nearest x2 + conv3x3 of act1)
// UpConvAlgo, the second (conv3x3 of act2) ConvAlgo. The caller picks them per call (the CPU
// binding by a cached one-time timing per shape) and passes the same ones to the backward; every
// algorithm saves the same tensors. The CUDA binding keeps the defaults (phase, conv): its policy
// has no im2col kernels for the gemm algorithms.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace mgm_fast {
namespace bindings {
namespace genblock_impl {

inline const char* kOp = "genblock";

/// Memory format a kernel sees: NCHW or channels_last (anything else is made NCHW first).
inline at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

inline bool is_pixels(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat format_of(const at::Tensor& t) {
  return is_pixels(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::Tensor empty4(const at::Tensor& like, int64_t n, int64_t c, int64_t h, int64_t w,
                         at::MemoryFormat format) {
  return at::empty({n, c, h, w}, like.options().memory_format(format));
}

inline at::Tensor conv(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t padding) {
  at::Tensor out = at::convolution(input, weight, bias, {1, 1}, {padding, padding}, {1, 1}, false,
                                   {0, 0}, 1);
  return out;
}

/// A channels_last (n, c, h, w) tensor as the (n*h*w, c) matrix of its pixels (a view).
inline at::Tensor pixel_matrix(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

/// The (n, c, h, w) channels_last view of a contiguous (n*h*w, c) pixel matrix.
inline at::Tensor from_pixel_matrix(const at::Tensor& m, int64_t n, int64_t h, int64_t w) {
  return m.view({n, h, w, m.size(1)}).permute({0, 3, 1, 2});
}

/// (grad_input, grad_weight) of a stride-1 convolution without bias.
inline std::pair<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad, const at::Tensor& input,
                                                       const at::Tensor& weight, int64_t padding,
                                                       bool need_input) {
  auto res = at::convolution_backward(grad, input, weight, std::nullopt, {1, 1}, {padding, padding},
                                      {1, 1}, false, {0, 0}, 1, {need_input, true, false});
  return {std::get<0>(res), std::get<1>(res)};
}

/// torch.nn.BatchNorm2d's running-statistics update: num_batches_tracked += 1, then
/// r = (1 - m) r + m * stat with the unbiased variance (m = 1 / num_batches_tracked when
/// momentum is None, which reads the counter on the host, as torch does).
/// Returns the factor m after counting the batch.
inline double count_batch(const std::optional<at::Tensor>& num_batches_tracked,
                          std::optional<double> momentum) {
  if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);
  if (momentum.has_value()) return *momentum;
  TORCH_CHECK_VALUE(num_batches_tracked.has_value(), kOp,
                    ": momentum=None needs num_batches_tracked (cumulative average)");
  return 1.0 / num_batches_tracked->item<double>();
}

/// The update with ATen ops (any device and dtype); mean/var (c,) double.
inline void update_running_aten(const at::Tensor& running_mean, const at::Tensor& running_var,
                                const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                double m) {
  at::NoGradGuard no_grad;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  running_mean.copy_(mean * m + running_mean.to(at::kDouble) * (1.0 - m));
  running_var.copy_(var * (unbias * m) + running_var.to(at::kDouble) * (1.0 - m));
}

/// Statistics used by the prologue: batch statistics (training; taken from `given` when the
/// producer of x already computed them) with the running update, or the running statistics.
template <class K>
std::pair<at::Tensor, at::Tensor> prologue_stats(const at::Tensor& x, const at::Tensor& running_mean,
                                                 const at::Tensor& running_var,
                                                 const std::optional<at::Tensor>& num_batches_tracked,
                                                 const std::optional<at::Tensor>& given_mean,
                                                 const std::optional<at::Tensor>& given_var,
                                                 bool training, std::optional<double> momentum) {
  if (!training) return {running_mean.to(at::kDouble), running_var.to(at::kDouble)};
  const int64_t count = x.size(0) * x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(count > 1, kOp, ": expected more than 1 value per channel when training, got x of size ",
                    x.sizes());
  at::Tensor mean, var;
  if (given_mean.has_value() && given_var.has_value()) {
    mean = *given_mean;
    var = *given_var;
  } else {
    std::tie(mean, var) = K::stats(x);
  }
  if (running_mean.defined()) {
    const double m = count_batch(num_batches_tracked, momentum);
    K::update_running(running_mean, running_var, mean, var, count, m);
  }
  return {mean, var};
}

/// Inputs of the backward pass through ReLU(conditional BN).
struct BnBackward {
  at::Tensor x, act, dact;  // dact: gradient w.r.t. act
  at::Tensor gamma;         // (n, c) view, unit column stride
  at::Tensor scale;         // (n, c) contiguous
  at::Tensor mean, rstd;    // (c,) double
  bool training;
};

// ---------------------------------------------------------------------------------------------
// nearest x2 + conv3x3: the algorithms

/// How conv3x3(up2(a)) of a block's first piece is computed (a: (n, cin, h, w) channels_last).
enum class UpConvAlgo : int64_t {
  /// One 2x2 conv with 4*cout outputs (the phase weights) over the low-resolution map padded to
  /// (h+1) x (w+1), interleaved by the epilogue: 16 taps per output pixel, but (h+1)(w+1)/(hw)
  /// of the work (1.56x at 4x4, 1.13x at 16x16).
  kPhase = 0,
  /// The same phases on the h x w pixels only: one GEMM per phase over im2col rows of 4 taps
  /// (n*h*w, 4*cin) x (4*cin, cout). No padded positions; the im2col copy is 16x the size of a.
  /// Needs the policy's compact_* kernels (CPU).
  kGemm = 1,
  /// up2(a) materialised, then the plain 3x3 conv at 2h x 2w: 36 taps per output pixel, one
  /// large conv (what the plain-PyTorch block does).
  kUpsample = 2,
};

/// How the second conv of a block (conv3x3 of act2 at the output resolution) is computed.
enum class ConvAlgo : int64_t {
  /// ATen's convolution (oneDNN / cuDNN) on channels_last tensors.
  kConv = 0,
  /// 3x3 im2col (n*h*w, 9*c) in the column order of the contiguous weight, and GEMMs that read
  /// the weight and write its gradient in place: no weight reorders, which dominate small maps
  /// with many channels. Needs the policy's conv3_* kernels (CPU).
  kGemm = 1,
};

inline const char* algo_name(UpConvAlgo a) {
  switch (a) {
    case UpConvAlgo::kPhase: return "phase";
    case UpConvAlgo::kGemm: return "gemm";
    case UpConvAlgo::kUpsample: return "upsample";
  }
  return "?";
}

inline const char* algo_name(ConvAlgo a) {
  switch (a) {
    case ConvAlgo::kConv: return "conv";
    case ConvAlgo::kGemm: return "gemm";
  }
  return "?";
}

/// Whether the kernel policy K has the im2col kernels of the kGemm algorithms.
template <class K, class = void>
struct has_gemm_kernels : std::false_type {};
template <class K>
struct has_gemm_kernels<K, std::void_t<decltype(&K::compact_im2col), decltype(&K::conv3_im2col)>>
    : std::true_type {};

inline at::Tensor upsample2(const at::Tensor& a) {
  return at::upsample_nearest2d(a, {2 * a.size(2), 2 * a.size(3)})
      .contiguous(at::MemoryFormat::ChannelsLast);
}

/// hh (n, cout, 2h, 2w, channels_last) = conv3x3(up2(act), w) + bias, with the statistics of hh
/// into hmean/hvar (c,) double when they are given.
template <class K>
void up_conv_forward(UpConvAlgo algo, const at::Tensor& act, const at::Tensor& w,
                     const at::Tensor& bias, at::Tensor& hh, at::Tensor* hmean, at::Tensor* hvar) {
  switch (algo) {
    case UpConvAlgo::kPhase: {
      at::Tensor p = conv(act, K::phase_weights(w), std::nullopt, 1)
                         .contiguous(at::MemoryFormat::ChannelsLast);
      K::phase_epilogue(p, bias, std::nullopt, false, hh, hmean, hvar);
      return;
    }
    case UpConvAlgo::kUpsample: {
      at::Tensor y = conv(upsample2(act), K::conv_weight(w), std::nullopt, 1)
                         .contiguous(at::MemoryFormat::ChannelsLast);
      K::conv_epilogue(y, bias, std::nullopt, false, hh, hmean, hvar);
      return;
    }
    case UpConvAlgo::kGemm: {
      if constexpr (has_gemm_kernels<K>::value) {
        // P (4, n*h*w, cout) = A (4, n*h*w, 4 cin) x Wp^T, Wp (4, cout, 4 cin)
        const at::Tensor wp = K::compact_phase_weights(w);
        const at::Tensor p = at::bmm(K::compact_im2col(act), wp.transpose(1, 2));
        K::compact_phase_epilogue(p, bias, hh, hmean, hvar);
        return;
      }
      break;
    }
  }
  TORCH_CHECK(false, kOp, ": up-conv algorithm ", algo_name(algo), " is not available here");
}

/// Backward of up_conv_forward followed by ReLU(CBN) (bn: the backward through the CBN of hh,
/// k1/k2 its reduce coefficients): returns {d act (channels_last), d w}; dbias (c,) double.
template <class K>
std::pair<at::Tensor, at::Tensor> up_conv_backward(UpConvAlgo algo, const BnBackward& bn,
                                                   const at::Tensor& k1, const at::Tensor& k2,
                                                   const at::Tensor& act, const at::Tensor& w,
                                                   at::Tensor& dbias) {
  const int64_t n = act.size(0), cin = act.size(1), h = act.size(2), wd = act.size(3);
  const int64_t cout = w.size(0);
  switch (algo) {
    case UpConvAlgo::kPhase: {
      // the BN backward written straight into the phase layout of the conv
      at::Tensor dp = empty4(act, n, 4 * cout, h + 1, wd + 1, at::MemoryFormat::ChannelsLast);
      K::bn_backward_apply_phase(bn, k1, k2, dp, &dbias);
      auto r = conv_backward(dp, act, K::phase_weights(w), 1, true);
      return {r.first, K::phase_weights_backward(r.second)};
    }
    case UpConvAlgo::kUpsample: {
      at::Tensor dh = empty4(act, n, cout, 2 * h, 2 * wd, at::MemoryFormat::ChannelsLast);
      K::bn_backward_apply(bn, k1, k2, nullptr, dh);
      K::grad_output_prep(dh, nullptr, nullptr, &dbias);
      auto r = conv_backward(dh, upsample2(act), K::conv_weight(w), 1, true);
      at::Tensor da = empty4(act, n, cin, h, wd, at::MemoryFormat::ChannelsLast);
      K::grad_output_prep(dense(r.first), nullptr, &da, nullptr);  // up2's adjoint: 2x2 sums
      return {da, r.second.contiguous()};
    }
    case UpConvAlgo::kGemm: {
      if constexpr (has_gemm_kernels<K>::value) {
        at::Tensor dp = at::empty({4, n * h * wd, cout}, act.options());
        K::bn_backward_apply_compact_phase(bn, k1, k2, dp, &dbias);
        const at::Tensor wp = K::compact_phase_weights(w);
        const at::Tensor da = K::compact_col2im(at::bmm(dp, wp), n, cin, h, wd);
        return {da, K::compact_phase_weights_grad(dp, K::compact_im2col(act))};
      }
      break;
    }
  }
  TORCH_CHECK(false, kOp, ": up-conv algorithm ", algo_name(algo), " is not available here");
}

/// y (n, cout, h, w, channels_last) = conv3x3(act, w) with padding 1, no bias.
template <class K>
at::Tensor conv3x3_forward(ConvAlgo algo, const at::Tensor& act, const at::Tensor& w) {
  if (algo == ConvAlgo::kGemm) {
    if constexpr (has_gemm_kernels<K>::value) {
      const at::Tensor wm = w.contiguous().view({w.size(0), -1});  // (cout, 9 cin), read in place
      return from_pixel_matrix(at::mm(K::conv3_im2col(act), wm.t()), act.size(0), act.size(2),
                               act.size(3));
    }
    TORCH_CHECK(false, kOp, ": conv algorithm gemm is not available here");
  }
  return conv(act, K::conv_weight(w), std::nullopt, 1).contiguous(at::MemoryFormat::ChannelsLast);
}

/// {d act (channels_last), d w (contiguous)} of conv3x3_forward from g, its output's gradient
/// (channels_last).
template <class K>
std::pair<at::Tensor, at::Tensor> conv3x3_backward(ConvAlgo algo, const at::Tensor& g,
                                                   const at::Tensor& act, const at::Tensor& w) {
  if (algo == ConvAlgo::kGemm) {
    if constexpr (has_gemm_kernels<K>::value) {
      const at::Tensor gm = pixel_matrix(g);  // (n*h*w, cout)
      const at::Tensor wm = w.contiguous().view({w.size(0), -1});
      const at::Tensor da = K::conv3_col2im(at::mm(gm, wm), act.size(0), act.size(1), act.size(2),
                                            act.size(3));
      return {da, at::mm(gm.t(), K::conv3_im2col(act)).view(w.sizes())};
    }
    TORCH_CHECK(false, kOp, ": conv algorithm gemm is not available here");
  }
  auto r = conv_backward(g, act, K::conv_weight(w), 1, true);
  return {r.first, r.second.contiguous()};
}

// ---------------------------------------------------------------------------------------------
// one piece

/// Returns {out, xs, act, mean, rstd, scale}: out (n, cout, ho, wo) in x's memory format; xs = x
/// in channels_last (x itself, or the copy the prologue writes on the way) and act the
/// channels_last prologue output, both saved for backward; mean/rstd (c,) double; scale (n, c).
template <class K>
std::vector<at::Tensor> piece_forward(const at::Tensor& x_in, const at::Tensor& gamma,
                                      const at::Tensor& beta, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual,
                                      const at::Tensor& running_mean, const at::Tensor& running_var,
                                      const std::optional<at::Tensor>& num_batches_tracked,
                                      bool training, std::optional<double> momentum, double eps,
                                      bool upsample) {
  const at::Tensor x = dense(x_in);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t cout = weight.size(0);
  const int64_t ho = upsample ? 2 * h : h, wo = upsample ? 2 * w : w;
  auto [mean, var] = prologue_stats<K>(x, running_mean, running_var, num_batches_tracked,
                                       std::nullopt, std::nullopt, training, momentum);
  const at::ScalarType pt = K::param_dtype(x);
  auto [rstd, scale, shift] = K::scale_shift(gamma.to(pt), beta.to(pt), mean, var, eps, x);
  at::Tensor act = empty4(x, n, c, h, w, at::MemoryFormat::ChannelsLast);
  at::Tensor xs = is_pixels(x) ? x : empty4(x, n, c, h, w, at::MemoryFormat::ChannelsLast);
  K::affine_relu(x, scale, shift, act, is_pixels(x) ? nullptr : &xs);

  at::Tensor out = empty4(x, n, cout, ho, wo, format_of(x));
  std::optional<at::Tensor> res;
  bool half = false;
  if (residual.has_value()) {
    res = dense(*residual);
    half = res->size(2) != ho;
  }
  if (upsample) {
    at::Tensor p = conv(act, K::phase_weights(weight), std::nullopt, 1)
                       .contiguous(at::MemoryFormat::ChannelsLast);
    K::phase_epilogue(p, bias, res, half, out, nullptr, nullptr);
  } else if (!res.has_value() && is_pixels(x)) {
    out = conv(act, K::conv_weight(weight), bias, 1).contiguous(at::MemoryFormat::ChannelsLast);
  } else {
    at::Tensor y = conv(act, K::conv_weight(weight), std::nullopt, 1)
                       .contiguous(at::MemoryFormat::ChannelsLast);
    K::conv_epilogue(y, bias, res, half, out, nullptr, nullptr);
  }
  return {out, xs, act, mean, rstd, scale};
}

/// Returns {dx, dgamma, dbeta, dweight, dbias, dresidual} (undefined where not requested or
/// absent). xs: x in channels_last (from piece_forward); dx takes channels_last when
/// x_channels_last, else NCHW. residual_mode: 0 none, 1 the output's size, 2 half of it.
template <class K>
std::vector<at::Tensor> piece_backward(const at::Tensor& grad_in, const at::Tensor& x,
                                       const at::Tensor& act, const at::Tensor& weight,
                                       const at::Tensor& gamma, const at::Tensor& scale,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       bool training, bool upsample, bool has_bias,
                                       int64_t residual_mode, bool need_x, bool need_gamma_beta,
                                       bool x_channels_last) {
  const at::Tensor g = dense(grad_in);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t cout = weight.size(0);
  const bool need_act = need_x || need_gamma_beta;
  at::Tensor dbias_d = has_bias ? at::empty({cout}, x.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor dres;
  if (residual_mode == 1) dres = g;
  if (residual_mode == 2) dres = empty4(g, n, cout, g.size(2) / 2, g.size(3) / 2, format_of(g));

  at::Tensor dact, dweight;
  if (upsample) {
    at::Tensor dp = empty4(x, n, 4 * cout, h + 1, w + 1, at::MemoryFormat::ChannelsLast);
    K::phase_grad_scatter(g, dp, has_bias ? &dbias_d : nullptr);
    if (residual_mode == 2) K::grad_output_prep(g, nullptr, &dres, nullptr);
    auto r = conv_backward(dp, act, K::phase_weights(weight), 1, need_act);
    dact = r.first;
    dweight = K::phase_weights_backward(r.second);
  } else {
    at::Tensor gp = g;
    const bool copy = !is_pixels(g);
    if (copy) gp = empty4(g, n, cout, h, w, at::MemoryFormat::ChannelsLast);
    if (copy || has_bias || residual_mode == 2) {
      K::grad_output_prep(g, copy ? &gp : nullptr, residual_mode == 2 ? &dres : nullptr,
                          has_bias ? &dbias_d : nullptr);
    }
    auto r = conv_backward(gp, act, K::conv_weight(weight), 1, need_act);
    dact = r.first;
    dweight = r.second.contiguous();
  }
  at::Tensor dx, dgamma, dbeta;
  if (need_act) {
    BnBackward bn{x, act, dense(dact), gamma.to(K::param_dtype(x)), scale, mean, rstd, training};
    at::Tensor dgb = at::empty({n, 2 * c}, scale.options());
    at::Tensor k1 = at::empty({c}, x.options().dtype(at::kDouble));
    at::Tensor k2 = at::empty({c}, x.options().dtype(at::kDouble));
    K::bn_backward_reduce(bn, dgb.narrow(1, 0, c), dgb.narrow(1, c, c), k1, k2);
    dgamma = dgb.narrow(1, 0, c).to(gamma.scalar_type());
    dbeta = dgb.narrow(1, c, c).to(gamma.scalar_type());
    if (need_x) {
      dx = empty4(x, n, c, h, w,
                  x_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
      K::bn_backward_apply(bn, k1, k2, nullptr, dx);
    }
  }
  at::Tensor dbias = has_bias ? dbias_d.to(weight.scalar_type()) : at::Tensor();
  return {dx, dgamma, dbeta, dweight, dbias, dres};
}

// ---------------------------------------------------------------------------------------------
// a whole GenBlock

/// Returns {out, xs, act1, h, act2, mean1, rstd1, scale1, gb1, mean2, rstd2, scale2, gb2}; out
/// in x's memory format, the rest saved for backward (xs = x in channels_last, gb = embed[y],
/// (n, 2c) rows of gamma | beta).
template <class K>
std::vector<at::Tensor> block_forward(
    const at::Tensor& x_in, const at::Tensor& y, const at::Tensor& embed1, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& embed2, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& rm1, const at::Tensor& rv1,
    const std::optional<at::Tensor>& nbt1, const at::Tensor& rm2, const at::Tensor& rv2,
    const std::optional<at::Tensor>& nbt2, bool training, std::optional<double> momentum,
    double eps, UpConvAlgo algo = UpConvAlgo::kPhase, ConvAlgo algo2 = ConvAlgo::kConv) {
  const at::Tensor x = dense(x_in);
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t cout = w1.size(0);
  const at::ScalarType pt = K::param_dtype(x);

  // piece 1: prologue of x, up-conv (algo), bias + statistics of h in its epilogue
  const at::Tensor gb1 = embed1.index_select(0, y).to(pt);
  auto [mean1, var1] = prologue_stats<K>(x, rm1, rv1, nbt1, std::nullopt, std::nullopt, training,
                                         momentum);
  auto [rstd1, scale1, shift1] = K::scale_shift(gb1.narrow(1, 0, cin), gb1.narrow(1, cin, cin),
                                                mean1, var1, eps, x);
  at::Tensor act1 = empty4(x, n, cin, h, w, at::MemoryFormat::ChannelsLast);
  at::Tensor xs = is_pixels(x) ? x : empty4(x, n, cin, h, w, at::MemoryFormat::ChannelsLast);
  K::affine_relu(x, scale1, shift1, act1, is_pixels(x) ? nullptr : &xs);
  at::Tensor hh = empty4(x, n, cout, 2 * h, 2 * w, at::MemoryFormat::ChannelsLast);
  at::Tensor hmean, hvar;
  if (training) {
    hmean = at::empty({cout}, x.options().dtype(at::kDouble));
    hvar = at::empty({cout}, x.options().dtype(at::kDouble));
  }
  up_conv_forward<K>(algo, act1, w1, b1, hh, training ? &hmean : nullptr,
                     training ? &hvar : nullptr);

  // piece 2: prologue of h, conv, + bias + nearest-x2 of the low-resolution shortcut
  const at::Tensor gb2 = embed2.index_select(0, y).to(pt);
  auto [mean2, var2] = prologue_stats<K>(hh, rm2, rv2, nbt2, hmean, hvar, training, momentum);
  auto [rstd2, scale2, shift2] = K::scale_shift(gb2.narrow(1, 0, cout), gb2.narrow(1, cout, cout),
                                                mean2, var2, eps, x);
  at::Tensor act2 = empty4(x, n, cout, 2 * h, 2 * w, at::MemoryFormat::ChannelsLast);
  K::affine_relu(hh, scale2, shift2, act2, nullptr);
  // 1x1 before upsampling: 4x fewer FLOPs; as one GEMM over the channels_last pixels
  const at::Tensor shortcut = from_pixel_matrix(
      at::addmm(b0, pixel_matrix(xs), w0.reshape({cout, cin}).t()), n, h, w);
  at::Tensor y2 = conv3x3_forward<K>(algo2, act2, w2);
  at::Tensor out = empty4(x, n, cout, 2 * h, 2 * w, format_of(x));
  K::conv_epilogue(y2, b2, shortcut, true, out, nullptr, nullptr);
  return {out, xs, act1, hh, act2, mean1, rstd1, scale1, gb1, mean2, rstd2, scale2, gb2};
}

/// Returns {dx, dembed1, dw1, db1, dembed2, dw2, db2, dw0, db0}; dx undefined unless need_x,
/// channels_last when x_channels_last, else NCHW. x: the saved channels_last xs.
template <class K>
std::vector<at::Tensor> block_backward(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& act1, const at::Tensor& hh, const at::Tensor& act2,
    const at::Tensor& mean1, const at::Tensor& rstd1, const at::Tensor& scale1,
    const at::Tensor& gb1, const at::Tensor& mean2, const at::Tensor& rstd2,
    const at::Tensor& scale2, const at::Tensor& gb2, const at::Tensor& embed1,
    const at::Tensor& w1, const at::Tensor& embed2, const at::Tensor& w2, const at::Tensor& w0,
    bool training, bool need_x, bool x_channels_last, UpConvAlgo algo = UpConvAlgo::kPhase,
    ConvAlgo algo2 = ConvAlgo::kConv) {
  const at::Tensor g = dense(grad_in);
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t cout = w1.size(0);
  const at::TensorOptions dopt = x.options().dtype(at::kDouble);

  // output: channels_last copy for the conv, 2x2 sums for the shortcut, bias gradient
  at::Tensor gp = g;
  const bool copy = !is_pixels(g);
  if (copy) gp = empty4(g, n, cout, 2 * h, 2 * w, at::MemoryFormat::ChannelsLast);
  at::Tensor dshort = empty4(x, n, cout, h, w, at::MemoryFormat::ChannelsLast);
  at::Tensor db2_d = at::empty({cout}, dopt);
  K::grad_output_prep(g, copy ? &gp : nullptr, &dshort, &db2_d);
  auto [dact2, dw2] = conv3x3_backward<K>(algo2, gp, act2, w2);

  // piece 2 backward (its dx written in the form piece 1's conv backward reads), piece 1
  BnBackward bn2{hh, act2, dense(dact2), gb2.narrow(1, 0, cout), scale2, mean2, rstd2, training};
  at::Tensor dgb2 = at::empty({n, 2 * cout}, scale2.options());
  at::Tensor k1 = at::empty({cout}, dopt), k2 = at::empty({cout}, dopt);
  K::bn_backward_reduce(bn2, dgb2.narrow(1, 0, cout), dgb2.narrow(1, cout, cout), k1, k2);
  at::Tensor db1_d = at::empty({cout}, dopt);
  auto [dact1, dw1] = up_conv_backward<K>(algo, bn2, k1, k2, act1, w1, db1_d);
  const at::Tensor ds = pixel_matrix(dshort);  // shortcut GEMM backward
  const at::Tensor dw0 = ds.t().mm(pixel_matrix(x)).view({cout, cin, 1, 1});
  BnBackward bn1{x, act1, dense(dact1), gb1.narrow(1, 0, cin), scale1, mean1, rstd1, training};
  at::Tensor dgb1 = at::empty({n, 2 * cin}, scale1.options());
  at::Tensor k1a = at::empty({cin}, dopt), k2a = at::empty({cin}, dopt);
  K::bn_backward_reduce(bn1, dgb1.narrow(1, 0, cin), dgb1.narrow(1, cin, cin), k1a, k2a);
  at::Tensor dx;
  if (need_x) {
    dx = empty4(x, n, cin, h, w,
                x_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    const at::Tensor dx_short = from_pixel_matrix(ds.mm(w0.reshape({cout, cin})), n, h, w);
    K::bn_backward_apply(bn1, k1a, k2a, &dx_short, dx);
  }
  const at::Tensor db2 = db2_d.to(w2.scalar_type());
  return {dx, K::embedding_grad(embed1, y, dgb1), dw1, db1_d.to(w1.scalar_type()),
          K::embedding_grad(embed2, y, dgb2), dw2, db2, dw0, db2.to(w0.scalar_type())};
}

}  // namespace genblock_impl
}  // namespace bindings
}  // namespace mgm_fast
