// Fused SAGAN self-attention on the CPU (formulas, work split and determinism in
// sagan_attention.h).
#include "sagan_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

constexpr int64_t kL = 16;       // lanes per block: one AVX-512 (two AVX2) register of floats
constexpr int64_t kChunk = 128;  // positions per backward chunk: its buffers stay in L1

// Below this much work (multiply-adds, an exp counted as 8) a parallel region costs more than
// it saves.
constexpr int64_t kParallelWork = int64_t{1} << 20;
constexpr int64_t kExpCost = 8;

// A block's kL lanes at a level: kVecs vectors of kFloats floats.
template <CpuIsa kIsa>
struct Lanes {
  static constexpr int kFloats = vector_floats(kIsa);
  static constexpr int kVecs = static_cast<int>(kL) / kFloats;
  using Vec = typename FloatVec<kFloats>::type;
  // Register blocks of the micro-kernels (positions of lane_scores, reduced channels of
  // lane_dots), kBlock x kVecs accumulators: 8 x 1 of the 32 zmm with AVX-512 (8 FMA chains
  // hide the latency), 6 x 2 of the 16 ymm with AVX2 (faster than 4 x 2, and than 8 x 2, which
  // spills), 4 x 4 xmm with SSE2 (spilling a few; as fast as 2 x 4 for scores, faster for dots).
  static constexpr int kBlock =
      kIsa == CpuIsa::kX86_64_V4 ? 8 : kIsa == CpuIsa::kX86_64_V3 ? 6 : 4;
};

// "scores": s[t * kL + l] = sum_k xt[t * ldx + k] * y[k * kL + l] for t < NT: the block's kL
// lanes y (kdim vectors) against NT positions whose kdim values are broadcast. k runs in order,
// so a (position, lane) value does not depend on the block it is computed in.
template <CpuIsa kIsa, int NT>
MGM_FAST_INLINE void lane_scores_block(const float* xt, int64_t ldx, const float* y, int64_t kdim,
                                       float* s) {
  using L = Lanes<kIsa>;
  constexpr int kF = L::kFloats, kV = L::kVecs;
  typename L::Vec acc[NT][kV] = {};
  for (int64_t k = 0; k < kdim; ++k) {
    typename L::Vec yv[kV];
    for (int v = 0; v < kV; ++v) yv[v] = vec_at<kF>(y + k * kL + v * kF);
    for (int q = 0; q < NT; ++q) {
      const float x = xt[q * ldx + k];
      for (int v = 0; v < kV; ++v) acc[q][v] += x * yv[v];
    }
  }
  for (int q = 0; q < NT; ++q) {
    for (int v = 0; v < kV; ++v) vec_at<kF>(s + q * kL + v * kF) = acc[q][v];
  }
}

// lane_scores_block over positions t < tn (xt: tn rows of ldx >= kdim floats).
template <CpuIsa kIsa>
MGM_FAST_ISA_BODY void lane_scores_body(const float* xt, int64_t ldx, const float* y, int64_t kdim,
                                        int64_t tn, float* s) {
  constexpr int kTB = Lanes<kIsa>::kBlock;
  int64_t t = 0;
  for (; t + kTB <= tn; t += kTB) {
    lane_scores_block<kIsa, kTB>(xt + t * ldx, ldx, y, kdim, s + t * kL);
  }
  for (; t < tn; ++t) lane_scores_block<kIsa, 1>(xt + t * ldx, ldx, y, kdim, s + t * kL);
}
constexpr auto& lane_scores = MGM_FAST_ISA_DISPATCH_PER_LEVEL(lane_scores_body);

// "dots", accumulating: c[k * kL + l] += sum_{t < tn} xt[t * ldx + k] * p[t * kL + l] for
// k < NK: each vector of p is loaded once for NK broadcast FMAs; t runs in order, so splitting
// the positions into consecutive chunks gives the same bits.
template <CpuIsa kIsa, int NK>
MGM_FAST_INLINE void lane_dots_block(const float* p, int64_t tn, const float* xt, int64_t ldx,
                                     float* c) {
  using L = Lanes<kIsa>;
  constexpr int kF = L::kFloats, kV = L::kVecs;
  typename L::Vec acc[NK][kV];
  for (int q = 0; q < NK; ++q) {
    for (int v = 0; v < kV; ++v) acc[q][v] = vec_at<kF>(c + q * kL + v * kF);
  }
  for (int64_t t = 0; t < tn; ++t) {
    typename L::Vec pv[kV];
    for (int v = 0; v < kV; ++v) pv[v] = vec_at<kF>(p + t * kL + v * kF);
    const float* xr = xt + t * ldx;
    for (int q = 0; q < NK; ++q) {
      const float x = xr[q];
      for (int v = 0; v < kV; ++v) acc[q][v] += x * pv[v];
    }
  }
  for (int q = 0; q < NK; ++q) {
    for (int v = 0; v < kV; ++v) vec_at<kF>(c + q * kL + v * kF) = acc[q][v];
  }
}

// lane_dots_block over every k < kdim: blocks of kKB, then the rest by 4, 2 and 1.
template <CpuIsa kIsa>
MGM_FAST_ISA_BODY void lane_dots_body(const float* p, int64_t tn, const float* xt, int64_t ldx,
                                      int64_t kdim, float* c) {
  constexpr int kKB = Lanes<kIsa>::kBlock;
  int64_t k = 0;
  for (; k + kKB <= kdim; k += kKB) lane_dots_block<kIsa, kKB>(p, tn, xt + k, ldx, c + k * kL);
  if constexpr (kKB > 4) {
    if (k + 4 <= kdim) {
      lane_dots_block<kIsa, 4>(p, tn, xt + k, ldx, c + k * kL);
      k += 4;
    }
  }
  if constexpr (kKB > 2) {
    if (k + 2 <= kdim) {
      lane_dots_block<kIsa, 2>(p, tn, xt + k, ldx, c + k * kL);
      k += 2;
    }
  }
  if (k < kdim) lane_dots_block<kIsa, 1>(p, tn, xt + k, ldx, c + k * kL);
}
constexpr auto& lane_dots = MGM_FAST_ISA_DISPATCH_PER_LEVEL(lane_dots_body);

// Forward softmax of tn >= 1 positions per lane: s -> exp(s - max) in place; max and the sum of
// the exponentials per lane to max_out[kL], sum_out[kL].
template <CpuIsa kIsa>
MGM_FAST_ISA_BODY void lane_softmax_body(float* s, int64_t tn, float* max_out, float* sum_out) {
  using L = Lanes<kIsa>;
  constexpr int kF = L::kFloats, kV = L::kVecs;
  typename L::Vec m[kV];
  for (int v = 0; v < kV; ++v) m[v] = vec_at<kF>(s + v * kF);
  for (int64_t t = 1; t < tn; ++t) {
    for (int v = 0; v < kV; ++v) {
      const typename L::Vec x = vec_at<kF>(s + t * kL + v * kF);
      m[v] = x > m[v] ? x : m[v];
    }
  }
  float mx[kL];
  static_assert(sizeof(mx) == sizeof(m), "kL lanes");
  std::memcpy(mx, m, sizeof(mx));
  for (int64_t t = 0; t < tn; ++t) {
    float* st = s + t * kL;
#pragma omp simd
    for (int64_t l = 0; l < kL; ++l) st[l] = exp_nonpos(st[l] - mx[l]);
  }
  typename L::Vec sum[kV] = {};
  for (int64_t t = 0; t < tn; ++t) {
    for (int v = 0; v < kV; ++v) sum[v] += vec_at<kF>(s + t * kL + v * kF);
  }
  std::memcpy(max_out, mx, sizeof(mx));
  std::memcpy(sum_out, sum, sizeof(mx));
}
constexpr auto& lane_softmax = MGM_FAST_ISA_DISPATCH_PER_LEVEL(lane_softmax_body);

// Query lanes (backward): s -> dS = exp(s - lse) (dp - delta), lse and delta per lane.
MGM_FAST_ISA_BODY void lane_dscores_body(float* s, const float* dp, int64_t tn, const float* lse,
                                         const float* delta) {
  for (int64_t t = 0; t < tn; ++t) {
    float* st = s + t * kL;
    const float* dpt = dp + t * kL;
#pragma omp simd
    for (int64_t l = 0; l < kL; ++l) st[l] = exp_nonpos(st[l] - lse[l]) * (dpt[l] - delta[l]);
  }
}
constexpr auto& lane_dscores = MGM_FAST_ISA_DISPATCH(lane_dscores_body);

// Key lanes (backward): s -> P = exp(s - lse[t]), lse per position.
MGM_FAST_ISA_BODY void lane_probs_body(float* s, int64_t tn, const float* lse) {
  for (int64_t t = 0; t < tn; ++t) {
    float* st = s + t * kL;
    const float m = lse[t];
#pragma omp simd
    for (int64_t l = 0; l < kL; ++l) st[l] = exp_nonpos(st[l] - m);
  }
}
constexpr auto& lane_probs = MGM_FAST_ISA_DISPATCH(lane_probs_body);

// Key lanes (backward): dp -> dS = P (dp - delta[t]), delta per position.
template <CpuIsa kIsa>
MGM_FAST_ISA_BODY void lane_dscores_keys_body(float* dp, const float* p, int64_t tn,
                                              const float* delta) {
  using L = Lanes<kIsa>;
  constexpr int kF = L::kFloats, kV = L::kVecs;
  for (int64_t t = 0; t < tn; ++t) {
    for (int v = 0; v < kV; ++v) {
      const typename L::Vec d = vec_at<kF>(dp + t * kL + v * kF);
      vec_at<kF>(dp + t * kL + v * kF) = vec_at<kF>(p + t * kL + v * kF) * (d - delta[t]);
    }
  }
}
constexpr auto& lane_dscores_keys = MGM_FAST_ISA_DISPATCH_PER_LEVEL(lane_dscores_keys_body);

// out[k * kL + l] = x[k * ld + l] for l < nl, 0 for nl <= l < kL, k < kdim: a block's lanes
// (positions i0 .. i0 + nl of the rows of a (kdim, ld) array starting at x = row 0 + i0).
void gather_lanes(const float* x, int64_t ld, int64_t kdim, int64_t nl, float* out) {
  for (int64_t k = 0; k < kdim; ++k) {
    std::memcpy(out + k * kL, x + k * ld, static_cast<size_t>(nl) * sizeof(float));
    std::fill(out + k * kL + nl, out + (k + 1) * kL, 0.0f);
  }
}

// The inverse for the nl valid lanes: x[k * ld + l] = in[k * kL + l].
void scatter_lanes(const float* in, int64_t kdim, int64_t nl, float* x, int64_t ld) {
  for (int64_t k = 0; k < kdim; ++k) {
    std::memcpy(x + k * ld, in + k * kL, static_cast<size_t>(nl) * sizeof(float));
  }
}

// x (batch, k, n) -> out (batch, n, k): the broadcast operand of the micro-kernels, one
// position's k values contiguous.
void transpose_batches(const float* x, int64_t batch, int64_t k, int64_t n, std::vector<float>& out,
                       int nt) {
  out.resize(static_cast<size_t>(batch * n * k));
  constexpr int64_t kTile = 64;  // positions per tile: k rows of it stay in cache
#pragma omp parallel for schedule(static) num_threads(nt) if (batch * n * k > kParallelWork)
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * k * n;
    float* ob = out.data() + b * n * k;
    for (int64_t j0 = 0; j0 < n; j0 += kTile) {
      const int64_t j1 = std::min(n, j0 + kTile);
      for (int64_t d = 0; d < k; ++d) {
        for (int64_t j = j0; j < j1; ++j) ob[j * k + d] = xb[d * n + j];
      }
    }
  }
}

// delta[b * N + i] = sum_c grad_out[b, c, i] * out[b, c, i], c in order.
void compute_delta(const float* out, const float* grad_out, int64_t batch, int64_t n,
                   int64_t dv, float* delta, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (batch * n * dv > kParallelWork)
  for (int64_t b = 0; b < batch; ++b) {
    float* db = delta + b * n;
    std::fill(db, db + n, 0.0f);
    for (int64_t c = 0; c < dv; ++c) {
      const float* o = out + (b * dv + c) * n;
      const float* go = grad_out + (b * dv + c) * n;
      for (int64_t i = 0; i < n; ++i) db[i] += go[i] * o[i];
    }
  }
}

inline size_t at_least_one(int64_t n) { return static_cast<size_t>(std::max<int64_t>(n, 1)); }

}  // namespace

void sagan_attention_forward(const SaganAttentionProblem& p, float* out, float* lse,
                             int num_threads) {
  const int nt = resolve_threads(num_threads);
  const int64_t B = p.batch, N = p.num_queries, M = p.num_keys, DQ = p.qk_dim, DV = p.v_dim;
  if (B == 0 || N == 0) return;
  std::vector<float> keys_t, values_t;  // (B, M, dq), (B, M, dv)
  transpose_batches(p.phi, B, DQ, M, keys_t, nt);
  transpose_batches(p.g, B, DV, M, values_t, nt);
  const int64_t blocks = (N + kL - 1) / kL, tasks = B * blocks;
  const bool parallel = tasks > 1 && B * N * M * (DQ + DV + kExpCost) >= kParallelWork;
#pragma omp parallel num_threads(nt) if (parallel)
  {
    std::vector<float> s(static_cast<size_t>(M * kL)), qa(at_least_one(DQ) * kL);
    std::vector<float> acc(at_least_one(DV) * kL);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / blocks, i0 = (task % blocks) * kL;
      const int64_t nl = std::min(kL, N - i0);
      gather_lanes(p.theta + b * DQ * N + i0, N, DQ, nl, qa.data());
      lane_scores(keys_t.data() + b * M * DQ, DQ, qa.data(), DQ, M, s.data());
      float mx[kL], sum[kL];
      lane_softmax(s.data(), M, mx, sum);
      std::fill(acc.begin(), acc.end(), 0.0f);
      lane_dots(s.data(), M, values_t.data() + b * M * DV, DV, DV, acc.data());
      for (int64_t l = 0; l < nl; ++l) lse[b * N + i0 + l] = mx[l] + std::log(sum[l]);
      for (int64_t c = 0; c < DV; ++c) {
        for (int64_t l = 0; l < kL; ++l) acc[c * kL + l] /= sum[l];
      }
      scatter_lanes(acc.data(), DV, nl, out + b * DV * N + i0, N);
    }
  }
}

void sagan_attention_backward(const SaganAttentionProblem& p, const float* out,
                              const float* lse, const float* grad_out, float* grad_theta,
                              float* grad_phi, float* grad_g, int num_threads) {
  const int nt = resolve_threads(num_threads);
  const int64_t B = p.batch, N = p.num_queries, M = p.num_keys, DQ = p.qk_dim, DV = p.v_dim;
  if ((grad_theta == nullptr && grad_phi == nullptr && grad_g == nullptr) || B == 0) return;
  if (N == 0) {  // no query attends to any key
    if (grad_phi != nullptr) std::fill(grad_phi, grad_phi + B * DQ * M, 0.0f);
    if (grad_g != nullptr) std::fill(grad_g, grad_g + B * DV * M, 0.0f);
    return;
  }
  std::vector<float> delta(static_cast<size_t>(B * N));
  compute_delta(out, grad_out, B, N, DV, delta.data(), nt);
  const bool parallel_work = B * N * M * (2 * DQ + DV + kExpCost) >= kParallelWork;

  if (grad_theta != nullptr) {  // query lanes against all keys
    std::vector<float> keys_t, values_t;
    transpose_batches(p.phi, B, DQ, M, keys_t, nt);
    transpose_batches(p.g, B, DV, M, values_t, nt);
    const int64_t blocks = (N + kL - 1) / kL, tasks = B * blocks;
#pragma omp parallel num_threads(nt) if (tasks > 1 && parallel_work)
    {
      std::vector<float> s(static_cast<size_t>(kChunk * kL)), dp(static_cast<size_t>(kChunk * kL));
      std::vector<float> qa(at_least_one(DQ) * kL), da(at_least_one(DV) * kL);
      std::vector<float> acc(at_least_one(DQ) * kL);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t b = task / blocks, i0 = (task % blocks) * kL;
        const int64_t nl = std::min(kL, N - i0);
        gather_lanes(p.theta + b * DQ * N + i0, N, DQ, nl, qa.data());
        gather_lanes(grad_out + b * DV * N + i0, N, DV, nl, da.data());
        float lse_l[kL], delta_l[kL];
        gather_lanes(lse + b * N + i0, 0, 1, nl, lse_l);
        gather_lanes(delta.data() + b * N + i0, 0, 1, nl, delta_l);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t t0 = 0; t0 < M; t0 += kChunk) {
          const int64_t tn = std::min(kChunk, M - t0);
          const float* kt = keys_t.data() + (b * M + t0) * DQ;
          lane_scores(kt, DQ, qa.data(), DQ, tn, s.data());
          lane_scores(values_t.data() + (b * M + t0) * DV, DV, da.data(), DV, tn, dp.data());
          lane_dscores(s.data(), dp.data(), tn, lse_l, delta_l);
          lane_dots(s.data(), tn, kt, DQ, DQ, acc.data());
        }
        scatter_lanes(acc.data(), DQ, nl, grad_theta + b * DQ * N + i0, N);
      }
    }
  }

  if (grad_phi != nullptr || grad_g != nullptr) {  // key lanes against all queries
    std::vector<float> queries_t, douts_t;  // (B, N, dq), (B, N, dv)
    transpose_batches(p.theta, B, DQ, N, queries_t, nt);
    transpose_batches(grad_out, B, DV, N, douts_t, nt);
    const int64_t blocks = (M + kL - 1) / kL, tasks = B * blocks;
#pragma omp parallel num_threads(nt) if (tasks > 1 && parallel_work)
    {
      std::vector<float> pt(static_cast<size_t>(kChunk * kL)), dpt(static_cast<size_t>(kChunk * kL));
      std::vector<float> ka(at_least_one(DQ) * kL), va(at_least_one(DV) * kL);
      std::vector<float> acc_k(at_least_one(DQ) * kL), acc_v(at_least_one(DV) * kL);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t b = task / blocks, j0 = (task % blocks) * kL;
        const int64_t nl = std::min(kL, M - j0);
        gather_lanes(p.phi + b * DQ * M + j0, M, DQ, nl, ka.data());
        gather_lanes(p.g + b * DV * M + j0, M, DV, nl, va.data());
        std::fill(acc_k.begin(), acc_k.end(), 0.0f);
        std::fill(acc_v.begin(), acc_v.end(), 0.0f);
        for (int64_t t0 = 0; t0 < N; t0 += kChunk) {
          const int64_t tn = std::min(kChunk, N - t0);
          const float* qt = queries_t.data() + (b * N + t0) * DQ;
          const float* ot = douts_t.data() + (b * N + t0) * DV;
          // the same products in the same order as the query side: the same scores
          lane_scores(qt, DQ, ka.data(), DQ, tn, pt.data());
          lane_probs(pt.data(), tn, lse + b * N + t0);
          if (grad_g != nullptr) lane_dots(pt.data(), tn, ot, DV, DV, acc_v.data());
          if (grad_phi != nullptr) {
            lane_scores(ot, DV, va.data(), DV, tn, dpt.data());
            lane_dscores_keys(dpt.data(), pt.data(), tn, delta.data() + b * N + t0);
            lane_dots(dpt.data(), tn, qt, DQ, DQ, acc_k.data());
          }
        }
        if (grad_phi != nullptr) scatter_lanes(acc_k.data(), DQ, nl, grad_phi + b * DQ * M + j0, M);
        if (grad_g != nullptr) scatter_lanes(acc_v.data(), DV, nl, grad_g + b * DV * M + j0, M);
      }
    }
  }
}

}  // namespace cpu
}  // namespace mgm_fast
