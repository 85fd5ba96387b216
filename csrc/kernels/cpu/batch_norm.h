// Training-mode batch normalisation (optionally plus a residual, then ReLU) of channels_last
// activations: forward and backward.
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
// (torch's formula; with a ReLU after the normalisation, dy is first zeroed where the output is
// not positive, and that masked dy is also the gradient of a residual added before the ReLU).
// Why a kernel: torch's channels_last CPU backward walks one row of C floats at a time, which is
// slow at few channels that are not a multiple of a vector (C = 8, 24; timed side by side in
// benchmarks/test_bench_batch_norm.py). Here the matrix is walked in memory order, in tiles of
// lcm(C, 16) floats whose lanes have a fixed channel, so every loop is a plain vector loop
// whatever C is.
//
// The rows are cut into blocks whose size depends only on (rows, C); each block's sums are
// float lane accumulators, the blocks' partial sums are added in block order in double. Results
// are therefore bit-identical for any thread count (at one ISA level, see isa.h).
#pragma once

#include <cstdint>

namespace mgm_fast {
namespace cpu {

/// Forward: y = (x - mean) invstd w + b (+ residual), then max(y, 0) when relu, with the batch's mean and
/// biased variance (two passes: the mean, then the sum of squared deviations), written to
/// mean[c] and invstd[c] = 1 / sqrt(var + eps). When running_mean / running_var are not nullptr
/// they are updated in place as torch does: r = (1 - momentum) r + momentum s, with the unbiased
/// variance var * rows / (rows - 1) for running_var. x, y: rows x channels, row-major float32
/// (y may not alias x); weight, bias: channels or nullptr (1 and 0); residual: rows x channels
/// added before the ReLU (a ResNet block's shortcut), or nullptr. rows >= 1.
void batch_norm_forward_channels_last(const float* x, int64_t rows, int64_t channels, const float* weight,
                                      const float* bias, const float* residual, float eps, bool relu, float* y,
                                      float* mean, float* invstd, float* running_mean, float* running_var,
                                      float momentum, int num_threads);

/// dy, x: rows x channels, row-major float32. mean, invstd: channels. weight: channels, or
/// nullptr (no affine weight: 1). relu_out: the forward's output when it applied ReLU (dy counts
/// where relu_out > 0 only, ReLU's gradient), else nullptr. Each output may be nullptr when it is
/// not wanted: grad_input (rows x channels, row-major; may not alias dy, x or relu_out),
/// grad_weight and grad_bias (channels), grad_residual (rows x channels: the gradient reaching the
/// forward's residual, dy through the ReLU's mask). num_threads <= 0 uses the OpenMP default.
void batch_norm_backward_channels_last(const float* dy, const float* x, int64_t rows, int64_t channels,
                                       const float* mean, const float* invstd, const float* weight,
                                       const float* relu_out, float* grad_input, float* grad_weight,
                                       float* grad_bias, float* grad_residual, int num_threads);

}  // namespace cpu
}  // namespace mgm_fast
