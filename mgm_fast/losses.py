"""The MGM losses in plain PyTorch (the reference twins of the fused ops).

Formulas follow docs/method.md section 2 (the released code); every deviation from the released
behaviour is an argument whose default keeps the released behaviour where the released code is
well defined:

* segmentation CE: released -- no ignore index, mean over all B*H*W pixels; option
  ``ignore_index`` -- those pixels are excluded from the loss and from the mean's count;
* depth L1: released -- the mask is all ones (``mask=None``) and the mean runs over all B*H*W
  elements; ``reduction="valid"`` -- masked sum divided by the number of valid pixels;
* normal L1: released -- ``mask * |pred - target|`` averaged over all B*3*H*W elements;
  ``reduction="valid"`` -- divided by the number of valid elements instead;
* scene CE, NT-Xent (any batch size; the released loss was fixed to 32), hinge GAN losses with
  Gaussian instance noise.

Shapes: B batch, C classes, H x W pixels. Predictions are float tensors (any float dtype; the
reductions accumulate in float32), labels int64. Every loss returns a 0-dim float32 tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("all", "valid")


def _check(name: str, tensor: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {what} of shape {tuple(shape)}, got {tuple(tensor.shape)}")


def seg_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Per-pixel softmax cross-entropy, mean over (non-ignored) pixels.

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, H, W) int64 class indices in [0, C), or ``ignore_index``.
        ignore_index: None reproduces the released loss (every pixel counts); otherwise pixels
            with this label are excluded. All pixels ignored gives 0 (not NaN).
    """
    b, _, h, w = logits.shape
    _check("seg_ce target", target, (b, h, w), "labels")
    logp = torch.log_softmax(logits.float(), dim=1)
    if ignore_index is None:
        return -logp.gather(1, target.unsqueeze(1)).mean()
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    return (nll * valid).sum() / valid.sum().clamp_min(1)


def depth_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "all",
) -> torch.Tensor:
    """L1 depth loss.

    Args:
        pred, target: (B, 1, H, W) depth (metres).
        mask: (B, 1, H, W) validity (bool or {0, 1} float), or None for all ones (released).
        reduction: "all" -- mean over all B*H*W elements (released); "valid" -- masked sum over
            the number of valid pixels (0 when none is valid).
    """
    _check("depth_l1 target", target, pred.shape, "depth")
    err = (pred.float() - target.float()).abs()
    if mask is None:
        mask_f = None
    else:
        _check("depth_l1 mask", mask, pred.shape, "mask")
        mask_f = mask.float()
        err = err * mask_f
    if reduction == "all":
        return err.mean()
    if reduction == "valid":
        count = err.new_tensor(err.numel()) if mask_f is None else mask_f.sum()
        return err.sum() / count.clamp_min(1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def normal_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "all",
) -> torch.Tensor:
    """Masked L1 on the normal vectors (no unit normalisation, as released).

    Args:
        pred, target: (B, 3, H, W).
        mask: (B, 3, H, W) or (B, 1, H, W) weights (the released mask is a 3-channel PNG / 255);
            None means all ones.
        reduction: "all" -- sum of mask*|pred-target| over B*3*H*W (released); "valid" -- over
            the sum of the mask broadcast to (B, 3, H, W).
    """
    _check("normal_l1 target", target, pred.shape, "normals")
    err = (pred.float() - target.float()).abs()
    if mask is not None:
        if mask.shape[1] not in (1, pred.shape[1]) or mask.shape[0] != pred.shape[0] or mask.shape[2:] != pred.shape[2:]:
            raise ValueError(
                f"normal_l1 mask: expected shape (B, 1 or 3, H, W) matching {tuple(pred.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        weight = mask.float().expand_as(err)
        err = err * weight
    if reduction == "all":
        return err.mean()
    if reduction == "valid":
        count = err.new_tensor(err.numel()) if mask is None else weight.sum()
        return err.sum() / count.clamp_min(1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def multitask_loss(
    seg_logits: torch.Tensor,
    depth_pred: torch.Tensor,
    normal_pred: torch.Tensor,
    seg_target: torch.Tensor,
    depth_target: torch.Tensor,
    normal_target: torch.Tensor,
    depth_mask: torch.Tensor | None = None,
    normal_mask: torch.Tensor | None = None,
    ignore_index: int | None = None,
    reduction: str = "all",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three dense losses of L_mt = L_seg + L_dep + L_nrm (equal weights), returned apart.

    Shapes: seg_logits (B, C, H, W), depth_pred/target/mask (B, 1, H, W), normal_pred/target
    (B, 3, H, W), normal_mask (B, 1 or 3, H, W), seg_target (B, H, W) int64. ``reduction``
    applies to depth and normals (segmentation always averages over non-ignored pixels).
    """
    return (
        seg_ce(seg_logits, seg_target, ignore_index),
        depth_l1(depth_pred, depth_target, depth_mask, reduction),
        normal_l1(normal_pred, normal_target, normal_mask, reduction),
    )


def scene_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scene classification CE. logits (B, K) float, target (B,) int64; mean over B."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"scene_ce: expected logits (B, K) and target (B,), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    return F.cross_entropy(logits.float(), target)


def ntxent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR) over two views, any batch size.

    Args:
        z1, z2: (B, D) projections of view 1 and view 2 of the same B images.
        temperature: tau (released 0.5).

    With u = cat(z1, z2) (2B rows) and s_ij = cos(u_i, u_j) / tau,
    loss_i = -s_{i,pos(i)} + log sum_{k != i} exp(s_ik), pos(i) = i +- B; returns the mean over
    the 2B rows (the released CE with sum reduction divided by 2B).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"ntxent: expected two (B, D) tensors, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2], 0).float(), dim=1)
    sim = u @ u.t() / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=u.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    pos = torch.arange(2 * b, device=u.device).roll(b)
    return (torch.logsumexp(sim, dim=1) - sim[torch.arange(2 * b, device=u.device), pos]).mean()


def ntxent_rows(rows: torch.Tensor, cols: torch.Tensor, row_index: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent of some rows against all columns (the form used across torchrun ranks).

    Args:
        rows: (R, D) projections whose losses are summed (e.g. this rank's 2b views).
        cols: (2N, D) projections of all 2N views, ordered [view 1 of N images; view 2 of the
            same N images] (e.g. gathered from every rank).
        row_index: (R,) int64, the index of each row among ``cols`` (its self column).
        temperature: tau.

    Returns the SUM over rows of -s(i, pos(i)) + log sum_{k != self(i)} exp(s(i, k)), with s
    the cosine similarity over tau and pos(i) = (row_index[i] + N) mod 2N; so
    ``ntxent(z1, z2) == ntxent_rows(u, u, arange(2B)) / 2B`` with u = cat(z1, z2).
    """
    if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1] or cols.shape[0] % 2:
        raise ValueError(
            f"ntxent_rows: expected rows (R, D) and cols (2N, D), got {tuple(rows.shape)} and {tuple(cols.shape)}"
        )
    if row_index.shape != rows.shape[:1]:
        raise ValueError(f"ntxent_rows: row_index must have shape ({rows.shape[0]},), got {tuple(row_index.shape)}")
    n2 = cols.shape[0]
    q = F.normalize(rows.float(), dim=1)
    k = F.normalize(cols.float(), dim=1)
    sim = q @ k.t() / temperature
    ar = torch.arange(rows.shape[0], device=rows.device)
    sim = sim.index_put((ar, row_index), torch.tensor(float("-inf"), device=sim.device))
    pos = (row_index + n2 // 2) % n2
    return (torch.logsumexp(sim, dim=1) - sim[ar, pos]).sum()


def instance_noise(
    x: torch.Tensor, std: float = 0.01, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x + N(0, std^2) noise of x's shape, drawn on x's device (released std 0.01)."""
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x + std * noise


def hinge_d(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean ReLU(1 - D(real)) + mean ReLU(1 + D(fake))."""
    return F.relu(1.0 - d_real.float()).mean() + F.relu(1.0 + d_fake.float()).mean()


def hinge_g(d_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean D(fake)."""
    return -d_fake.float().mean()
