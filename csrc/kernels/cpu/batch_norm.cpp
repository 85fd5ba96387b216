// Channels_last batch norm on the CPU (contracts in batch_norm.h).
#include "batch_norm.h"

#include <algorithm>
#include <cmath>
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

// How the (rows, C) matrix is cut: tiles of `lanes` floats (lane j holds channel j % C), and
// blocks of whole tiles whose size depends only on (rows, C), so that sums do not depend on the
// thread count.
struct Blocks {
  int64_t c, rows, lanes, block_rows, count;
  int threads;
  Blocks(int64_t rows_, int64_t c_, int num_threads) : c(c_), rows(rows_) {
    lanes = std::lcm(c, kTileFloats);
    const int64_t tile_rows = lanes / c;
    const int64_t min_rows = tile_rows * ((kMinBlockFloats + lanes - 1) / lanes);
    const int64_t spread_rows = ((rows + kMaxBlocks - 1) / kMaxBlocks + tile_rows - 1) / tile_rows * tile_rows;
    block_rows = std::max(min_rows, spread_rows);
    count = (rows + block_rows - 1) / block_rows;
    threads = rows * c >= kParallelFloats ? resolve_threads(num_threads) : 1;
  }
  int64_t offset(int64_t b) const { return b * block_rows * c; }                                // first float
  int64_t size(int64_t b) const { return (std::min(rows, (b + 1) * block_rows) - b * block_rows) * c; }  // floats
  // A per-channel vector repeated over a tile's lanes.
  std::vector<float> tiled(const float* per_channel) const {
    std::vector<float> out(lanes);
    for (int64_t j = 0; j < lanes; ++j) out[j] = per_channel[j % c];
    return out;
  }
  // Per-channel totals (double) of `sets` lane accumulators per block, added in block order.
  void fold(const std::vector<float>& partial, int sets, std::vector<std::vector<double>>& out) const {
    out.assign(sets, std::vector<double>(c, 0.0));
    for (int64_t b = 0; b < count; ++b) {
      const float* acc = partial.data() + b * sets * lanes;
      for (int s = 0; s < sets; ++s)
        for (int64_t j = 0; j < lanes; ++j) out[s][j % c] += acc[s * lanes + j];
    }
  }
};

// The reductions below run their whole tiles at the common tile widths -- lcm(C, 16) = 16 for
// C = 1, 2, 4, 8, 16; 32 for 32; 48 for 3, 6, 12, 24, 48; 64 for 64 -- with the width known at
// compile time, through local accumulators the compiler keeps in vector registers (summing into
// acc[] in memory chains every tile on a store and a reload). Each sum is still taken tile after
// tile from zero and then added to acc[] (zero at a block's start), so the bits are those of the
// plain loops, which run the other widths and a block's last, partial tile. The elementwise passes
// (normalize, input_grad) do the same with their tiled per-channel vectors.

// dst[j] = src[j] for a tile of kL floats (a tiled per-channel vector into registers).
template <int64_t kL>
MGM_FAST_INLINE void load_tile(const float* __restrict src, float* __restrict dst) {
  for (int64_t j = 0; j < kL; ++j) dst[j] = src[j];
}

// Whole kL-float tiles of n: acc[j] += x[j]; returns the floats done.
template <int64_t kL>
MGM_FAST_INLINE int64_t sum_tiles(const float* __restrict x, int64_t n, float* __restrict acc) {
  float a[kL] = {};
  int64_t e = 0;
  for (; e + kL <= n; e += kL) {
#pragma omp simd
    for (int64_t j = 0; j < kL; ++j) a[j] += x[e + j];
  }
  for (int64_t j = 0; j < kL; ++j) acc[j] += a[j];
  return e;
}

// acc[j] += x[j] over n floats from a tile start (j: the position in the tile; the last tile
// may be partial).
MGM_FAST_ISA_BODY void sum_body(const float* x, int64_t n, int64_t lanes, float* acc) {
  int64_t e = 0;
  switch (lanes) {
    case 16: e = sum_tiles<16>(x, n, acc); break;
    case 32: e = sum_tiles<32>(x, n, acc); break;
    case 48: e = sum_tiles<48>(x, n, acc); break;
    case 64: e = sum_tiles<64>(x, n, acc); break;
    default: break;
  }
  for (; e + lanes <= n; e += lanes) {
    const float* v = x + e;
    for (int64_t j = 0; j < lanes; ++j) acc[j] += v[j];
  }
  for (int64_t j = 0; e + j < n; ++j) acc[j] += x[e + j];
}
constexpr auto& lane_sums = MGM_FAST_ISA_DISPATCH(sum_body);

// Whole kL-float tiles of n: acc[j] += (x[j] - mean_t[j])^2; returns the floats done.
template <int64_t kL>
MGM_FAST_INLINE int64_t squares_tiles(const float* __restrict x, int64_t n, const float* __restrict mean_t,
                                      float* __restrict acc) {
  float m[kL], a[kL] = {};
  load_tile<kL>(mean_t, m);
  int64_t e = 0;
  for (; e + kL <= n; e += kL) {
#pragma omp simd
    for (int64_t j = 0; j < kL; ++j) {
      const float d = x[e + j] - m[j];
      a[j] += d * d;
    }
  }
  for (int64_t j = 0; j < kL; ++j) acc[j] += a[j];
  return e;
}

// acc[j] += (x[j] - mean_t[j])^2.
MGM_FAST_ISA_BODY void squares_body(const float* x, int64_t n, int64_t lanes, const float* mean_t, float* acc) {
  int64_t e = 0;
  switch (lanes) {
    case 16: e = squares_tiles<16>(x, n, mean_t, acc); break;
    case 32: e = squares_tiles<32>(x, n, mean_t, acc); break;
    case 48: e = squares_tiles<48>(x, n, mean_t, acc); break;
    case 64: e = squares_tiles<64>(x, n, mean_t, acc); break;
    default: break;
  }
  for (; e + lanes <= n; e += lanes) {
    const float* v = x + e;
    for (int64_t j = 0; j < lanes; ++j) {
      const float d = v[j] - mean_t[j];
      acc[j] += d * d;
    }
  }
  for (int64_t j = 0; e + j < n; ++j) {
    const float d = x[e + j] - mean_t[j];
    acc[j] += d * d;
  }
}
constexpr auto& lane_squares = MGM_FAST_ISA_DISPATCH(squares_body);

// y[j] = (x[j] - mean_t[j]) scale_t[j] + shift_t[j] (+ residual[j] with kResidual), then
// max(., 0) with kRelu.
template <bool kRelu, bool kResidual>
MGM_FAST_INLINE float normalized(const float* x, const float* residual, int64_t i, int64_t j, const float* mean_t,
                                 const float* scale_t, const float* shift_t) {
  float r = (x[i] - mean_t[j]) * scale_t[j] + shift_t[j];
  if (kResidual) r += residual[i];
  return kRelu ? std::max(r, 0.0f) : r;
}

// Whole kL-float tiles of n through normalized() with the tiled vectors in registers (as the
// reductions above; the same arithmetic per element); returns the floats done.
template <int64_t kL, bool kRelu, bool kResidual>
MGM_FAST_INLINE int64_t normalize_tiles(const float* __restrict x, const float* __restrict residual, int64_t n,
                                        const float* __restrict mean_t, const float* __restrict scale_t,
                                        const float* __restrict shift_t, float* __restrict y) {
  float m[kL], sc[kL], sh[kL];
  load_tile<kL>(mean_t, m);
  load_tile<kL>(scale_t, sc);
  load_tile<kL>(shift_t, sh);
  int64_t e = 0;
  for (; e + kL <= n; e += kL) {
#pragma omp simd
    for (int64_t j = 0; j < kL; ++j) y[e + j] = normalized<kRelu, kResidual>(x, residual, e + j, j, m, sc, sh);
  }
  return e;
}

template <bool kRelu, bool kResidual>
MGM_FAST_ISA_BODY void normalize_body(const float* x, const float* residual, int64_t n, int64_t lanes,
                                      const float* mean_t, const float* scale_t, const float* shift_t, float* y) {
  int64_t e = 0;
  switch (lanes) {
    case 16: e = normalize_tiles<16, kRelu, kResidual>(x, residual, n, mean_t, scale_t, shift_t, y); break;
    case 32: e = normalize_tiles<32, kRelu, kResidual>(x, residual, n, mean_t, scale_t, shift_t, y); break;
    case 48: e = normalize_tiles<48, kRelu, kResidual>(x, residual, n, mean_t, scale_t, shift_t, y); break;
    case 64: e = normalize_tiles<64, kRelu, kResidual>(x, residual, n, mean_t, scale_t, shift_t, y); break;
    default: break;
  }
  for (; e + lanes <= n; e += lanes) {
    for (int64_t j = 0; j < lanes; ++j)
      y[e + j] = normalized<kRelu, kResidual>(x, residual, e + j, j, mean_t, scale_t, shift_t);
  }
  for (int64_t j = 0; e + j < n; ++j)
    y[e + j] = normalized<kRelu, kResidual>(x, residual, e + j, j, mean_t, scale_t, shift_t);
}
constexpr auto& normalize = MGM_FAST_ISA_DISPATCH((normalize_body<false, false>));
constexpr auto& normalize_relu = MGM_FAST_ISA_DISPATCH((normalize_body<true, false>));
constexpr auto& normalize_residual = MGM_FAST_ISA_DISPATCH((normalize_body<false, true>));
constexpr auto& normalize_residual_relu = MGM_FAST_ISA_DISPATCH((normalize_body<true, true>));

// The gradient reaching the normalisation: dy, or dy where the ReLU's output is positive.
template <bool kRelu>
MGM_FAST_INLINE float masked(const float* dy, const float* out, int64_t i) {
  return kRelu ? (out[i] > 0.0f ? dy[i] : 0.0f) : dy[i];
}

// Whole kL-float tiles of n: acc_dy[j] += g[j], acc_dot[j] += g[j] (x[j] - mean_t[j]), g the
// masked gradient; returns the floats done.
template <int64_t kL, bool kRelu>
MGM_FAST_INLINE int64_t grad_sums_tiles(const float* __restrict dy, const float* __restrict x,
                                        const float* __restrict out, int64_t n, const float* __restrict mean_t,
                                        float* __restrict acc_dy, float* __restrict acc_dot) {
  float m[kL], a_dy[kL] = {}, a_dot[kL] = {};
  load_tile<kL>(mean_t, m);
  int64_t e = 0;
  for (; e + kL <= n; e += kL) {
#pragma omp simd
    for (int64_t j = 0; j < kL; ++j) {
      const float g = masked<kRelu>(dy, out, e + j);
      a_dy[j] += g;
      a_dot[j] += g * (x[e + j] - m[j]);
    }
  }
  for (int64_t j = 0; j < kL; ++j) {
    acc_dy[j] += a_dy[j];
    acc_dot[j] += a_dot[j];
  }
  return e;
}

// acc_dy[j] += g[j], acc_dot[j] += g[j] (x[j] - mean_t[j]), g the masked gradient.
template <bool kRelu>
MGM_FAST_ISA_BODY void grad_sums_body(const float* dy, const float* x, const float* out, int64_t n, int64_t lanes,
                                      const float* mean_t, float* acc_dy, float* acc_dot) {
  int64_t e = 0;
  switch (lanes) {
    case 16: e = grad_sums_tiles<16, kRelu>(dy, x, out, n, mean_t, acc_dy, acc_dot); break;
    case 32: e = grad_sums_tiles<32, kRelu>(dy, x, out, n, mean_t, acc_dy, acc_dot); break;
    case 48: e = grad_sums_tiles<48, kRelu>(dy, x, out, n, mean_t, acc_dy, acc_dot); break;
    case 64: e = grad_sums_tiles<64, kRelu>(dy, x, out, n, mean_t, acc_dy, acc_dot); break;
    default: break;
  }
  for (; e + lanes <= n; e += lanes) {
    for (int64_t j = 0; j < lanes; ++j) {
      const float g = masked<kRelu>(dy, out, e + j);
      acc_dy[j] += g;
      acc_dot[j] += g * (x[e + j] - mean_t[j]);
    }
  }
  for (int64_t j = 0; e + j < n; ++j) {
    const float g = masked<kRelu>(dy, out, e + j);
    acc_dy[j] += g;
    acc_dot[j] += g * (x[e + j] - mean_t[j]);
  }
}
constexpr auto& grad_sums = MGM_FAST_ISA_DISPATCH(grad_sums_body<false>);
constexpr auto& grad_sums_relu = MGM_FAST_ISA_DISPATCH(grad_sums_body<true>);

// dx[j] = (g[j] - mean_dy_t[j]) scale_t[j] - (x[j] - mean_t[j]) proj_t[j], and with kResidual
// also dres[j] = g[j].
template <int64_t kL, bool kRelu, bool kResidual>
MGM_FAST_INLINE int64_t input_grad_tiles(const float* __restrict dy, const float* __restrict x,
                                         const float* __restrict out, int64_t n, const float* __restrict mean_t,
                                         const float* __restrict mean_dy_t, const float* __restrict scale_t,
                                         const float* __restrict proj_t, float* __restrict dx,
                                         float* __restrict dres) {
  float m[kL], md[kL], sc[kL], pr[kL];
  load_tile<kL>(mean_t, m);
  load_tile<kL>(mean_dy_t, md);
  load_tile<kL>(scale_t, sc);
  load_tile<kL>(proj_t, pr);
  int64_t e = 0;
  for (; e + kL <= n; e += kL) {
#pragma omp simd
    for (int64_t j = 0; j < kL; ++j) {
      const float g = masked<kRelu>(dy, out, e + j);
      dx[e + j] = (g - md[j]) * sc[j] - (x[e + j] - m[j]) * pr[j];
      if (kResidual) dres[e + j] = g;
    }
  }
  return e;
}

template <bool kRelu, bool kResidual>
MGM_FAST_ISA_BODY void input_grad_body(const float* dy, const float* x, const float* out, int64_t n, int64_t lanes,
                                       const float* mean_t, const float* mean_dy_t, const float* scale_t,
                                       const float* proj_t, float* dx, float* dres) {
  int64_t e = 0;
  switch (lanes) {
    case 16:
      e = input_grad_tiles<16, kRelu, kResidual>(dy, x, out, n, mean_t, mean_dy_t, scale_t, proj_t, dx, dres);
      break;
    case 32:
      e = input_grad_tiles<32, kRelu, kResidual>(dy, x, out, n, mean_t, mean_dy_t, scale_t, proj_t, dx, dres);
      break;
    case 48:
      e = input_grad_tiles<48, kRelu, kResidual>(dy, x, out, n, mean_t, mean_dy_t, scale_t, proj_t, dx, dres);
      break;
    case 64:
      e = input_grad_tiles<64, kRelu, kResidual>(dy, x, out, n, mean_t, mean_dy_t, scale_t, proj_t, dx, dres);
      break;
    default: break;
  }
  for (; e + lanes <= n; e += lanes) {
    for (int64_t j = 0; j < lanes; ++j) {
      const float g = masked<kRelu>(dy, out, e + j);
      dx[e + j] = (g - mean_dy_t[j]) * scale_t[j] - (x[e + j] - mean_t[j]) * proj_t[j];
      if (kResidual) dres[e + j] = g;
    }
  }
  for (int64_t j = 0; e + j < n; ++j) {
    const float g = masked<kRelu>(dy, out, e + j);
    dx[e + j] = (g - mean_dy_t[j]) * scale_t[j] - (x[e + j] - mean_t[j]) * proj_t[j];
    if (kResidual) dres[e + j] = g;
  }
}
constexpr auto& input_grad = MGM_FAST_ISA_DISPATCH((input_grad_body<false, false>));
constexpr auto& input_grad_relu = MGM_FAST_ISA_DISPATCH((input_grad_body<true, false>));
constexpr auto& input_grad_residual = MGM_FAST_ISA_DISPATCH((input_grad_body<false, true>));
constexpr auto& input_grad_residual_relu = MGM_FAST_ISA_DISPATCH((input_grad_body<true, true>));

// dres[j] = g[j] alone (the input gradient not wanted).
template <bool kRelu>
MGM_FAST_ISA_BODY void mask_body(const float* dy, const float* out, int64_t n, float* dres) {
  for (int64_t i = 0; i < n; ++i) dres[i] = masked<kRelu>(dy, out, i);
}
constexpr auto& mask_only = MGM_FAST_ISA_DISPATCH(mask_body<false>);
constexpr auto& mask_only_relu = MGM_FAST_ISA_DISPATCH(mask_body<true>);

}  // namespace

void batch_norm_forward_channels_last(const float* x, int64_t rows, int64_t channels, const float* weight,
                                      const float* bias, const float* residual, float eps, bool relu, float* y,
                                      float* mean, float* invstd, float* running_mean, float* running_var,
                                      float momentum, int num_threads) {
  if (channels <= 0 || rows <= 0) return;
  const Blocks blk(rows, channels, num_threads);
  const int64_t c = channels, lanes = blk.lanes;
  std::vector<float> partial(static_cast<size_t>(blk.count) * lanes, 0.0f);
  std::vector<std::vector<double>> totals;
#pragma omp parallel for num_threads(blk.threads) schedule(static) if (blk.threads > 1)
  for (int64_t b = 0; b < blk.count; ++b) lane_sums(x + blk.offset(b), blk.size(b), lanes, partial.data() + b * lanes);
  blk.fold(partial, 1, totals);
  std::vector<double> mean_d(c);
  for (int64_t k = 0; k < c; ++k) {
    mean_d[k] = totals[0][k] / rows;
    mean[k] = static_cast<float>(mean_d[k]);
  }
  const std::vector<float> mean_t = blk.tiled(mean);
  std::fill(partial.begin(), partial.end(), 0.0f);
#pragma omp parallel for num_threads(blk.threads) schedule(static) if (blk.threads > 1)
  for (int64_t b = 0; b < blk.count; ++b)
    lane_squares(x + blk.offset(b), blk.size(b), lanes, mean_t.data(), partial.data() + b * lanes);
  blk.fold(partial, 1, totals);
  std::vector<float> scale(c), shift(c);
  for (int64_t k = 0; k < c; ++k) {
    const double var = totals[0][k] / rows;
    const double s = 1.0 / std::sqrt(var + static_cast<double>(eps));
    invstd[k] = static_cast<float>(s);
    scale[k] = static_cast<float>(s * (weight == nullptr ? 1.0 : static_cast<double>(weight[k])));
    shift[k] = bias == nullptr ? 0.0f : bias[k];
    if (running_mean != nullptr) running_mean[k] = (1.0f - momentum) * running_mean[k] + momentum * mean[k];
    if (running_var != nullptr) {
      const double unbiased = rows > 1 ? var * rows / (rows - 1) : var;
      running_var[k] = (1.0f - momentum) * running_var[k] + momentum * static_cast<float>(unbiased);
    }
  }
  const std::vector<float> scale_t = blk.tiled(scale.data()), shift_t = blk.tiled(shift.data());
#pragma omp parallel for num_threads(blk.threads) schedule(static) if (blk.threads > 1)
  for (int64_t b = 0; b < blk.count; ++b) {
    const int64_t o = blk.offset(b);
    auto& body = residual != nullptr ? (relu ? normalize_residual_relu : normalize_residual)
                                     : (relu ? normalize_relu : normalize);
    body(x + o, residual != nullptr ? residual + o : nullptr, blk.size(b), lanes, mean_t.data(), scale_t.data(),
         shift_t.data(), y + o);
  }
}

void batch_norm_backward_channels_last(const float* dy, const float* x, int64_t rows, int64_t channels,
                                       const float* mean, const float* invstd, const float* weight,
                                       const float* relu_out, float* grad_input, float* grad_weight,
                                       float* grad_bias, float* grad_residual, int num_threads) {
  if (channels <= 0) return;
  const int64_t c = channels;
  if (rows <= 0) {  // empty batch: zero sums (torch's value); no input gradient to write
    if (grad_weight != nullptr) std::fill(grad_weight, grad_weight + c, 0.0f);
    if (grad_bias != nullptr) std::fill(grad_bias, grad_bias + c, 0.0f);
    return;
  }
  const Blocks blk(rows, c, num_threads);
  const int64_t lanes = blk.lanes;
  const bool relu = relu_out != nullptr;
  const std::vector<float> mean_t = blk.tiled(mean);
  std::vector<float> partial(static_cast<size_t>(blk.count) * 2 * lanes, 0.0f);
#pragma omp parallel for num_threads(blk.threads) schedule(static) if (blk.threads > 1)
  for (int64_t b = 0; b < blk.count; ++b) {
    float* acc = partial.data() + b * 2 * lanes;
    const int64_t o = blk.offset(b);
    auto& body = relu ? grad_sums_relu : grad_sums;
    body(dy + o, x + o, relu ? relu_out + o : nullptr, blk.size(b), lanes, mean_t.data(), acc, acc + lanes);
  }
  std::vector<std::vector<double>> totals;
  blk.fold(partial, 2, totals);
  const std::vector<double>& sum_dy = totals[0];
  const std::vector<double>& dot = totals[1];
  for (int64_t k = 0; k < c; ++k) {
    if (grad_bias != nullptr) grad_bias[k] = static_cast<float>(sum_dy[k]);
    if (grad_weight != nullptr) grad_weight[k] = static_cast<float>(dot[k] * invstd[k]);
  }
  const bool residual = grad_residual != nullptr;
  if (grad_input == nullptr) {
    if (!residual) return;
#pragma omp parallel for num_threads(blk.threads) schedule(static) if (blk.threads > 1)
    for (int64_t b = 0; b < blk.count; ++b) {
      const int64_t o = blk.offset(b);
      auto& body = relu ? mask_only_relu : mask_only;
      body(dy + o, relu ? relu_out + o : nullptr, blk.size(b), grad_residual + o);
    }
    return;
  }

  std::vector<float> mean_dy(c), scale(c), proj(c);
  for (int64_t k = 0; k < c; ++k) {
    const double s = static_cast<double>(invstd[k]);
    const double w = weight == nullptr ? 1.0 : static_cast<double>(weight[k]);
    mean_dy[k] = static_cast<float>(sum_dy[k] / rows);
    scale[k] = static_cast<float>(w * s);
    proj[k] = static_cast<float>(w * s * s * s * dot[k] / rows);
  }
  const std::vector<float> mean_dy_t = blk.tiled(mean_dy.data()), scale_t = blk.tiled(scale.data()),
                           proj_t = blk.tiled(proj.data());
#pragma omp parallel for num_threads(blk.threads) schedule(static) if (blk.threads > 1)
  for (int64_t b = 0; b < blk.count; ++b) {
    const int64_t o = blk.offset(b);
    auto& body = residual ? (relu ? input_grad_residual_relu : input_grad_residual)
                          : (relu ? input_grad_relu : input_grad);
    body(dy + o, x + o, relu ? relu_out + o : nullptr, blk.size(b), lanes, mean_t.data(), mean_dy_t.data(),
         scale_t.data(), proj_t.data(), grad_input + o, residual ? grad_residual + o : nullptr);
  }
}

}  // namespace cpu
}  // namespace mgm_fast
