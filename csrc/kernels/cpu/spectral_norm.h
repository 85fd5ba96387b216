// Spectral normalisation of a group of weight matrices: the power iteration and the gradient of
// W / sigma, one call for every spectrally normalised layer of a network.
//
// Torch-free C++17; the torch glue is csrc/bindings/spectral_norm.cpp and the op
// mgm_fast/ops/spectral_norm.py. A weight is the matrix W (rows x cols) of torch's spectral_norm
// with dim=0: row r is output r, column c the flattened (in, kh, kw) index in that order. Each
// row's cols elements are one dense block of memory (contiguous and channels_last conv weights,
// linear and embedding weights), at `w + r * row_stride`; `col_offset[c]` is where logical column
// c lies inside the block (nullptr: the identity). The kernels work in memory order and map
// v between the two orders in O(cols), so no weight is copied.
//
// One power-iteration step, as torch.nn.utils.spectral_norm (eps clamps the norms):
//   v = W^T u / max(|W^T u|, eps),   Wv = W v,   u = Wv / max(|Wv|, eps)
// and after the last step sigma = |Wv|^2 / max(|Wv|, eps) (= u . W v without a third product).
// With steps == 0 (evaluation mode) u and v stay and sigma = u . (W v).
// Products and norms accumulate in double; results are float32.
#pragma once

#include <cstdint>

namespace mgm_fast {
namespace cpu {

struct SpectralNormMatrix {
  const float* w;            // row r at w + r * row_stride, cols elements (memory order)
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  const int64_t* col_offset;  // logical column c -> offset in a row's block; nullptr = identity
};

/// `steps` power-iteration steps of one matrix. u (rows) and v (cols, logical order) are read
/// and, when steps > 0, overwritten with the new vectors; *sigma receives sigma.
/// num_threads <= 0 uses the OpenMP default; results do not depend on the thread count.
void spectral_norm_power_iteration(const SpectralNormMatrix& m, float* u, float* v, int steps,
                                   float eps, float* sigma, int num_threads);

/// The gradient of W / sigma with respect to W, with u, v constants and sigma = u . (W v):
///   dW = g / sigma - (<g, W> / sigma^2) u v^T.
/// g and grad_w are laid out like m (same row_stride and col_offset); grad_w may alias g.
void spectral_norm_weight_grad(const SpectralNormMatrix& m, const float* g, const float* u,
                               const float* v, float sigma, float* grad_w, int num_threads);

}  // namespace cpu
}  // namespace mgm_fast
