// Fused MGM dense losses on the CPU: segmentation cross-entropy and the two L1 losses (depth,
// normals), each computing its reduced loss AND the gradient w.r.t. its prediction in one pass.
//
// Torch-free C++17: raw pointers, sizes and element strides. The torch glue lives in
// csrc/bindings/multitask_loss.cpp; the plain-PyTorch reference is mgm_fast/losses.py
// (seg_ce, depth_l1, normal_l1) and these kernels reproduce it exactly (up to float rounding):
//
//   seg:   l_p = logsumexp_c(x[b,:,h,w]) - x[b,t_p,h,w]     for every pixel p = (b, h, w)
//          loss = sum_{p valid} l_p / D,   D = B*H*W                  (no ignore index)
//                                          D = max(#{t_p != ignore}, 1) (with ignore index)
//          dloss/dx[b,c,h,w] = (softmax_c - [c == t_p]) / D  on valid pixels, 0 on ignored ones
//   L1:    loss = sum_e m_e |pred_e - target_e| / D,   e over all B*C*H*W elements
//          D = B*C*H*W ("all"),  max(sum_e m_e, 1) ("valid"; m_e = 1 without a mask)
//          dloss/dpred_e = sign(pred_e - target_e) * m_e / D   (sign(0) = 0, as torch.abs)
//
// Every input may have any element strides (NCHW contiguous, channels_last, or views); the
// gradient is written with its own strides, so a channels_last prediction gets a channels_last
// gradient without a copy. Unit stride along W takes a vectorised path.
//
// Determinism: the pixel range is cut into fixed chunks (a function of the shape only, not of
// the thread count); each chunk's partial sums are accumulated in double and the chunk partials
// are added in chunk order. Results are therefore bit-identical for any number of threads (on
// one machine: the row loops are compiled per ISA -- SSE2 / AVX2 / AVX-512, picked at load
// time -- and FMA contraction or the vector width can change the last bits between machines).
#pragma once

#include <cstdint>

namespace mgm_fast {
namespace cpu {

/// Element strides of a 4-d (N, C, H, W) tensor.
struct Strides4 {
  int64_t n, c, h, w;
};

/// Element strides of a 3-d (N, H, W) tensor.
struct Strides3 {
  int64_t n, h, w;
};

/// How the L1 losses are averaged (mgm_fast.losses REDUCTIONS).
enum class Reduction : int {
  kAll = 0,    ///< divide by the number of elements (the released code)
  kValid = 1,  ///< divide by max(sum of the mask, 1)
};

/// Storage of an optional mask. Bool masks are read as kUInt8 (0/1); any uint8 value is used
/// as a weight, exactly like mask.float() in the reference.
enum class MaskKind : int { kNone = 0, kUInt8 = 1, kFloat32 = 2 };

/// Outcome of one loss.
struct LossResult {
  double loss = 0.0;       ///< the reduced loss (what the reference returns)
  double divisor = 0.0;    ///< D in the formulas above (after the clamp where it applies)
  bool label_error = false;  ///< seg only: a label outside [0, C) that is not the ignore index
  int64_t bad_label = 0;     ///< the first such label in (b, h, w) order
  int64_t bad_pixel = -1;    ///< its flat pixel index b*H*W + h*W + w
};

/// Softmax cross-entropy over the class axis of (B, C, H, W) float32 logits.
struct SegCEProblem {
  const float* logits = nullptr;
  Strides4 logits_strides{};
  const int64_t* target = nullptr;  ///< (B, H, W) int64 labels
  Strides3 target_strides{};
  float* grad = nullptr;            ///< (B, C, H, W) output, or nullptr for the loss only
  Strides4 grad_strides{};
  int64_t batch = 0, classes = 0, height = 0, width = 0;
  bool has_ignore = false;
  int64_t ignore_index = -100;
};

/// Masked L1 over (B, C, H, W) float32 predictions and targets (C = 1 depth, 3 normals).
struct L1Problem {
  const float* pred = nullptr;
  Strides4 pred_strides{};
  const float* target = nullptr;
  Strides4 target_strides{};
  const void* mask = nullptr;       ///< (B, 1 or C, H, W) or nullptr
  MaskKind mask_kind = MaskKind::kNone;
  int64_t mask_channels = 1;        ///< 1 (broadcast over C) or C
  Strides4 mask_strides{};
  float* grad = nullptr;            ///< (B, C, H, W) output, or nullptr for the loss only
  Strides4 grad_strides{};
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  Reduction reduction = Reduction::kAll;
};

/// Runs the fused segmentation CE. On a label error the gradient content is unspecified and
/// the caller must raise (the loss then only covers the pixels before the error).
/// num_threads <= 0 uses the OpenMP default.
LossResult seg_ce(const SegCEProblem& problem, int num_threads);

/// Runs the fused masked L1. num_threads <= 0 uses the OpenMP default.
LossResult masked_l1(const L1Problem& problem, int num_threads);

/// exp(x) for x <= 0 as evaluated inside the kernels (exposed for the unit tests): about 1 ulp
/// on [-87, 0], gradual underflow below, 0 from -104 on (and for -inf), NaN for NaN.
float exp_nonpositive(float x);

/// The fixed number of (b, h) rows per reduction chunk for a given width (shape-only).
int64_t rows_per_chunk(int64_t width);

}  // namespace cpu
}  // namespace mgm_fast
