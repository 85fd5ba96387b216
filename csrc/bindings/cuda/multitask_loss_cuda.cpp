// Torch glue of the fused CUDA multitask loss (kernels: csrc/kernels/cuda/multitask_loss.*).
// Compiled only when setup.py builds with CUDA (MGM_FAST_WITH_CUDA).
//
// multitask_loss_cuda(seg_logits, depth_pred, normal_pred, seg_target, depth_target,
//                     normal_target, depth_mask, normal_mask, ignore_index, reduction, need_grad)
//   -> (seg, depth, normal, buf_seg, buf_depth, buf_normal, inv_divisors, label_error)
// * seg/depth/normal: 0-dim float32 losses on the device.
// * buf_k: float32 gradient buffers NOT divided by the divisor (None where need_grad[k] is
//   false), in the prediction's memory format; backward turns them into gradients with
//   multitask_loss_scale_grad_cuda(buf_k, grad_output, inv_divisors, k, dtype).
// * inv_divisors: (3,) float32, 1/D of each loss.
// * label_error: (2,) int64 {smallest flat pixel b*H*W + h*W + w holding a label outside
//   [0, C) that is not the ignore index, or -1; that label}. Nothing here reads it (that would
//   synchronise the host); mgm_fast/ops/multitask_loss.py checks it without blocking.
// Inputs: predictions float32/float16/bfloat16, targets float32/float16/bfloat16 (may differ
// from the prediction), labels int64, masks bool/uint8/float32/float16/bfloat16 (other mask
// dtypes are converted to a float32 copy). Everything on one CUDA device, any strides.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../multitask_loss_checks.h"
#include "../registry.h"
#include "kernels/cuda/multitask_loss.cuh"

namespace mgm_fast {
namespace bindings {
namespace {

namespace k = mgm_fast::cuda;

k::Strides4 strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

k::DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return k::DType::kFloat32;
    case at::kHalf: return k::DType::kFloat16;
    case at::kBFloat16: return k::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "multitask_loss (cuda backend): ", name,
                       " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return k::DType::kFloat32;  // unreachable
}

void check_device(const at::Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, "multitask_loss (cuda backend): ", name,
                    " must be on ", device, " (the device of seg_logits), got ", t.device());
}

void set_mask(k::L1Args& a, const std::optional<at::Tensor>& mask, at::Tensor& holder,
              const at::Device& device, const char* name) {
  if (!mask.has_value()) {
    a.mask = nullptr;
    a.mask_channels = 1;
    a.mask_strides = {0, 0, 0, 0};
    return;
  }
  holder = *mask;
  check_device(holder, device, name);
  switch (holder.scalar_type()) {
    case at::kBool:
    case at::kByte: a.mask_dtype = k::DType::kUInt8; break;
    case at::kFloat: a.mask_dtype = k::DType::kFloat32; break;
    case at::kHalf: a.mask_dtype = k::DType::kFloat16; break;
    case at::kBFloat16: a.mask_dtype = k::DType::kBFloat16; break;
    default:
      holder = holder.to(at::kFloat);  // e.g. integer masks: explicit copy
      a.mask_dtype = k::DType::kFloat32;
  }
  a.mask = holder.data_ptr();
  a.mask_channels = holder.size(1);
  a.mask_strides = strides4(holder);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
           std::optional<at::Tensor>, std::optional<at::Tensor>, at::Tensor, at::Tensor>
multitask_loss_cuda(const at::Tensor& seg_logits, const at::Tensor& depth_pred,
                    const at::Tensor& normal_pred, const at::Tensor& seg_target,
                    const at::Tensor& depth_target, const at::Tensor& normal_target,
                    const std::optional<at::Tensor>& depth_mask,
                    const std::optional<at::Tensor>& normal_mask,
                    std::optional<int64_t> ignore_index, const std::string& reduction,
                    std::vector<bool> need_grad) {
  const bool valid = check_multitask_inputs(seg_logits, depth_pred, normal_pred, seg_target,
                                            depth_target, normal_target, depth_mask,
                                            normal_mask, reduction);
  TORCH_CHECK_VALUE(need_grad.size() == 3, "multitask_loss_cuda: need_grad must have 3 entries");
  TORCH_CHECK_VALUE(seg_logits.is_cuda(),
                    "multitask_loss (cuda backend): seg_logits must be a CUDA tensor, got device ",
                    seg_logits.device());
  const at::Device device = seg_logits.device();
  check_device(depth_pred, device, "depth_pred");
  check_device(normal_pred, device, "normal_pred");
  check_device(seg_target, device, "seg_target");
  check_device(depth_target, device, "depth_target");
  check_device(normal_target, device, "normal_target");
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  const at::TensorOptions f32 = seg_logits.options().dtype(at::kFloat);
  at::Tensor buffers[3];
  const at::Tensor* preds[3] = {&seg_logits, &depth_pred, &normal_pred};
  for (int i = 0; i < 3; ++i) {
    if (need_grad[static_cast<size_t>(i)]) buffers[i] = at::empty_like(*preds[i], f32);
  }

  k::MultitaskLossArgs args;
  args.reduction = valid ? k::Reduction::kValid : k::Reduction::kAll;
  k::SegArgs& seg = args.seg;
  seg.logits = seg_logits.data_ptr();
  seg.logits_dtype = float_dtype(seg_logits, "seg_logits");
  seg.logits_strides = strides4(seg_logits);
  seg.target = seg_target.data_ptr<int64_t>();
  seg.target_strides = {seg_target.stride(0), seg_target.stride(1), seg_target.stride(2)};
  seg.grad = buffers[0].defined() ? buffers[0].data_ptr<float>() : nullptr;
  seg.grad_strides = buffers[0].defined() ? strides4(buffers[0]) : k::Strides4{0, 0, 0, 0};
  seg.batch = seg_logits.size(0);
  seg.classes = seg_logits.size(1);
  seg.height = seg_logits.size(2);
  seg.width = seg_logits.size(3);
  seg.has_ignore = ignore_index.has_value();
  seg.ignore_index = ignore_index.value_or(0);

  at::Tensor mask_holder[2];
  k::L1Args* l1[2] = {&args.depth, &args.normal};
  const at::Tensor* l1_pred[2] = {&depth_pred, &normal_pred};
  const at::Tensor* l1_target[2] = {&depth_target, &normal_target};
  const std::optional<at::Tensor>* l1_mask[2] = {&depth_mask, &normal_mask};
  const char* names[2][3] = {{"depth_pred", "depth_target", "depth_mask"},
                             {"normal_pred", "normal_target", "normal_mask"}};
  for (int i = 0; i < 2; ++i) {
    k::L1Args& a = *l1[i];
    const at::Tensor& pred = *l1_pred[i];
    a.pred = pred.data_ptr();
    a.pred_dtype = float_dtype(pred, names[i][0]);
    a.pred_strides = strides4(pred);
    a.target = l1_target[i]->data_ptr();
    a.target_dtype = float_dtype(*l1_target[i], names[i][1]);
    a.target_strides = strides4(*l1_target[i]);
    set_mask(a, *l1_mask[i], mask_holder[i], device, names[i][2]);
    const at::Tensor& g = buffers[i + 1];
    a.grad = g.defined() ? g.data_ptr<float>() : nullptr;
    a.grad_strides = g.defined() ? strides4(g) : k::Strides4{0, 0, 0, 0};
    a.batch = pred.size(0);
    a.channels = pred.size(1);
    a.height = pred.size(2);
    a.width = pred.size(3);
  }

  at::Tensor losses[3] = {at::empty({}, f32), at::empty({}, f32), at::empty({}, f32)};
  at::Tensor inv_divisors = at::empty({3}, f32);
  at::Tensor label_error = at::empty({2}, seg_logits.options().dtype(at::kLong));
  at::Tensor workspace = at::empty({static_cast<int64_t>(k::multitask_loss_workspace_bytes())},
                                   seg_logits.options().dtype(at::kByte));
  k::MultitaskLossOutputs out;
  for (int i = 0; i < 3; ++i) out.losses[i] = losses[i].data_ptr<float>();
  out.inv_divisors = inv_divisors.data_ptr<float>();
  out.label_error = label_error.data_ptr<int64_t>();
  const cudaError_t err = k::multitask_loss_forward(args, out, workspace.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, "multitask_loss (cuda backend): launch failed: ",
              cudaGetErrorString(err));

  auto opt = [](const at::Tensor& t) -> std::optional<at::Tensor> {
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  };
  return {losses[0],       losses[1],    losses[2],   opt(buffers[0]),
          opt(buffers[1]), opt(buffers[2]), inv_divisors, label_error};
}

// grad = (dtype) (buffer * grad_output * inv_divisors[index]), one rounding, no host sync.
at::Tensor multitask_loss_scale_grad_cuda(const at::Tensor& buffer, const at::Tensor& grad_output,
                                          const at::Tensor& inv_divisors, int64_t index,
                                          at::ScalarType dtype) {
  TORCH_CHECK_VALUE(buffer.is_cuda() && buffer.scalar_type() == at::kFloat &&
                        buffer.is_non_overlapping_and_dense(),
                    "multitask_loss_scale_grad_cuda: buffer must be a dense float32 CUDA tensor");
  TORCH_CHECK_VALUE(index >= 0 && index < 3 && inv_divisors.numel() == 3 &&
                        inv_divisors.scalar_type() == at::kFloat &&
                        inv_divisors.device() == buffer.device(),
                    "multitask_loss_scale_grad_cuda: bad inv_divisors/index");
  TORCH_CHECK_VALUE(grad_output.numel() == 1,
                    "multitask_loss_scale_grad_cuda: grad_output must be a scalar");
  const c10::cuda::CUDAGuard guard(buffer.device());
  const at::Tensor go = grad_output.to(buffer.device(), at::kFloat).contiguous();
  const at::Tensor inv = inv_divisors.contiguous();
  at::Tensor out = at::empty_like(buffer, buffer.options().dtype(dtype));
  TORCH_CHECK(out.strides() == buffer.strides(),
              "multitask_loss_scale_grad_cuda: output strides differ from the buffer's");
  k::DType out_dtype = float_dtype(out, "gradient");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(buffer.device().index()).stream();
  const cudaError_t err =
      k::scale_gradient(buffer.data_ptr<float>(), out.data_ptr(), out_dtype, buffer.numel(),
                        go.data_ptr<float>(), inv.data_ptr<float>() + index, stream);
  TORCH_CHECK(err == cudaSuccess, "multitask_loss_scale_grad_cuda: launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace

void register_multitask_loss_cuda(pybind11::module_& m) {
  m.def("multitask_loss_cuda", &multitask_loss_cuda, pybind11::arg("seg_logits"),
        pybind11::arg("depth_pred"), pybind11::arg("normal_pred"), pybind11::arg("seg_target"),
        pybind11::arg("depth_target"), pybind11::arg("normal_target"),
        pybind11::arg("depth_mask"), pybind11::arg("normal_mask"),
        pybind11::arg("ignore_index"), pybind11::arg("reduction"), pybind11::arg("need_grad"),
        "Fused seg CE + depth L1 + normal L1 on CUDA: (seg, depth, normal, buf_seg, buf_depth, "
        "buf_normal, inv_divisors, label_error); buffers are unscaled float32.");
  m.def("multitask_loss_scale_grad_cuda", &multitask_loss_scale_grad_cuda,
        pybind11::arg("buffer"), pybind11::arg("grad_output"), pybind11::arg("inv_divisors"),
        pybind11::arg("index"), pybind11::arg("dtype"),
        "Backward of multitask_loss_cuda: buffer * grad_output / D_index in the given dtype.");
}

}  // namespace bindings
}  // namespace mgm_fast
