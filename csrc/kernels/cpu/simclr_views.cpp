// Fused SimCLR view generation on the CPU (see simclr_views.h for the formulas and contracts).
//
// One view, output (oh, ow), buffer layout (oh, 3, ow) -- a row's three channels side by side:
//
//   taps      column taps (flip folded in by reversing them) and row taps, once per view
//   pass 1    for each output row i: resample the two source rows y0[i], y1[i] of the crop
//             along the columns (cached: consecutive output rows share source rows), blend
//             them along the rows, run the jitter ops up to the first contrast (+ grayscale
//             when there is no contrast), accumulate the channel sums a contrast needs; the
//             row goes straight to the output when neither a contrast nor the blur follows
//   pass 2..  one pass over the buffer per contrast op: apply it with the mean of the image
//             as it is now, then the ops up to the next contrast
//   blur      per output row: the vertical taps over the buffer rows into a reflect-padded
//             line, the horizontal taps along it, scaled to [-1, 1] into the output
//
// The row loops are unit-stride float32 arithmetic on data in L1/L2 (a 128 x 128 view is
// ~200 KB), written so that the compiler vectorises them without -ffast-math: bit-mask
// selects instead of branches (select_bits: GCC turns plain selects into branches that only
// AVX-512 masking vectorises), 0/1 masks as floats, a rounding-trick floor, no libm calls in
// the pixel loops. They are compiled three times (baseline x86-64, x86-64-v3, x86-64-v4) and
// run at the level chosen in isa.h; the pixel loops vectorise at every level.
#include "simclr_views.h"

#include <cmath>
#include <cstring>
#include <utility>
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

// ITU-R 601-2 luma weights (augment.GRAY_WEIGHTS), as float32 like torch's scalar arithmetic.
constexpr float kGrayR = 0.299f;
constexpr float kGrayG = 0.587f;
constexpr float kGrayB = 0.114f;

// clamp(v, lo, hi) with torch's NaN propagation, by bit-mask selects (vec_math.h). Plain
// selects vectorise here too, but GCC merges the two of a clamp into a longer compare-and-blend
// chain, and in hue_row it turns them into branches (a clamped 0 or 1 simplifies the
// arithmetic after it) that only AVX-512 masking vectorises.
MGM_FAST_INLINE float clamp_range(float v, float lo, float hi) {
  const float a = select_bits(v < lo, lo, v);
  return select_bits(a > hi, hi, a);
}

MGM_FAST_INLINE float clamp01(float v) { return clamp_range(v, 0.0f, 1.0f); }

// 1.0f if c else 0.0f, by a bit mask (an integer select would be a branch again, see
// clamp_range).
MGM_FAST_INLINE float one_if(bool c) {
  return vec_math_detail::as_float(0x3f800000u & (0u - static_cast<uint32_t>(c)));
}

// floor(x) for |x| <= 2^22 (larger values are clamped there first), exact and vectorisable
// without SSE4.1 or a libm call: round to the nearest integer with the 1.5 * 2^23 trick, then
// step down where that rounded up. NaN stays NaN.
MGM_FAST_INLINE float floor_exact(float x) {
  constexpr float kLimit = 4194304.0f;   // 2^22
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: x + kRound has unit spacing
  const float xc = clamp_range(x, -kLimit, kLimit);
  const float r = (xc + kRound) - kRound;
  return r - one_if(r > xc);
}

// Sum of n floats (a vectorised reduction: lane-wise partial sums, then added together).
MGM_FAST_INLINE float row_sum(const float* __restrict__ v, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += v[j];
  return s;
}

// Hue rotation of n pixels, the arithmetic of augment._hue_rotate_ step by step (shift4 is
// 4 + 6 * shift), with its exact 0/1 channel masks as floats: every value is computed
// unconditionally and combined by multiplies and bit-mask selects (select_bits, clamp_range,
// one_if), so the loop vectorises under the default -ftrapping-math at every level.
// The inputs are clamped to [0, 1] first (the clamp that ends every jitter round of the torch
// path, including a hue round, before the rotation).
//
// With FMA (x86-64-v3 and v4) the kernel has always fused h * inv into the addition of
// -4 * is_r and rounded the products chroma * d before subtracting them; the code pins those
// roundings down: -4 * is_r and -2 * is_g are selects of constants (-4 * 0 is -0), so h * inv
// is the only product that addition can fuse, and chroma * clamp(d, 1, 2) is a select of
// 2 chroma and chroma * max(d, 1), which no subtraction can fuse. Every other product is of
// a 0/1 mask or of 2 or 6, exact whether fused or not.
MGM_FAST_INLINE void hue_row(float* __restrict__ r, float* __restrict__ g, float* __restrict__ b,
                             int64_t n, float shift4) {
  for (int64_t j = 0; j < n; ++j) {
    const float R = clamp01(r[j]);
    const float G = clamp01(g[j]);
    const float B = clamp01(b[j]);
    const float mx = select_bits(R < G, G, R);
    const float maxc = select_bits(mx < B, B, mx);
    const float mn = select_bits(G < R, G, R);
    const float minc = select_bits(B < mn, B, mn);
    const float chroma = maxc - minc;
    const float inv = 1.0f / select_bits(chroma < 1e-30f, 1e-30f, chroma);  // grays: numerator 0
    const bool r_max = R == maxc;
    const bool g_max = (G == maxc) & !r_max;  // R wins ties
    const float is_r = one_if(r_max);
    const float is_g = one_if(g_max);
    float h = R - G;
    const float t1 = (G - B) - h;
    const float t2 = (B - R) - h;
    h = h + is_r * t1;
    h = h + is_g * t2;
    h = h * inv + select_bits(r_max, -4.0f, -0.0f);  // + -4 * is_r
    h = h + select_bits(g_max, -2.0f, -0.0f);        // + -2 * is_g
    h = h + shift4;
    h = h - 6.0f * floor_exact(h / 6.0f);  // wrap into [0, 6)
    const float two_chroma = 2.0f * chroma;
    const float base = minc + two_chroma;
    const float to_red = 6.0f - h;
    const float dr = select_bits(to_red < h, to_red, h);
    const float dg = std::fabs(h - 2.0f);
    const float db = std::fabs(h - 4.0f);
    const float ar = select_bits(dr < 1.0f, 1.0f, dr);
    const float ag = select_bits(dg < 1.0f, 1.0f, dg);
    const float ab = select_bits(db < 1.0f, 1.0f, db);
    // base - chroma * clamp(d, 1, 2)
    r[j] = base - select_bits(ar > 2.0f, two_chroma, chroma * ar);
    g[j] = base - select_bits(ag > 2.0f, two_chroma, chroma * ag);
    b[j] = base - select_bits(ab > 2.0f, two_chroma, chroma * ab);
  }
}

// A per-pixel step of a view, in application order.
enum PixelOpKind : int32_t {
  kOpBrightness = 0,  // v = clamp(f v)
  kOpContrast,        // v = clamp(gamma + f v), gamma = (1 - f) * mean gray of the current image
  kOpSaturation,      // v = clamp(gray((1 - f) w) + f v)
  kOpHue,             // v = hue_rotate(clamp(v), f)  (the clamp is inside hue_row)
  kOpClamp,           // v = clamp(v): a jitter round that changes nothing (hue shift 0)
  kOpGray,            // v = gray(v) on every channel
};

struct PixelOp {
  int32_t kind = kOpClamp;
  float f = 1.0f;
  float gamma = 0.0f;  // contrast only, set before its pass
};

// v = clamp(f v) over n values.
MGM_FAST_INLINE void op_scale(float* __restrict__ v, int64_t n, float f) {
  for (int64_t j = 0; j < n; ++j) v[j] = clamp01(v[j] * f);
}

// v = clamp(gamma + f v) over n values (torch's addcmul(plane, img, alpha) with plane = gamma).
MGM_FAST_INLINE void op_affine(float* __restrict__ v, int64_t n, float f, float gamma) {
  for (int64_t j = 0; j < n; ++j) v[j] = clamp01(gamma + v[j] * f);
}

MGM_FAST_INLINE void op_clamp(float* __restrict__ v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) v[j] = clamp01(v[j]);
}

// Saturation: plane = R kr + G kg + B kb with k = (1 - f) w rounded to float as beta * w is in
// the torch path, then v = clamp(plane + f v).
MGM_FAST_INLINE void op_saturation(float* __restrict__ r, float* __restrict__ g,
                                   float* __restrict__ b, int64_t n, float f) {
  const float om = 1.0f - f;
  const float kr = om * kGrayR, kg = om * kGrayG, kb = om * kGrayB;
  for (int64_t j = 0; j < n; ++j) {
    const float R = r[j], G = g[j], B = b[j];
    float plane = R * kr;
    plane = plane + G * kg;
    plane = plane + B * kb;
    r[j] = clamp01(plane + R * f);
    g[j] = clamp01(plane + G * f);
    b[j] = clamp01(plane + B * f);
  }
}

MGM_FAST_INLINE void op_gray(float* __restrict__ r, float* __restrict__ g, float* __restrict__ b,
                             int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float luma = r[j] * kGrayR;
    luma = luma + g[j] * kGrayG;
    luma = luma + b[j] * kGrayB;
    r[j] = luma;
    g[j] = luma;
    b[j] = luma;
  }
}

// Runs ops [begin, end) on one row: planes r = row, g = row + w, b = row + 2w.
MGM_FAST_INLINE void apply_ops(float* row, int64_t w, const PixelOp* ops, int begin, int end) {
  for (int k = begin; k < end; ++k) {
    const PixelOp& op = ops[k];
    switch (op.kind) {
      case kOpBrightness:
        op_scale(row, 3 * w, op.f);
        break;
      case kOpContrast:
        op_affine(row, 3 * w, op.f, op.gamma);
        break;
      case kOpSaturation:
        op_saturation(row, row + w, row + 2 * w, w, op.f);
        break;
      case kOpHue:
        hue_row(row, row + w, row + 2 * w, w, 4.0f + 6.0f * op.f);
        break;
      case kOpClamp:
        op_clamp(row, 3 * w);
        break;
      case kOpGray:
        op_gray(row, row + w, row + 2 * w, w);
        break;
      default:
        break;
    }
  }
}

// Output row i of view n: (oh, 3, ow)-layout row -> the three (n, c, i, :) rows, 2v - 1 clamped.
MGM_FAST_INLINE void store_row(const float* __restrict__ row, float* __restrict__ out, int64_t oh,
                               int64_t ow, int64_t i) {
  for (int64_t c = 0; c < 3; ++c) {
    const float* __restrict__ src = row + c * ow;
    float* __restrict__ dst = out + (c * oh + i) * ow;
    for (int64_t j = 0; j < ow; ++j) dst[j] = clamp_range(src[j] * 2.0f - 1.0f, -1.0f, 1.0f);
  }
}

MGM_FAST_INLINE int64_t reflect101(int64_t i, int64_t n) {
  if (i < 0) return -i;
  if (i >= n) return 2 * (n - 1) - i;
  return i;
}

// Separable blur of `channels` planes of (height, width). Plane c's row i is read at
// src(c, i) and the blurred row is handed to store(c, i, values). vpad holds width + 2 rad
// floats, hacc width floats. Accumulation order of augment._blur_separable_.
template <typename SrcRow, typename Store>
MGM_FAST_INLINE void blur_planes(SrcRow src, Store store, int64_t channels, int64_t height,
                                 int64_t width, const float* taps, int64_t rad,
                                 float* __restrict__ vpad, float* __restrict__ hacc) {
  const float t0 = taps[rad];
  float* __restrict__ vp = vpad + rad;
  for (int64_t i = 0; i < height; ++i) {
    for (int64_t c = 0; c < channels; ++c) {
      const float* __restrict__ center = src(c, i);
      for (int64_t j = 0; j < width; ++j) vp[j] = center[j] * t0;
      for (int64_t d = 1; d <= rad; ++d) {
        const float td = taps[rad + d];
        const float* __restrict__ up = src(c, reflect101(i - d, height));
        const float* __restrict__ dn = src(c, reflect101(i + d, height));
        for (int64_t j = 0; j < width; ++j) {
          float v = vp[j] + up[j] * td;
          vp[j] = v + dn[j] * td;
        }
      }
      for (int64_t d = 1; d <= rad; ++d) {  // reflect-101 columns
        vp[-d] = vp[d];
        vp[width - 1 + d] = vp[width - 1 - d];
      }
      for (int64_t j = 0; j < width; ++j) hacc[j] = vp[j] * t0;
      for (int64_t d = 1; d <= rad; ++d) {
        const float td = taps[rad + d];
        for (int64_t j = 0; j < width; ++j) {
          float v = hacc[j] + vp[j - d] * td;
          hacc[j] = v + vp[j + d] * td;
        }
      }
      store(c, i, static_cast<const float*>(hacc));
    }
  }
}

// Float offsets of one view's scratch (sizes for the largest view of a call).
struct Layout {
  int64_t col_w0, col_w1, row_w0, row_w1, src_row, cache, line, buf, vpad, hacc, taps, floats;
  int64_t col_i0, col_i1, row_i0, row_i1, ints;
};

Layout make_layout(const SimclrViewsProblem& P) {
  const int64_t oh = P.out_height, ow = P.out_width, rs = 3 * ow, rad = P.blur_kernel / 2;
  Layout L{};
  int64_t at = 0;
  auto take = [&at](int64_t n) {
    const int64_t here = at;
    at += (n + 15) / 16 * 16;  // 16-float (64-byte) steps: arrays keep the scratch's alignment
    return here;
  };
  L.col_w0 = take(ow);
  L.col_w1 = take(ow);
  L.row_w0 = take(oh);
  L.row_w1 = take(oh);
  L.src_row = take(3 * P.width);
  L.cache = take(2 * rs);
  L.line = take(rs);
  L.buf = take(oh * rs);
  L.vpad = take(ow + 2 * rad);
  L.hacc = take(ow);
  L.taps = take(P.blur_kernel);
  L.floats = at;
  L.col_i0 = 0;
  L.col_i1 = ow;
  L.row_i0 = 2 * ow;
  L.row_i1 = 2 * ow + oh;
  L.ints = 2 * ow + 2 * oh;
  return L;
}

// dst[c * ow + j] = w0[j] src[c * cw + x0[j]] + w1[j] src[c * cw + x1[j]] for the 3 channels.
// The channels share their taps, so the indexed loads (emulated lane by lane: gcc emits no
// hardware gathers under generic tuning) extract each index once for three outputs.
MGM_FAST_INLINE void gather_columns(const float* __restrict__ src, int64_t cw, int64_t ow,
                                    const int32_t* __restrict__ x0,
                                    const int32_t* __restrict__ x1,
                                    const float* __restrict__ w0, const float* __restrict__ w1,
                                    float* __restrict__ dst) {
  const float* __restrict__ sr = src;
  const float* __restrict__ sg = src + cw;
  const float* __restrict__ sb = src + 2 * cw;
  float* __restrict__ dr = dst;
  float* __restrict__ dg = dst + ow;
  float* __restrict__ db = dst + 2 * ow;
  for (int64_t j = 0; j < ow; ++j) {
    const int32_t a = x0[j], b = x1[j];
    const float wa = w0[j], wb = w1[j];
    dr[j] = sr[a] * wa + sr[b] * wb;
    dg[j] = sg[a] * wa + sg[b] * wb;
    db[j] = sb[a] * wa + sb[b] * wb;
  }
}

// Resamples source row `row` of the crop along the columns into `dst` (3 planes of ow): the
// crop's row is mapped to [0, 1] into src_row (3 planes of cw), then gathered.
MGM_FAST_INLINE void resample_columns(const float* __restrict__ image, const ImageStrides& s,
                                      int64_t row, int64_t left, int64_t cw, int64_t ow,
                                      const int32_t* __restrict__ x0,
                                      const int32_t* __restrict__ x1,
                                      const float* __restrict__ w0, const float* __restrict__ w1,
                                      float* __restrict__ src_row, float* __restrict__ dst) {
  for (int64_t c = 0; c < 3; ++c) {
    const float* __restrict__ in = image + c * s.c + row * s.h + left * s.w;
    float* __restrict__ sr = src_row + c * cw;
    if (s.w == 1) {
      for (int64_t k = 0; k < cw; ++k) sr[k] = clamp01(in[k] * 0.5f + 0.5f);
    } else {
      for (int64_t k = 0; k < cw; ++k) sr[k] = clamp01(in[k * s.w] * 0.5f + 0.5f);
    }
  }
  gather_columns(src_row, cw, ow, x0, x1, w0, w1, dst);
}

MGM_FAST_ISA_BODY void run_view_body(const SimclrViewsProblem& P, const Layout& L, int64_t n,
                                     float* fs, int32_t* is) {
  const int64_t oh = P.out_height, ow = P.out_width, rs = 3 * ow;
  const int64_t* box = P.crop + 4 * n;
  const int64_t top = box[0], left = box[1], ch = box[2], cw = box[3];
  const float* image = P.images + P.src_index[n] * P.image_strides.n;
  float* out = P.out + n * 3 * oh * ow;

  // -- taps: columns (flip folded in) and rows, weights (1 - lam, lam) as in the torch path
  int32_t* x0 = is + L.col_i0;
  int32_t* x1 = is + L.col_i1;
  int32_t* y0 = is + L.row_i0;
  int32_t* y1 = is + L.row_i1;
  float* cw0 = fs + L.col_w0;
  float* cw1 = fs + L.col_w1;
  float* rw0 = fs + L.row_w0;
  float* rw1 = fs + L.row_w1;
  bilinear_taps(cw, ow, x0, x1, cw1);
  if (P.flip[n]) {
    for (int64_t j = 0, k = ow - 1; j < k; ++j, --k) {
      std::swap(x0[j], x0[k]);
      std::swap(x1[j], x1[k]);
      std::swap(cw1[j], cw1[k]);
    }
  }
  for (int64_t j = 0; j < ow; ++j) cw0[j] = 1.0f - cw1[j];
  bilinear_taps(ch, oh, y0, y1, rw1);
  for (int64_t i = 0; i < oh; ++i) rw0[i] = 1.0f - rw1[i];

  // -- the per-pixel steps of this view
  PixelOp ops[5];
  int nops = 0;
  if (P.jitter[n]) {
    const float* f = P.factors + 4 * n;
    for (int r = 0; r < 4; ++r) {
      const int64_t op = P.order[4 * n + r];
      PixelOp& o = ops[nops++];
      o.f = f[op];
      if (op == kBrightness) {
        o.kind = kOpBrightness;
      } else if (op == kContrast) {
        o.kind = kOpContrast;
      } else if (op == kSaturation) {
        o.kind = kOpSaturation;
      } else {
        o.kind = o.f != 0.0f ? kOpHue : kOpClamp;  // a zero shift skips the rotation
      }
    }
  }
  if (P.gray[n]) ops[nops++].kind = kOpGray;
  int first_contrast = nops;
  for (int k = 0; k < nops; ++k) {
    if (ops[k].kind == kOpContrast) {
      first_contrast = k;
      break;
    }
  }
  const bool blur = P.blur[n] != 0;
  const bool need_buf = first_contrast < nops || blur;
  float* buf = fs + L.buf;
  double sums[3] = {0.0, 0.0, 0.0};

  // -- pass 1: resample, ops before the first contrast
  float* slot[2] = {fs + L.cache, fs + L.cache + rs};
  int64_t cached[2] = {-1, -1};
  float* src_row = fs + L.src_row;
  auto source_row = [&](int64_t y, int avoid) -> int {
    if (cached[0] == y) return 0;
    if (cached[1] == y) return 1;
    // rows are requested in non-decreasing order: the smaller cached row is never needed again
    int s = cached[0] <= cached[1] ? 0 : 1;
    if (s == avoid) s = 1 - s;
    resample_columns(image, P.image_strides, top + y, left, cw, ow, x0, x1, cw0, cw1, src_row,
                     slot[s]);
    cached[s] = y;
    return s;
  };
  for (int64_t i = 0; i < oh; ++i) {
    const int s0 = source_row(y0[i], -1);
    const int s1 = source_row(y1[i], s0);
    const float* __restrict__ a = slot[s0];
    const float* __restrict__ c = slot[s1];
    const float wa = rw0[i], wc = rw1[i];
    float* __restrict__ row = need_buf ? buf + i * rs : fs + L.line;
    for (int64_t j = 0; j < rs; ++j) row[j] = a[j] * wa + c[j] * wc;
    apply_ops(row, ow, ops, 0, first_contrast);
    if (first_contrast < nops) {
      for (int64_t k = 0; k < 3; ++k) sums[k] += static_cast<double>(row_sum(row + k * ow, ow));
    }
    if (!need_buf) store_row(row, out, oh, ow, i);
  }

  // -- one pass per contrast op: the mean of the image as it is now, then the ops up to the
  //    next contrast
  const double pixels = static_cast<double>(oh * ow);
  for (int k = first_contrast; k < nops;) {
    int end = k + 1;
    while (end < nops && ops[end].kind != kOpContrast) ++end;
    const float m_r = static_cast<float>(sums[0] / pixels);
    const float m_g = static_cast<float>(sums[1] / pixels);
    const float m_b = static_cast<float>(sums[2] / pixels);
    const float mean_gray = m_r * kGrayR + m_g * kGrayG + m_b * kGrayB;
    ops[k].gamma = (1.0f - ops[k].f) * mean_gray;
    const bool last = end == nops;
    sums[0] = sums[1] = sums[2] = 0.0;
    for (int64_t i = 0; i < oh; ++i) {
      float* row = buf + i * rs;
      apply_ops(row, ow, ops, k, end);
      if (!last) {
        for (int64_t c = 0; c < 3; ++c) sums[c] += static_cast<double>(row_sum(row + c * ow, ow));
      } else if (!blur) {
        store_row(row, out, oh, ow, i);
      }
    }
    k = end;
  }

  // -- blur straight into the output
  if (blur) {
    float* taps = fs + L.taps;
    gaussian_taps(P.sigma[n], P.blur_kernel, taps);
    const int64_t rad = P.blur_kernel / 2;
    auto src = [buf, rs, ow](int64_t c, int64_t i) -> const float* {
      return buf + i * rs + c * ow;
    };
    auto store = [out, oh, ow](int64_t c, int64_t i, const float* v) {
      float* __restrict__ dst = out + (c * oh + i) * ow;
      for (int64_t j = 0; j < ow; ++j) dst[j] = clamp_range(v[j] * 2.0f - 1.0f, -1.0f, 1.0f);
    };
    blur_planes(src, store, 3, oh, ow, taps, rad, fs + L.vpad, fs + L.hacc);
  }
}
constexpr auto& run_view = MGM_FAST_ISA_DISPATCH(run_view_body);

MGM_FAST_ISA_BODY void hue_rotate_body(float* r, float* g, float* b, int64_t n, float shift) {
  hue_row(r, g, b, n, 4.0f + 6.0f * shift);
}
constexpr auto& hue_rotate_impl = MGM_FAST_ISA_DISPATCH(hue_rotate_body);

struct Scratch {
  std::vector<float> f;
  std::vector<int32_t> i;
};

// Per-thread scratch kept between calls (OpenMP reuses its threads): no allocation, hence no
// page faults, on the hot path once the buffers have their size.
Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

}  // namespace

void bilinear_taps(int64_t length, int64_t out_len, int32_t* i0, int32_t* i1, float* lam) {
  const float scale = static_cast<float>(length) / static_cast<float>(out_len);
  const int64_t last = length - 1;
  for (int64_t j = 0; j < out_len; ++j) {
    const float dst = static_cast<float>(j) + 0.5f;
    float src = scale * dst - 0.5f;
    src = src < 0.0f ? 0.0f : src;
    int64_t k = static_cast<int64_t>(src);  // truncation is floor: src >= 0
    lam[j] = clamp01(src - static_cast<float>(k));
    k = k < last ? k : last;
    i0[j] = static_cast<int32_t>(k);
    i1[j] = static_cast<int32_t>(k + 1 < last ? k + 1 : last);
  }
}

void gaussian_taps(float sigma, int64_t size, float* taps) {
  const double s = static_cast<double>(sigma);
  const double half = static_cast<double>(size - 1) / 2.0;
  double sum = 0.0;
  for (int64_t k = 0; k < size; ++k) {
    const double t = static_cast<double>(k) - half;
    sum += std::exp(-(t * t) / (2.0 * s * s));
  }
  for (int64_t k = 0; k < size; ++k) {
    const double t = static_cast<double>(k) - half;
    taps[k] = static_cast<float>(std::exp(-(t * t) / (2.0 * s * s)) / sum);
  }
}

void hue_rotate(float* r, float* g, float* b, int64_t n, float shift) {
  hue_rotate_impl(r, g, b, n, shift);
}

void gaussian_blur(float* planes, int64_t channels, int64_t height, int64_t width,
                   const float* taps, int64_t size) {
  const int64_t rad = size / 2;
  std::vector<float> copy(planes, planes + channels * height * width);
  std::vector<float> vpad(static_cast<size_t>(width + 2 * rad));
  std::vector<float> hacc(static_cast<size_t>(width));
  const float* in = copy.data();
  auto src = [in, height, width](int64_t c, int64_t i) { return in + (c * height + i) * width; };
  auto store = [planes, height, width](int64_t c, int64_t i, const float* v) {
    float* dst = planes + (c * height + i) * width;
    for (int64_t j = 0; j < width; ++j) dst[j] = v[j];
  };
  blur_planes(src, store, channels, height, width, taps, rad, vpad.data(), hacc.data());
}

ViewsCheck check_simclr_views(const SimclrViewsProblem& P) {
  ViewsCheck res;
  if (P.out_height < 1 || P.out_width < 1) {
    res.error = ViewsError::kOutputSize;
    return res;
  }
  const int64_t k = P.blur_kernel;
  const int64_t min_side = P.out_height < P.out_width ? P.out_height : P.out_width;
  if (k < 1 || k % 2 == 0 || k / 2 >= min_side) {
    res.error = ViewsError::kBlurKernel;
    return res;
  }
  for (int64_t n = 0; n < P.views; ++n) {
    const int64_t b = P.src_index[n];
    if (b < 0 || b >= P.batch) {
      res.error = ViewsError::kSrcIndex;
      res.view = n;
      return res;
    }
    const int64_t* c = P.crop + 4 * n;
    if (c[0] < 0 || c[1] < 0 || c[2] < 1 || c[3] < 1 || c[0] + c[2] > P.height ||
        c[1] + c[3] > P.width) {
      res.error = ViewsError::kCrop;
      res.view = n;
      return res;
    }
    for (int r = 0; r < 4; ++r) {
      const int64_t op = P.order[4 * n + r];
      if (op < 0 || op > 3) {
        res.error = ViewsError::kOrder;
        res.view = n;
        return res;
      }
    }
  }
  return res;
}

void simclr_views(const SimclrViewsProblem& P, int num_threads) {
  if (P.views <= 0) return;
  const int nt = resolve_threads(num_threads);
  const Layout L = make_layout(P);
#pragma omp parallel num_threads(nt) if (nt > 1 && P.views > 1)
  {
    Scratch& s = thread_scratch();
    if (s.f.size() < static_cast<size_t>(L.floats)) s.f.resize(static_cast<size_t>(L.floats));
    if (s.i.size() < static_cast<size_t>(L.ints)) s.i.resize(static_cast<size_t>(L.ints));
    float* fs = s.f.data();
    int32_t* is = s.i.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < P.views; ++n) run_view(P, L, n, fs, is);
  }
}

}  // namespace cpu
}  // namespace mgm_fast
