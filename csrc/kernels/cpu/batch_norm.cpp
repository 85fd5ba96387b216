// Channels_last batch-norm backward on the CPU (contracts in batch_norm.h).
#include "batch_norm.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/threads.h"

namespace mgm_fast {
namespace cpu {
namespace {

// A tile is lcm(C, kTileFloats) floats: whole rows, and a whole number of 16-float vectors.
constexpr int64_t kTileFloats = 16;
// At most this many blocks (partial sums kept per call), each at least kMinBlockFloats floats.
constexpr int64_t kMaxBlocks = 256;
constexpr int64_t kMinBlockFloats = 1 << 14;
// Below this many elements one thread does everything: the fork costs more.
constexpr int64_t kParallelFloats = 1 << 15;

// acc_dy[j] += dy[j], acc_dot[j] += dy[j] (x[j] - mean_t[j]) over n floats from a tile start
// (j: the position in the tile; the last tile may be partial).
MGM_FAST_ISA_BODY void sums_body(const float* dy, const float* x, int64_t n, int64_t lanes, const float* mean_t,
                                 float* acc_dy, float* acc_dot) {
  int64_t e = 0;
  for (; e + lanes <= n; e += lanes) {
    const float* d = dy + e;
    const float* v = x + e;
    for (int64_t j = 0; j < lanes; ++j) {
      acc_dy[j] += d[j];
      acc_dot[j] += d[j] * (v[j] - mean_t[j]);
    }
  }
  for (int64_t j = 0; e + j < n; ++j) {
    acc_dy[j] += dy[e + j];
    acc_dot[j] += dy[e + j] * (x[e + j] - mean_t[j]);
  }
}
constexpr auto& sums = MGM_FAST_ISA_DISPATCH(sums_body);

// dx[j] = (dy[j] - mean_dy_t[j]) scale_t[j] - (x[j] - mean_t[j]) proj_t[j] over n floats from
// a tile start.
MGM_FAST_ISA_BODY void input_grad_body(const float* dy, const float* x, int64_t n, int64_t lanes,
                                       const float* mean_t, const float* mean_dy_t, const float* scale_t,
                                       const float* proj_t, float* dx) {
  int64_t e = 0;
  for (; e + lanes <= n; e += lanes) {
    const float* d = dy + e;
    const float* v = x + e;
    float* o = dx + e;
    for (int64_t j = 0; j < lanes; ++j) o[j] = (d[j] - mean_dy_t[j]) * scale_t[j] - (v[j] - mean_t[j]) * proj_t[j];
  }
  for (int64_t j = 0; e + j < n; ++j)
    dx[e + j] = (dy[e + j] - mean_dy_t[j]) * scale_t[j] - (x[e + j] - mean_t[j]) * proj_t[j];
}
constexpr auto& input_grad = MGM_FAST_ISA_DISPATCH(input_grad_body);

// A per-channel vector repeated over a tile's lanes.
std::vector<float> tiled(const std::vector<float>& per_channel, int64_t lanes) {
  std::vector<float> out(lanes);
  const int64_t c = static_cast<int64_t>(per_channel.size());
  for (int64_t j = 0; j < lanes; ++j) out[j] = per_channel[j % c];
  return out;
}

}  // namespace

void batch_norm_backward_channels_last(const float* dy, const float* x, int64_t rows, int64_t channels,
                                       const float* mean, const float* invstd, const float* weight,
                                       float* grad_input, float* grad_weight, float* grad_bias, int num_threads) {
  if (channels <= 0) return;
  const int64_t c = channels;
  if (rows <= 0) {  // empty batch: zero sums (torch's value); no input gradient to write
    if (grad_weight != nullptr) std::fill(grad_weight, grad_weight + c, 0.0f);
    if (grad_bias != nullptr) std::fill(grad_bias, grad_bias + c, 0.0f);
    return;
  }
  const int64_t lanes = std::lcm(c, kTileFloats);
  const int64_t tile_rows = lanes / c;
  // Block size from (rows, C) only, so the summation order does not depend on the threads.
  const int64_t min_rows = tile_rows * ((kMinBlockFloats + lanes - 1) / lanes);
  const int64_t spread_rows = ((rows + kMaxBlocks - 1) / kMaxBlocks + tile_rows - 1) / tile_rows * tile_rows;
  const int64_t block_rows = std::max(min_rows, spread_rows);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const int threads = rows * c >= kParallelFloats ? resolve_threads(num_threads) : 1;

  std::vector<float> mean_c(mean, mean + c);
  const std::vector<float> mean_t = tiled(mean_c, lanes);
  std::vector<float> partial(static_cast<size_t>(blocks) * 2 * lanes, 0.0f);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * block_rows;
    const int64_t n = (std::min(rows, r0 + block_rows) - r0) * c;
    float* acc = partial.data() + b * 2 * lanes;
    sums(dy + r0 * c, x + r0 * c, n, lanes, mean_t.data(), acc, acc + lanes);
  }
  std::vector<double> sum_dy(c, 0.0), dot(c, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* acc = partial.data() + b * 2 * lanes;
    for (int64_t j = 0; j < lanes; ++j) {
      sum_dy[j % c] += acc[j];
      dot[j % c] += acc[lanes + j];
    }
  }
  for (int64_t k = 0; k < c; ++k) {
    if (grad_bias != nullptr) grad_bias[k] = static_cast<float>(sum_dy[k]);
    if (grad_weight != nullptr) grad_weight[k] = static_cast<float>(dot[k] * invstd[k]);
  }
  if (grad_input == nullptr) return;

  std::vector<float> mean_dy(c), scale(c), proj(c);
  for (int64_t k = 0; k < c; ++k) {
    const double s = static_cast<double>(invstd[k]);
    const double w = weight == nullptr ? 1.0 : static_cast<double>(weight[k]);
    mean_dy[k] = static_cast<float>(sum_dy[k] / rows);
    scale[k] = static_cast<float>(w * s);
    proj[k] = static_cast<float>(w * s * s * s * dot[k] / rows);
  }
  const std::vector<float> mean_dy_t = tiled(mean_dy, lanes), scale_t = tiled(scale, lanes),
                           proj_t = tiled(proj, lanes);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * block_rows;
    const int64_t n = (std::min(rows, r0 + block_rows) - r0) * c;
    input_grad(dy + r0 * c, x + r0 * c, n, lanes, mean_t.data(), mean_dy_t.data(), scale_t.data(), proj_t.data(),
               grad_input + r0 * c);
  }
}

}  // namespace cpu
}  // namespace mgm_fast
