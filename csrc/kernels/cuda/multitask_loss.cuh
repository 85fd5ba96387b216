// Fused MGM dense losses on CUDA: segmentation cross-entropy, depth L1 and normal L1 in one
// forward call that produces the three reduced losses AND the gradients w.r.t. the three
// predictions (the Liger-Kernel pattern: no softmax tensor is kept, backward only rescales).
//
// Torch-free: raw device pointers, sizes, element strides and a cudaStream_t. The torch glue is
// csrc/bindings/cuda/multitask_loss_cuda.cpp; the plain-PyTorch reference is mgm_fast/losses.py
// and the formulas are those of csrc/kernels/cpu/multitask_loss.h:
//
//   seg:  l_p = logsumexp_c x[b,:,h,w] - x[b,t_p,h,w];  loss = sum_{p valid} l_p / D_seg
//         D_seg = B*H*W (no ignore index) or max(#valid pixels, 1)
//         buffer[b,c,h,w] = softmax_c - [c == t_p] on valid pixels, 0 on ignored ones
//   L1:   loss = sum_e m_e |pred_e - target_e| / D;  D = numel ("all") or max(sum_e m_e, 1)
//         ("valid"; a 1-channel normal mask counts once per channel)
//         buffer_e = sign(pred_e - target_e) * m_e
//
// Differences from the CPU kernels, and why:
// * The gradient buffers are float32 and NOT divided by D: backward computes
//   grad = buffer * (grad_output * 1/D) in float32 and rounds once to the prediction dtype
//   (scale_gradient). Pre-scaling an fp16/bf16 buffer by 1/D ~ 1e-6 would push it into the
//   subnormal range and lose bits before a GradScaler-sized grad_output could restore them.
//   Both factors stay on the device, so neither forward nor backward synchronises the host.
// * Labels outside [0, C) that are not the ignore index cannot raise from inside a kernel.
//   Such a pixel makes the segmentation loss and its gradient row NaN (never silently wrong),
//   and label_error receives the smallest offending flat pixel index and its label; the caller
//   decides when to look at it (see mgm_fast/ops/multitask_loss.py).
// * Reductions are deterministic: a fixed grid (a function of the shape only), per-block
//   partial sums in double written to the workspace, and one block that adds the partials in
//   a fixed order. No floating-point atomics.
//
// Prediction dtypes: float, __half, __nv_bfloat16 (templates inside the .cu); targets and
// float masks may each be any of those three (read and converted per element), masks may also
// be uint8 (bool). All arithmetic is in float32, the reductions in double.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mgm_fast {
namespace cuda {

/// Element type of an input tensor.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8 = 3 };

/// Element strides of a 4-d (N, C, H, W) tensor (any layout: NCHW, channels_last, views).
struct Strides4 {
  int64_t n, c, h, w;
};

/// Element strides of a 3-d (N, H, W) tensor.
struct Strides3 {
  int64_t n, h, w;
};

/// How the L1 losses are averaged (mgm_fast.losses REDUCTIONS).
enum class Reduction : int { kAll = 0, kValid = 1 };

/// Segmentation: (B, C, H, W) logits, (B, H, W) int64 labels.
struct SegArgs {
  const void* logits = nullptr;
  DType logits_dtype = DType::kFloat32;  ///< float32 / float16 / bfloat16
  Strides4 logits_strides{};
  const int64_t* target = nullptr;
  Strides3 target_strides{};
  float* grad = nullptr;                 ///< (B, C, H, W) float32 buffer, or nullptr (loss only)
  Strides4 grad_strides{};
  int64_t batch = 0, classes = 0, height = 0, width = 0;
  bool has_ignore = false;
  int64_t ignore_index = -100;
};

/// Masked L1: (B, C, H, W) prediction and target, optional (B, 1 or C, H, W) mask.
struct L1Args {
  const void* pred = nullptr;
  DType pred_dtype = DType::kFloat32;    ///< float32 / float16 / bfloat16
  Strides4 pred_strides{};
  const void* target = nullptr;
  DType target_dtype = DType::kFloat32;  ///< float32 / float16 / bfloat16
  Strides4 target_strides{};
  const void* mask = nullptr;            ///< nullptr: all ones
  DType mask_dtype = DType::kUInt8;      ///< any DType
  int64_t mask_channels = 1;
  Strides4 mask_strides{};
  float* grad = nullptr;                 ///< (B, C, H, W) float32 buffer, or nullptr
  Strides4 grad_strides{};
  int64_t batch = 0, channels = 0, height = 0, width = 0;
};

struct MultitaskLossArgs {
  SegArgs seg;
  L1Args depth;
  L1Args normal;
  Reduction reduction = Reduction::kAll;  ///< applies to depth and normal
};

/// Device outputs of the forward call.
struct MultitaskLossOutputs {
  float* losses[3] = {nullptr, nullptr, nullptr};  ///< seg, depth, normal (one float each)
  float* inv_divisors = nullptr;  ///< [3]: 1 / D of each loss (backward's scale)
  int64_t* label_error = nullptr; ///< [2]: {smallest bad flat pixel or -1, its label}
};

/// Bytes of device workspace multitask_loss_forward needs (independent of the shapes).
size_t multitask_loss_workspace_bytes();

/// Launches the three fused losses and the deterministic final reduction on `stream`.
/// Asynchronous; returns the launch status.
cudaError_t multitask_loss_forward(const MultitaskLossArgs& args,
                                   const MultitaskLossOutputs& out, void* workspace,
                                   cudaStream_t stream);

/// out[i] = (out_dtype) (buffer[i] * grad_output[0] * inv_divisor[0]) for i < n, where buffer
/// and out are dense with identical strides (so one flat index addresses both).
cudaError_t scale_gradient(const float* buffer, void* out, DType out_dtype, int64_t n,
                           const float* grad_output, const float* inv_divisor,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace mgm_fast
