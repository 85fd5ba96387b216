"""The losses of the MGM schedule that are not fused ops (docs/method.md section 2).

The dense multi-task losses, NT-Xent, the hinge GAN losses and instance noise are ops, each in
its op module with its plain-PyTorch reference twin: :mod:`mgm_fast.ops.multitask_loss`
(``seg_ce``, ``depth_l1``, ``normal_l1``, ``multitask_loss_reference``),
:mod:`mgm_fast.ops.ntxent` (``ntxent_loss_reference``, ``ntxent_rows_reference``) and
:mod:`mgm_fast.ops.gan_losses` (``hinge_d_reference``, ``hinge_g_reference``,
``instance_noise``). What remains here is the refinement network's scene classification loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scene_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scene classification CE. logits (B, K) float, target (B,) int64; mean over B, a 0-dim
    float32 tensor (the logits are cast to float32 first)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"scene_ce: expected logits (B, K) and target (B,), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    return F.cross_entropy(logits.float(), target)
