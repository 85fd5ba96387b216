// Torch glue of the fused CPU NT-Xent (kernel: csrc/kernels/cpu/ntxent.*).
//
// ntxent_rows_cpu_forward(rows, cols, row_index, temperature) -> (loss, lse)
//   loss: 0-dim float32, the SUM over the R rows of the row losses; lse: (R,) float32 per-row
//   logsumexp over the negatives (saved for backward).
// ntxent_rows_cpu_backward(rows, cols, row_index, temperature, lse, grad_output, need_grad)
//   -> (grad_rows or None, grad_cols or None), contiguous float32.
// Inputs: rows (R, D) and cols (2N, D) float32 CPU tensors (a copy is made when the D axis is
// not unit-stride), row_index (R,) int64 with values in [0, 2N). Called by
// mgm_fast/ops/ntxent.py, which owns the autograd.Function and the dispatch.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "kernels/cpu/ntxent.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

namespace k = mgm_fast::cpu;

constexpr const char* kOp = "ntxent (cpp backend): ";

// Checks and a view with unit stride along D (copied only if needed).
at::Tensor projections(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kOp, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, kOp, name, " must be 2-d (rows, D), got shape ", t.sizes());
  return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
}

k::NtxentProblem problem(const at::Tensor& rows, const at::Tensor& cols,
                         const at::Tensor& row_index, double temperature) {
  TORCH_CHECK_VALUE(cols.size(0) >= 2 && cols.size(0) % 2 == 0, kOp,
                    "cols must hold 2N views (an even number >= 2 of rows), got shape ",
                    cols.sizes());
  TORCH_CHECK_VALUE(rows.size(1) == cols.size(1), kOp, "rows ", rows.sizes(), " and cols ",
                    cols.sizes(), " differ in D");
  TORCH_CHECK_VALUE(row_index.device().is_cpu() && row_index.scalar_type() == at::kLong &&
                        row_index.dim() == 1 && row_index.size(0) == rows.size(0),
                    kOp, "row_index must be a CPU int64 tensor of shape (", rows.size(0),
                    ",), got ", row_index.sizes(), " ", row_index.scalar_type());
  TORCH_CHECK_VALUE(temperature > 0.0, kOp, "temperature must be positive, got ", temperature);
  TORCH_CHECK_VALUE(row_index.is_contiguous(), kOp, "row_index must be contiguous");
  k::NtxentProblem p;
  p.rows = rows.data_ptr<float>();
  p.rows_stride = rows.size(0) > 1 ? rows.stride(0) : rows.size(1);
  p.cols = cols.data_ptr<float>();
  p.cols_stride = cols.stride(0);
  p.row_index = row_index.data_ptr<int64_t>();
  p.num_rows = rows.size(0);
  p.num_cols = cols.size(0);
  p.dim = rows.size(1);
  p.temperature = static_cast<float>(temperature);
  const int64_t bad = k::ntxent_bad_row(p);
  TORCH_CHECK_VALUE(bad < 0, kOp, "row_index[", bad, "] = ", bad >= 0 ? p.row_index[bad] : 0,
                    " is not a column index in [0, ", p.num_cols, ")");
  return p;
}

std::tuple<at::Tensor, at::Tensor> ntxent_rows_cpu_forward(const at::Tensor& rows_in,
                                                          const at::Tensor& cols_in,
                                                          const at::Tensor& row_index_in,
                                                          double temperature) {
  const at::Tensor rows = projections(rows_in, "rows");
  const at::Tensor cols = projections(cols_in, "cols");
  const at::Tensor row_index = row_index_in.contiguous();
  const k::NtxentProblem p = problem(rows, cols, row_index, temperature);
  at::Tensor lse = at::empty({p.num_rows}, rows.options());
  double loss = 0.0;
  const int threads = at::get_num_threads();  // honours torch.set_num_threads
  {
    pybind11::gil_scoped_release no_gil;
    loss = k::ntxent_forward(p, lse.data_ptr<float>(), threads);
  }
  return {at::scalar_tensor(loss, rows.options()), lse};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> ntxent_rows_cpu_backward(
    const at::Tensor& rows_in, const at::Tensor& cols_in, const at::Tensor& row_index_in,
    double temperature, const at::Tensor& lse, const at::Tensor& grad_output,
    std::vector<bool> need_grad) {
  TORCH_CHECK_VALUE(need_grad.size() == 2, kOp, "need_grad must have 2 entries");
  const at::Tensor rows = projections(rows_in, "rows");
  const at::Tensor cols = projections(cols_in, "cols");
  const at::Tensor row_index = row_index_in.contiguous();
  const k::NtxentProblem p = problem(rows, cols, row_index, temperature);
  TORCH_CHECK_VALUE(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 1 &&
                        lse.size(0) == p.num_rows && lse.is_contiguous(),
                    kOp, "lse must be the (R,) float32 tensor of the forward");
  // The upstream gradient stays a tensor and is read in place: no op reads it back.
  TORCH_CHECK_VALUE(grad_output.device().is_cpu() && grad_output.scalar_type() == at::kFloat &&
                        grad_output.numel() == 1,
                    kOp, "grad_output must be one float32 on the CPU, got ", grad_output.scalar_type(),
                    " ", grad_output.sizes());
  const float scale = *grad_output.data_ptr<float>();
  std::optional<at::Tensor> grad_rows, grad_cols;
  if (need_grad[0]) grad_rows = at::empty({p.num_rows, p.dim}, rows.options());
  if (need_grad[1]) grad_cols = at::empty({p.num_cols, p.dim}, cols.options());
  const int threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    k::ntxent_backward(p, lse.data_ptr<float>(), scale,
                       grad_rows ? grad_rows->data_ptr<float>() : nullptr,
                       grad_cols ? grad_cols->data_ptr<float>() : nullptr, threads);
  }
  return {grad_rows, grad_cols};
}

}  // namespace

void register_ntxent(pybind11::module_& m) {
  m.def("ntxent_rows_cpu_forward", &ntxent_rows_cpu_forward, pybind11::arg("rows"),
        pybind11::arg("cols"), pybind11::arg("row_index"), pybind11::arg("temperature"),
        "Fused NT-Xent forward on the CPU: (sum of the row losses, per-row LSE).");
  m.def("ntxent_rows_cpu_backward", &ntxent_rows_cpu_backward, pybind11::arg("rows"),
        pybind11::arg("cols"), pybind11::arg("row_index"), pybind11::arg("temperature"),
        pybind11::arg("lse"), pybind11::arg("grad_output"), pybind11::arg("need_grad"),
        "Fused NT-Xent backward on the CPU: (grad_rows or None, grad_cols or None).");
}

}  // namespace bindings
}  // namespace mgm_fast
