// Fused NT-Xent (SimCLR) loss on CUDA: rows (R, D) against columns (2N, D), forward and
// backward, without an (R, 2N) matrix in memory.
//
// Torch-free: raw device pointers, sizes, row strides and a cudaStream_t. The torch glue is
// csrc/bindings/cuda/ntxent_cuda.cpp; the formulas are those of csrc/kernels/cpu/ntxent.h
// (u = x / max(||x||, 1e-12), s = u_r . u_c / tau, loss = sum_i lse_i - s(i, pos(i)) with the
// self column excluded from the logsumexp, pos(i) = (row_index[i] + N) mod 2N).
//
// Work split: a block of 8 warps owns 8 rows (one per warp) and walks the columns in tiles of
// 32, staged normalised in shared memory by the whole block (coalesced loads). Lane k of a warp
// computes the score of tile column k (a dot over D from shared memory) and keeps its own
// running max and rescaled sum; the 32 lane states are merged at the end (online logsumexp, no
// per-tile reduction). Backward: the row kernel recomputes each tile's scores, writes the 32
// dS values to shared memory and lets the lanes switch to owning dimensions d = lane + 32 m to
// accumulate dS @ U_c in registers; the column kernel does the same with rows and columns
// exchanged. Each gradient element is written by one thread (no atomics, deterministic), and
// the loss is the sum of the per-row losses by one block in a fixed order.
//
// Limits: D <= kNtxentMaxDim (256; the tiles stay under the default 48 KB of shared memory).
// A row_index entry outside [0, 2N) makes that row's loss and gradients NaN (a kernel cannot
// raise; the CPU path raises).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mgm_fast {
namespace cuda {

constexpr int64_t kNtxentMaxDim = 256;

/// Element type of the projections (float32 arithmetic inside).
enum class NtxentDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct NtxentArgs {
  const void* rows = nullptr;         ///< (R, D), unit stride along D
  int64_t rows_stride = 0;
  const void* cols = nullptr;         ///< (2N, D), unit stride along D
  int64_t cols_stride = 0;
  NtxentDType dtype = NtxentDType::kFloat32;  ///< of rows and cols (and of the gradients)
  const int64_t* row_index = nullptr; ///< (R,)
  int64_t num_rows = 0, num_cols = 0, dim = 0;
  float temperature = 0.5f;
};

/// Bytes of device workspace for (R, 2N): the inverse norms and the per-row losses.
size_t ntxent_workspace_bytes(int64_t num_rows, int64_t num_cols);

/// loss[0] = sum of the row losses, lse[R] = per-row logsumexp over the negatives.
/// Asynchronous on `stream`; returns the launch status (cudaErrorInvalidValue for bad sizes).
cudaError_t ntxent_forward(const NtxentArgs& args, float* loss, float* lse, void* workspace,
                           cudaStream_t stream);

/// Gradients of grad_output[0] * loss: grad_rows (R, D) and grad_cols (2N, D), contiguous, of
/// args.dtype; either may be nullptr. lse from ntxent_forward on the same inputs.
cudaError_t ntxent_backward(const NtxentArgs& args, const float* lse, const float* grad_output,
                            void* grad_rows, void* grad_cols, void* workspace,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace mgm_fast
