// CPU kernels of the fused GenBlock (contracts and formulas in genblock.h).
//
// Everything works on pixel rows: the W*C values of one (b, y) row in kPixels order, which are
// contiguous in a channels_last tensor. A kPlanes tensor is transposed row by row into a small
// per-thread buffer on load (and back on store), so the arithmetic is always one flat loop over
// W*C contiguous values -- with per-channel parameters (mean, scale, ...) pre-tiled to the row
// length -- which the compiler vectorises whatever C is (the generator has C = 8 at 64x64).
//
// Work is cut into chunks of kRows rows of one sample (a function of the shape only). Per-channel
// sums are accumulated per chunk element-wise along the row in the element type (at most kRows
// terms each), folded over the columns in double once per chunk, and the chunk partials are added
// in chunk order: bit-identical results for any thread count. Each chunk worker is inlined into
// the ISA-versioned dispatcher for float and a plain function for double (isa.h).
#include "genblock.h"

#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.h"
#include "threads.h"

namespace mgm_fast {
namespace cpu {
namespace genblock {
namespace {

constexpr int64_t kRows = 8;             // rows per chunk
constexpr int64_t kParallelMin = 16384;  // fewer elements: one thread (a team costs more)

int team(int threads, int64_t work) {
  return work < kParallelMin ? 1 : resolve_threads(threads);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-thread scratch rows, sized on first use.
template <typename T>
struct Scratch {
  std::vector<T> t0, t1, t2, t3, t4, u0, u1, u2, u3, u4, u5;
};

template <typename V>
MGM_FAST_INLINE typename V::value_type* room(V& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Runs worker(args, chunk, scratch) for every chunk on a team of nt threads.
template <typename A, typename T, typename F>
void for_chunks(const A& args, int64_t chunks, int nt, F worker) {
  if (chunks <= 0) return;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    Scratch<T> s;
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) worker(args, ch, s);
  }
}

template <typename T>
MGM_FAST_INLINE T relu(T v) {
  return v < T(0) ? T(0) : v;  // NaN stays NaN, as torch.relu
}

template <typename T>
struct SameSizeInt;
template <>
struct SameSizeInt<float> {
  using type = int32_t;
};
template <>
struct SameSizeInt<double> {
  using type = int64_t;
};

// g where act > 0, else +0 -- the ReLU backward mask (act is a ReLU output: >= 0, +-0 or NaN;
// a NaN act passes g). Done on the bit patterns: under GCC's default -ftrapping-math a
// floating-point select is not if-converted, which would leave the loops scalar.
template <typename T>
MGM_FAST_INLINE T pass_if_positive(T act, T g) {
  using I = typename SameSizeInt<T>::type;
  I a, b;
  std::memcpy(&a, &act, sizeof(T));
  std::memcpy(&b, &g, sizeof(T));
  b &= -static_cast<I>(a > 0);
  T r;
  std::memcpy(&r, &b, sizeof(T));
  return r;
}

// The pixel row (b, y) of v: a pointer into v (kPixels) or its transpose in buf (kPlanes).
template <typename T>
MGM_FAST_INLINE const T* load_row(const View<const T>& v, int64_t b, int64_t y, T* buf) {
  const Dims& d = v.dims;
  const int64_t C = d.c, W = d.w;
  if (v.layout == Layout::kPixels) return v.data + (b * d.h + y) * W * C;
  const T* __restrict__ src = v.data + (b * C * d.h + y) * W;
  const int64_t cs = d.h * W;
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict__ s = src + c * cs;
    for (int64_t x = 0; x < W; ++x) buf[x * C + c] = s[x];
  }
  return buf;
}

// Where to compute the pixel row (b, y) of an output: in place (kPixels) or in buf (kPlanes).
template <typename T>
MGM_FAST_INLINE T* out_row(const View<T>& v, int64_t b, int64_t y, T* buf) {
  const Dims& d = v.dims;
  return v.layout == Layout::kPixels ? v.data + (b * d.h + y) * d.w * d.c : buf;
}

// Completes out_row: transposes buf into a kPlanes output (nothing to do for kPixels).
template <typename T>
MGM_FAST_INLINE void store_row(const View<T>& v, int64_t b, int64_t y, const T* row) {
  if (v.layout == Layout::kPixels) return;
  const Dims& d = v.dims;
  const int64_t C = d.c, W = d.w, cs = d.h * W;
  T* __restrict__ dst = v.data + (b * C * d.h + y) * W;
  for (int64_t c = 0; c < C; ++c) {
    T* __restrict__ o = dst + c * cs;
    for (int64_t x = 0; x < W; ++x) o[x] = row[x * C + c];
  }
}

// dst[x*C + c] = src[c] for x < W.
template <typename S, typename D>
MGM_FAST_INLINE void tile(const S* src, int64_t C, int64_t W, D* dst) {
  for (int64_t x = 0; x < W; ++x) {
    for (int64_t c = 0; c < C; ++c) dst[x * C + c] = static_cast<D>(src[c]);
  }
}

// out[c] = sum_x acc[x*C + c], in double.
template <typename A>
MGM_FAST_INLINE void fold(const A* acc, int64_t C, int64_t W, double* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = 0.0;
  for (int64_t x = 0; x < W; ++x) {
    const A* a = acc + x * C;
    for (int64_t c = 0; c < C; ++c) out[c] += static_cast<double>(a[c]);
  }
}

// mean/var from sums shifted by `shift`: s1 = sum (x - K), s2 = sum (x - K)^2 over count values.
void finish_stats(const double* s1, const double* s2, const double* shift, int64_t c, double count,
                  double* mean, double* var) {
  for (int64_t k = 0; k < c; ++k) {
    const double m1 = s1[k] / count;
    const double v = s2[k] / count - m1 * m1;
    mean[k] = shift[k] + m1;
    var[k] = v > 0.0 ? v : 0.0;
  }
}

// Sums (chunks, c) partials over chunks, in chunk order.
void sum_chunks(const std::vector<double>& part, int64_t chunks, int64_t c, double* out) {
  for (int64_t k = 0; k < c; ++k) out[k] = 0.0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const double* p = part.data() + ch * c;
    for (int64_t k = 0; k < c; ++k) out[k] += p[k];
  }
}

// Shifted sums of a pixel row into element-wise accumulators. Accumulators of the element type
// only ever add the kRows rows of one chunk; chunks are folded and combined in double.
template <typename T>
MGM_FAST_INLINE void accumulate_shifted(const T* __restrict__ row, const T* __restrict__ k,
                                        int64_t n, T* __restrict__ a1, T* __restrict__ a2) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T v = row[j] - k[j];
    a1[j] += v;
    a2[j] += v * v;
  }
}

// Chunk c of rows: sample b = c / per_b, rows [y0, y1).
struct RowChunk {
  int64_t b, y0, y1;
};

MGM_FAST_INLINE RowChunk row_chunk(int64_t chunk, int64_t rows, int64_t rows_per_chunk) {
  const int64_t per_b = ceil_div(rows, rows_per_chunk);
  const int64_t b = chunk / per_b, y0 = (chunk % per_b) * rows_per_chunk;
  return {b, y0, y0 + rows_per_chunk < rows ? y0 + rows_per_chunk : rows};
}

// ---------------------------------------------------------------------------------------------
// channel_stats

template <typename T>
struct StatsArgs {
  View<const T> x;
  const double* shift;  // (c,)
  double* s1;           // planes: (n*c,) per plane; pixels: (chunks, c)
  double* s2;
};

template <typename T>
MGM_FAST_INLINE void stats_chunk_impl(const StatsArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const Dims& d = a.x.dims;
  const int64_t C = d.c, W = d.w;
  if (a.x.layout == Layout::kPlanes) {  // chunk = one (b, c) plane
    const T* __restrict__ p = a.x.data + chunk * d.h * W;
    const double k = a.shift[chunk % C];
    double acc1 = 0.0, acc2 = 0.0;
    const int64_t hw = d.h * W;
#pragma omp simd reduction(+ : acc1, acc2)
    for (int64_t i = 0; i < hw; ++i) {
      const double v = static_cast<double>(p[i]) - k;
      acc1 += v;
      acc2 += v * v;
    }
    a.s1[chunk] = acc1;
    a.s2[chunk] = acc2;
    return;
  }
  const int64_t n = W * C;
  const RowChunk rc = row_chunk(chunk, d.h, kRows);
  T* kt = room(s.t0, n);
  T* a1 = room(s.t1, n);
  T* a2 = room(s.t2, n);
  tile(a.shift, C, W, kt);
  for (int64_t j = 0; j < n; ++j) a1[j] = a2[j] = T(0);
  for (int64_t y = rc.y0; y < rc.y1; ++y) {
    accumulate_shifted(load_row(a.x, rc.b, y, static_cast<T*>(nullptr)), kt, n, a1, a2);
  }
  fold(a1, C, W, a.s1 + chunk * C);
  fold(a2, C, W, a.s2 + chunk * C);
}

void stats_chunk(const StatsArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(stats_chunk_impl<float>)(a, chunk, s);
}
void stats_chunk(const StatsArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  stats_chunk_impl(a, chunk, s);
}

// ---------------------------------------------------------------------------------------------
// affine_relu

template <typename T>
struct AffineArgs {
  View<const T> x;
  const T* scale;
  const T* shift;
  View<T> out;
  View<T> copy;
};

template <typename T>
MGM_FAST_INLINE void affine_chunk_impl(const AffineArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const Dims& d = a.x.dims;
  const int64_t C = d.c, W = d.w, n = W * C;
  const RowChunk rc = row_chunk(chunk, d.h, kRows);
  T* st = room(s.t0, n);
  T* tt = room(s.t1, n);
  T* in = room(s.t2, n);
  T* ob = room(s.t3, n);
  tile(a.scale + rc.b * C, C, W, st);
  tile(a.shift + rc.b * C, C, W, tt);
  const bool copy = a.copy.data != nullptr;
  // A kPlanes x copied to kPixels: the copy row itself receives the transpose.
  const bool in_place = copy && a.x.layout == Layout::kPlanes && a.copy.layout == Layout::kPixels;
  for (int64_t y = rc.y0; y < rc.y1; ++y) {
    const T* __restrict__ xr = load_row(a.x, rc.b, y, in_place ? out_row(a.copy, rc.b, y, in) : in);
    if (copy && !in_place) {
      T* __restrict__ c = out_row(a.copy, rc.b, y, room(s.t4, n));
      for (int64_t j = 0; j < n; ++j) c[j] = xr[j];
      store_row(a.copy, rc.b, y, c);
    }
    T* __restrict__ o = out_row(a.out, rc.b, y, ob);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = relu(xr[j] * st[j] + tt[j]);
    store_row(a.out, rc.b, y, o);
  }
}

void affine_chunk(const AffineArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(affine_chunk_impl<float>)(a, chunk, s);
}
void affine_chunk(const AffineArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  affine_chunk_impl(a, chunk, s);
}

// ---------------------------------------------------------------------------------------------
// epilogues

template <typename T>
struct EpilogueArgs {
  const T* p;               // phase: P in p_layout; else nullptr
  PhaseLayout p_layout;
  View<const T> conv;       // plain: the conv output
  Epilogue<T> ep;
  View<T> out;              // (n, c, oh, ow)
  const double* shift;      // statistics shift (c,), or nullptr: no statistics
  double* part1;            // (chunks, c)
  double* part2;
};

// Fills the output pixel row Y with the interleaved phases of P: pixel X = 2j + q reads phase
// (p, q) of low-resolution pixel (i, j) for Y = 2i + p -- kPadded: P[b, i + p, j + q,
// (2p + q) * c + :]; kCompact: P[2p + q, b, i, j, :].
template <typename T>
MGM_FAST_INLINE void interleave_row(const T* p, PhaseLayout layout, const Dims& od, int64_t b,
                                    int64_t Y, T* row) {
  const int64_t C = od.c, w = od.w / 2, h = od.h / 2;
  const int64_t pr = Y & 1, i = Y >> 1;
  const T* s0;   // phase (pr, 0) of pixel j = 0
  const T* s1;   // phase (pr, 1) of pixel j = 0
  int64_t step;  // from pixel j to j + 1
  if (layout == PhaseLayout::kPadded) {
    const T* prow = p + (b * (h + 1) + i + pr) * (w + 1) * 4 * C;
    s0 = prow + (2 * pr) * C;
    s1 = prow + 4 * C + (2 * pr + 1) * C;
    step = 4 * C;
  } else {
    const int64_t plane = od.n * h * w * C;  // one phase
    s0 = p + 2 * pr * plane + (b * h + i) * w * C;
    s1 = s0 + plane;
    step = C;
  }
  for (int64_t j = 0; j < w; ++j) {
    const T* __restrict__ a0 = s0 + j * step;
    const T* __restrict__ a1 = s1 + j * step;
    T* __restrict__ d0 = row + 2 * j * C;
    T* __restrict__ d1 = d0 + C;
    for (int64_t c = 0; c < C; ++c) d0[c] = a0[c];
    for (int64_t c = 0; c < C; ++c) d1[c] = a1[c];
  }
}

template <typename T>
MGM_FAST_INLINE void epilogue_chunk_impl(const EpilogueArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const Dims& d = a.out.dims;
  const int64_t C = d.c, W = d.w, n = W * C;
  const RowChunk rc = row_chunk(chunk, d.h, kRows);
  const bool stats = a.shift != nullptr;
  const View<const T>& res = a.ep.residual;
  T* bt = a.ep.bias != nullptr ? room(s.t0, n) : nullptr;
  T* ob = room(s.t1, n);
  T* cb = room(s.t2, n);
  T* rb = room(s.t3, n);
  T* kt = stats ? room(s.t4, n) : nullptr;
  T* a1 = stats ? room(s.u0, n) : nullptr;
  T* a2 = stats ? room(s.u1, n) : nullptr;
  if (bt != nullptr) tile(a.ep.bias, C, W, bt);
  if (stats) {
    tile(a.shift, C, W, kt);
    for (int64_t j = 0; j < n; ++j) a1[j] = a2[j] = T(0);
  }
  for (int64_t y = rc.y0; y < rc.y1; ++y) {
    T* __restrict__ o = out_row(a.out, rc.b, y, ob);
    if (a.p != nullptr) {
      interleave_row(a.p, a.p_layout, d, rc.b, y, o);
    } else {
      const T* __restrict__ src = load_row(a.conv, rc.b, y, cb);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] = src[j];
    }
    if (bt != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] += bt[j];
    }
    if (res.data != nullptr) {
      if (!a.ep.residual_half) {
        const T* __restrict__ r = load_row(res, rc.b, y, rb);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] += r[j];
      } else {
        const T* __restrict__ r = load_row(res, rc.b, y >> 1, rb);
        for (int64_t x = 0; x < W; ++x) {
          const T* __restrict__ rx = r + (x >> 1) * C;
          T* __restrict__ ox = o + x * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) ox[c] += rx[c];
        }
      }
    }
    if (stats) accumulate_shifted(o, kt, n, a1, a2);
    store_row(a.out, rc.b, y, o);
  }
  if (stats) {
    fold(a1, C, W, a.part1 + chunk * C);
    fold(a2, C, W, a.part2 + chunk * C);
  }
}

void epilogue_chunk(const EpilogueArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(epilogue_chunk_impl<float>)(a, chunk, s);
}
void epilogue_chunk(const EpilogueArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  epilogue_chunk_impl(a, chunk, s);
}

template <typename T>
void run_epilogue(EpilogueArgs<T>& a, double* mean, double* var, int threads) {
  const Dims& d = a.out.dims;
  const int64_t C = d.c;
  if (d.numel() == 0) return;
  const int64_t chunks = d.n * ceil_div(d.h, kRows);
  std::vector<double> shift, p1, p2;
  if (mean != nullptr) {
    // Shift = the value the epilogue stores at (b=0, y=0, x=0) of each channel.
    shift.resize(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) {
      T v = a.p != nullptr ? a.p[c] : a.conv.data[offset(a.conv.layout, a.conv.dims, 0, c, 0, 0)];
      if (a.ep.bias != nullptr) v += a.ep.bias[c];
      const View<const T>& r = a.ep.residual;
      if (r.data != nullptr) v += r.data[offset(r.layout, r.dims, 0, c, 0, 0)];
      shift[static_cast<size_t>(c)] = static_cast<double>(v);
    }
    p1.resize(static_cast<size_t>(chunks * C));
    p2.resize(p1.size());
    a.shift = shift.data();
    a.part1 = p1.data();
    a.part2 = p2.data();
  }
  for_chunks<EpilogueArgs<T>, T>(a, chunks, team(threads, d.numel()),
                                 [](const EpilogueArgs<T>& x, int64_t ch, Scratch<T>& s) {
                                   epilogue_chunk(x, ch, s);
                                 });
  if (mean != nullptr) {
    std::vector<double> t1(static_cast<size_t>(C)), t2(static_cast<size_t>(C));
    sum_chunks(p1, chunks, C, t1.data());
    sum_chunks(p2, chunks, C, t2.data());
    finish_stats(t1.data(), t2.data(), shift.data(), C, static_cast<double>(d.n * d.h * d.w),
                 mean, var);
  }
}

// ---------------------------------------------------------------------------------------------
// grad_output_prep

template <typename T>
struct PrepArgs {
  View<const T> g;
  View<T> copy;   // kPixels copy, or data == nullptr
  View<T> half;   // (n, c, H/2, W/2), or data == nullptr
  double* part;   // (chunks, c) bias partials, or nullptr
};

template <typename T>
MGM_FAST_INLINE void prep_chunk_impl(const PrepArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const Dims& d = a.g.dims;
  const int64_t C = d.c, W = d.w, n = W * C;
  const RowChunk rc = row_chunk(chunk, d.h, kRows);  // kRows is even: 2x2 blocks stay together
  T* acc = a.part != nullptr ? room(s.u0, n) : nullptr;
  if (acc != nullptr) {
    for (int64_t j = 0; j < n; ++j) acc[j] = T(0);
  }
  T* bufs[2] = {room(s.t0, n), room(s.t1, n)};
  const int64_t wh = W / 2, nh = wh * C;
  T* hb = a.half.data != nullptr ? room(s.t2, nh) : nullptr;
  // A kPlanes gradient copied to kPixels: the copy row itself receives the transpose.
  const bool in_place = a.copy.data != nullptr && a.g.layout == Layout::kPlanes &&
                        a.copy.layout == Layout::kPixels;
  const T* prev = nullptr;
  for (int64_t y = rc.y0; y < rc.y1; ++y) {
    T* buf = in_place ? out_row(a.copy, rc.b, y, bufs[y & 1]) : bufs[y & 1];
    const T* __restrict__ gr = load_row(a.g, rc.b, y, buf);
    if (a.copy.data != nullptr && !in_place) {
      T* __restrict__ o = out_row(a.copy, rc.b, y, room(s.t3, n));
      for (int64_t j = 0; j < n; ++j) o[j] = gr[j];
      store_row(a.copy, rc.b, y, o);
    }
    if (acc != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += gr[j];
    }
    if (hb != nullptr && (y & 1)) {
      T* __restrict__ ho = out_row(a.half, rc.b, y >> 1, hb);
      for (int64_t x = 0; x < wh; ++x) {
        const T* __restrict__ r0 = prev + 2 * x * C;
        const T* __restrict__ r1 = gr + 2 * x * C;
        T* __restrict__ o = ho + x * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          o[c] = static_cast<T>((static_cast<double>(r0[c]) + static_cast<double>(r0[C + c])) +
                                (static_cast<double>(r1[c]) + static_cast<double>(r1[C + c])));
        }
      }
      store_row(a.half, rc.b, y >> 1, ho);
    }
    prev = gr;
  }
  if (acc != nullptr) fold(acc, C, W, a.part + chunk * C);
}

void prep_chunk(const PrepArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(prep_chunk_impl<float>)(a, chunk, s);
}
void prep_chunk(const PrepArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  prep_chunk_impl(a, chunk, s);
}

// ---------------------------------------------------------------------------------------------
// backward through ReLU(conditional BN), and the phase scatter

template <typename T>
struct BnArgs {
  BnReluBackward<T> bn;
  const double* k1;
  const double* k2;
  double* p1;            // reduce: (chunks, c) partials of sum dz and sum dz * xhat
  double* p2;
  View<const T> add;     // apply: added to dx, or data == nullptr
  View<T> dx;            // apply: output
};

// Per-sample tiles of the dx formula dx = A dz - Bc - Cx (x - M) (see genblock.h):
// training A = rstd gamma, Bc = rstd k1, Cx = rstd^2 k2, M = mean; eval A = scale, rest 0.
template <typename T>
MGM_FAST_INLINE void dx_tiles(const BnArgs<T>& a, int64_t b, int64_t W, T* A, T* Bc, T* Cx,
                              T* M) {
  const BnReluBackward<T>& n = a.bn;
  const int64_t C = n.x.dims.c;
  for (int64_t c = 0; c < C; ++c) {
    double av, bv, cv, mv;
    if (n.training) {
      const double r = n.rstd[c];
      av = r * static_cast<double>(n.gamma[b * n.gamma_stride + c]);
      bv = r * a.k1[c];
      cv = r * r * a.k2[c];
      mv = n.mean[c];
    } else {
      av = static_cast<double>(n.scale[b * C + c]);
      bv = cv = mv = 0.0;
    }
    for (int64_t x = 0; x < W; ++x) {
      A[x * C + c] = static_cast<T>(av);
      Bc[x * C + c] = static_cast<T>(bv);
      Cx[x * C + c] = static_cast<T>(cv);
      M[x * C + c] = static_cast<T>(mv);
    }
  }
}

// dx of one pixel row (length n) into o, in the element type.
template <typename T>
MGM_FAST_INLINE void dx_row(const T* __restrict__ xr, const T* __restrict__ ar,
                            const T* __restrict__ gr, const T* __restrict__ addr,
                            const T* __restrict__ A, const T* __restrict__ Bc,
                            const T* __restrict__ Cx, const T* __restrict__ M, int64_t n,
                            T* __restrict__ o) {
  if (addr != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T dz = pass_if_positive(ar[j], gr[j]);
      o[j] = A[j] * dz - Bc[j] - Cx[j] * (xr[j] - M[j]) + addr[j];
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T dz = pass_if_positive(ar[j], gr[j]);
      o[j] = A[j] * dz - Bc[j] - Cx[j] * (xr[j] - M[j]);
    }
  }
}

template <typename T>
MGM_FAST_INLINE void bn_reduce_chunk_impl(const BnArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const BnReluBackward<T>& bn = a.bn;
  const Dims& d = bn.x.dims;
  const int64_t C = d.c, W = d.w, n = W * C;
  const RowChunk rc = row_chunk(chunk, d.h, kRows);
  T* mt = room(s.u0, n);
  T* rt = room(s.u1, n);
  T* a1 = room(s.u2, n);
  T* a2 = room(s.u3, n);
  T* xb = room(s.t0, n);
  T* ab = room(s.t1, n);
  T* gb = room(s.t2, n);
  tile(bn.mean, C, W, mt);
  tile(bn.rstd, C, W, rt);
  for (int64_t j = 0; j < n; ++j) a1[j] = a2[j] = T(0);
  for (int64_t y = rc.y0; y < rc.y1; ++y) {
    const T* __restrict__ xr = load_row(bn.x, rc.b, y, xb);
    const T* __restrict__ ar = load_row(bn.act, rc.b, y, ab);
    const T* __restrict__ gr = load_row(bn.dact, rc.b, y, gb);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T dz = pass_if_positive(ar[j], gr[j]);
      a1[j] += dz;
      a2[j] += dz * ((xr[j] - mt[j]) * rt[j]);
    }
  }
  fold(a1, C, W, a.p1 + chunk * C);
  fold(a2, C, W, a.p2 + chunk * C);
}

void bn_reduce_chunk(const BnArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(bn_reduce_chunk_impl<float>)(a, chunk, s);
}
void bn_reduce_chunk(const BnArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  bn_reduce_chunk_impl(a, chunk, s);
}

template <typename T>
MGM_FAST_INLINE void bn_apply_chunk_impl(const BnArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const BnReluBackward<T>& bn = a.bn;
  const Dims& d = bn.x.dims;
  const int64_t C = d.c, W = d.w, n = W * C;
  const RowChunk rc = row_chunk(chunk, d.h, kRows);
  T* A = room(s.u0, n);
  T* Bc = room(s.u1, n);
  T* Cx = room(s.u2, n);
  T* M = room(s.u3, n);
  T* xb = room(s.t0, n);
  T* ab = room(s.t1, n);
  T* gb = room(s.t2, n);
  T* db = room(s.t3, n);
  T* ob = room(s.t4, n);
  dx_tiles(a, rc.b, W, A, Bc, Cx, M);
  for (int64_t y = rc.y0; y < rc.y1; ++y) {
    const T* xr = load_row(bn.x, rc.b, y, xb);
    const T* ar = load_row(bn.act, rc.b, y, ab);
    const T* gr = load_row(bn.dact, rc.b, y, gb);
    const T* addr = a.add.data != nullptr ? load_row(a.add, rc.b, y, db) : nullptr;
    T* o = out_row(a.dx, rc.b, y, ob);
    dx_row(xr, ar, gr, addr, A, Bc, Cx, M, n, o);
    store_row(a.dx, rc.b, y, o);
  }
}

void bn_apply_chunk(const BnArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(bn_apply_chunk_impl<float>)(a, chunk, s);
}
void bn_apply_chunk(const BnArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  bn_apply_chunk_impl(a, chunk, s);
}

// Phase scatter: kPadded: rows i' of dp (n, 4c, h+1, w+1) from the gradient rows Y = 2i' - p
// of the interleaved output; kCompact: the rows Y of the interleaved output into
// dp (4, n, h, w, c) -- read from g, or computed by the BN backward (bn != nullptr).
template <typename T>
struct ScatterArgs {
  View<const T> g;         // (n, c, 2h, 2w), when bn == nullptr
  const BnArgs<T>* bn;
  Dims low;                // (n, c, h, w)
  T* dp;
  double* part;            // (chunks, c) bias partials, or nullptr
  PhaseLayout layout;
};

// kCompact scatter of the chunk's output rows Y = 2i + p: dp[2p + q, b, i, j] = row[2j + q].
template <typename T>
MGM_FAST_INLINE void scatter_compact_chunk(const ScatterArgs<T>& a, int64_t chunk, Scratch<T>& s,
                                           T* acc, T* rb, T* A, T* Bc, T* Cx, T* M, T* xb, T* ab,
                                           T* gb) {
  const Dims& L = a.low;
  const int64_t C = L.c, h = L.h, w = L.w, W = 2 * w, n = W * C;
  const int64_t plane = L.n * h * w * C;
  const RowChunk rc = row_chunk(chunk, 2 * h, kRows);
  (void)s;
  for (int64_t Y = rc.y0; Y < rc.y1; ++Y) {
    const T* gr;
    if (a.bn == nullptr) {
      gr = load_row(a.g, rc.b, Y, rb);
    } else {
      const BnReluBackward<T>& bn = a.bn->bn;
      dx_row(load_row(bn.x, rc.b, Y, xb), load_row(bn.act, rc.b, Y, ab),
             load_row(bn.dact, rc.b, Y, gb), static_cast<const T*>(nullptr), A, Bc, Cx, M, n, rb);
      gr = rb;
    }
    if (acc != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += gr[j];
    }
    const int64_t pr = Y & 1, i = Y >> 1;
    T* __restrict__ d0 = a.dp + 2 * pr * plane + (rc.b * h + i) * w * C;  // phase (pr, 0)
    T* __restrict__ d1 = d0 + plane;                                      // phase (pr, 1)
    for (int64_t j = 0; j < w; ++j) {
      const T* __restrict__ s0 = gr + 2 * j * C;
      for (int64_t c = 0; c < C; ++c) d0[j * C + c] = s0[c];
      for (int64_t c = 0; c < C; ++c) d1[j * C + c] = s0[C + c];
    }
  }
}

template <typename T>
MGM_FAST_INLINE void scatter_chunk_impl(const ScatterArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const Dims& L = a.low;
  const int64_t C = L.c, h = L.h, w = L.w, hp = h + 1, wp = w + 1;
  const int64_t W = 2 * w, n = W * C;
  const bool compact = a.layout == PhaseLayout::kCompact;
  const RowChunk rc = row_chunk(chunk, compact ? 2 * h : hp, kRows);
  T* acc = a.part != nullptr ? room(s.u4, n) : nullptr;
  if (acc != nullptr) {
    for (int64_t j = 0; j < n; ++j) acc[j] = T(0);
  }
  T* rb = room(s.t4, n);
  T *A = nullptr, *Bc = nullptr, *Cx = nullptr, *M = nullptr;
  T *xb = nullptr, *ab = nullptr, *gb = nullptr;
  if (a.bn != nullptr) {
    A = room(s.u0, n);
    Bc = room(s.u1, n);
    Cx = room(s.u2, n);
    M = room(s.u3, n);
    xb = room(s.t0, n);
    ab = room(s.t1, n);
    gb = room(s.t2, n);
    dx_tiles(*a.bn, rc.b, W, A, Bc, Cx, M);
  }
  if (compact) {
    scatter_compact_chunk(a, chunk, s, acc, rb, A, Bc, Cx, M, xb, ab, gb);
    if (acc != nullptr) fold(acc, C, W, a.part + chunk * C);
    return;
  }
  for (int64_t ip = rc.y0; ip < rc.y1; ++ip) {
    T* __restrict__ drow = a.dp + (rc.b * hp + ip) * wp * 4 * C;
    for (int64_t pr = 0; pr < 2; ++pr) {
      const int64_t i = ip - pr;
      if (i < 0 || i >= h) {  // phase row unused by the forward: zero gradient
        for (int64_t jp = 0; jp < wp; ++jp) {
          T* __restrict__ z = drow + jp * 4 * C + 2 * pr * C;
          for (int64_t c = 0; c < 2 * C; ++c) z[c] = T(0);
        }
        continue;
      }
      const int64_t Y = 2 * i + pr;
      const T* gr;
      if (a.bn == nullptr) {
        gr = load_row(a.g, rc.b, Y, rb);
      } else {
        const BnReluBackward<T>& bn = a.bn->bn;
        dx_row(load_row(bn.x, rc.b, Y, xb), load_row(bn.act, rc.b, Y, ab),
               load_row(bn.dact, rc.b, Y, gb), static_cast<const T*>(nullptr), A, Bc, Cx, M, n,
               rb);
        gr = rb;
      }
      if (acc != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) acc[j] += gr[j];
      }
      for (int64_t jp = 0; jp < wp; ++jp) {
        T* __restrict__ d0 = drow + jp * 4 * C + 2 * pr * C;  // phase (pr, 0): X = 2 jp
        T* __restrict__ d1 = d0 + C;                          // phase (pr, 1): X = 2 jp - 1
        if (jp < w) {
          const T* __restrict__ s0 = gr + 2 * jp * C;
          for (int64_t c = 0; c < C; ++c) d0[c] = s0[c];
        } else {
          for (int64_t c = 0; c < C; ++c) d0[c] = T(0);
        }
        if (jp >= 1) {
          const T* __restrict__ s1 = gr + (2 * jp - 1) * C;
          for (int64_t c = 0; c < C; ++c) d1[c] = s1[c];
        } else {
          for (int64_t c = 0; c < C; ++c) d1[c] = T(0);
        }
      }
    }
  }
  if (acc != nullptr) fold(acc, C, W, a.part + chunk * C);
}

void scatter_chunk(const ScatterArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(scatter_chunk_impl<float>)(a, chunk, s);
}
void scatter_chunk(const ScatterArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  scatter_chunk_impl(a, chunk, s);
}

template <typename T>
void run_scatter(ScatterArgs<T>& a, double* dbias, int threads) {
  const Dims& L = a.low;
  const int64_t C = L.c;
  const int64_t rows = a.layout == PhaseLayout::kCompact ? 2 * L.h : L.h + 1;
  const int64_t chunks = L.n * ceil_div(rows, kRows);
  std::vector<double> part;
  if (dbias != nullptr) {
    part.assign(static_cast<size_t>(chunks * C), 0.0);
    a.part = part.data();
  }
  if (C > 0 && L.w > 0) {
    for_chunks<ScatterArgs<T>, T>(a, chunks, team(threads, L.numel() * 4),
                                  [](const ScatterArgs<T>& x, int64_t ch, Scratch<T>& s) {
                                    scatter_chunk(x, ch, s);
                                  });
  }
  if (dbias != nullptr) sum_chunks(part, chunks, C, dbias);
}

// ---------------------------------------------------------------------------------------------
// im2col of the compact phase conv, and its adjoint

template <typename T>
struct ColArgs {
  View<const T> a;  // im2col: the input map (n, c, h, w)
  View<T> da;       // col2im: the output map (n, c, h, w)
  T* cols;          // (4, n*h*w, 4c)
  const T* dcols;
};

// Chunk = low-resolution row (b, i): its 4 phases x w pixels x 4 taps of c values.
template <typename T>
MGM_FAST_INLINE void im2col_chunk_impl(const ColArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const Dims& d = a.a.dims;
  const int64_t C = d.c, h = d.h, w = d.w, K = 4 * C, plane = d.n * h * w;
  const int64_t b = chunk / h, i = chunk % h;
  const T* rows[3];  // low-resolution rows i - 1, i, i + 1 (nullptr outside the map)
  T* bufs[3] = {room(s.t0, w * C), room(s.t1, w * C), room(s.t2, w * C)};
  for (int64_t k = 0; k < 3; ++k) {
    const int64_t y = i - 1 + k;
    rows[k] = y >= 0 && y < h ? load_row(a.a, b, y, bufs[k]) : nullptr;
  }
  for (int64_t ph = 0; ph < 4; ++ph) {
    const int64_t p = ph >> 1, q = ph & 1;
    T* dst_row = a.cols + (ph * plane + (b * h + i) * w) * K;
    for (int64_t j = 0; j < w; ++j) {
      for (int64_t r = 0; r < 2; ++r) {
        const T* src_row = rows[p + r];  // low-resolution row i - 1 + p + r
        for (int64_t t = 0; t < 2; ++t) {
          const int64_t x = j - 1 + q + t;
          T* __restrict__ dst = dst_row + j * K + (2 * r + t) * C;
          if (src_row == nullptr || x < 0 || x >= w) {
            for (int64_t c = 0; c < C; ++c) dst[c] = T(0);
          } else {
            const T* __restrict__ src = src_row + x * C;
            for (int64_t c = 0; c < C; ++c) dst[c] = src[c];
          }
        }
      }
    }
  }
}

void im2col_chunk(const ColArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(im2col_chunk_impl<float>)(a, chunk, s);
}
void im2col_chunk(const ColArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  im2col_chunk_impl(a, chunk, s);
}

// Chunk = output row (b, y): the sum over the (p, r, q, t) taps that read pixel (y, x), in that
// order (i = y + 1 - p - r, j = x + 1 - q - t).
template <typename T>
MGM_FAST_INLINE void col2im_chunk_impl(const ColArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const Dims& d = a.da.dims;
  const int64_t C = d.c, h = d.h, w = d.w, K = 4 * C, plane = d.n * h * w, n = w * C;
  const int64_t b = chunk / h, y = chunk % h;
  T* __restrict__ o = out_row(a.da, b, y, room(s.t0, n));
  for (int64_t j = 0; j < n; ++j) o[j] = T(0);
  for (int64_t p = 0; p < 2; ++p) {
    for (int64_t r = 0; r < 2; ++r) {
      const int64_t i = y + 1 - p - r;
      if (i < 0 || i >= h) continue;
      for (int64_t q = 0; q < 2; ++q) {
        for (int64_t t = 0; t < 2; ++t) {
          const T* base = a.dcols + ((2 * p + q) * plane + (b * h + i) * w) * K + (2 * r + t) * C;
          const int64_t x0 = q + t > 1 ? 1 : 0;           // j = x + 1 - q - t >= 0
          const int64_t x1 = q + t == 0 ? w - 1 : w;       // j < w
          for (int64_t x = x0; x < x1; ++x) {
            const T* __restrict__ src = base + (x + 1 - q - t) * K;
            T* __restrict__ dst = o + x * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
          }
        }
      }
    }
  }
  store_row(a.da, b, y, o);
}

void col2im_chunk(const ColArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(col2im_chunk_impl<float>)(a, chunk, s);
}
void col2im_chunk(const ColArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  col2im_chunk_impl(a, chunk, s);
}

// Chunk = pixel row (b, y) of the 3x3 im2col: per pixel, 9 source rows (a zero row outside the
// map), written in the (ci, tap) column order.
template <typename T>
MGM_FAST_INLINE void im2col3_chunk_impl(const ColArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const Dims& d = a.a.dims;
  const int64_t C = d.c, h = d.h, w = d.w;
  const int64_t b = chunk / h, y = chunk % h;
  T* zero = room(s.t3, C);
  for (int64_t c = 0; c < C; ++c) zero[c] = T(0);
  const T* rows[3];
  T* bufs[3] = {room(s.t0, w * C), room(s.t1, w * C), room(s.t2, w * C)};
  for (int64_t ky = 0; ky < 3; ++ky) {
    const int64_t yy = y - 1 + ky;
    rows[ky] = yy >= 0 && yy < h ? load_row(a.a, b, yy, bufs[ky]) : nullptr;
  }
  for (int64_t x = 0; x < w; ++x) {
    const T* src[9];
    for (int64_t ky = 0; ky < 3; ++ky) {
      for (int64_t kx = 0; kx < 3; ++kx) {
        const int64_t xx = x - 1 + kx;
        src[ky * 3 + kx] = rows[ky] != nullptr && xx >= 0 && xx < w ? rows[ky] + xx * C : zero;
      }
    }
    T* __restrict__ dst = a.cols + ((b * h + y) * w + x) * 9 * C;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < 9; ++t) dst[c * 9 + t] = src[t][c];
    }
  }
}

void im2col3_chunk(const ColArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(im2col3_chunk_impl<float>)(a, chunk, s);
}
void im2col3_chunk(const ColArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  im2col3_chunk_impl(a, chunk, s);
}

// Chunk = pixel row (b, y) of the adjoint: per pixel, the 9 dcols rows that read it (a zero row
// outside the map), summed in tap order.
template <typename T>
MGM_FAST_INLINE void col2im3_chunk_impl(const ColArgs<T>& a, int64_t chunk, Scratch<T>& s) {
  const Dims& d = a.da.dims;
  const int64_t C = d.c, h = d.h, w = d.w, K = 9 * C;
  const int64_t b = chunk / h, y = chunk % h;
  T* zero = room(s.t1, K);
  for (int64_t k = 0; k < K; ++k) zero[k] = T(0);
  T* __restrict__ o = out_row(a.da, b, y, room(s.t0, w * C));
  for (int64_t x = 0; x < w; ++x) {
    const T* src[9];  // src[t] + c*9 + t: the entry of tap t = (ky, kx) that reads (y, x, c)
    for (int64_t ky = 0; ky < 3; ++ky) {
      const int64_t yy = y + 1 - ky;
      for (int64_t kx = 0; kx < 3; ++kx) {
        const int64_t xx = x + 1 - kx;
        const bool in = yy >= 0 && yy < h && xx >= 0 && xx < w;
        src[ky * 3 + kx] = in ? a.dcols + ((b * h + yy) * w + xx) * K : zero;
      }
    }
    T* __restrict__ dst = o + x * C;
    for (int64_t c = 0; c < C; ++c) {
      T acc = src[0][c * 9];
      for (int64_t t = 1; t < 9; ++t) acc += src[t][c * 9 + t];
      dst[c] = acc;
    }
  }
  store_row(a.da, b, y, o);
}

void col2im3_chunk(const ColArgs<float>& a, int64_t chunk, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(col2im3_chunk_impl<float>)(a, chunk, s);
}
void col2im3_chunk(const ColArgs<double>& a, int64_t chunk, Scratch<double>& s) {
  col2im3_chunk_impl(a, chunk, s);
}

// Phase weights, one output channel o per chunk, vectorised over the input channels: w[o] is
// transposed to 9 rows of cin values, each of the 16 phase taps is a sum of those rows (row groups,
// genblock.h: p=0: {0}, {1,2}; p=1: {0,1}, {2}; columns alike), and the adjoint the other way.
template <typename T>
struct PhaseWeightArgs {
  const T* w;       // forward: (cout, cin, 3, 3)
  T* wp;            // forward: (4*cout, cin, 2, 2) in wp's layout
  const T* dwp;     // backward
  T* dw;            // backward
  int64_t cout, cin;
  bool channels_last;
};

// The row (contiguous over ci, or strided by 4) of phase tap (ph, rs) of output channel o.
MGM_FAST_INLINE int64_t wp_row(bool channels_last, int64_t ph, int64_t o, int64_t rs, int64_t cout,
                               int64_t cin) {
  const int64_t row = ph * cout + o;
  return channels_last ? (row * 4 + rs) * cin : row * cin * 4 + rs;
}

template <typename T>
MGM_FAST_INLINE void phase_weights_chunk_impl(const PhaseWeightArgs<T>& a, int64_t o,
                                              Scratch<T>& s) {
  const int64_t cin = a.cin, st = a.channels_last ? 1 : 4;
  T* t = room(s.t0, 9 * cin);      // t[k * cin + ci] = w[o, ci, k]
  // rows[((p * 2 + r) * 3 + kx) * cin + ci]: the sum of t over the rows ky in G(p, r)
  T* rows = room(s.t1, 12 * cin);
  const T* __restrict__ src = a.w + o * cin * 9;
  for (int64_t ci = 0; ci < cin; ++ci) {
    for (int64_t k = 0; k < 9; ++k) t[k * cin + ci] = src[ci * 9 + k];
  }
  for (int64_t kx = 0; kx < 3; ++kx) {
    const T* __restrict__ k0 = t + kx * cin;
    const T* __restrict__ k1 = t + (3 + kx) * cin;
    const T* __restrict__ k2 = t + (6 + kx) * cin;
    T* __restrict__ r00 = rows + (0 * 3 + kx) * cin;
    T* __restrict__ r01 = rows + (1 * 3 + kx) * cin;
    T* __restrict__ r10 = rows + (2 * 3 + kx) * cin;
    T* __restrict__ r11 = rows + (3 * 3 + kx) * cin;
#pragma omp simd
    for (int64_t ci = 0; ci < cin; ++ci) {
      r00[ci] = k0[ci];
      r01[ci] = k1[ci] + k2[ci];
      r10[ci] = k0[ci] + k1[ci];
      r11[ci] = k2[ci];
    }
  }
  for (int64_t p = 0; p < 2; ++p) {
    for (int64_t r = 0; r < 2; ++r) {
      const T* __restrict__ v0 = rows + ((p * 2 + r) * 3 + 0) * cin;
      const T* __restrict__ v1 = v0 + cin;
      const T* __restrict__ v2 = v1 + cin;
      T* __restrict__ q0s0 = a.wp + wp_row(a.channels_last, 2 * p, o, r * 2, a.cout, cin);
      T* __restrict__ q0s1 = a.wp + wp_row(a.channels_last, 2 * p, o, r * 2 + 1, a.cout, cin);
      T* __restrict__ q1s0 = a.wp + wp_row(a.channels_last, 2 * p + 1, o, r * 2, a.cout, cin);
      T* __restrict__ q1s1 = a.wp + wp_row(a.channels_last, 2 * p + 1, o, r * 2 + 1, a.cout, cin);
#pragma omp simd
      for (int64_t ci = 0; ci < cin; ++ci) {
        q0s0[ci * st] = v0[ci];
        q0s1[ci * st] = v1[ci] + v2[ci];
        q1s0[ci * st] = v0[ci] + v1[ci];
        q1s1[ci * st] = v2[ci];
      }
    }
  }
}

void phase_weights_chunk(const PhaseWeightArgs<float>& a, int64_t o, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(phase_weights_chunk_impl<float>)(a, o, s);
}
void phase_weights_chunk(const PhaseWeightArgs<double>& a, int64_t o, Scratch<double>& s) {
  phase_weights_chunk_impl(a, o, s);
}

// The adjoint: k[ky*3+kx] = sum over the (ph, r, s) whose groups contain (ky, kx).
template <typename T>
MGM_FAST_INLINE void phase_weights_backward_chunk_impl(const PhaseWeightArgs<T>& a, int64_t o,
                                                       Scratch<T>& s) {
  const int64_t cin = a.cin, st = a.channels_last ? 1 : 4;
  T* cols = room(s.t1, 12 * cin);  // cols[((p * 2 + r) * 3 + kx) * cin + ci]: column groups folded
  T* t = room(s.t0, 9 * cin);      // t[k * cin + ci] = dw[o, ci, k]
  for (int64_t p = 0; p < 2; ++p) {
    for (int64_t r = 0; r < 2; ++r) {
      // q = 0: s = 0 -> {0}, s = 1 -> {1, 2};  q = 1: s = 0 -> {0, 1}, s = 1 -> {2}
      const bool cl = a.channels_last;
      const T* __restrict__ a0 = a.dwp + wp_row(cl, 2 * p, o, r * 2, a.cout, cin);
      const T* __restrict__ a1 = a.dwp + wp_row(cl, 2 * p, o, r * 2 + 1, a.cout, cin);
      const T* __restrict__ b0 = a.dwp + wp_row(cl, 2 * p + 1, o, r * 2, a.cout, cin);
      const T* __restrict__ b1 = a.dwp + wp_row(cl, 2 * p + 1, o, r * 2 + 1, a.cout, cin);
      T* __restrict__ c0 = cols + ((p * 2 + r) * 3 + 0) * cin;
      T* __restrict__ c1 = c0 + cin;
      T* __restrict__ c2 = c1 + cin;
#pragma omp simd
      for (int64_t ci = 0; ci < cin; ++ci) {
        c0[ci] = a0[ci * st] + b0[ci * st];
        c1[ci] = a1[ci * st] + b0[ci * st];
        c2[ci] = a1[ci * st] + b1[ci * st];
      }
    }
  }
  for (int64_t kx = 0; kx < 3; ++kx) {
    const T* __restrict__ c00 = cols + (0 * 3 + kx) * cin;
    const T* __restrict__ c01 = cols + (1 * 3 + kx) * cin;
    const T* __restrict__ c10 = cols + (2 * 3 + kx) * cin;
    const T* __restrict__ c11 = cols + (3 * 3 + kx) * cin;
    T* __restrict__ k0 = t + kx * cin;
    T* __restrict__ k1 = t + (3 + kx) * cin;
    T* __restrict__ k2 = t + (6 + kx) * cin;
#pragma omp simd
    for (int64_t ci = 0; ci < cin; ++ci) {
      k0[ci] = c00[ci] + c10[ci];
      k1[ci] = c01[ci] + c10[ci];
      k2[ci] = c01[ci] + c11[ci];
    }
  }
  T* __restrict__ dst = a.dw + o * cin * 9;
  for (int64_t ci = 0; ci < cin; ++ci) {
    for (int64_t k = 0; k < 9; ++k) dst[ci * 9 + k] = t[k * cin + ci];
  }
}

void phase_weights_backward_chunk(const PhaseWeightArgs<float>& a, int64_t o, Scratch<float>& s) {
  MGM_FAST_ISA_DISPATCH(phase_weights_backward_chunk_impl<float>)(a, o, s);
}
void phase_weights_backward_chunk(const PhaseWeightArgs<double>& a, int64_t o,
                                  Scratch<double>& s) {
  phase_weights_backward_chunk_impl(a, o, s);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// public entry points

template <typename T>
void channel_stats(const View<const T>& x, double* mean, double* var, int threads) {
  const Dims& d = x.dims;
  const int64_t C = d.c;
  if (C == 0) return;
  const int64_t count = d.n * d.h * d.w;
  if (count == 0) {
    for (int64_t c = 0; c < C; ++c) mean[c] = var[c] = std::nan("");
    return;
  }
  std::vector<double> shift(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    shift[static_cast<size_t>(c)] = static_cast<double>(x.data[offset(x.layout, d, 0, c, 0, 0)]);
  }
  const bool planes = x.layout == Layout::kPlanes;
  const int64_t chunks = planes ? d.n * C : d.n * ceil_div(d.h, kRows);
  const int64_t width = planes ? 1 : C;
  std::vector<double> s1(static_cast<size_t>(chunks * width)), s2(s1.size());
  StatsArgs<T> a{x, shift.data(), s1.data(), s2.data()};
  for_chunks<StatsArgs<T>, T>(a, chunks, team(threads, d.numel()),
                              [](const StatsArgs<T>& z, int64_t ch, Scratch<T>& s) {
                                stats_chunk(z, ch, s);
                              });
  std::vector<double> t1(static_cast<size_t>(C), 0.0), t2(static_cast<size_t>(C), 0.0);
  if (planes) {
    for (int64_t b = 0; b < d.n; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        t1[static_cast<size_t>(c)] += s1[static_cast<size_t>(b * C + c)];
        t2[static_cast<size_t>(c)] += s2[static_cast<size_t>(b * C + c)];
      }
    }
  } else {
    sum_chunks(s1, chunks, C, t1.data());
    sum_chunks(s2, chunks, C, t2.data());
  }
  finish_stats(t1.data(), t2.data(), shift.data(), C, static_cast<double>(count), mean, var);
}

template <typename T>
void scale_shift(const T* gamma, const T* beta, int64_t stride, int64_t n, int64_t c,
                 const double* mean, const double* var, double eps, double* rstd, T* scale,
                 T* shift) {
  for (int64_t k = 0; k < c; ++k) rstd[k] = 1.0 / std::sqrt(var[k] + eps);
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t k = 0; k < c; ++k) {
      const double s = static_cast<double>(gamma[b * stride + k]) * rstd[k];
      scale[b * c + k] = static_cast<T>(s);
      shift[b * c + k] = static_cast<T>(static_cast<double>(beta[b * stride + k]) - mean[k] * s);
    }
  }
}

template <typename T>
void affine_relu(const View<const T>& x, const T* scale, const T* shift, const View<T>& out,
                 const View<T>& copy, int threads) {
  const Dims& d = x.dims;
  AffineArgs<T> a{x, scale, shift, out, copy};
  for_chunks<AffineArgs<T>, T>(a, d.n * ceil_div(d.h, kRows), team(threads, d.numel()),
                               [](const AffineArgs<T>& z, int64_t ch, Scratch<T>& s) {
                                 affine_chunk(z, ch, s);
                               });
}

template <typename T>
void phase_weights(const T* w, int64_t cout, int64_t cin, T* wp, bool channels_last, int threads) {
  PhaseWeightArgs<T> a{w, wp, nullptr, nullptr, cout, cin, channels_last};
  for_chunks<PhaseWeightArgs<T>, T>(a, cin > 0 ? cout : 0, team(threads, cout * cin * 16),
                                    [](const PhaseWeightArgs<T>& z, int64_t o, Scratch<T>& s) {
                                      phase_weights_chunk(z, o, s);
                                    });
}

template <typename T>
void phase_weights_backward(const T* dwp, int64_t cout, int64_t cin, T* dw, bool channels_last,
                            int threads) {
  PhaseWeightArgs<T> a{nullptr, nullptr, dwp, dw, cout, cin, channels_last};
  for_chunks<PhaseWeightArgs<T>, T>(a, cin > 0 ? cout : 0, team(threads, cout * cin * 16),
                                    [](const PhaseWeightArgs<T>& z, int64_t o, Scratch<T>& s) {
                                      phase_weights_backward_chunk(z, o, s);
                                    });
}

template <typename T>
void phase_epilogue(const T* p, const Dims& low, const Epilogue<T>& ep, const View<T>& out,
                    double* mean, double* var, int threads, PhaseLayout layout) {
  (void)low;  // the output dims carry it: (n, c, 2h, 2w)
  EpilogueArgs<T> a{};
  a.p = p;
  a.p_layout = layout;
  a.ep = ep;
  a.out = out;
  run_epilogue(a, mean, var, threads);
}

template <typename T>
void phase_im2col(const View<const T>& a, T* cols, int threads) {
  const Dims& d = a.dims;
  ColArgs<T> args{};
  args.a = a;
  args.cols = cols;
  for_chunks<ColArgs<T>, T>(args, d.n * d.h, team(threads, 16 * d.numel()),
                            [](const ColArgs<T>& z, int64_t ch, Scratch<T>& s) {
                              im2col_chunk(z, ch, s);
                            });
}

template <typename T>
void phase_col2im(const T* dcols, const View<T>& da, int threads) {
  const Dims& d = da.dims;
  ColArgs<T> args{};
  args.da = da;
  args.dcols = dcols;
  for_chunks<ColArgs<T>, T>(args, d.n * d.h, team(threads, 16 * d.numel()),
                            [](const ColArgs<T>& z, int64_t ch, Scratch<T>& s) {
                              col2im_chunk(z, ch, s);
                            });
}

template <typename T>
void conv3x3_im2col(const View<const T>& a, T* cols, int threads) {
  const Dims& d = a.dims;
  ColArgs<T> args{};
  args.a = a;
  args.cols = cols;
  for_chunks<ColArgs<T>, T>(args, d.n * d.h, team(threads, 9 * d.numel()),
                            [](const ColArgs<T>& z, int64_t ch, Scratch<T>& s) {
                              im2col3_chunk(z, ch, s);
                            });
}

template <typename T>
void conv3x3_col2im(const T* dcols, const View<T>& da, int threads) {
  const Dims& d = da.dims;
  ColArgs<T> args{};
  args.da = da;
  args.dcols = dcols;
  for_chunks<ColArgs<T>, T>(args, d.n * d.h, team(threads, 9 * d.numel()),
                            [](const ColArgs<T>& z, int64_t ch, Scratch<T>& s) {
                              col2im3_chunk(z, ch, s);
                            });
}

template <typename T>
void conv_epilogue(const View<const T>& conv, const Epilogue<T>& ep, const View<T>& out,
                   double* mean, double* var, int threads) {
  EpilogueArgs<T> a{};
  a.p = nullptr;
  a.conv = conv;
  a.ep = ep;
  a.out = out;
  run_epilogue(a, mean, var, threads);
}

template <typename T>
void grad_output_prep(const View<const T>& g, const View<T>& copy, const View<T>& d_half,
                      double* dbias, int threads) {
  const Dims& d = g.dims;
  const int64_t chunks = d.n * ceil_div(d.h, kRows);
  std::vector<double> part;
  PrepArgs<T> a{g, copy, d_half, nullptr};
  if (dbias != nullptr) {
    part.assign(static_cast<size_t>(chunks * d.c), 0.0);
    a.part = part.data();
  }
  if (d.numel() > 0) {
    for_chunks<PrepArgs<T>, T>(a, chunks, team(threads, d.numel()),
                               [](const PrepArgs<T>& z, int64_t ch, Scratch<T>& s) {
                                 prep_chunk(z, ch, s);
                               });
  }
  if (dbias != nullptr) sum_chunks(part, chunks, d.c, dbias);
}

template <typename T>
void phase_grad_scatter(const View<const T>& g, T* dp, double* dbias, int threads,
                        PhaseLayout layout) {
  ScatterArgs<T> a{};
  a.layout = layout;
  a.g = g;
  a.bn = nullptr;
  a.low = Dims{g.dims.n, g.dims.c, g.dims.h / 2, g.dims.w / 2};
  a.dp = dp;
  run_scatter(a, dbias, threads);
}

template <typename T>
void bn_relu_backward_reduce(const BnReluBackward<T>& bn, T* dgamma, T* dbeta, int64_t stride,
                             double* k1, double* k2, int threads) {
  const Dims& d = bn.x.dims;
  const int64_t C = d.c, per_b = ceil_div(d.h, kRows), chunks = d.n * per_b;
  BnArgs<T> a{};
  a.bn = bn;
  std::vector<double> p1(static_cast<size_t>(chunks * C), 0.0), p2(p1.size(), 0.0);
  a.p1 = p1.data();
  a.p2 = p2.data();
  if (d.numel() > 0) {
    for_chunks<BnArgs<T>, T>(a, chunks, team(threads, d.numel()),
                             [](const BnArgs<T>& z, int64_t ch, Scratch<T>& s) {
                               bn_reduce_chunk(z, ch, s);
                             });
  }
  const double count = static_cast<double>(d.n * d.h * d.w);
  for (int64_t c = 0; c < C; ++c) k1[c] = k2[c] = 0.0;
  for (int64_t b = 0; b < d.n; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      double t1 = 0.0, t2 = 0.0;  // per (b, c): the chunks of sample b, in order
      for (int64_t k = 0; k < per_b; ++k) {
        t1 += p1[static_cast<size_t>((b * per_b + k) * C + c)];
        t2 += p2[static_cast<size_t>((b * per_b + k) * C + c)];
      }
      dbeta[b * stride + c] = static_cast<T>(t1);
      dgamma[b * stride + c] = static_cast<T>(t2);
      const double g = static_cast<double>(bn.gamma[b * bn.gamma_stride + c]);
      k1[c] += g * t1;
      k2[c] += g * t2;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    k1[c] = bn.training ? k1[c] / count : 0.0;
    k2[c] = bn.training ? k2[c] / count : 0.0;
  }
}

template <typename T>
void bn_relu_backward_apply(const BnReluBackward<T>& bn, const double* k1, const double* k2,
                            const View<const T>& add, const View<T>& dx, int threads) {
  const Dims& d = bn.x.dims;
  BnArgs<T> a{};
  a.bn = bn;
  a.k1 = k1;
  a.k2 = k2;
  a.add = add;
  a.dx = dx;
  for_chunks<BnArgs<T>, T>(a, d.n * ceil_div(d.h, kRows), team(threads, d.numel()),
                           [](const BnArgs<T>& z, int64_t ch, Scratch<T>& s) {
                             bn_apply_chunk(z, ch, s);
                           });
}

template <typename T>
void bn_relu_backward_apply_phase(const BnReluBackward<T>& bn, const double* k1, const double* k2,
                                  T* dp, double* dbias, int threads, PhaseLayout layout) {
  BnArgs<T> n{};
  n.bn = bn;
  n.k1 = k1;
  n.k2 = k2;
  ScatterArgs<T> a{};
  a.layout = layout;
  a.bn = &n;
  const Dims& d = bn.x.dims;
  a.low = Dims{d.n, d.c, d.h / 2, d.w / 2};
  a.dp = dp;
  run_scatter(a, dbias, threads);
}

#define MGM_FAST_GENBLOCK_INSTANTIATE(T)                                                        \
  template void channel_stats<T>(const View<const T>&, double*, double*, int);                 \
  template void scale_shift<T>(const T*, const T*, int64_t, int64_t, int64_t, const double*,   \
                               const double*, double, double*, T*, T*);                        \
  template void affine_relu<T>(const View<const T>&, const T*, const T*, const View<T>&,        \
                               const View<T>&, int);                                           \
  template void phase_weights<T>(const T*, int64_t, int64_t, T*, bool, int);                   \
  template void phase_weights_backward<T>(const T*, int64_t, int64_t, T*, bool, int);          \
  template void phase_epilogue<T>(const T*, const Dims&, const Epilogue<T>&, const View<T>&,   \
                                  double*, double*, int, PhaseLayout);                         \
  template void phase_im2col<T>(const View<const T>&, T*, int);                                \
  template void phase_col2im<T>(const T*, const View<T>&, int);                                \
  template void conv3x3_im2col<T>(const View<const T>&, T*, int);                              \
  template void conv3x3_col2im<T>(const T*, const View<T>&, int);                              \
  template void conv_epilogue<T>(const View<const T>&, const Epilogue<T>&, const View<T>&,     \
                                 double*, double*, int);                                       \
  template void grad_output_prep<T>(const View<const T>&, const View<T>&, const View<T>&,      \
                                    double*, int);                                             \
  template void phase_grad_scatter<T>(const View<const T>&, T*, double*, int, PhaseLayout);    \
  template void bn_relu_backward_reduce<T>(const BnReluBackward<T>&, T*, T*, int64_t, double*, \
                                           double*, int);                                      \
  template void bn_relu_backward_apply<T>(const BnReluBackward<T>&, const double*,             \
                                          const double*, const View<const T>&, const View<T>&, \
                                          int);                                                \
  template void bn_relu_backward_apply_phase<T>(const BnReluBackward<T>&, const double*,       \
                                                const double*, T*, double*, int, PhaseLayout);

MGM_FAST_GENBLOCK_INSTANTIATE(float)
MGM_FAST_GENBLOCK_INSTANTIATE(double)

#undef MGM_FAST_GENBLOCK_INSTANTIATE

}  // namespace genblock
}  // namespace cpu
}  // namespace mgm_fast
