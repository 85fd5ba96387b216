// Torch glue of the fused CPU multitask loss (kernels: csrc/kernels/cpu/multitask_loss.*).
//
// multitask_loss_cpu(seg_logits, depth_pred, normal_pred, seg_target, depth_target,
//                    normal_target, depth_mask, normal_mask, ignore_index, reduction, need_grad)
//   -> (seg, depth, normal, grad_seg, grad_depth, grad_normal)
// The losses are 0-dim float32 tensors. grad_k is dloss_k/dprediction_k (already divided by the
// loss's divisor, so backward only multiplies by grad_output), float32 with the prediction's
// memory format (channels_last stays channels_last), or None when need_grad[k] is false.
// Inputs: float32 predictions/targets (any strides), int64 labels, masks bool/uint8/float32
// (masks of other dtypes are converted to a float32 copy). Called by
// mgm_fast/ops/multitask_loss.py, which owns the autograd.Function and the dispatch.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/multitask_loss.h"
#include "multitask_loss_checks.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

namespace k = mgm_fast::cpu;

k::Strides4 strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "multitask_loss (cpp backend): ", name,
                    " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "multitask_loss (cpp backend): ", name,
                   " must be float32, got ", t.scalar_type());
}

// Mask view for the kernel; `holder` keeps a converted copy alive.
void set_mask(k::L1Problem& p, const std::optional<at::Tensor>& mask, at::Tensor& holder,
              const char* name) {
  if (!mask.has_value()) {
    p.mask = nullptr;
    p.mask_kind = k::MaskKind::kNone;
    p.mask_channels = 1;
    p.mask_strides = {0, 0, 0, 0};
    return;
  }
  holder = *mask;
  TORCH_CHECK_VALUE(holder.device().is_cpu(), "multitask_loss (cpp backend): ", name,
                    " must be a CPU tensor, got device ", holder.device());
  const auto st = holder.scalar_type();
  if (st == at::kBool || st == at::kByte) {
    p.mask_kind = k::MaskKind::kUInt8;  // bool is stored as one byte holding 0 or 1
  } else {
    if (st != at::kFloat) holder = holder.to(at::kFloat);  // e.g. int masks: explicit copy
    p.mask_kind = k::MaskKind::kFloat32;
  }
  p.mask = holder.data_ptr();
  p.mask_channels = holder.size(1);
  p.mask_strides = strides4(holder);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
           std::optional<at::Tensor>, std::optional<at::Tensor>>
multitask_loss_cpu(const at::Tensor& seg_logits, const at::Tensor& depth_pred,
                   const at::Tensor& normal_pred, const at::Tensor& seg_target,
                   const at::Tensor& depth_target, const at::Tensor& normal_target,
                   const std::optional<at::Tensor>& depth_mask,
                   const std::optional<at::Tensor>& normal_mask,
                   std::optional<int64_t> ignore_index, const std::string& reduction,
                   std::vector<bool> need_grad) {
  const bool valid = check_multitask_inputs(seg_logits, depth_pred, normal_pred, seg_target,
                                            depth_target, normal_target, depth_mask,
                                            normal_mask, reduction);
  TORCH_CHECK_VALUE(need_grad.size() == 3, "multitask_loss_cpu: need_grad must have 3 entries");
  check_cpu_float(seg_logits, "seg_logits");
  check_cpu_float(depth_pred, "depth_pred");
  check_cpu_float(normal_pred, "normal_pred");
  check_cpu_float(depth_target, "depth_target");
  check_cpu_float(normal_target, "normal_target");
  TORCH_CHECK_VALUE(seg_target.device().is_cpu(),
                    "multitask_loss (cpp backend): seg_target must be a CPU tensor, got device ",
                    seg_target.device());

  // Gradients take the prediction's memory format (empty_like preserves dense strides).
  at::Tensor grads[3];
  const at::Tensor* preds[3] = {&seg_logits, &depth_pred, &normal_pred};
  for (int i = 0; i < 3; ++i) {
    if (need_grad[static_cast<size_t>(i)]) grads[i] = at::empty_like(*preds[i]);
  }

  k::SegCEProblem seg;
  seg.logits = seg_logits.data_ptr<float>();
  seg.logits_strides = strides4(seg_logits);
  seg.target = seg_target.data_ptr<int64_t>();
  seg.target_strides = {seg_target.stride(0), seg_target.stride(1), seg_target.stride(2)};
  seg.grad = grads[0].defined() ? grads[0].data_ptr<float>() : nullptr;
  seg.grad_strides = grads[0].defined() ? strides4(grads[0]) : k::Strides4{0, 0, 0, 0};
  seg.batch = seg_logits.size(0);
  seg.classes = seg_logits.size(1);
  seg.height = seg_logits.size(2);
  seg.width = seg_logits.size(3);
  seg.has_ignore = ignore_index.has_value();
  seg.ignore_index = ignore_index.value_or(0);

  at::Tensor mask_holder[2];
  k::L1Problem l1[2];
  const at::Tensor* l1_pred[2] = {&depth_pred, &normal_pred};
  const at::Tensor* l1_target[2] = {&depth_target, &normal_target};
  const std::optional<at::Tensor>* l1_mask[2] = {&depth_mask, &normal_mask};
  const char* mask_name[2] = {"depth_mask", "normal_mask"};
  for (int i = 0; i < 2; ++i) {
    k::L1Problem& p = l1[i];
    const at::Tensor& pred = *l1_pred[i];
    p.pred = pred.data_ptr<float>();
    p.pred_strides = strides4(pred);
    p.target = l1_target[i]->data_ptr<float>();
    p.target_strides = strides4(*l1_target[i]);
    set_mask(p, *l1_mask[i], mask_holder[i], mask_name[i]);
    const at::Tensor& g = grads[i + 1];
    p.grad = g.defined() ? g.data_ptr<float>() : nullptr;
    p.grad_strides = g.defined() ? strides4(g) : k::Strides4{0, 0, 0, 0};
    p.batch = pred.size(0);
    p.channels = pred.size(1);
    p.height = pred.size(2);
    p.width = pred.size(3);
    p.reduction = valid ? k::Reduction::kValid : k::Reduction::kAll;
  }

  const int threads = at::get_num_threads();  // honours torch.set_num_threads
  k::LossResult res[3];
  {
    pybind11::gil_scoped_release no_gil;
    res[0] = k::seg_ce(seg, threads);
    if (!res[0].label_error) {
      res[1] = k::masked_l1(l1[0], threads);
      res[2] = k::masked_l1(l1[1], threads);
    }
  }
  if (res[0].label_error) {
    raise_bad_label(res[0].bad_label, res[0].bad_pixel, seg_logits, ignore_index);
  }

  auto loss = [](double v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kFloat)); };
  auto opt = [](const at::Tensor& t) -> std::optional<at::Tensor> {
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  };
  return {loss(res[0].loss), loss(res[1].loss), loss(res[2].loss),
          opt(grads[0]),     opt(grads[1]),     opt(grads[2])};
}

}  // namespace

void register_multitask_loss(pybind11::module_& m) {
  m.def("multitask_loss_cpu", &multitask_loss_cpu, pybind11::arg("seg_logits"),
        pybind11::arg("depth_pred"), pybind11::arg("normal_pred"), pybind11::arg("seg_target"),
        pybind11::arg("depth_target"), pybind11::arg("normal_target"),
        pybind11::arg("depth_mask"), pybind11::arg("normal_mask"),
        pybind11::arg("ignore_index"), pybind11::arg("reduction"), pybind11::arg("need_grad"),
        "Fused seg CE + depth L1 + normal L1 on the CPU: (seg, depth, normal, grad_seg, "
        "grad_depth, grad_normal); gradients are pre-divided, None where not requested.");
}

}  // namespace bindings
}  // namespace mgm_fast
