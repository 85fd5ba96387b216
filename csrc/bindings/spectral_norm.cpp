// Torch glue of the CPU spectral normalisation (kernel: csrc/kernels/cpu/spectral_norm.*).
//
// spectral_norm_power_iteration_cpu(weights, us, vs, steps, eps) -> (sigmas, us', vs')
//   weights: float32 CPU tensors (out, ...) -- conv weights in any dense layout (channels_last
//   included) are read in place; u_i (out,), v_i (numel / out,) float32; steps_i >= 0 (0: the
//   stored vectors, evaluation mode); eps_i > 0. sigma_i is 0-dim; u_i', v_i' are new tensors
//   (the inputs are not written).
// spectral_norm_weight_grad_cpu(grads, weights, sigmas, us, vs) -> grad_weights
//   dW_i = g_i / sigma_i - (<g_i, W_i> / sigma_i^2) u_i v_i^T, laid out like W_i.
// Called by mgm_fast/ops/spectral_norm.py, which owns the custom ops and the autograd.
#include <torch/extension.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

#include "kernels/cpu/spectral_norm.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

// A weight as the kernel's matrix: its rows, and where each logical column lies in a row.
struct MatrixView {
  at::Tensor weight;                // the weight itself, or a contiguous copy of an odd layout
  std::vector<int64_t> col_offset;  // empty: the identity
  cpu::SpectralNormMatrix matrix() const {
    const int64_t rows = weight.size(0);
    const int64_t cols = rows == 0 ? 0 : weight.numel() / rows;
    return {weight.data_ptr<float>(), rows, cols, weight.dim() > 1 ? weight.stride(0) : cols,
            col_offset.empty() ? nullptr : col_offset.data()};
  }
};

// True when the dims after the first form one dense block per row (some order of them is
// row-major with unit innermost stride): contiguous and channels_last conv weights do.
bool rows_are_dense_blocks(const at::Tensor& w) {
  std::vector<int64_t> dims(w.dim() - 1);
  std::iota(dims.begin(), dims.end(), 1);
  std::sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return w.stride(a) < w.stride(b); });
  int64_t expected = 1;
  for (int64_t d : dims) {
    if (w.size(d) != 1 && w.stride(d) != expected) return false;
    expected *= w.size(d);
  }
  return w.dim() == 1 || w.size(0) <= 1 || w.stride(0) >= expected;
}

MatrixView view_of(const at::Tensor& w_in, const char* what, size_t i) {
  TORCH_CHECK_VALUE(w_in.device().is_cpu(), "spectral_norm (cpp backend): ", what, "[", i,
                    "] must be a CPU tensor, got ", w_in.device());
  TORCH_CHECK_TYPE(w_in.scalar_type() == at::kFloat, "spectral_norm (cpp backend): ", what, "[", i,
                   "] must be float32, got ", w_in.scalar_type());
  TORCH_CHECK_VALUE(w_in.dim() >= 1, "spectral_norm (cpp backend): ", what, "[", i, "] must have a dimension");
  MatrixView view{rows_are_dense_blocks(w_in) ? w_in : w_in.contiguous(), {}};
  const at::Tensor& w = view.weight;
  bool row_major = true;
  int64_t expected = 1;
  for (int64_t d = w.dim() - 1; d >= 1; --d) {
    if (w.size(d) != 1 && w.stride(d) != expected) row_major = false;
    expected *= w.size(d);
  }
  if (!row_major) {
    const int64_t cols = w.numel() / std::max<int64_t>(w.size(0), 1);
    view.col_offset.resize(cols);
    for (int64_t c = 0; c < cols; ++c) {  // logical (row-major) index -> memory offset in the row
      int64_t rest = c, offset = 0;
      for (int64_t d = w.dim() - 1; d >= 1; --d) {
        offset += (rest % w.size(d)) * w.stride(d);
        rest /= w.size(d);
      }
      view.col_offset[c] = offset;
    }
  }
  return view;
}

void check_vector(const at::Tensor& t, int64_t n, const char* what, size_t i) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n,
                    "spectral_norm (cpp backend): ", what, "[", i, "] must be a float32 CPU vector of ", n,
                    " entries, got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void check_counts(size_t n, size_t m, const char* what) {
  TORCH_CHECK_VALUE(n == m, "spectral_norm (cpp backend): ", m, " ", what, " for ", n, " weights");
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> power_iteration_cpu(
    const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us, const std::vector<at::Tensor>& vs,
    const std::vector<int64_t>& steps, const std::vector<double>& eps) {
  const size_t n = weights.size();
  check_counts(n, us.size(), "u vectors");
  check_counts(n, vs.size(), "v vectors");
  check_counts(n, steps.size(), "step counts");
  check_counts(n, eps.size(), "eps values");
  std::vector<MatrixView> views;
  std::vector<at::Tensor> sigmas, new_us, new_vs;
  views.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    views.push_back(view_of(weights[i], "weights", i));
    const cpu::SpectralNormMatrix m = views.back().matrix();
    check_vector(us[i], m.rows, "us", i);
    check_vector(vs[i], m.cols, "vs", i);
    TORCH_CHECK_VALUE(steps[i] >= 0 && eps[i] > 0, "spectral_norm (cpp backend): steps[", i, "] = ", steps[i],
                      " and eps[", i, "] = ", eps[i], " (need steps >= 0, eps > 0)");
    sigmas.push_back(at::empty({}, weights[i].options()));
    new_us.push_back(us[i].clone(at::MemoryFormat::Contiguous));
    new_vs.push_back(vs[i].clone(at::MemoryFormat::Contiguous));
  }
  const int threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    for (size_t i = 0; i < n; ++i) {
      cpu::spectral_norm_power_iteration(views[i].matrix(), new_us[i].data_ptr<float>(), new_vs[i].data_ptr<float>(),
                                         static_cast<int>(steps[i]), static_cast<float>(eps[i]),
                                         sigmas[i].data_ptr<float>(), threads);
    }
  }
  return {sigmas, new_us, new_vs};
}

std::vector<at::Tensor> weight_grad_cpu(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& weights,
                                        const std::vector<at::Tensor>& sigmas, const std::vector<at::Tensor>& us,
                                        const std::vector<at::Tensor>& vs) {
  const size_t n = weights.size();
  check_counts(n, grads.size(), "gradients");
  check_counts(n, sigmas.size(), "sigmas");
  check_counts(n, us.size(), "u vectors");
  check_counts(n, vs.size(), "v vectors");
  std::vector<MatrixView> views;
  std::vector<at::Tensor> gs, outs;
  views.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    views.push_back(view_of(weights[i], "weights", i));
    const at::Tensor& w = views.back().weight;
    const cpu::SpectralNormMatrix m = views.back().matrix();
    check_vector(us[i], m.rows, "us", i);
    check_vector(vs[i], m.cols, "vs", i);
    TORCH_CHECK_VALUE(grads[i].sizes() == w.sizes() && grads[i].scalar_type() == at::kFloat && grads[i].device().is_cpu(),
                      "spectral_norm (cpp backend): grads[", i, "] must be float32 on the CPU shaped ", w.sizes(),
                      ", got ", grads[i].scalar_type(), " ", grads[i].sizes());
    TORCH_CHECK_VALUE(sigmas[i].numel() == 1 && sigmas[i].scalar_type() == at::kFloat && sigmas[i].device().is_cpu(),
                      "spectral_norm (cpp backend): sigmas[", i, "] must be one float32 on the CPU");
    // The gradient in the weight's layout, so both are walked in the same memory order.
    at::Tensor g = grads[i];
    if (g.strides() != w.strides()) g = at::empty_strided(w.sizes(), w.strides(), w.options()).copy_(grads[i]);
    gs.push_back(g);
    outs.push_back(at::empty_strided(w.sizes(), w.strides(), w.options()));
  }
  const int threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    for (size_t i = 0; i < n; ++i) {
      cpu::spectral_norm_weight_grad(views[i].matrix(), gs[i].data_ptr<float>(), us[i].data_ptr<float>(),
                                     vs[i].data_ptr<float>(), *sigmas[i].data_ptr<float>(), outs[i].data_ptr<float>(),
                                     threads);
    }
  }
  return outs;
}

}  // namespace

void register_spectral_norm(pybind11::module_& m) {
  m.def("spectral_norm_power_iteration_cpu", &power_iteration_cpu, pybind11::arg("weights"), pybind11::arg("us"),
        pybind11::arg("vs"), pybind11::arg("steps"), pybind11::arg("eps"),
        "Power iteration of a group of spectrally normalised weights: (sigmas, new us, new vs).");
  m.def("spectral_norm_weight_grad_cpu", &weight_grad_cpu, pybind11::arg("grads"), pybind11::arg("weights"),
        pybind11::arg("sigmas"), pybind11::arg("us"), pybind11::arg("vs"),
        "Gradients of W / sigma for a group of weights (u, v constants, sigma = u . W v).");
}

}  // namespace bindings
}  // namespace mgm_fast
