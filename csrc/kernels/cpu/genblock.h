// The memory-bound pieces of the fused GenBlock on the CPU: batch statistics, the conditional-BN
// affine + ReLU prologue, the epilogues of the phase-decomposed upsampling conv and of the second
// conv (bias, residual, fused statistics of the output), the phase weights, the im2col matrices
// of the GEMM formulations of both convs, and their backward passes. The convs themselves are
// ATen calls (oneDNN convolutions, MKL GEMMs) made by the torch glue (csrc/bindings/genblock.cpp,
// csrc/bindings/genblock_impl.h); the plain-PyTorch reference is mgm_fast/ops/genblock.py.
//
// Torch-free C++17: raw pointers, sizes, a layout flag. Every 4-d tensor is dense in one of two
// layouts: kPlanes (NCHW contiguous) or kPixels (NHWC, torch's channels_last). Kernels may read
// one layout and write the other, which is how the glue moves NCHW activations into the
// channels_last buffers that oneDNN convolves fastest, without a separate transpose pass.
//
// Formulas (b sample, c channel, N = n*h*w elements per channel):
//
//   statistics      mean_c = sum x / N,  var_c = sum (x - mean_c)^2 / N   (biased, as BN uses)
//   prologue        a = max(x * scale[b,c] + shift[b,c], 0),
//                   scale = gamma[b,c] * rstd_c, shift = beta[b,c] - mean_c * scale
//   phase weights   nearest-2x upsampling followed by a 3x3 conv (padding 1) equals, for output
//                   pixel (2i+p, 2j+q), a 2x2 conv over low-resolution rows {i-1+p, i+p} and
//                   columns {j-1+q, j+q} whose taps sum the 3x3 taps that land on the same
//                   low-resolution pixel: rows p=0: {0}, {1,2};  p=1: {0,1}, {2} (columns alike).
//                   wp[(2p+q)*Cout + o, ci, r, s] = sum_{ky in G(p,r), kx in G(q,s)} w[o,ci,ky,kx]
//                   One 2x2 conv with padding 1 and 4*Cout outputs over the low-resolution map
//                   gives P (n, 4*Cout, h+1, w+1); phase (p,q) of output (i, j) is
//                   P[b, (2p+q)*Cout + o, i+p, j+q]. 16 instead of 36 taps per output pixel.
//                   The padded grid wastes (h+1)(w+1) - hw positions per phase (36% at 4x4):
//                   the compact layout computes each phase on the hw pixels only, as one GEMM
//                   per phase: A_pq (n*h*w, 4*Cin) with A_pq[(b,i,j), (2r+s)*Cin + ci] =
//                   a[b, ci, i-1+p+r, j-1+q+s] (0 outside; phase_im2col), P_pq = A_pq Wpq^T;
//                   P (4, n, h, w, Cout) holds phase (p,q) of output (i, j) at [2p+q, b, i, j].
//                   Backward: dA_pq = dP_pq Wpq, da = the adjoint of the im2col (phase_col2im).
//   BN backward     dz = dact * [act > 0],  xhat = (x - mean_c) * rstd_c
//                   dbeta[b,c] = sum_hw dz,  dgamma[b,c] = sum_hw dz * xhat
//                   training: dx = rstd_c * (gamma[b,c] dz - k1_c - xhat k2_c),
//                             k1_c = sum_b gamma[b,c] dbeta[b,c] / N, k2_c = sum_b gamma[b,c] dgamma[b,c] / N
//                   eval (running statistics are constants): dx = scale[b,c] * dz
//
// The 3x3 conv as a GEMM: cols (n*h*w, 9*Cin) = conv3x3_im2col(a) in the (ci, tap) column order
// of the contiguous weight viewed as (Cout, 9*Cin), y = cols W^T, dcols = dy W, dW = dy^T cols,
// da = conv3x3_col2im(dcols): no weight reorder (which dominates small maps with many channels).
//
// Determinism: every reduction cuts its range into fixed chunks (up to 8 rows of one sample, a
// function of the shape only), accumulates each chunk element-wise in the element type, folds it
// per channel in double and adds the chunk partials in chunk order, so results are bit-identical
// for any thread count. Statistics use sums shifted by the first element of each channel, which
// keeps E[x^2] - E[x]^2 free of cancellation when |mean| >> std. Element types: float (chunk
// workers compiled per ISA, see isa.h) and double (tests, gradcheck).
#pragma once

#include <cstdint>

namespace mgm_fast {
namespace cpu {
namespace genblock {

/// Memory layout of a dense 4-d (n, c, h, w) tensor.
enum class Layout : int {
  kPlanes = 0,  ///< NCHW contiguous
  kPixels = 1,  ///< NHWC (channels_last) contiguous
};

/// Sizes of a 4-d tensor.
struct Dims {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t numel() const { return n * c * h * w; }
};

/// Element offset of (b, c, y, x) in a dense tensor of the given layout.
inline int64_t offset(Layout layout, const Dims& d, int64_t b, int64_t c, int64_t y, int64_t x) {
  return layout == Layout::kPlanes ? ((b * d.c + c) * d.h + y) * d.w + x
                                   : ((b * d.h + y) * d.w + x) * d.c + c;
}

/// A dense 4-d tensor. `data == nullptr` marks an absent optional tensor.
template <typename T>
struct View {
  T* data = nullptr;
  Dims dims{};
  Layout layout = Layout::kPlanes;
};

/// Where a phase-decomposed conv output P keeps phase ph = 2p+q of the low-resolution pixel
/// (b, i, j) of a (n, c, h, w) map (see the formulas above).
enum class PhaseLayout : int {
  kPadded = 0,   ///< kPixels (n, 4c, h+1, w+1) at [b, ph*c + o, i+p, j+q]: one 2x2 conv, padding 1
  kCompact = 1,  ///< (4, n, h, w, c) contiguous at [ph, b, i, j, o]: one GEMM per phase
};

/// What the epilogues add to the conv output before storing it.
template <typename T>
struct Epilogue {
  const T* bias = nullptr;       ///< (c,) or nullptr
  View<const T> residual{};      ///< the output's size, or half of it (then upsampled x2)
  bool residual_half = false;    ///< residual dims are (n, c, h/2, w/2) of the output
};

// ---------------------------------------------------------------------------------------------
// forward

/// Per-channel mean and biased variance of x over (n, h, w); mean, var: (c,) doubles.
template <typename T>
void channel_stats(const View<const T>& x, double* mean, double* var, int threads);

/// scale/shift (n, c) of the prologue from per-sample gamma/beta and the channel statistics:
/// rstd_c = 1 / sqrt(var_c + eps), scale = gamma * rstd, shift = beta - mean * scale (computed in
/// double). gamma[b * stride + c], beta[b * stride + c]; rstd: (c,) output.
template <typename T>
void scale_shift(const T* gamma, const T* beta, int64_t stride, int64_t n, int64_t c,
                 const double* mean, const double* var, double eps, double* rstd, T* scale,
                 T* shift);

/// out = max(x * scale[b,c] + shift[b,c], 0); scale/shift (n, c) contiguous; out has x's dims.
/// copy (data may be nullptr): also receives x itself, in copy's layout (the transpose a kPlanes
/// x needs on the way anyway, so backward can read x as kPixels rows).
template <typename T>
void affine_relu(const View<const T>& x, const T* scale, const T* shift, const View<T>& out,
                 const View<T>& copy, int threads);

/// wp (4*cout, cin, 2, 2) from the 3x3 weight w (cout, cin, 3, 3) (contiguous); wp is NCHW or,
/// with channels_last, (4*cout, 2, 2, cin) in memory (the format oneDNN wants with
/// channels_last activations, so the conv does not reorder it; also Wpq as the (cout, 4*cin)
/// rows of the compact phase GEMMs). threads <= 0: OpenMP's maximum.
template <typename T>
void phase_weights(const T* w, int64_t cout, int64_t cin, T* wp, bool channels_last,
                   int threads = 0);

/// The adjoint of phase_weights: dw (cout, cin, 3, 3) contiguous from dwp (4*cout, cin, 2, 2)
/// in either layout.
template <typename T>
void phase_weights_backward(const T* dwp, int64_t cout, int64_t cin, T* dw, bool channels_last,
                            int threads = 0);

/// Interleaves the phase conv output p (`layout`: kPadded (n, 4*low.c, low.h+1, low.w+1) or
/// kCompact (4, n, low.h, low.w, low.c)) into out (n, low.c, 2*low.h, 2*low.w), adding the
/// epilogue terms. mean/var (c,): statistics of the stored output, or nullptr to skip them.
template <typename T>
void phase_epilogue(const T* p, const Dims& low, const Epilogue<T>& ep, const View<T>& out,
                    double* mean, double* var, int threads,
                    PhaseLayout layout = PhaseLayout::kPadded);

/// The im2col matrices of the compact phase conv: cols (4, n*h*w, 4*c) contiguous,
/// cols[2p+q, (b*h + i)*w + j, (2r+s)*c + ci] = a[b, ci, i-1+p+r, j-1+q+s] (0 outside the map);
/// a (n, c, h, w) in either layout.
template <typename T>
void phase_im2col(const View<const T>& a, T* cols, int threads);

/// The adjoint of phase_im2col: da[b, ci, y, x] = the sum of the dcols entries that
/// phase_im2col copies a[b, ci, y, x] to (in a fixed order); da (n, c, h, w) in either layout.
template <typename T>
void phase_col2im(const T* dcols, const View<T>& da, int threads);

/// The im2col matrix of a 3x3 conv with padding 1: cols (n*h*w, 9*c) contiguous,
/// cols[(b*h + y)*w + x, ci*9 + ky*3 + kx] = a[b, ci, y+ky-1, x+kx-1] (0 outside the map) -- the
/// column order of a contiguous (cout, c, 3, 3) weight viewed as (cout, 9c), so a GEMM reads the
/// weight (and writes its gradient) in place; a (n, c, h, w) in either layout.
template <typename T>
void conv3x3_im2col(const View<const T>& a, T* cols, int threads);

/// The adjoint of conv3x3_im2col: da[b, ci, y, x] = sum over the 9 taps (ky, kx) of
/// dcols[(b*h + y-ky+1)*w + x-kx+1, ci*9 + ky*3 + kx] (taps inside the map, in tap order).
template <typename T>
void conv3x3_col2im(const T* dcols, const View<T>& da, int threads);

/// out = conv + bias + residual (upsampled when half), any layouts; statistics as above.
template <typename T>
void conv_epilogue(const View<const T>& conv, const Epilogue<T>& ep, const View<T>& out,
                   double* mean, double* var, int threads);

// ---------------------------------------------------------------------------------------------
// backward

/// From the output gradient g: a copy in another layout (copy.data may be nullptr), the gradient
/// of a half-size residual (sum of each 2x2 block; d_half.data may be nullptr) and the bias
/// gradient sum_{b,y,x} g (dbias may be nullptr).
template <typename T>
void grad_output_prep(const View<const T>& g, const View<T>& copy, const View<T>& d_half,
                      double* dbias, int threads);

/// The gradient of the phase conv output P from the gradient g (n, c, 2h, 2w) of the
/// interleaved output: dp in `layout` (kPadded: (n, 4c, h+1, w+1), zero where P was not used;
/// kCompact: (4, n, h, w, c)); and dbias = sum g (nullable).
template <typename T>
void phase_grad_scatter(const View<const T>& g, T* dp, double* dbias, int threads,
                        PhaseLayout layout = PhaseLayout::kPadded);

/// Inputs of the backward pass through prologue = ReLU(conditional BN).
template <typename T>
struct BnReluBackward {
  View<const T> x;              ///< the BN input
  View<const T> act;            ///< the prologue output relu(x * scale + shift)
  View<const T> dact;           ///< the gradient w.r.t. act (act's dims)
  const T* gamma = nullptr;     ///< gamma[b * gamma_stride + c]
  int64_t gamma_stride = 0;
  const T* scale = nullptr;     ///< (n, c) contiguous
  const double* mean = nullptr; ///< (c,)
  const double* rstd = nullptr; ///< (c,)
  bool training = true;         ///< batch statistics (gradients flow through them)
};

/// Reductions of the backward pass: dgamma/dbeta (n, c) with row stride `stride` (they may be
/// the two halves of one (n, 2c) buffer), and the coefficients k1, k2 (c,) of the dx formula.
template <typename T>
void bn_relu_backward_reduce(const BnReluBackward<T>& a, T* dgamma, T* dbeta, int64_t stride,
                             double* k1, double* k2, int threads);

/// dx (x's dims) by the formula above, plus `add` when add.data != nullptr (same dims as dx).
template <typename T>
void bn_relu_backward_apply(const BnReluBackward<T>& a, const double* k1, const double* k2,
                            const View<const T>& add, const View<T>& dx, int threads);

/// dx written straight into the phase layout of the conv that produced x: x is the interleaved
/// output (n, c, 2h, 2w) of a phase conv, dp (`layout`, as phase_grad_scatter) receives
/// phase_grad_scatter(dx) and dbias = sum dx (nullable). Saves a pass over dx.
template <typename T>
void bn_relu_backward_apply_phase(const BnReluBackward<T>& a, const double* k1, const double* k2,
                                  T* dp, double* dbias, int threads,
                                  PhaseLayout layout = PhaseLayout::kPadded);

}  // namespace genblock
}  // namespace cpu
}  // namespace mgm_fast
