// The memory-bound pieces of the fused GenBlock on CUDA: batch statistics, the conditional-BN
// affine + ReLU prologue, the epilogues of the phase-decomposed upsampling conv and of the second
// conv (bias, interleave, residual, fused statistics of the output), and their backward passes.
// The convolutions are cuDNN calls made by the torch glue (csrc/bindings/cuda/genblock_cuda.cpp,
// composition in csrc/bindings/genblock_impl.h); formulas and layouts are those of the CPU
// kernels, csrc/kernels/cpu/genblock.h, which document them in full.
//
// Torch-free: raw device pointers, sizes, a layout flag, a cudaStream_t. Activations and conv
// weights are float32, float16 or bfloat16 (one `dtype` per call); per-sample affine parameters
// (gamma, beta, scale, shift, dgamma, dbeta) are float32; per-channel statistics and the
// backward coefficients are float64. All arithmetic is float32; reductions add float32 partials
// of fixed pixel chunks (a function of the shape only) in double, in a fixed order, so results
// are bit-reproducible run to run (no atomics).
//
// Every function launches asynchronously on `stream` and returns the launch status. Functions
// with a `workspace` need workspace_bytes(d) bytes of device memory for the tensor dims d they
// reduce over (the largest input of the call).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mgm_fast {
namespace cuda {
namespace genblock {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

/// Memory layout of a dense 4-d (n, c, h, w) tensor.
enum class Layout : int { kPlanes = 0, kPixels = 1 };

struct Dims {
  int64_t n = 0, c = 0, h = 0, w = 0;
};

/// A dense 4-d tensor on the device; data == nullptr marks an absent optional tensor.
struct View {
  const void* data = nullptr;
  Dims dims{};
  Layout layout = Layout::kPlanes;
};

struct MutView {
  void* data = nullptr;
  Dims dims{};
  Layout layout = Layout::kPlanes;
};

/// What the epilogues add to the conv output before storing it.
struct Epilogue {
  const void* bias = nullptr;   ///< (c,) of dtype, or nullptr
  View residual{};              ///< the output's size or half of it (upsampled x2), or absent
  bool residual_half = false;
};

/// Inputs of the backward pass through ReLU(conditional BN) (see the CPU header).
struct BnReluBackward {
  View x, act, dact;
  const float* gamma = nullptr;  ///< gamma[b * gamma_stride + c]
  int64_t gamma_stride = 0;
  const float* scale = nullptr;  ///< (n, c)
  const double* mean = nullptr;  ///< (c,)
  const double* rstd = nullptr;  ///< (c,)
  bool training = true;
};

/// Workspace bytes of a reduction over a tensor of dims d (any of the functions below).
size_t workspace_bytes(const Dims& d);

cudaError_t channel_stats(DType dtype, const View& x, double* mean, double* var, void* workspace,
                          cudaStream_t stream);

/// rstd = 1 / sqrt(var + eps); scale = gamma * rstd; shift = beta - mean * scale (gamma/beta
/// rows of stride `stride`).
cudaError_t scale_shift(const float* gamma, const float* beta, int64_t stride, int64_t n, int64_t c,
                        const double* mean, const double* var, double eps, double* rstd,
                        float* scale, float* shift, cudaStream_t stream);

/// out = max(x * scale + shift, 0); copy (optional) receives x in its own layout.
cudaError_t affine_relu(DType dtype, const View& x, const float* scale, const float* shift,
                        const MutView& out, const MutView& copy, cudaStream_t stream);

/// wp (4*cout, cin, 2, 2) -- channels_last or NCHW -- from w (cout, cin, 3, 3) contiguous.
cudaError_t phase_weights(DType dtype, const void* w, int64_t cout, int64_t cin, void* wp,
                          bool channels_last, cudaStream_t stream);
cudaError_t phase_weights_backward(DType dtype, const void* dwp, int64_t cout, int64_t cin,
                                   void* dw, bool channels_last, cudaStream_t stream);

/// out (n, c, 2h, 2w) = interleave(p) + epilogue; p kPixels (n, 4c, h+1, w+1). mean/var of the
/// stored output when non-null (then out must be kPixels).
cudaError_t phase_epilogue(DType dtype, const void* p, const Epilogue& ep, const MutView& out,
                           double* mean, double* var, void* workspace, cudaStream_t stream);

/// out = conv + epilogue; statistics as above.
cudaError_t conv_epilogue(DType dtype, const View& conv, const Epilogue& ep, const MutView& out,
                          double* mean, double* var, void* workspace, cudaStream_t stream);

/// copy (optional) = g in copy's layout; half (optional) = 2x2 block sums; dbias (optional,
/// (c,) double) = sum of g over (n, h, w).
cudaError_t grad_output_prep(DType dtype, const View& g, const MutView& copy, const MutView& half,
                             double* dbias, void* workspace, cudaStream_t stream);

/// dp (kPixels, (n, 4c, h+1, w+1)) from the gradient g (n, c, 2h, 2w) of the interleaved output,
/// zero where P was not used; dbias (optional) = sum of g.
cudaError_t phase_grad_scatter(DType dtype, const View& g, void* dp, double* dbias, void* workspace,
                               cudaStream_t stream);

/// dgamma/dbeta (n, c) float rows of stride `stride`, and k1/k2 (c,) double.
cudaError_t bn_relu_backward_reduce(DType dtype, const BnReluBackward& a, float* dgamma, float* dbeta,
                                    int64_t stride, double* k1, double* k2, void* workspace,
                                    cudaStream_t stream);

/// dx (x's dims) plus `add` when present.
cudaError_t bn_relu_backward_apply(DType dtype, const BnReluBackward& a, const double* k1,
                                   const double* k2, const View& add, const MutView& dx,
                                   cudaStream_t stream);

/// dx written straight into the phase layout dp (kPixels, (n, 4c, h/2+1, w/2+1)) of the conv
/// that produced x; dbias (optional) = sum of dx.
cudaError_t bn_relu_backward_apply_phase(DType dtype, const BnReluBackward& a, const double* k1,
                                         const double* k2, void* dp, double* dbias, void* workspace,
                                         cudaStream_t stream);

}  // namespace genblock
}  // namespace cuda
}  // namespace mgm_fast
