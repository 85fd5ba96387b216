// Torch glue of the fused CUDA NT-Xent (kernels: csrc/kernels/cuda/ntxent.*). Compiled only
// when setup.py builds with CUDA (MGM_FAST_WITH_CUDA).
//
// ntxent_rows_cuda_forward(rows, cols, row_index, temperature) -> (loss, lse)
//   loss: 0-dim float32 on the device, the SUM over the R rows of the row losses;
//   lse: (R,) float32, the per-row logsumexp over the negatives (saved for backward).
// ntxent_rows_cuda_backward(rows, cols, row_index, temperature, lse, grad_output, need_grad)
//   -> (grad_rows or None, grad_cols or None), contiguous, in the projections' dtype.
// Inputs: rows (R, D) and cols (2N, D) of one dtype (float32 / float16 / bfloat16; copied when
// the D axis is not unit-stride), D <= 256, row_index (R,) int64, all on one CUDA device;
// grad_output a float tensor with one element. Nothing here reads device memory from the host:
// a row_index entry outside [0, 2N) gives a NaN loss instead of an error. Called by
// mgm_fast/ops/ntxent.py, which owns the autograd.Function and the dispatch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../registry.h"
#include "kernels/cuda/ntxent.cuh"

namespace mgm_fast {
namespace bindings {
namespace {

namespace k = mgm_fast::cuda;

constexpr const char* kOp = "ntxent (cuda backend): ";

k::NtxentDType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return k::NtxentDType::kFloat32;
    case at::kHalf: return k::NtxentDType::kFloat16;
    case at::kBFloat16: return k::NtxentDType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, kOp, name, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return k::NtxentDType::kFloat32;  // unreachable
}

at::Tensor projections(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), kOp, name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2, kOp, name, " must be 2-d (rows, D), got shape ", t.sizes());
  return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
}

k::NtxentArgs make_args(const at::Tensor& rows, const at::Tensor& cols,
                        const at::Tensor& row_index, double temperature) {
  TORCH_CHECK_TYPE(rows.scalar_type() == cols.scalar_type(), kOp, "rows (", rows.scalar_type(),
                   ") and cols (", cols.scalar_type(), ") must have one dtype");
  TORCH_CHECK_VALUE(cols.size(0) >= 2 && cols.size(0) % 2 == 0, kOp,
                    "cols must hold 2N views (an even number >= 2 of rows), got shape ",
                    cols.sizes());
  TORCH_CHECK_VALUE(rows.size(1) == cols.size(1), kOp, "rows ", rows.sizes(), " and cols ",
                    cols.sizes(), " differ in D");
  TORCH_CHECK_VALUE(rows.size(1) >= 1 && rows.size(1) <= k::kNtxentMaxDim, kOp,
                    "the projection dim must be in [1, ", k::kNtxentMaxDim, "], got ",
                    rows.size(1));
  TORCH_CHECK_VALUE(row_index.scalar_type() == at::kLong && row_index.dim() == 1 &&
                        row_index.size(0) == rows.size(0) && row_index.is_contiguous(),
                    kOp, "row_index must be a contiguous int64 tensor of shape (", rows.size(0),
                    ",), got ", row_index.sizes(), " ", row_index.scalar_type());
  TORCH_CHECK_VALUE(cols.device() == rows.device() && row_index.device() == rows.device(), kOp,
                    "rows, cols and row_index must be on one device, got ", rows.device(), ", ",
                    cols.device(), ", ", row_index.device());
  TORCH_CHECK_VALUE(temperature > 0.0, kOp, "temperature must be positive, got ", temperature);
  k::NtxentArgs a;
  a.rows = rows.data_ptr();
  a.rows_stride = rows.size(0) > 1 ? rows.stride(0) : rows.size(1);
  a.cols = cols.data_ptr();
  a.cols_stride = cols.stride(0);
  a.dtype = dtype_of(rows, "rows");
  a.row_index = row_index.data_ptr<int64_t>();
  a.num_rows = rows.size(0);
  a.num_cols = cols.size(0);
  a.dim = rows.size(1);
  a.temperature = static_cast<float>(temperature);
  return a;
}

at::Tensor workspace(const k::NtxentArgs& a, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(k::ntxent_workspace_bytes(a.num_rows, a.num_cols))},
                   like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> ntxent_rows_cuda_forward(const at::Tensor& rows_in,
                                                           const at::Tensor& cols_in,
                                                           const at::Tensor& row_index_in,
                                                           double temperature) {
  const at::Tensor rows = projections(rows_in, "rows");
  const at::Tensor cols = projections(cols_in, "cols");
  const at::Tensor row_index = row_index_in.contiguous();
  const c10::cuda::CUDAGuard guard(rows.device());
  const k::NtxentArgs a = make_args(rows, cols, row_index, temperature);
  const at::TensorOptions f32 = rows.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32);
  at::Tensor lse = at::empty({a.num_rows}, f32);
  at::Tensor ws = workspace(a, rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rows.device().index()).stream();
  const cudaError_t err =
      k::ntxent_forward(a, loss.data_ptr<float>(), lse.data_ptr<float>(), ws.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, kOp, "launch failed: ", cudaGetErrorString(err));
  return {loss, lse};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> ntxent_rows_cuda_backward(
    const at::Tensor& rows_in, const at::Tensor& cols_in, const at::Tensor& row_index_in,
    double temperature, const at::Tensor& lse, const at::Tensor& grad_output,
    std::vector<bool> need_grad) {
  TORCH_CHECK_VALUE(need_grad.size() == 2, kOp, "need_grad must have 2 entries");
  const at::Tensor rows = projections(rows_in, "rows");
  const at::Tensor cols = projections(cols_in, "cols");
  const at::Tensor row_index = row_index_in.contiguous();
  const c10::cuda::CUDAGuard guard(rows.device());
  const k::NtxentArgs a = make_args(rows, cols, row_index, temperature);
  TORCH_CHECK_VALUE(lse.device() == rows.device() && lse.scalar_type() == at::kFloat &&
                        lse.dim() == 1 && lse.size(0) == a.num_rows && lse.is_contiguous(),
                    kOp, "lse must be the (R,) float32 tensor of the forward");
  TORCH_CHECK_VALUE(grad_output.numel() == 1, kOp, "grad_output must have one element");
  const at::Tensor go = grad_output.to(rows.device(), at::kFloat).contiguous();
  std::optional<at::Tensor> grad_rows, grad_cols;
  if (need_grad[0]) grad_rows = at::empty({a.num_rows, a.dim}, rows.options());
  if (need_grad[1]) grad_cols = at::empty({a.num_cols, a.dim}, cols.options());
  if (!grad_rows && !grad_cols) return {grad_rows, grad_cols};
  at::Tensor ws = workspace(a, rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rows.device().index()).stream();
  const cudaError_t err = k::ntxent_backward(
      a, lse.data_ptr<float>(), go.data_ptr<float>(), grad_rows ? grad_rows->data_ptr() : nullptr,
      grad_cols ? grad_cols->data_ptr() : nullptr, ws.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, kOp, "launch failed: ", cudaGetErrorString(err));
  return {grad_rows, grad_cols};
}

}  // namespace

void register_ntxent_cuda(pybind11::module_& m) {
  m.def("ntxent_rows_cuda_forward", &ntxent_rows_cuda_forward, pybind11::arg("rows"),
        pybind11::arg("cols"), pybind11::arg("row_index"), pybind11::arg("temperature"),
        "Fused NT-Xent forward on CUDA: (sum of the row losses, per-row LSE).");
  m.def("ntxent_rows_cuda_backward", &ntxent_rows_cuda_backward, pybind11::arg("rows"),
        pybind11::arg("cols"), pybind11::arg("row_index"), pybind11::arg("temperature"),
        pybind11::arg("lse"), pybind11::arg("grad_output"), pybind11::arg("need_grad"),
        "Fused NT-Xent backward on CUDA: (grad_rows or None, grad_cols or None).");
}

}  // namespace bindings
}  // namespace mgm_fast
