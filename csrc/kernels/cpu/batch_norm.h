// Backward of training-mode batch normalisation for channels_last activations.
//
// Torch-free C++17; the torch glue is csrc/bindings/batch_norm.cpp and the op
// mgm_fast/ops/batch_norm.py. A channels_last (N, C, H, W) tensor is the row-major matrix
// (rows = N*H*W, C): channel innermost. With the forward's batch statistics mean[c] and
// invstd[c] = 1 / sqrt(biased var[c] + eps), and w[c] the affine weight (1 without one):
//
//   sum_dy[c] = sum_r dy[r, c]          dot[c] = sum_r dy[r, c] (x[r, c] - mean[c])
//   grad_bias[c] = sum_dy[c]            grad_weight[c] = dot[c] invstd[c]
//   dx[r, c] = w[c] invstd[c] (dy[r, c] - sum_dy[c] / rows - (x[r, c] - mean[c]) invstd[c]^2 dot[c] / rows)
//
// (torch's formula). Why a kernel: torch's channels_last CPU backward walks one row of C floats
// at a time, which at few channels (C = 8, 24: not a multiple of a vector) is 10-50x slower than
// its NCHW backward. Here the matrix is walked in memory order, in tiles of lcm(C, 16) floats
// whose lanes have a fixed channel, so every loop is a plain vector loop whatever C is.
//
// The rows are cut into blocks whose size depends only on (rows, C); each block's sums are
// float lane accumulators, the blocks' partial sums are added in block order in double. Results
// are therefore bit-identical for any thread count (at one ISA level, see isa.h).
#pragma once

#include <cstdint>

namespace mgm_fast {
namespace cpu {

/// dy, x: rows x channels, row-major float32. mean, invstd: channels. weight: channels, or
/// nullptr (no affine weight: 1). Each output may be nullptr when it is not wanted: grad_input
/// (rows x channels, row-major; may not alias dy or x), grad_weight and grad_bias (channels).
/// num_threads <= 0 uses the OpenMP default.
void batch_norm_backward_channels_last(const float* dy, const float* x, int64_t rows, int64_t channels,
                                       const float* mean, const float* invstd, const float* weight,
                                       float* grad_input, float* grad_weight, float* grad_bias, int num_threads);

}  // namespace cpu
}  // namespace mgm_fast
