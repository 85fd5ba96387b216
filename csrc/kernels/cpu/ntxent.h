// Fused NT-Xent (SimCLR) loss on the CPU: rows against all 2N columns, forward and backward,
// without an (R, 2N) matrix in memory.
//
// Torch-free C++17: raw pointers, sizes and row strides. The torch glue is
// csrc/bindings/ntxent.cpp; the plain-PyTorch reference is mgm_fast/ops/ntxent.py
// (ntxent_rows_reference) and mgm_fast/losses.py (ntxent). Formulas, u = x / max(||x||, 1e-12):
//
//   s(i, k)  = (u_rows[i] . u_cols[k]) / tau
//   loss     = sum_i [ logsumexp_{k != self(i)} s(i, k) - s(i, pos(i)) ]
//              self(i) = row_index[i],  pos(i) = (row_index[i] + N) mod 2N
//   dS(i, k) = g (softmax_{k != self(i)} s(i, .)_k - [k == pos(i)]),  dS(i, self(i)) = 0
//   d loss / d u_rows[i] = sum_k dS(i, k) u_cols[k] / tau
//   d loss / d u_cols[k] = sum_i dS(i, k) u_rows[i] / tau
//   d loss / d x = (d_u - u (u . d_u)) / max(||x||, 1e-12)       (a zero row: d_u / 1e-12)
//
// Work: rows are processed in blocks of 4. A block's similarities against all 2N columns are
// one (4, 2N) float buffer (128 KB at 2N = 8192, per thread: stays in L2), computed by a
// register-blocked micro-kernel over a transposed copy of the normalised columns (unit stride
// along the columns, so the inner loop is a vector FMA). Forward keeps only the per-row LSE.
// Backward recomputes the scores: once per row block for the row gradients and once per
// column block (against the transposed rows) for the column gradients, so every gradient
// element is written by one thread, in a fixed order.
//
// Determinism: each row (column) block is computed independently and the loss is summed in row
// order in double, so results are bit-identical for any thread count on one machine (the
// micro-kernels are compiled per ISA -- SSE2 / AVX2 / AVX-512, see isa.h).
#pragma once

#include <cstdint>

namespace mgm_fast {
namespace cpu {

/// rows (R, D) against cols (2N, D), float32, unit stride along D.
struct NtxentProblem {
  const float* rows = nullptr;
  int64_t rows_stride = 0;            ///< elements between consecutive rows
  const float* cols = nullptr;
  int64_t cols_stride = 0;
  const int64_t* row_index = nullptr; ///< (R,) column of each row, in [0, 2N)
  int64_t num_rows = 0;               ///< R
  int64_t num_cols = 0;               ///< 2N, even and >= 2
  int64_t dim = 0;                    ///< D
  float temperature = 0.5f;           ///< tau > 0
};

/// The first row whose row_index lies outside [0, 2N), or -1.
int64_t ntxent_bad_row(const NtxentProblem& problem);

/// SUM over the rows of the row losses (accumulated in double, in row order); writes the
/// per-row logsumexp over the negatives to lse[R]. Precondition: ntxent_bad_row(...) == -1,
/// 2N even and >= 2. num_threads <= 0 uses the OpenMP default.
double ntxent_forward(const NtxentProblem& problem, float* lse, int num_threads);

/// Gradients of grad_output * (the forward's sum): grad_rows (R, D) and grad_cols (2N, D),
/// contiguous, either may be nullptr. lse from ntxent_forward on the same inputs.
void ntxent_backward(const NtxentProblem& problem, const float* lse, float grad_output,
                     float* grad_rows, float* grad_cols, int num_threads);

/// exp(x) for x <= 0 as evaluated inside the kernel (exposed for the unit tests): about 1 ulp on
/// normal results, 0 for x < -104 and for -inf.
float ntxent_exp(float x);

}  // namespace cpu
}  // namespace mgm_fast
