// Torch glue of the CPU channels_last batch-norm backward (kernel: csrc/kernels/cpu/batch_norm.*).
//
// batch_norm_channels_last_cpu(input, weight, bias, running_mean, running_var, momentum, eps) -> out
//   training-mode batch norm, differentiable: aten._batch_norm_with_update's forward (running
//   statistics updated in place) and the kernel's backward, in a C++ autograd node.
// batch_norm_backward_channels_last_cpu(grad_out, input, weight, mean, invstd, output_mask)
//   -> (grad_input or None, grad_weight or None, grad_bias or None)
//   input: (N, C, H, W) float32 CPU, channels_last; grad_out shaped like it (copied to
//   channels_last when it is not); weight (C,) or None (no affine weight); mean, invstd (C,)
//   float32, the forward's batch statistics (invstd = 1 / sqrt(biased var + eps)).
//   output_mask: which of the three gradients to compute; grad_input is channels_last.
// Called by mgm_fast/ops/batch_norm.py (eager: the first; traced by torch.compile: the second, behind
// a custom op, in a Python autograd.Function).
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

using OptionalGrads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

// The checks, the outputs and the kernel call; the caller holds the GIL or not (the autograd
// engine's threads run the backward node without it).
OptionalGrads backward_impl(const at::Tensor& grad_out_in, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, const std::vector<bool>& output_mask) {
  check_float_cpu(input, "input");
  check_float_cpu(grad_out_in, "grad_out");
  TORCH_CHECK_VALUE(input.dim() == 4, kOp, "input must be 4-d (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK_VALUE(input.is_contiguous(at::MemoryFormat::ChannelsLast), kOp,
                    "input must be channels_last, got strides ", input.strides());
  TORCH_CHECK_VALUE(grad_out_in.sizes() == input.sizes(), kOp, "grad_out ", grad_out_in.sizes(),
                    " and input ", input.sizes(), " differ in shape");
  TORCH_CHECK_VALUE(output_mask.size() == 3, kOp, "output_mask needs 3 entries, got ", output_mask.size());
  const int64_t c = input.size(1);
  const int64_t rows = c == 0 ? 0 : input.numel() / c;
  check_channels(mean, c, "mean");
  check_channels(invstd, c, "invstd");
  if (weight.has_value()) check_channels(*weight, c, "weight");
  const at::Tensor grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);

  // Allocated by the CPU allocator directly, as torch's own kernels allocate their outputs: no
  // dispatcher round trip per gradient (host overhead, and 3 extra ATen ops per call).
  std::optional<at::Tensor> grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    grad_input = at::detail::empty_cpu(input.sizes(), at::kFloat, /*pin_memory=*/false, at::MemoryFormat::ChannelsLast);
  }
  if (output_mask[1]) grad_weight = at::detail::empty_cpu({c}, at::kFloat);
  if (output_mask[2]) grad_bias = at::detail::empty_cpu({c}, at::kFloat);
  cpu::batch_norm_backward_channels_last(
      grad_out.data_ptr<float>(), input.data_ptr<float>(), rows, c, mean.data_ptr<float>(), invstd.data_ptr<float>(),
      weight.has_value() ? weight->data_ptr<float>() : nullptr, grad_input ? grad_input->data_ptr<float>() : nullptr,
      grad_weight ? grad_weight->data_ptr<float>() : nullptr, grad_bias ? grad_bias->data_ptr<float>() : nullptr,
      at::get_num_threads());
  return {grad_input, grad_weight, grad_bias};
}

OptionalGrads backward_cpu(const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const at::Tensor& mean, const at::Tensor& invstd, const std::vector<bool>& output_mask) {
  pybind11::gil_scoped_release no_gil;
  return backward_impl(grad_out, input, weight, mean, invstd, output_mask);
}

// The aten forward (batch statistics, running-statistics update: what F.batch_norm runs in
// training) with the kernel's backward, as a C++ autograd node: an eager step pays no Python in
// its backward, so the op costs no more per call than torch's own at small sizes.
class BatchNormChannelsLast : public torch::autograd::Function<BatchNormChannelsLast> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& running_mean, const at::Tensor& running_var, double momentum,
                            double eps) {
    auto stats = at::_batch_norm_with_update(input, weight, bias, const_cast<at::Tensor&>(running_mean),
                                             const_cast<at::Tensor&>(running_var), momentum, eps);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), std::get<1>(stats), std::get<2>(stats)});
    return std::get<0>(stats);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The kernel's gradients have no graph of their own: refuse to pretend otherwise.
    TORCH_CHECK(!at::GradMode::is_enabled(), kOp,
                "the backward is once differentiable: no double backward (create_graph=True)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[1];
    const bool affine = weight.defined();
    const std::vector<bool> need{ctx->needs_input_grad(0), affine && ctx->needs_input_grad(1),
                                 affine && ctx->needs_input_grad(2)};
    auto [grad_input, grad_weight, grad_bias] = backward_impl(
        grads[0], saved[0], affine ? std::optional<at::Tensor>(weight) : std::nullopt, saved[2], saved[3], need);
    return {grad_input.value_or(at::Tensor()), grad_weight.value_or(at::Tensor()), grad_bias.value_or(at::Tensor()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor train_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                     const at::Tensor& running_var, double momentum, double eps) {
  check_float_cpu(input, "input");
  TORCH_CHECK_VALUE(input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast), kOp,
                    "input must be a channels_last (N, C, H, W) tensor, got shape ", input.sizes(), " strides ",
                    input.strides());
  return BatchNormChannelsLast::apply(input, weight, bias, running_mean, running_var, momentum, eps);
}

}  // namespace

void register_batch_norm(pybind11::module_& m) {
  m.def("batch_norm_channels_last_cpu", &train_cpu, pybind11::arg("input"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("running_mean"), pybind11::arg("running_var"), pybind11::arg("momentum"),
        pybind11::arg("eps"),
        "Training-mode batch norm of a channels_last float32 input (running statistics updated in place), "
        "differentiable: torch's forward, this extension's backward.");
  m.def("batch_norm_backward_channels_last_cpu", &backward_cpu, pybind11::arg("grad_out"), pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("mean"), pybind11::arg("invstd"), pybind11::arg("output_mask"),
        "Backward of training-mode batch norm for a channels_last float32 input: (grad_input, grad_weight, "
        "grad_bias), each None when output_mask leaves it out.");
}

}  // namespace bindings
}  // namespace mgm_fast
