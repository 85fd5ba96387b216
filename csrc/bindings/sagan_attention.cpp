// Torch glue of the fused CPU SAGAN self-attention (kernel: csrc/kernels/cpu/sagan_attention.*).
//
// sagan_attention_cpu_forward(theta, phi, g) -> (out, lse)
//   out: (B, dv, N) float32 = g softmax(theta^T phi, -1)^T; lse: (B, N) float32 per-query
//   logsumexp of the scores (saved for backward).
// sagan_attention_cpu_backward(theta, phi, g, out, lse, grad_out, need_grad)
//   -> (grad_theta or None, grad_phi or None, grad_g or None), contiguous float32.
// Inputs: theta (B, dq, N), phi (B, dq, M), g (B, dv, M), grad_out (B, dv, N) float32 CPU
// tensors of any strides (copied when not contiguous: theta is often a reshape of a
// channels_last conv output), M >= 1. Called by mgm_fast/ops/attention.py, which owns the
// autograd.Function, the autocast handling and the dispatch.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "kernels/cpu/sagan_attention.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

namespace k = mgm_fast::cpu;

constexpr const char* kOp = "sagan_attention (cpp backend): ";

// Checks and a contiguous version (a copy only when needed).
at::Tensor operand(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kOp, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 3, kOp, name, " must be 3-d ", layout, ", got shape ", t.sizes());
  return t.contiguous();
}

k::SaganAttentionProblem problem(const at::Tensor& theta, const at::Tensor& phi,
                                 const at::Tensor& g) {
  const int64_t B = theta.size(0), dq = theta.size(1), N = theta.size(2);
  TORCH_CHECK_VALUE(phi.size(0) == B && g.size(0) == B, kOp, "theta ", theta.sizes(), ", phi ",
                    phi.sizes(), " and g ", g.sizes(), " differ in the batch size");
  TORCH_CHECK_VALUE(phi.size(1) == dq, kOp, "theta ", theta.sizes(), " and phi ", phi.sizes(),
                    " differ in dq (dim 1)");
  TORCH_CHECK_VALUE(g.size(2) == phi.size(2), kOp, "phi ", phi.sizes(), " and g ", g.sizes(),
                    " differ in M (dim 2)");
  TORCH_CHECK_VALUE(phi.size(2) >= 1, kOp, "phi must have at least one key position (M >= 1), got ",
                    phi.sizes());
  k::SaganAttentionProblem p;
  p.theta = theta.data_ptr<float>();
  p.phi = phi.data_ptr<float>();
  p.g = g.data_ptr<float>();
  p.batch = B;
  p.num_queries = N;
  p.num_keys = phi.size(2);
  p.qk_dim = dq;
  p.v_dim = g.size(1);
  return p;
}

std::tuple<at::Tensor, at::Tensor> sagan_attention_cpu_forward(const at::Tensor& theta_in,
                                                               const at::Tensor& phi_in,
                                                               const at::Tensor& g_in) {
  const at::Tensor theta = operand(theta_in, "theta", "(B, dq, N)");
  const at::Tensor phi = operand(phi_in, "phi", "(B, dq, M)");
  const at::Tensor g = operand(g_in, "g", "(B, dv, M)");
  const k::SaganAttentionProblem p = problem(theta, phi, g);
  at::Tensor out = at::empty({p.batch, p.v_dim, p.num_queries}, theta.options());
  at::Tensor lse = at::empty({p.batch, p.num_queries}, theta.options());
  const int threads = at::get_num_threads();  // honours torch.set_num_threads
  {
    pybind11::gil_scoped_release no_gil;
    k::sagan_attention_forward(p, out.data_ptr<float>(), lse.data_ptr<float>(), threads);
  }
  return {out, lse};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
sagan_attention_cpu_backward(const at::Tensor& theta_in, const at::Tensor& phi_in,
                             const at::Tensor& g_in, const at::Tensor& out_in,
                             const at::Tensor& lse_in, const at::Tensor& grad_out_in,
                             std::vector<bool> need_grad) {
  TORCH_CHECK_VALUE(need_grad.size() == 3, kOp, "need_grad must have 3 entries");
  const at::Tensor theta = operand(theta_in, "theta", "(B, dq, N)");
  const at::Tensor phi = operand(phi_in, "phi", "(B, dq, M)");
  const at::Tensor g = operand(g_in, "g", "(B, dv, M)");
  const k::SaganAttentionProblem p = problem(theta, phi, g);
  const at::Tensor out = operand(out_in, "out", "(B, dv, N)");
  const at::Tensor grad_out = operand(grad_out_in, "grad_out", "(B, dv, N)");
  const std::vector<int64_t> out_shape = {p.batch, p.v_dim, p.num_queries};
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape) && grad_out.sizes() == out.sizes(),
                    kOp, "out ", out.sizes(), " and grad_out ", grad_out.sizes(),
                    " must have the output shape ", at::IntArrayRef(out_shape));
  TORCH_CHECK_VALUE(lse_in.device().is_cpu() && lse_in.scalar_type() == at::kFloat &&
                        lse_in.dim() == 2 && lse_in.size(0) == p.batch &&
                        lse_in.size(1) == p.num_queries,
                    kOp, "lse must be the (B, N) float32 tensor of the forward, got ",
                    lse_in.sizes(), " ", lse_in.scalar_type());
  const at::Tensor lse = lse_in.contiguous();
  std::optional<at::Tensor> grad_theta, grad_phi, grad_g;
  if (need_grad[0]) grad_theta = at::empty(theta.sizes(), theta.options());
  if (need_grad[1]) grad_phi = at::empty(phi.sizes(), phi.options());
  if (need_grad[2]) grad_g = at::empty(g.sizes(), g.options());
  const int threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    k::sagan_attention_backward(p, out.data_ptr<float>(), lse.data_ptr<float>(),
                                grad_out.data_ptr<float>(),
                                grad_theta ? grad_theta->data_ptr<float>() : nullptr,
                                grad_phi ? grad_phi->data_ptr<float>() : nullptr,
                                grad_g ? grad_g->data_ptr<float>() : nullptr, threads);
  }
  return {grad_theta, grad_phi, grad_g};
}

}  // namespace

void register_sagan_attention(pybind11::module_& m) {
  m.def("sagan_attention_cpu_forward", &sagan_attention_cpu_forward, pybind11::arg("theta"),
        pybind11::arg("phi"), pybind11::arg("g"),
        "Fused SAGAN self-attention forward on the CPU: (out (B, dv, N), per-query LSE (B, N)).");
  m.def("sagan_attention_cpu_backward", &sagan_attention_cpu_backward, pybind11::arg("theta"),
        pybind11::arg("phi"), pybind11::arg("g"), pybind11::arg("out"), pybind11::arg("lse"),
        pybind11::arg("grad_out"), pybind11::arg("need_grad"),
        "Fused SAGAN self-attention backward on the CPU: (grad_theta, grad_phi, grad_g), "
        "each None when not requested.");
}

}  // namespace bindings
}  // namespace mgm_fast
