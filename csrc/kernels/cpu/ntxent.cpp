// Fused NT-Xent on the CPU (formulas, work split and determinism in ntxent.h).
#include "ntxent.h"

#include <cmath>
#include <cstring>
#include <limits>
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

constexpr int64_t kMR = 4;    // rows (or columns) per block: one score buffer row each
constexpr int64_t kNC = 16;   // columns per block of the packed panel (one AVX-512 vector)
constexpr float kEps = 1e-12f;  // torch.nn.functional.normalize's eps
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Below this many multiply-adds per pass a parallel region costs more than it saves
// (2B = 64, D = 64 is 262K: one thread).
constexpr int64_t kParallelWork = int64_t{1} << 20;

// Normalised copies with a padded row stride ldu (a multiple of kNC, zeros past dim):
// out[i * ldu + d] = x[i] / max(||x[i]||, eps), and inv[i] the factor.
void normalize_rows(const float* x, int64_t stride, int64_t n, int64_t dim, int64_t ldu,
                    float* out, float* inv, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (n * dim > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * stride;
    double sq = 0.0;
    for (int64_t d = 0; d < dim; ++d) sq += static_cast<double>(xi[d]) * xi[d];
    const float norm = static_cast<float>(std::sqrt(sq));
    const float f = 1.0f / (norm > kEps ? norm : kEps);
    inv[i] = f;
    for (int64_t d = 0; d < dim; ++d) out[i * ldu + d] = xi[d] * f;
    for (int64_t d = dim; d < ldu; ++d) out[i * ldu + d] = 0.0f;
  }
}

// Packed panel of n vectors (row stride ldu): for each block of kNC of them, the dim x kNC
// transpose, contiguous: out[(blk * dim + d) * kNC + jj] = u[(blk * kNC + jj) * ldu + d],
// zeros past n. The micro-kernel then streams each block (4 KB at D = 64) sequentially.
void pack_panel(const float* u, int64_t n, int64_t dim, int64_t ldu, float* out) {
  const int64_t blocks = (n + kNC - 1) / kNC;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int64_t d = 0; d < dim; ++d) {
      float* o = out + (blk * dim + d) * kNC;
      for (int64_t jj = 0; jj < kNC; ++jj) {
        const int64_t j = blk * kNC + jj;
        o[jj] = j < n ? u[j * ldu + d] : 0.0f;
      }
    }
  }
}

// kNC floats at a level: kVecs vectors of kFloats floats. The micro-kernels' kMR x kVecs
// accumulators, kVecs loaded vectors and a broadcast take 4 + 1 + 1 of the 32 zmm with AVX-512
// and 8 + 2 + 1 of the 16 ymm with AVX2; SSE2 spills a few of its 16 + 4 + 1 and is still
// faster so than in two passes of 8 columns.
template <CpuIsa kIsa>
struct Blocking {
  static constexpr int kFloats = vector_floats(kIsa);
  static constexpr int kVecs = static_cast<int>(kNC) / kFloats;
  using Vec = typename FloatVec<kFloats>::type;
};

// s[r * lds + j] = scale * sum_d a[r * ldu + d] * u[j * ldu + d] for r < mr, j < n_pad
// (n_pad a multiple of kNC), from the packed panel of u. The kMR x kNC accumulator block stays
// in registers; the d loop streams one block of the panel and broadcasts one value of each of
// the kMR rows. Rows past mr repeat row 0 (computed, not stored).
template <CpuIsa kIsa>
MGM_FAST_ISA_BODY void block_scores_body(const float* a, int64_t mr, int64_t ldu,
                                         const float* panel, int64_t n_pad, int64_t dim,
                                         float scale, float* s, int64_t lds) {
  static_assert(kMR == 4, "the micro-kernels are written for 4 rows");
  using B = Blocking<kIsa>;
  using Vec = typename B::Vec;
  constexpr int kF = B::kFloats, kV = B::kVecs;
  const float* rows[kMR] = {a, a + (mr > 1 ? 1 : 0) * ldu, a + (mr > 2 ? 2 : 0) * ldu,
                            a + (mr > 3 ? 3 : 0) * ldu};
  for (int64_t j0 = 0; j0 < n_pad; j0 += kNC) {
    Vec acc[kMR][kV] = {};
    const float* b = panel + j0 * dim;
    for (int64_t d = 0; d < dim; ++d, b += kNC) {
      Vec bv[kV];
      for (int v = 0; v < kV; ++v) bv[v] = vec_at<kF>(b + v * kF);
      for (int r = 0; r < kMR; ++r) {
        const float x = rows[r][d];
        for (int v = 0; v < kV; ++v) acc[r][v] += x * bv[v];
      }
    }
    for (int r = 0; r < kMR; ++r) {
      if (r >= mr) break;
      for (int v = 0; v < kV; ++v) vec_at<kF>(s + r * lds + j0 + v * kF) = acc[r][v] * scale;
    }
  }
}
constexpr auto& block_scores = MGM_FAST_ISA_DISPATCH_PER_LEVEL(block_scores_body);

// In place: row s[0, n) of scores -> its logsumexp over k != self (returns it; s unchanged
// except s[self] = -inf).
MGM_FAST_ISA_BODY float row_logsumexp_body(float* s, int64_t n, int64_t self) {
  s[self] = kNegInf;
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_nonpos(s[j] - m);
  return m + std::log(sum);
}
constexpr auto& row_logsumexp = MGM_FAST_ISA_DISPATCH(row_logsumexp_body);

// In place: scores -> dS = g (exp(s - lse) - [j == pos]), 0 at j == self.
MGM_FAST_ISA_BODY void row_dscores_body(float* s, int64_t n, float lse, float g, int64_t self,
                                        int64_t pos) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = g * exp_nonpos(s[j] - lse);
  s[pos] -= g;
  s[self] = 0.0f;
}
constexpr auto& row_dscores = MGM_FAST_ISA_DISPATCH(row_dscores_body);

// The column side: sc[i] = s(i, j) for every row i -> dS(i, j), 0 where j is row i's own column.
MGM_FAST_ISA_BODY void col_dscores_body(float* sc, int64_t n, const float* lse, const int64_t* pos,
                                        const int64_t* self, int64_t j, float g) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float prob = exp_nonpos(sc[i] - lse[i]);
    // selects by bit masks, so the loop vectorises without AVX-512 masking (vec_math.h)
    const float target = zero_unless(pos[i] == j, 1.0f);
    sc[i] = zero_unless(self[i] != j, g * (prob - target));
  }
}
constexpr auto& col_dscores = MGM_FAST_ISA_DISPATCH(col_dscores_body);

constexpr int64_t kJChunk = 256;  // vectors of u per pass of accumulate_block (64 KB at D = 64)

// acc[r * ldu + d] = sum_j ds[r * lds + j] * u[j * ldu + d] for r < mr, j < n, d < ldu.
// Chunks of kJChunk vectors of u (cache-resident) x kNC dims, with the kMR x kNC accumulators
// in registers across the chunk; the chunks are added in order (deterministic).
template <CpuIsa kIsa>
MGM_FAST_ISA_BODY void accumulate_block_body(const float* ds, int64_t lds, int64_t mr,
                                             const float* u, int64_t n, int64_t ldu, float* acc) {
  using B = Blocking<kIsa>;
  using Vec = typename B::Vec;
  constexpr int kF = B::kFloats, kV = B::kVecs;
  const float* rows[kMR] = {ds, ds + (mr > 1 ? 1 : 0) * lds, ds + (mr > 2 ? 2 : 0) * lds,
                            ds + (mr > 3 ? 3 : 0) * lds};
  for (int64_t k = 0; k < kMR * ldu; ++k) acc[k] = 0.0f;
  for (int64_t j0 = 0; j0 < n; j0 += kJChunk) {
    const int64_t j1 = j0 + kJChunk < n ? j0 + kJChunk : n;
    for (int64_t dc = 0; dc < ldu; dc += kNC) {
      Vec sums[kMR][kV] = {};
      for (int64_t j = j0; j < j1; ++j) {
        Vec uv[kV];
        for (int v = 0; v < kV; ++v) uv[v] = vec_at<kF>(u + j * ldu + dc + v * kF);
        for (int r = 0; r < kMR; ++r) {
          const float x = rows[r][j];
          for (int v = 0; v < kV; ++v) sums[r][v] += x * uv[v];
        }
      }
      for (int r = 0; r < kMR; ++r) {
        for (int v = 0; v < kV; ++v) vec_at<kF>(acc + r * ldu + dc + v * kF) += sums[r][v];
      }
    }
  }
}
constexpr auto& accumulate_block = MGM_FAST_ISA_DISPATCH_PER_LEVEL(accumulate_block_body);

// grad[d] = (g[d] - u[d] (u . g)) * inv with g = acc * scale, d < dim.
void finish_normalize(const float* acc, const float* u, float inv, float scale, int64_t dim,
                      float* grad) {
  double proj = 0.0;
  for (int64_t d = 0; d < dim; ++d) proj += static_cast<double>(u[d]) * (acc[d] * scale);
  const float p = static_cast<float>(proj);
  for (int64_t d = 0; d < dim; ++d) grad[d] = (acc[d] * scale - u[d] * p) * inv;
}

inline int64_t positive_of(int64_t index, int64_t n2) {
  const int64_t half = n2 / 2;
  return index < half ? index + half : index - half;
}

// Normalised, padded copies of both sides.
struct Normalised {
  int64_t ldu = 0;
  std::vector<float> ur, uc, inv_r, inv_c;
  Normalised(const NtxentProblem& p, int nt) : ldu(round_up(p.dim > 0 ? p.dim : 1, kNC)) {
    ur.resize(static_cast<size_t>(p.num_rows * ldu));
    uc.resize(static_cast<size_t>(p.num_cols * ldu));
    inv_r.resize(static_cast<size_t>(p.num_rows));
    inv_c.resize(static_cast<size_t>(p.num_cols));
    normalize_rows(p.rows, p.rows_stride, p.num_rows, p.dim, ldu, ur.data(), inv_r.data(), nt);
    normalize_rows(p.cols, p.cols_stride, p.num_cols, p.dim, ldu, uc.data(), inv_c.data(), nt);
  }
};

}  // namespace

float ntxent_exp(float x) { return exp_nonpos(x); }

int64_t ntxent_bad_row(const NtxentProblem& p) {
  for (int64_t i = 0; i < p.num_rows; ++i) {
    if (p.row_index[i] < 0 || p.row_index[i] >= p.num_cols) return i;
  }
  return -1;
}

double ntxent_forward(const NtxentProblem& p, float* lse, int num_threads) {
  const int nt = resolve_threads(num_threads);
  const int64_t R = p.num_rows, N2 = p.num_cols, D = p.dim;
  if (R == 0) return 0.0;
  const Normalised u(p, nt);
  const int64_t ld = round_up(N2, kNC);
  std::vector<float> panel(static_cast<size_t>(D * ld));
  pack_panel(u.uc.data(), N2, D, u.ldu, panel.data());
  const float inv_t = 1.0f / p.temperature;
  std::vector<double> row_loss(static_cast<size_t>(R));
  const int64_t blocks = (R + kMR - 1) / kMR;
  const bool parallel = blocks > 1 && R * N2 * D >= kParallelWork;
#pragma omp parallel num_threads(nt) if (parallel)
  {
    std::vector<float> s(static_cast<size_t>(kMR * ld));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t i0 = blk * kMR;
      const int64_t mr = R - i0 < kMR ? R - i0 : kMR;
      block_scores(u.ur.data() + i0 * u.ldu, mr, u.ldu, panel.data(), ld, D, inv_t, s.data(), ld);
      for (int64_t r = 0; r < mr; ++r) {
        const int64_t i = i0 + r;
        float* si = s.data() + r * ld;
        const float s_pos = si[positive_of(p.row_index[i], N2)];
        const float l = row_logsumexp(si, N2, p.row_index[i]);
        lse[i] = l;
        row_loss[static_cast<size_t>(i)] = static_cast<double>(l) - static_cast<double>(s_pos);
      }
    }
  }
  double total = 0.0;
  for (double v : row_loss) total += v;  // row order: independent of the thread count
  return total;
}

void ntxent_backward(const NtxentProblem& p, const float* lse, float grad_output,
                     float* grad_rows, float* grad_cols, int num_threads) {
  const int nt = resolve_threads(num_threads);
  const int64_t R = p.num_rows, N2 = p.num_cols, D = p.dim;
  if (grad_rows == nullptr && grad_cols == nullptr) return;
  if (R == 0) {
    if (grad_cols != nullptr) std::memset(grad_cols, 0, static_cast<size_t>(N2 * D) * sizeof(float));
    return;
  }
  const Normalised u(p, nt);
  const int64_t ldu = u.ldu;
  const float inv_t = 1.0f / p.temperature;

  if (grad_rows != nullptr) {
    const int64_t ld = round_up(N2, kNC);
    std::vector<float> panel(static_cast<size_t>(D * ld));
    pack_panel(u.uc.data(), N2, D, ldu, panel.data());
    const int64_t blocks = (R + kMR - 1) / kMR;
    const bool parallel = blocks > 1 && R * N2 * D >= kParallelWork;
#pragma omp parallel num_threads(nt) if (parallel)
    {
      std::vector<float> s(static_cast<size_t>(kMR * ld)), acc(static_cast<size_t>(kMR * ldu));
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t i0 = blk * kMR;
        const int64_t mr = R - i0 < kMR ? R - i0 : kMR;
        block_scores(u.ur.data() + i0 * ldu, mr, ldu, panel.data(), ld, D, inv_t, s.data(), ld);
        for (int64_t r = 0; r < mr; ++r) {
          const int64_t i = i0 + r;
          row_dscores(s.data() + r * ld, N2, lse[i], grad_output, p.row_index[i],
                      positive_of(p.row_index[i], N2));
        }
        accumulate_block(s.data(), ld, mr, u.uc.data(), N2, ldu, acc.data());
        for (int64_t r = 0; r < mr; ++r) {
          const int64_t i = i0 + r;
          finish_normalize(acc.data() + r * ldu, u.ur.data() + i * ldu, u.inv_r[i], inv_t, D,
                           grad_rows + i * D);
        }
      }
    }
  }

  if (grad_cols != nullptr) {
    const int64_t ld = round_up(R, kNC);
    std::vector<float> panel(static_cast<size_t>(D * ld));
    pack_panel(u.ur.data(), R, D, ldu, panel.data());
    std::vector<int64_t> pos(static_cast<size_t>(R));
    for (int64_t i = 0; i < R; ++i) pos[i] = positive_of(p.row_index[i], N2);
    const int64_t blocks = (N2 + kMR - 1) / kMR;
    const bool parallel = blocks > 1 && R * N2 * D >= kParallelWork;
#pragma omp parallel num_threads(nt) if (parallel)
    {
      std::vector<float> s(static_cast<size_t>(kMR * ld)), acc(static_cast<size_t>(kMR * ldu));
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t j0 = blk * kMR;
        const int64_t mc = N2 - j0 < kMR ? N2 - j0 : kMR;
        // s[c * ld + i] = s(i, j0 + c): the columns' scores against every row (the same
        // products in the same order as the row side, so the same bits)
        block_scores(u.uc.data() + j0 * ldu, mc, ldu, panel.data(), ld, D, inv_t, s.data(), ld);
        for (int64_t c = 0; c < mc; ++c) {
          col_dscores(s.data() + c * ld, R, lse, pos.data(), p.row_index, j0 + c, grad_output);
        }
        accumulate_block(s.data(), ld, mc, u.ur.data(), R, ldu, acc.data());
        for (int64_t c = 0; c < mc; ++c) {
          const int64_t j = j0 + c;
          finish_normalize(acc.data() + c * ldu, u.uc.data() + j * ldu, u.inv_c[j], inv_t, D,
                           grad_cols + j * D);
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace mgm_fast
