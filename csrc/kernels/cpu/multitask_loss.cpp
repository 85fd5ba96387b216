// Fused MGM dense losses on the CPU (see multitask_loss.h for the formulas and contracts).
//
// Segmentation CE, per (b, h) row and per tile of kTile pixels along W:
//   pass 1  m_i = max_c x[c, i]                         (read the logits)
//   pass 2  e_ci = exp(x[c, i] - m_i), s_i += e_ci       (read the logits, write e into grad)
//   labels  l_i = (m_i - x[t_i, i]) + log s_i, r_i = scale / s_i (0 on ignored pixels)
//   pass 3  grad[c, i] = e_ci * r_i, grad[t_i, i] -= scale
// The tile (kTile pixels x C <= ~100 classes of logits and gradient) stays in L1/L2, so the
// logits are streamed from memory once and the gradient written once; no softmax tensor is
// kept. The class axis is strided by H*W in NCHW, which is why the loops run over classes
// outside and pixels inside: the inner loop is unit-stride (vectorised) for NCHW and strided
// for channels_last (still correct, tile still in cache).
#include "multitask_loss.h"

#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/cpu/isa.h"
#include "kernels/cpu/threads.h"
#include "kernels/cpu/vec_math.h"

namespace mgm_fast {
namespace cpu {
namespace {


constexpr int64_t kTile = 64;            // pixels processed together along W
constexpr int64_t kChunkPixels = 4096;   // pixels per reduction chunk (shape-only)

// Lower clamp of the exponent argument: exp(-104) < 2^-149 rounds to 0 in float.
constexpr float kExpFloor = -104.0f;

// Clamp of d = x - max to [kExpFloor, +inf), NaN kept. Written as a select whose result is
// stored, the one form gcc vectorises under the default -ftrapping-math.
inline float clamp_exp_arg(float d) { return d < kExpFloor ? kExpFloor : d; }

struct SegChunk {
  double loss = 0.0;
  bool error = false;
  int64_t bad_label = 0;
  int64_t bad_pixel = -1;
};

// One tile of n <= kTile pixels of row (b, h) starting at column w0.
template <bool kUnitW>
MGM_FAST_INLINE void seg_tile(const SegCEProblem& P, int64_t b, int64_t h, int64_t w0,
                              int64_t n, float scale, SegChunk& acc) {
  const int64_t C = P.classes;
  const Strides4& ls = P.logits_strides;
  const int64_t xw = kUnitW ? 1 : ls.w;
  const float* __restrict__ x = P.logits + b * ls.n + h * ls.h + w0 * ls.w;
  const int64_t* t = P.target + b * P.target_strides.n + h * P.target_strides.h +
                     w0 * P.target_strides.w;

  float m[kTile], s[kTile], r[kTile], d[kTile];
  int64_t lab[kTile];

  for (int64_t i = 0; i < n; ++i) m[i] = x[i * xw];
  for (int64_t c = 1; c < C; ++c) {
    const float* __restrict__ xc = x + c * ls.c;
    for (int64_t i = 0; i < n; ++i) {
      const float v = xc[i * xw];
      m[i] = v > m[i] ? v : m[i];
    }
  }
  for (int64_t i = 0; i < n; ++i) s[i] = 0.0f;

  float* __restrict__ g = nullptr;
  const Strides4& gs = P.grad_strides;
  const int64_t gw = kUnitW ? 1 : gs.w;
  if (P.grad != nullptr) g = P.grad + b * gs.n + h * gs.h + w0 * gs.w;
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict__ xc = x + c * ls.c;
    for (int64_t i = 0; i < n; ++i) d[i] = clamp_exp_arg(xc[i * xw] - m[i]);
    if (g != nullptr) {
      float* __restrict__ gc = g + c * gs.c;
      for (int64_t i = 0; i < n; ++i) {
        const float e = exp_clamped(d[i]);
        s[i] += e;
        gc[i * gw] = e;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) s[i] += exp_clamped(d[i]);
    }
  }

  const int64_t first_pixel = (b * P.height + h) * P.width + w0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = t[i * P.target_strides.w];
    lab[i] = -1;
    r[i] = 0.0f;
    if (P.has_ignore && label == P.ignore_index) continue;
    if (label < 0 || label >= C) {
      if (!acc.error) {
        acc.error = true;
        acc.bad_label = label;
        acc.bad_pixel = first_pixel + i;
      }
      continue;
    }
    // (m - x_t) is exact when the target is near the max; log s >= 0.
    const float nll = (m[i] - x[label * ls.c + i * xw]) + std::log(s[i]);
    acc.loss += static_cast<double>(nll);
    r[i] = scale / s[i];
    lab[i] = label;
  }

  if (g != nullptr) {
    for (int64_t c = 0; c < C; ++c) {
      float* __restrict__ gc = g + c * gs.c;
      for (int64_t i = 0; i < n; ++i) gc[i * gw] *= r[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      if (lab[i] >= 0) g[lab[i] * gs.c + i * gw] -= scale;
    }
  }
}

// Rows [row_begin, row_end) of (b, h); one reduction chunk.
MGM_FAST_ISA_BODY void seg_rows_body(const SegCEProblem& P, int64_t row_begin, int64_t row_end,
                                     bool unit, float scale, SegChunk& acc) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / P.height, h = row % P.height;
    for (int64_t w0 = 0; w0 < P.width; w0 += kTile) {
      const int64_t n = P.width - w0 < kTile ? P.width - w0 : kTile;
      if (unit) {
        seg_tile<true>(P, b, h, w0, n, scale, acc);
      } else {
        seg_tile<false>(P, b, h, w0, n, scale, acc);
      }
    }
  }
}
constexpr auto& seg_rows = MGM_FAST_ISA_DISPATCH(seg_rows_body);

int64_t count_not_ignored(const SegCEProblem& P, int nt) {
  const int64_t rows = P.batch * P.height;
  int64_t count = 0;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : count) if (rows > 64)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / P.height, h = row % P.height;
    const int64_t* t = P.target + b * P.target_strides.n + h * P.target_strides.h;
    int64_t local = 0;
    for (int64_t w = 0; w < P.width; ++w) local += t[w * P.target_strides.w] != P.ignore_index;
    count += local;
  }
  return count;  // integer sum: exact in any order
}

template <typename M, bool kUnitW>
inline float mask_at(const M* mrow, int64_t w, int64_t mw) {
  return static_cast<float>(mrow[w * (kUnitW ? 1 : mw)]);
}

// Sum of the mask over its own (B, mask_channels, H, W) elements, in fixed chunks.
double mask_sum(const L1Problem& P, int nt) {
  const int64_t rows = P.batch * P.mask_channels * P.height;
  const int64_t rpc = rows_per_chunk(P.width);
  const int64_t chunks = (rows + rpc - 1) / rpc;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
  const Strides4& ms = P.mask_strides;
#pragma omp parallel for schedule(static) num_threads(nt) if (chunks > 1)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    double acc = 0.0;
    const int64_t end = (ch + 1) * rpc < rows ? (ch + 1) * rpc : rows;
    for (int64_t row = ch * rpc; row < end; ++row) {
      const int64_t h = row % P.height;
      const int64_t c = (row / P.height) % P.mask_channels;
      const int64_t b = row / (P.height * P.mask_channels);
      const int64_t off = b * ms.n + c * ms.c + h * ms.h;
      if (P.mask_kind == MaskKind::kUInt8) {
        const uint8_t* mrow = static_cast<const uint8_t*>(P.mask) + off;
        for (int64_t w = 0; w < P.width; ++w) acc += mrow[w * ms.w];
      } else {
        const float* mrow = static_cast<const float*>(P.mask) + off;
        for (int64_t w = 0; w < P.width; ++w) acc += static_cast<double>(mrow[w * ms.w]);
      }
    }
    part[static_cast<size_t>(ch)] = acc;
  }
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

// One (b, h) row of every channel. M is the mask element type (unused for kNone).
template <bool kUnitW, MaskKind kMask, typename M>
MGM_FAST_INLINE double l1_row(const L1Problem& P, int64_t b, int64_t h, float scale) {
  const Strides4 &ps = P.pred_strides, &ts = P.target_strides, &gs = P.grad_strides,
                 &ms = P.mask_strides;
  const int64_t W = P.width;
  double loss = 0.0;
  for (int64_t c = 0; c < P.channels; ++c) {
    const float* __restrict__ p = P.pred + b * ps.n + c * ps.c + h * ps.h;
    const float* __restrict__ t = P.target + b * ts.n + c * ts.c + h * ts.h;
    const int64_t pw = kUnitW ? 1 : ps.w, tw = kUnitW ? 1 : ts.w, gw = kUnitW ? 1 : gs.w;
    const M* mrow = nullptr;
    if (kMask != MaskKind::kNone) {
      const int64_t mc = P.mask_channels == 1 ? 0 : c;
      mrow = static_cast<const M*>(P.mask) + b * ms.n + mc * ms.c + h * ms.h;
    }
    double row_loss = 0.0;
    if (P.grad != nullptr) {
      float* __restrict__ g = P.grad + b * gs.n + c * gs.c + h * gs.h;
#pragma omp simd reduction(+ : row_loss)
      for (int64_t w = 0; w < W; ++w) {
        const float d = p[w * pw] - t[w * tw];
        const float wt = kMask == MaskKind::kNone ? 1.0f : mask_at<M, kUnitW>(mrow, w, ms.w);
        const float sign = (d > 0.0f ? 1.0f : 0.0f) - (d < 0.0f ? 1.0f : 0.0f);
        row_loss += static_cast<double>(std::fabs(d) * wt);
        g[w * gw] = sign * (wt * scale);
      }
    } else {
#pragma omp simd reduction(+ : row_loss)
      for (int64_t w = 0; w < W; ++w) {
        const float d = p[w * pw] - t[w * tw];
        const float wt = kMask == MaskKind::kNone ? 1.0f : mask_at<M, kUnitW>(mrow, w, ms.w);
        row_loss += static_cast<double>(std::fabs(d) * wt);
      }
    }
    loss += row_loss;
  }
  return loss;
}

template <bool kUnitW>
MGM_FAST_INLINE double l1_rows_unit(const L1Problem& P, int64_t row_begin, int64_t row_end,
                                    float scale) {
  double acc = 0.0;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / P.height, h = row % P.height;
    switch (P.mask_kind) {
      case MaskKind::kNone:
        acc += l1_row<kUnitW, MaskKind::kNone, float>(P, b, h, scale);
        break;
      case MaskKind::kUInt8:
        acc += l1_row<kUnitW, MaskKind::kUInt8, uint8_t>(P, b, h, scale);
        break;
      case MaskKind::kFloat32:
        acc += l1_row<kUnitW, MaskKind::kFloat32, float>(P, b, h, scale);
        break;
    }
  }
  return acc;
}

// Rows [row_begin, row_end) of (b, h), all channels; one reduction chunk.
MGM_FAST_ISA_BODY double l1_rows_body(const L1Problem& P, int64_t row_begin, int64_t row_end,
                                      bool unit, float scale) {
  return unit ? l1_rows_unit<true>(P, row_begin, row_end, scale)
              : l1_rows_unit<false>(P, row_begin, row_end, scale);
}
constexpr auto& l1_rows = MGM_FAST_ISA_DISPATCH(l1_rows_body);

double l1_all_rows(const L1Problem& P, float scale, int nt) {
  const bool unit = P.pred_strides.w == 1 && P.target_strides.w == 1 &&
                    (P.grad == nullptr || P.grad_strides.w == 1) &&
                    (P.mask_kind == MaskKind::kNone || P.mask_strides.w == 1);
  const int64_t rows = P.batch * P.height;
  const int64_t rpc = rows_per_chunk(P.width);
  const int64_t chunks = (rows + rpc - 1) / rpc;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static) num_threads(nt) if (chunks > 1)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t end = (ch + 1) * rpc < rows ? (ch + 1) * rpc : rows;
    part[static_cast<size_t>(ch)] = l1_rows(P, ch * rpc, end, unit, scale);
  }
  double total = 0.0;
  for (double v : part) total += v;  // chunk order: independent of the thread count
  return total;
}

}  // namespace

float exp_nonpositive(float x) { return exp_clamped(clamp_exp_arg(x)); }

int64_t rows_per_chunk(int64_t width) {
  const int64_t w = width > 0 ? width : 1;
  const int64_t rows = kChunkPixels / w;
  return rows > 0 ? rows : 1;
}

LossResult seg_ce(const SegCEProblem& P, int num_threads) {
  const int nt = resolve_threads(num_threads);
  LossResult result;
  const int64_t pixels = P.batch * P.height * P.width;
  if (P.has_ignore) {
    const int64_t valid = count_not_ignored(P, nt);
    result.divisor = static_cast<double>(valid > 0 ? valid : 1);
  } else {
    result.divisor = static_cast<double>(pixels);  // 0 pixels: 0/0 = NaN, like torch's mean
  }
  const float scale = static_cast<float>(1.0 / result.divisor);

  const int64_t rows = P.batch * P.height;
  const int64_t rpc = rows_per_chunk(P.width);
  const int64_t chunks = (rows + rpc - 1) / rpc;
  std::vector<SegChunk> part(static_cast<size_t>(chunks));
  const bool unit = P.logits_strides.w == 1 && (P.grad == nullptr || P.grad_strides.w == 1);
#pragma omp parallel for schedule(static) num_threads(nt) if (chunks > 1)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t end = (ch + 1) * rpc < rows ? (ch + 1) * rpc : rows;
    seg_rows(P, ch * rpc, end, unit, scale, part[static_cast<size_t>(ch)]);
  }
  double total = 0.0;
  for (const SegChunk& acc : part) {
    total += acc.loss;
    if (acc.error && !result.label_error) {
      result.label_error = true;
      result.bad_label = acc.bad_label;
      result.bad_pixel = acc.bad_pixel;
    }
  }
  result.loss = total / result.divisor;
  return result;
}

LossResult masked_l1(const L1Problem& P, int num_threads) {
  const int nt = resolve_threads(num_threads);
  LossResult result;
  const int64_t numel = P.batch * P.channels * P.height * P.width;
  if (P.reduction == Reduction::kAll) {
    result.divisor = static_cast<double>(numel);
  } else if (P.mask_kind == MaskKind::kNone) {
    result.divisor = static_cast<double>(numel > 0 ? numel : 1);
  } else {
    // a (B, 1, H, W) mask is broadcast over the C channels, so it counts C times
    const double broadcast = static_cast<double>(P.mask_channels == 1 ? P.channels : 1);
    const double count = mask_sum(P, nt) * broadcast;
    result.divisor = count < 1.0 ? 1.0 : count;  // clamp_min(1); NaN stays NaN
  }
  const float scale = static_cast<float>(1.0 / result.divisor);
  const double total = l1_all_rows(P, scale, nt);
  result.loss = total / result.divisor;
  return result;
}

}  // namespace cpu
}  // namespace mgm_fast
