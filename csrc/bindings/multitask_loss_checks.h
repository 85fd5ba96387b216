// Input validation shared by the CPU and CUDA glue of multitask_loss, so both backends reject
// bad input with the same messages (ValueError for shapes/values, TypeError for dtypes).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <stdexcept>
#include <string>

namespace mgm_fast {
namespace bindings {

/// Shapes, as in mgm_fast/losses.py: seg_logits (B, C, H, W) with C >= 1, seg_target (B, H, W)
/// int64; each L1 prediction 4-d with a target of its shape; depth_mask the shape of
/// depth_pred; normal_mask (B, 1 or C, H, W) of normal_pred. Returns true for "valid".
inline bool check_multitask_inputs(const at::Tensor& seg_logits, const at::Tensor& depth_pred,
                                   const at::Tensor& normal_pred, const at::Tensor& seg_target,
                                   const at::Tensor& depth_target,
                                   const at::Tensor& normal_target,
                                   const std::optional<at::Tensor>& depth_mask,
                                   const std::optional<at::Tensor>& normal_mask,
                                   const std::string& reduction) {
  TORCH_CHECK_VALUE(reduction == "all" || reduction == "valid",
                    "multitask_loss: reduction must be 'all' or 'valid', got '", reduction, "'");
  TORCH_CHECK_VALUE(seg_logits.dim() == 4,
                    "multitask_loss: seg_logits must be 4-d (B, C, H, W), got shape ",
                    seg_logits.sizes());
  TORCH_CHECK_VALUE(seg_logits.size(1) >= 1,
                    "multitask_loss: seg_logits needs at least one class, got shape ",
                    seg_logits.sizes());
  TORCH_CHECK_TYPE(seg_target.scalar_type() == at::kLong,
                   "multitask_loss: seg_target must hold int64 class indices, got ",
                   seg_target.scalar_type());
  const bool target_ok = seg_target.dim() == 3 && seg_target.size(0) == seg_logits.size(0) &&
                         seg_target.size(1) == seg_logits.size(2) &&
                         seg_target.size(2) == seg_logits.size(3);
  TORCH_CHECK_VALUE(target_ok, "multitask_loss: seg_target must have shape (B, H, W) = (",
                    seg_logits.size(0), ", ", seg_logits.size(2), ", ", seg_logits.size(3),
                    ") to match seg_logits ", seg_logits.sizes(), ", got ", seg_target.sizes());
  struct L1 {
    const char* name;
    const at::Tensor& pred;
    const at::Tensor& target;
    const std::optional<at::Tensor>& mask;
    bool mask_may_broadcast;
  };
  for (const L1& t : {L1{"depth", depth_pred, depth_target, depth_mask, false},
                      L1{"normal", normal_pred, normal_target, normal_mask, true}}) {
    TORCH_CHECK_VALUE(t.pred.dim() == 4, "multitask_loss: ", t.name,
                      "_pred must be 4-d (B, C, H, W), got shape ", t.pred.sizes());
    TORCH_CHECK_VALUE(t.target.sizes() == t.pred.sizes(), "multitask_loss: ", t.name,
                      "_target must have the shape of ", t.name, "_pred ", t.pred.sizes(),
                      ", got ", t.target.sizes());
    if (!t.mask.has_value()) continue;
    const at::Tensor& m = *t.mask;
    bool ok = m.sizes() == t.pred.sizes();
    if (t.mask_may_broadcast) {
      ok = ok || (m.dim() == 4 && m.size(0) == t.pred.size(0) && m.size(1) == 1 &&
                  m.size(2) == t.pred.size(2) && m.size(3) == t.pred.size(3));
    }
    TORCH_CHECK_VALUE(ok, "multitask_loss: ", t.name, "_mask must have shape ",
                      t.mask_may_broadcast ? "(B, 1 or C, H, W) matching " : "",
                      t.name, "_pred ", t.pred.sizes(), ", got ", m.sizes());
  }
  return reduction == "valid";
}

/// The error for a label outside [0, C) that is not the ignore index; pixel is b*H*W + h*W + w.
[[noreturn]] inline void raise_bad_label(int64_t label, int64_t pixel,
                                         const at::Tensor& seg_logits,
                                         std::optional<int64_t> ignore_index) {
  const int64_t C = seg_logits.size(1), H = seg_logits.size(2), W = seg_logits.size(3);
  const int64_t b = pixel / (H * W), h = (pixel / W) % H, w = pixel % W;
  const std::string ignore = ignore_index.has_value()
                                 ? " and is not the ignore_index " + std::to_string(*ignore_index)
                                 : " (no ignore_index is set)";
  TORCH_CHECK_VALUE(false, "multitask_loss: seg_target holds label ", label, " at (b=", b,
                    ", h=", h, ", w=", w, "), outside the class range [0, ", C, ")", ignore);
  // unreachable: TORCH_CHECK_VALUE(false, ...) throws
  throw std::logic_error("unreachable");
}

}  // namespace bindings
}  // namespace mgm_fast
