// Torch glue of the fused CPU SimCLR views (kernel: csrc/kernels/cpu/simclr_views.*).
//
// simclr_views_cpu(x, crop, flip, jitter, order, factors, gray, blur, sigma, src_index,
//                  out_height, out_width, blur_kernel) -> (N, 3, out_height, out_width) float32
//
// x: (B, 3, H, W) float32 CPU images in [-1, 1], any strides (read in place). Per view n of N:
// src_index (N,) int64 in [0, B); crop (N, 4) int64 top, left, height, width; order (N, 4)
// int64 op codes in [0, 4); factors (N, 4) float32; sigma (N,) float32; flip, jitter, gray, blur
// (N,) bool. Parameter tensors must be on the CPU; non-contiguous ones are copied. The output is
// a new contiguous tensor. Not differentiable (the views are network inputs). Called by
// mgm_fast/ops/simclr_views.py, which owns the dispatch; the semantics are those of
// mgm_fast.data.augment.apply_torch.
#include <torch/extension.h>

#include <string>

#include "kernels/cpu/simclr_views.h"
#include "registry.h"

namespace mgm_fast {
namespace bindings {
namespace {

namespace k = mgm_fast::cpu;

constexpr const char* kOp = "simclr_views (cpp backend): ";

// Checks device, dtype and shape of one parameter tensor; returns it contiguous.
at::Tensor param(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t views,
                 int64_t cols) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, "params['", name,
                    "'] must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, "params['", name, "'] must be ", dtype, ", got ",
                   t.scalar_type());
  const bool ok = cols == 0 ? (t.dim() == 1 && t.size(0) == views)
                            : (t.dim() == 2 && t.size(0) == views && t.size(1) == cols);
  TORCH_CHECK_VALUE(ok, kOp, "params['", name, "'] must have shape ",
                    cols == 0 ? "(" + std::to_string(views) + ",)"
                              : "(" + std::to_string(views) + ", " + std::to_string(cols) + ")",
                    ", got ", t.sizes());
  return t.contiguous();
}

std::string row_string(const at::Tensor& t, int64_t n) {
  const int64_t* p = t.data_ptr<int64_t>() + n * t.size(1);
  std::string s = "[";
  for (int64_t j = 0; j < t.size(1); ++j) s += (j ? ", " : "") + std::to_string(p[j]);
  return s + "]";
}

at::Tensor simclr_views_cpu(const at::Tensor& x, const at::Tensor& crop, const at::Tensor& flip,
                            const at::Tensor& jitter, const at::Tensor& order,
                            const at::Tensor& factors, const at::Tensor& gray,
                            const at::Tensor& blur, const at::Tensor& sigma,
                            const at::Tensor& src_index, int64_t out_height, int64_t out_width,
                            int64_t blur_kernel) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), kOp, "x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, kOp, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == 3, kOp,
                    "x must have shape (B, 3, H, W), got ", x.sizes());
  TORCH_CHECK_VALUE(src_index.device().is_cpu(), kOp,
                    "src_index must be a CPU tensor, got device ", src_index.device());
  TORCH_CHECK_TYPE(src_index.scalar_type() == at::kLong, kOp, "src_index must be int64, got ",
                   src_index.scalar_type());
  TORCH_CHECK_VALUE(src_index.dim() == 1, kOp, "src_index must have shape (N,), got ",
                    src_index.sizes());
  const int64_t views = src_index.size(0);
  const at::Tensor src = src_index.contiguous();
  const at::Tensor p_crop = param(crop, "crop", at::kLong, views, 4);
  const at::Tensor p_flip = param(flip, "flip", at::kBool, views, 0);
  const at::Tensor p_jitter = param(jitter, "jitter", at::kBool, views, 0);
  const at::Tensor p_order = param(order, "order", at::kLong, views, 4);
  const at::Tensor p_factors = param(factors, "factors", at::kFloat, views, 4);
  const at::Tensor p_gray = param(gray, "gray", at::kBool, views, 0);
  const at::Tensor p_blur = param(blur, "blur", at::kBool, views, 0);
  const at::Tensor p_sigma = param(sigma, "sigma", at::kFloat, views, 0);

  k::SimclrViewsProblem p;
  p.images = x.data_ptr<float>();
  p.image_strides = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  p.batch = x.size(0);
  p.height = x.size(2);
  p.width = x.size(3);
  p.views = views;
  p.src_index = src.data_ptr<int64_t>();
  p.crop = p_crop.data_ptr<int64_t>();
  // bool tensors hold one byte per element, 0 or 1
  p.flip = reinterpret_cast<const uint8_t*>(p_flip.data_ptr<bool>());
  p.jitter = reinterpret_cast<const uint8_t*>(p_jitter.data_ptr<bool>());
  p.order = p_order.data_ptr<int64_t>();
  p.factors = p_factors.data_ptr<float>();
  p.gray = reinterpret_cast<const uint8_t*>(p_gray.data_ptr<bool>());
  p.blur = reinterpret_cast<const uint8_t*>(p_blur.data_ptr<bool>());
  p.sigma = p_sigma.data_ptr<float>();
  p.out_height = out_height;
  p.out_width = out_width;
  p.blur_kernel = blur_kernel;

  const k::ViewsCheck check = k::check_simclr_views(p);
  switch (check.error) {
    case k::ViewsError::kNone:
      break;
    case k::ViewsError::kOutputSize:
      TORCH_CHECK_VALUE(false, kOp, "out_hw must be positive, got (", out_height, ", ",
                        out_width, ")");
      break;
    case k::ViewsError::kBlurKernel:
      TORCH_CHECK_VALUE(false, kOp, "blur_kernel ", blur_kernel,
                        " must be odd and positive, with an output larger than ", blur_kernel / 2,
                        " pixels, got ", out_height, "x", out_width);
      break;
    case k::ViewsError::kSrcIndex:
      TORCH_CHECK_VALUE(false, kOp, "src_index[", check.view, "] = ",
                        src.data_ptr<int64_t>()[check.view], " is not an image index in [0, ",
                        p.batch, ")");
      break;
    case k::ViewsError::kCrop:
      TORCH_CHECK_VALUE(false, kOp, "params['crop'][", check.view, "] = ",
                        row_string(p_crop, check.view),
                        " (top, left, height, width) is not inside a ", p.height, "x", p.width,
                        " image");
      break;
    case k::ViewsError::kOrder:
      TORCH_CHECK_VALUE(false, kOp, "params['order'][", check.view, "] = ",
                        row_string(p_order, check.view),
                        " holds an op code outside [0, 4) (brightness, contrast, saturation, hue)");
      break;
  }

  at::Tensor out = at::empty({views, 3, out_height, out_width}, x.options());
  p.out = out.data_ptr<float>();
  const int threads = at::get_num_threads();  // honours torch.set_num_threads
  {
    pybind11::gil_scoped_release no_gil;
    k::simclr_views(p, threads);
  }
  return out;
}

}  // namespace

void register_simclr_views(pybind11::module_& m) {
  m.def("simclr_views_cpu", &simclr_views_cpu, pybind11::arg("x"), pybind11::arg("crop"),
        pybind11::arg("flip"), pybind11::arg("jitter"), pybind11::arg("order"),
        pybind11::arg("factors"), pybind11::arg("gray"), pybind11::arg("blur"),
        pybind11::arg("sigma"), pybind11::arg("src_index"), pybind11::arg("out_height"),
        pybind11::arg("out_width"), pybind11::arg("blur_kernel"),
        "Fused SimCLR views on the CPU: (N, 3, out_height, out_width) float32 in [-1, 1], one "
        "view per entry of src_index with that view's crop/flip/jitter/gray/blur parameters.");
}

}  // namespace bindings
}  // namespace mgm_fast
