// Torch glue of the CPU channels_last batch norm (kernel: csrc/kernels/cpu/batch_norm.*).
//
// batch_norm_channels_last_cpu(input, weight, bias, running_mean, running_var, momentum, eps, relu,
//   residual) -> out: training-mode batch norm (+ residual) (then ReLU when relu), differentiable:
//   the kernel's forward and backward in one C++ autograd node (no Python and no dispatched op).
// batch_norm_forward_channels_last_cpu(input, weight, bias, running_mean, running_var, momentum, eps,
//   relu, residual) -> (out, mean, invstd): the forward alone.
// batch_norm_backward_channels_last_cpu(grad_out, input, weight, mean, invstd, relu_out, output_mask)
//   -> (grad_input, grad_weight, grad_bias, grad_residual), each None when output_mask (4 entries)
//   leaves it out: the backward alone.
// input: (N, C, H, W) float32 CPU, channels_last; grad_out shaped like it (copied to channels_last
// when it is not); weight, bias (C,) or None (no affine transform); running_mean, running_var (C,)
// float32 buffers, updated in place (momentum: torch's); residual shaped like input, added before
// the ReLU (a ResNet block's shortcut), or None; mean, invstd (C,) the forward's batch
// statistics (invstd = 1 / sqrt(biased var + eps)); relu_out: the forward's output when it applied
// the ReLU, else None. Outputs are channels_last. Called by mgm_fast/ops/batch_norm.py (eager: the
// first; traced by torch.compile: the other two, behind custom ops, in a Python autograd.Function).
#include <ATen/EmptyTensor.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "kernels/cpu/batch_norm.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

constexpr const char* kOp = "batch_norm (cpp backend): ";

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kOp, name, " must be float32, got ", t.scalar_type());
}

void check_channels(const at::Tensor& t, int64_t c, const char* name) {
  check_float_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == c && t.is_contiguous(), kOp, name, " must be a contiguous (",
                    c, ",) vector, got shape ", t.sizes());
}

void check_input(const at::Tensor& input) {
  check_float_cpu(input, "input");
  TORCH_CHECK_VALUE(input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast), kOp,
                    "input must be a channels_last (N, C, H, W) tensor, got shape ", input.sizes(), " strides ",
                    input.strides());
}

const float* data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// Outputs come from the CPU allocator directly, as torch's own kernels allocate theirs: no
// dispatcher round trip (host overhead, and one ATen op each).
at::Tensor empty_like_input(const at::Tensor& input) {
  return at::detail::empty_cpu(input.sizes(), at::kFloat, /*pin_memory=*/false, at::MemoryFormat::ChannelsLast);
}

at::Tensor empty_channels(int64_t c) { return at::detail::empty_cpu({c}, at::kFloat); }

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The checks, the outputs and the kernel call (GIL held or not: see backward_impl).
Forward forward_impl(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                     const at::Tensor& running_var, double momentum, double eps, bool relu,
                     const std::optional<at::Tensor>& residual_in) {
  check_input(input);
  const int64_t c = input.size(1);
  const int64_t rows = input.numel() / std::max<int64_t>(c, 1);
  TORCH_CHECK_VALUE(rows > 1, kOp, "expected more than 1 value per channel when training, got input ",
                    input.sizes());
  if (weight.has_value()) check_channels(*weight, c, "weight");
  if (bias.has_value()) check_channels(*bias, c, "bias");
  check_channels(running_mean, c, "running_mean");
  check_channels(running_var, c, "running_var");
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) {
    check_float_cpu(*residual_in, "residual");
    TORCH_CHECK_VALUE(residual_in->sizes() == input.sizes(), kOp, "residual ", residual_in->sizes(), " and input ",
                      input.sizes(), " differ in shape");
    residual = residual_in->contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor out = empty_like_input(input), mean = empty_channels(c), invstd = empty_channels(c);
  cpu::batch_norm_forward_channels_last(input.data_ptr<float>(), rows, c, data_or_null(weight), data_or_null(bias),
                                        data_or_null(residual), static_cast<float>(eps), relu, out.data_ptr<float>(),
                                        mean.data_ptr<float>(),
                                        invstd.data_ptr<float>(), running_mean.data_ptr<float>(),
                                        running_var.data_ptr<float>(), static_cast<float>(momentum),
                                        at::get_num_threads());
  // The buffers changed behind autograd's back: bump their versions as an in-place op would.
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
  return {out, mean, invstd};
}

using OptionalGrads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                                 std::optional<at::Tensor>>;

// The checks, the outputs and the kernel call; the caller holds the GIL or not (the autograd
// engine's threads run the backward node without it).
OptionalGrads backward_impl(const at::Tensor& grad_out_in, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd,
                            const std::optional<at::Tensor>& relu_out, const std::vector<bool>& output_mask) {
  check_input(input);
  check_float_cpu(grad_out_in, "grad_out");
  TORCH_CHECK_VALUE(grad_out_in.sizes() == input.sizes(), kOp, "grad_out ", grad_out_in.sizes(), " and input ",
                    input.sizes(), " differ in shape");
  TORCH_CHECK_VALUE(output_mask.size() == 4, kOp, "output_mask needs 4 entries, got ", output_mask.size());
  const int64_t c = input.size(1);
  const int64_t rows = c == 0 ? 0 : input.numel() / c;
  check_channels(mean, c, "mean");
  check_channels(invstd, c, "invstd");
  if (weight.has_value()) check_channels(*weight, c, "weight");
  if (relu_out.has_value()) {
    check_float_cpu(*relu_out, "relu_out");
    TORCH_CHECK_VALUE(relu_out->sizes() == input.sizes() && relu_out->is_contiguous(at::MemoryFormat::ChannelsLast),
                      kOp, "relu_out must be the channels_last output of the forward, got ", relu_out->sizes());
  }
  const at::Tensor grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  std::optional<at::Tensor> grad_input, grad_weight, grad_bias, grad_residual;
  if (output_mask[0]) grad_input = empty_like_input(input);
  if (output_mask[1]) grad_weight = empty_channels(c);
  if (output_mask[2]) grad_bias = empty_channels(c);
  if (output_mask[3]) grad_residual = empty_like_input(input);
  auto ptr = [](std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; };
  cpu::batch_norm_backward_channels_last(grad_out.data_ptr<float>(), input.data_ptr<float>(), rows, c,
                                         mean.data_ptr<float>(), invstd.data_ptr<float>(), data_or_null(weight),
                                         data_or_null(relu_out), ptr(grad_input), ptr(grad_weight), ptr(grad_bias),
                                         ptr(grad_residual), at::get_num_threads());
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

Forward forward_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                    double momentum, double eps, bool relu, const std::optional<at::Tensor>& residual) {
  pybind11::gil_scoped_release no_gil;
  return forward_impl(input, weight, bias, running_mean, running_var, momentum, eps, relu, residual);
}

OptionalGrads backward_cpu(const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& relu_out,
                           const std::vector<bool>& output_mask) {
  pybind11::gil_scoped_release no_gil;
  return backward_impl(grad_out, input, weight, mean, invstd, relu_out, output_mask);
}

// Forward and backward as one C++ autograd node: an eager step runs no Python and dispatches no
// ATen op in the backward, so the op costs no more per call than torch's at small sizes.
class BatchNormChannelsLast : public torch::autograd::Function<BatchNormChannelsLast> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& running_mean, const at::Tensor& running_var, double momentum, double eps,
                            bool relu, const std::optional<at::Tensor>& residual) {
    auto [out, mean, invstd] =
        forward_impl(input, weight, bias, running_mean, running_var, momentum, eps, relu, residual);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), mean, invstd, relu ? out : at::Tensor()});
    // needs_input_grad counts the tensor arguments that were given: where bias and residual are.
    const bool has_weight = weight.has_value() && weight->defined(), has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["bias_edge"] = has_bias ? static_cast<int64_t>(1 + has_weight) : int64_t{-1};
    ctx->saved_data["residual_edge"] =
        residual.has_value() && residual->defined() ? static_cast<int64_t>(3 + has_weight + has_bias) : int64_t{-1};
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The kernel's gradients have no graph of their own: refuse to pretend otherwise.
    TORCH_CHECK(!at::GradMode::is_enabled(), kOp,
                "the backward is once differentiable: no double backward (create_graph=True)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[1];
    const bool affine = weight.defined();
    const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
    const int64_t residual_edge = ctx->saved_data["residual_edge"].toInt();
    const std::vector<bool> need{ctx->needs_input_grad(0), affine && ctx->needs_input_grad(1),
                                 bias_edge >= 0 && ctx->needs_input_grad(bias_edge),
                                 residual_edge >= 0 && ctx->needs_input_grad(residual_edge)};
    auto [grad_input, grad_weight, grad_bias, grad_residual] =
        backward_impl(grads[0], saved[0], affine ? std::optional<at::Tensor>(weight) : std::nullopt, saved[2],
                      saved[3], saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt, need);
    return {grad_input.value_or(at::Tensor()), grad_weight.value_or(at::Tensor()), grad_bias.value_or(at::Tensor()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_residual.value_or(at::Tensor())};
  }
};

at::Tensor train_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                     const at::Tensor& running_var, double momentum, double eps, bool relu,
                     const std::optional<at::Tensor>& residual) {
  return BatchNormChannelsLast::apply(input, weight, bias, running_mean, running_var, momentum, eps, relu, residual);
}

}  // namespace

void register_batch_norm(pybind11::module_& m) {
  using pybind11::arg;
  m.def("batch_norm_channels_last_cpu", &train_cpu, arg("input"), arg("weight"), arg("bias"), arg("running_mean"),
        arg("running_var"), arg("momentum"), arg("eps"), arg("relu"), arg("residual"),
        "Training-mode batch norm (then ReLU when relu) of a channels_last float32 input, running statistics "
        "updated in place; differentiable (one C++ autograd node).");
  m.def("batch_norm_forward_channels_last_cpu", &forward_cpu, arg("input"), arg("weight"), arg("bias"),
        arg("running_mean"), arg("running_var"), arg("momentum"), arg("eps"), arg("relu"), arg("residual"),
        "Forward of training-mode batch norm (then ReLU when relu): (out, mean, invstd); running statistics "
        "updated in place.");
  m.def("batch_norm_backward_channels_last_cpu", &backward_cpu, arg("grad_out"), arg("input"), arg("weight"),
        arg("mean"), arg("invstd"), arg("relu_out"), arg("output_mask"),
        "Backward of training-mode batch norm (through the ReLU when relu_out is given): (grad_input, "
        "grad_weight, grad_bias, grad_residual), each None when output_mask leaves it out.");
}

}  // namespace bindings
}  // namespace mgm_fast
