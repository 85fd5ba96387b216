// Fused SAGAN/BigGAN self-attention core on the CPU, forward and backward, without the
// (B, N, M) attention map in memory (flash-attention style).
//
// Torch-free C++17: raw pointers to contiguous float32 arrays. The torch glue is
// csrc/bindings/sagan_attention.cpp; the plain-PyTorch reference is mgm_fast/ops/attention.py
// (sagan_attention_reference, the two lines of mgm_fast/models/layers.py SelfAttention.forward).
// For each batch item b, query i < N, key j < M (q_i = theta[b, :, i], k_j = phi[b, :, j],
// v_j = g[b, :, j]):
//
//   s_ij  = q_i . k_j                               (no 1/sqrt(dq) scaling)
//   lse_i = log sum_j exp(s_ij),  P_ij = exp(s_ij - lse_i)
//   out_i = sum_j P_ij v_j                          out[b, :, i]
// Backward, given dout_i = grad_out[b, :, i]:
//   delta_i = dout_i . out_i,   dP_ij = dout_i . v_j,   dS_ij = P_ij (dP_ij - delta_i)
//   dq_i = sum_j dS_ij k_j,   dk_j = sum_i dS_ij q_i,   dv_j = sum_i P_ij dout_i
//
// Work: blocks of 16 queries (forward, dq) or 16 keys (dk, dv) -- one vector register of lanes
// (AVX-512) -- OpenMP over (b, block). The block runs over all positions of the other side
// with two micro-kernels whose FMAs are lane-wise (no horizontal sums, no per-lane branches):
// "scores" (s_t = sum_k x_tk y_k: the block's vectors y_k against broadcast values of one
// position t) and "dots" (c_k += sum_t x_tk p_t). The broadcast side is read from a transposed
// copy (one position's channels contiguous), the block's own channels are gathered once into a
// padded buffer, so odd N and M need no special code. Forward keeps one block's scores (M x 16
// floats) per thread, takes the max, exponentiates, accumulates out and saves lse (B, N).
// Backward recomputes the scores twice in chunks of 128 positions that stay in L1: once per
// query block for dq, once per key block (keys as lanes, all queries as positions) for dk and
// dv, so every gradient element is written by one thread in a fixed order.
//
// Determinism: each output element comes from one thread in a fixed order, so results are
// bit-identical for any thread count on one machine (the micro-kernels are compiled per ISA --
// SSE2 / AVX2 / AVX-512, see isa.h -- and may round differently on another ISA).
#pragma once

#include <cstdint>

namespace mgm_fast {
namespace cpu {

/// The attention inputs, contiguous float32.
struct SaganAttentionProblem {
  const float* theta = nullptr;  ///< (B, dq, N): the queries, one column per position
  const float* phi = nullptr;    ///< (B, dq, M): the keys
  const float* g = nullptr;      ///< (B, dv, M): the values
  int64_t batch = 0;             ///< B >= 0
  int64_t num_queries = 0;       ///< N >= 0
  int64_t num_keys = 0;          ///< M >= 1
  int64_t qk_dim = 0;            ///< dq >= 0
  int64_t v_dim = 0;             ///< dv >= 0
};

/// out (B, dv, N) = g softmax(theta^T phi)^T and lse (B, N), the per-query logsumexp of the
/// scores (saved for backward). num_threads <= 0 uses the OpenMP default.
void sagan_attention_forward(const SaganAttentionProblem& problem, float* out, float* lse,
                             int num_threads);

/// Gradients for grad_out (B, dv, N): grad_theta (B, dq, N), grad_phi (B, dq, M), grad_g
/// (B, dv, M), contiguous, each may be nullptr (not computed). out and lse from
/// sagan_attention_forward on the same inputs.
void sagan_attention_backward(const SaganAttentionProblem& problem, const float* out,
                              const float* lse, const float* grad_out, float* grad_theta,
                              float* grad_phi, float* grad_g, int num_threads);

}  // namespace cpu
}  // namespace mgm_fast
