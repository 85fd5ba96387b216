"""Triton kernels of the fused MGM dense losses (the ``triton`` backend of
:mod:`mgm_fast.ops.multitask_loss`; formulas in that module's docstring).

One forward call launches four kernels and never synchronises the host:

* ``_seg_ce_fwd`` -- grid (pixel blocks of one image, B). Each program owns BLOCK_P pixels of
  one image and all C classes: the class axis is small (13-40) and strided by H*W in NCHW, so
  the tile is (BLOCK_P pixels x BLOCK_C classes) with the pixels along the fast axis; in NCHW
  consecutive pixels of a class are adjacent in memory (coalesced), in channels_last the
  classes of a pixel are. For C <= BLOCK_C the logits are read once and kept in registers;
  larger C loops over class chunks (online logsumexp, then a second, cache-hot pass that
  writes the gradient). It writes the unscaled float32 gradient buffer
  ``softmax - onehot(target)`` (0 on ignored pixels, NaN on out-of-range labels) and per
  program the partial loss, the valid-pixel count and the smallest bad-label pixel.
* ``_masked_l1_fwd`` (depth, then normals) -- grid (pixel blocks, B); the channels (1 or 3)
  are a static loop. Writes ``sign(pred - target) * mask`` and partial sums of the loss and the
  mask weights.
* ``_finalize`` -- one program: adds the partials in a fixed order (float64), applies the
  divisors, writes the three losses, 1/D of each and the label-error record.

Reductions are deterministic (a fixed grid per shape, partials in float64, fixed summation
order; no atomics). Backward is ``_scale_grad``: ``buffer * grad_output * (1/D)`` computed in
float32 and rounded once to the prediction dtype -- the design of the CUDA backend (pre-scaling
a float16 buffer by 1/D ~ 1e-6 would lose bits in the subnormal range). Predictions may be
float32, float16 or bfloat16 (targets and float masks may be any of those); every sum is in
float32 per program and float64 across programs.

Layouts: every tensor is addressed through its own element strides. When h and w collapse
into one stride (``stride_h == W * stride_w``: NCHW contiguous and channels_last both do) the
kernels index the pixel axis directly (``COLLAPSE``), which keeps loads vectorisable;
otherwise they split the pixel index into (h, w).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mgm_fast.ops._dispatch import triton_interpreting

__all__ = ["check_inputs", "forward", "scale_grad"]

_BIG = tl.constexpr(2**62)  # "no bad pixel" marker of the partials (above any pixel index)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _pixel_offsets(hw, W, s_h, s_w, COLLAPSE: tl.constexpr):
    """Element offset of the pixels hw = h * W + w of one image (int64)."""
    if COLLAPSE:
        return hw.to(tl.int64) * s_w
    h = hw // W
    w = hw - h * W
    return h.to(tl.int64) * s_h + w.to(tl.int64) * s_w


@triton.jit
def _seg_ce_fwd(
    logits_ptr, target_ptr, grad_ptr,
    part_loss_ptr, part_count_ptr, part_bad_ptr,
    HW, W, C, ignore_index,
    l_n, l_c, l_h, l_w,
    t_n, t_h, t_w,
    g_n, g_c, g_h, g_w,
    HAS_IGNORE: tl.constexpr, WRITE_GRAD: tl.constexpr, COLLAPSE: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hw = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = hw < HW
    x_pix = b * l_n + _pixel_offsets(hw, W, l_h, l_w, COLLAPSE)
    t_pix = b * t_n + _pixel_offsets(hw, W, t_h, t_w, COLLAPSE)
    label = tl.load(target_ptr + t_pix, mask=pmask, other=0)
    if HAS_IGNORE:
        kept = pmask & (label != ignore_index)
    else:
        kept = pmask
    bad = kept & ((label < 0) | (label >= C))
    valid = kept & (label >= 0) & (label < C)
    safe_label = tl.where(valid, label, 0)
    x_t = tl.load(logits_ptr + x_pix + safe_label * l_c, mask=valid, other=0.0).to(tl.float32)

    cls = tl.arange(0, BLOCK_C)
    if SINGLE_CHUNK:
        # C <= BLOCK_C: the whole (pixels x classes) tile stays in registers.
        tmask = pmask[:, None] & (cls < C)[None, :]
        x = tl.load(logits_ptr + x_pix[:, None] + cls[None, :].to(tl.int64) * l_c,
                    mask=tmask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(x - m_safe[:, None])
        s = tl.sum(e, axis=1)
        s = tl.where(pmask, s, 1.0)  # padding pixels: keep log and 1/s finite
    else:
        # pass 1: online logsumexp over class chunks
        m_safe = tl.zeros([BLOCK_P], dtype=tl.float32) + float("-inf")
        s = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cls
            tmask = pmask[:, None] & (cc < C)[None, :]
            x = tl.load(logits_ptr + x_pix[:, None] + cc[None, :].to(tl.int64) * l_c,
                        mask=tmask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_safe, tl.max(x, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m_safe - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
            m_safe = m_new
        m_safe = tl.where(m_safe == float("-inf"), 0.0, m_safe)
        s = tl.where(pmask, s, 1.0)  # padding pixels: keep log and 1/s finite

    # (m - x_t) is exact when the target is near the max; log s >= 0
    nll = (m_safe - x_t) + tl.log(s)
    loss = tl.sum(tl.where(valid, nll, 0.0), axis=0) + tl.sum(tl.where(bad, float("nan"), 0.0), axis=0)
    count = tl.sum(valid.to(tl.float32), axis=0)
    flat = b * HW + hw.to(tl.int64)
    first_bad = tl.min(tl.where(bad, flat, _BIG), axis=0)
    pid = tl.program_id(1) * tl.num_programs(0) + pid_p
    tl.store(part_loss_ptr + pid, loss.to(tl.float64))
    tl.store(part_count_ptr + pid, count.to(tl.float64))
    tl.store(part_bad_ptr + pid, first_bad)

    if WRITE_GRAD:
        g_pix = b * g_n + _pixel_offsets(hw, W, g_h, g_w, COLLAPSE)
        inv_s = 1.0 / s
        if SINGLE_CHUNK:
            g = e * inv_s[:, None] - (cls[None, :] == safe_label[:, None]).to(tl.float32)
            g = tl.where(valid[:, None], g, 0.0)
            g = tl.where(bad[:, None], float("nan"), g)
            tmask = pmask[:, None] & (cls < C)[None, :]
            tl.store(grad_ptr + g_pix[:, None] + cls[None, :].to(tl.int64) * g_c, g, mask=tmask)
        else:
            # pass 2: recompute the exponentials (the chunks are cache-hot) and write
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cls
                tmask = pmask[:, None] & (cc < C)[None, :]
                x = tl.load(logits_ptr + x_pix[:, None] + cc[None, :].to(tl.int64) * l_c,
                            mask=tmask, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - m_safe[:, None]) * inv_s[:, None]
                g = g - (cc[None, :] == safe_label[:, None]).to(tl.float32)
                g = tl.where(valid[:, None], g, 0.0)
                g = tl.where(bad[:, None], float("nan"), g)
                tl.store(grad_ptr + g_pix[:, None] + cc[None, :].to(tl.int64) * g_c, g, mask=tmask)


@triton.jit
def _masked_l1_fwd(
    pred_ptr, target_ptr, mask_ptr, grad_ptr,
    part_loss_ptr, part_count_ptr,
    HW, W,
    p_n, p_c, p_h, p_w,
    t_n, t_c, t_h, t_w,
    m_n, m_c, m_h, m_w,
    g_n, g_c, g_h, g_w,
    CHANNELS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BROADCAST: tl.constexpr,
    WRITE_GRAD: tl.constexpr, COLLAPSE: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hw = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = hw < HW
    p_pix = b * p_n + _pixel_offsets(hw, W, p_h, p_w, COLLAPSE)
    t_pix = b * t_n + _pixel_offsets(hw, W, t_h, t_w, COLLAPSE)
    m_pix = b * m_n + _pixel_offsets(hw, W, m_h, m_w, COLLAPSE)
    g_pix = b * g_n + _pixel_offsets(hw, W, g_h, g_w, COLLAPSE)
    loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    count = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c in tl.static_range(CHANNELS):
        p = tl.load(pred_ptr + p_pix + c * p_c, mask=pmask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + t_pix + c * t_c, mask=pmask, other=0.0).to(tl.float32)
        d = p - t
        if HAS_MASK:
            if MASK_BROADCAST:
                wt = tl.load(mask_ptr + m_pix, mask=pmask, other=0).to(tl.float32)
            else:
                wt = tl.load(mask_ptr + m_pix + c * m_c, mask=pmask, other=0).to(tl.float32)
        else:
            wt = pmask.to(tl.float32)
        loss += tl.abs(d) * wt
        count += wt
        if WRITE_GRAD:
            sign = (d > 0).to(tl.float32) - (d < 0).to(tl.float32)  # sign(0) = 0, as torch.abs
            tl.store(grad_ptr + g_pix + c * g_c, sign * wt, mask=pmask)
    pid = tl.program_id(1) * tl.num_programs(0) + pid_p
    tl.store(part_loss_ptr + pid, tl.sum(loss, axis=0).to(tl.float64))
    tl.store(part_count_ptr + pid, tl.sum(count, axis=0).to(tl.float64))


@triton.jit
def _sum_f64(ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < n, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _divided(total, count, static_div):
    """(loss, 1/D): D = static_div when >= 0, else max(count, 1) (NaN stays NaN)."""
    d = tl.where(static_div >= 0, static_div.to(tl.float64), tl.where(count < 1.0, 1.0, count))
    return (total / d).to(tl.float32), (1.0 / d).to(tl.float32)


@triton.jit(do_not_specialize=["div_seg", "div_dep", "div_nrm"])
def _finalize(
    seg_loss_ptr, seg_count_ptr, seg_bad_ptr, n_seg,
    dep_loss_ptr, dep_count_ptr, n_dep,
    nrm_loss_ptr, nrm_count_ptr, n_nrm,
    div_seg, div_dep, div_nrm,
    target_ptr, t_n, t_h, t_w, HW, W,
    out_seg_ptr, out_dep_ptr, out_nrm_ptr, inv_ptr, record_ptr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    loss, inv = _divided(_sum_f64(seg_loss_ptr, n_seg, BLOCK), _sum_f64(seg_count_ptr, n_seg, BLOCK), div_seg)
    tl.store(out_seg_ptr, loss)
    tl.store(inv_ptr, inv)
    loss, inv = _divided(_sum_f64(dep_loss_ptr, n_dep, BLOCK), _sum_f64(dep_count_ptr, n_dep, BLOCK), div_dep)
    tl.store(out_dep_ptr, loss)
    tl.store(inv_ptr + 1, inv)
    loss, inv = _divided(_sum_f64(nrm_loss_ptr, n_nrm, BLOCK), _sum_f64(nrm_count_ptr, n_nrm, BLOCK), div_nrm)
    tl.store(out_nrm_ptr, loss)
    tl.store(inv_ptr + 2, inv)

    first = tl.full([BLOCK], _BIG, dtype=tl.int64)
    for i in range(0, n_seg, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        first = tl.minimum(first, tl.load(seg_bad_ptr + offs, mask=offs < n_seg, other=_BIG))
    pixel = tl.min(first, axis=0)
    found = pixel < _BIG
    safe = tl.where(found, pixel, 0)
    b = safe // HW
    hw = safe - b * HW
    h = hw // W
    w = hw - h * W
    label = tl.load(target_ptr + b * t_n + h * t_h + w * t_w, mask=found, other=0)
    tl.store(record_ptr, tl.where(found, pixel, -1))
    tl.store(record_ptr + 1, tl.where(found, label, 0))


@triton.jit
def _scale_grad(buffer_ptr, out_ptr, n, grad_output_ptr, inv_ptr, BLOCK: tl.constexpr):
    """out = (out dtype)(buffer * grad_output * inv) over a dense storage (shared strides)."""
    factor = tl.load(grad_output_ptr).to(tl.float32) * tl.load(inv_ptr)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    v = tl.load(buffer_ptr + offs, mask=keep, other=0.0)
    tl.store(out_ptr + offs, (v * factor).to(out_ptr.dtype.element_ty), mask=keep)


# ---------------------------------------------------------------------------------------------
# launchers


def _collapses(t: torch.Tensor) -> bool:
    """h and w of a 3-d (B, H, W) or 4-d (B, C, H, W) tensor share one stride."""
    h, w = t.shape[-2], t.shape[-1]
    return h <= 1 or t.stride(-2) == w * t.stride(-1)


def _mask_arg(mask: torch.Tensor | None) -> torch.Tensor | None:
    """bool masks are read as their bytes (0/1, no copy); int masks become a float32 copy."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    if mask.dtype in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
        return mask
    return mask.float()


def check_inputs(seg_logits, depth_pred, normal_pred, seg_target, depth_target, normal_target,
                 depth_mask, normal_mask, reduction) -> None:  # fmt: skip
    """The shape and device rules of the fused backends; ValueError naming the tensor."""
    if reduction not in ("all", "valid"):
        raise ValueError(f"multitask_loss: reduction must be 'all' or 'valid', got {reduction!r}")
    b, c, h, w = seg_logits.shape
    if c < 1:
        raise ValueError(f"multitask_loss: seg_logits needs at least one class, got shape {tuple(seg_logits.shape)}")
    if tuple(seg_target.shape) != (b, h, w):
        raise ValueError(
            f"multitask_loss: seg_target must have shape (B, H, W) = {(b, h, w)} to match seg_logits "
            f"{tuple(seg_logits.shape)}, got {tuple(seg_target.shape)}"
        )
    for name, pred, target, mask, broadcast in (
        ("depth", depth_pred, depth_target, depth_mask, False),
        ("normal", normal_pred, normal_target, normal_mask, True),
    ):
        if target.shape != pred.shape:
            raise ValueError(
                f"multitask_loss: {name}_target must have the shape of {name}_pred {tuple(pred.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if mask is not None:
            ok = mask.shape == pred.shape or (
                broadcast and mask.dim() == 4 and mask.shape[1] == 1
                and mask.shape[0] == pred.shape[0] and mask.shape[2:] == pred.shape[2:]
            )  # fmt: skip
            if not ok:
                expected = "(B, 1 or C, H, W) matching " if broadcast else ""
                raise ValueError(
                    f"multitask_loss: {name}_mask must have shape {expected}{name}_pred "
                    f"{tuple(pred.shape)}, got {tuple(mask.shape)}"
                )
    device = seg_logits.device
    for name, t in (("depth_pred", depth_pred), ("normal_pred", normal_pred), ("seg_target", seg_target),
                    ("depth_target", depth_target), ("normal_target", normal_target),
                    ("depth_mask", depth_mask), ("normal_mask", normal_mask)):  # fmt: skip
        if t is not None and t.device != device:
            raise ValueError(
                f"multitask_loss (triton backend): {name} must be on {device} (the device of seg_logits), "
                f"got {t.device}"
            )


def _blocks(classes: int, block_p: int | None, block_c: int | None) -> tuple[int, int]:
    if block_c is None:
        block_c = min(triton.next_power_of_2(classes), 64)
    if block_p is None:
        # about 8K logits per program on the GPU; small tiles keep the interpreter cheap
        block_p = 32 if triton_interpreting() else max(16, min(256, 8192 // block_c))
    return block_p, block_c


def forward(seg_logits, depth_pred, normal_pred, seg_target, depth_target, normal_target,
            depth_mask, normal_mask, ignore_index, reduction, need,
            block_p: int | None = None, block_c: int | None = None):  # fmt: skip
    """Runs the forward kernels.

    Returns (seg, depth, normal, buf_seg, buf_depth, buf_normal, inv_divisors, record): three
    0-dim float32 losses; float32 gradient buffers NOT divided by D in each prediction's memory
    format (None where ``need[k]`` is false); (3,) float32 1/D; (2,) int64 {smallest flat
    pixel b*H*W + h*W + w with a label outside [0, C) that is not the ignore index, or -1;
    that label}. ``block_p`` / ``block_c`` override the tile (tests use them to exercise the
    class-chunk loop).
    """
    check_inputs(seg_logits, depth_pred, normal_pred, seg_target, depth_target, normal_target,
                 depth_mask, normal_mask, reduction)  # fmt: skip
    device = seg_logits.device
    B, C, H, W = seg_logits.shape
    f32 = dict(device=device, dtype=torch.float32)
    buffers = [
        torch.empty_like(p, dtype=torch.float32) if n else None
        for p, n in zip((seg_logits, depth_pred, normal_pred), need)
    ]
    block_p, block_c = _blocks(C, block_p, block_c)

    # segmentation
    grid = (triton.cdiv(H * W, block_p), B)
    n_seg = grid[0] * grid[1]
    part = torch.empty(2, max(n_seg, 1), device=device, dtype=torch.float64)
    part_bad = torch.empty(max(n_seg, 1), device=device, dtype=torch.int64)
    g = buffers[0]
    g_arg = g if g is not None else seg_logits  # never written when WRITE_GRAD is off
    if n_seg:
        _seg_ce_fwd[grid](
            seg_logits, seg_target, g_arg, part[0], part[1], part_bad,
            H * W, W, C, 0 if ignore_index is None else int(ignore_index),
            *seg_logits.stride(), *seg_target.stride(), *g_arg.stride(),
            HAS_IGNORE=ignore_index is not None, WRITE_GRAD=g is not None,
            COLLAPSE=_collapses(seg_logits) and _collapses(seg_target) and _collapses(g_arg),
            SINGLE_CHUNK=C <= block_c, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=8 if block_p * block_c >= 8192 else 4,  # 32 logits per thread at most
        )  # fmt: skip

    # depth and normals
    l1_parts, l1_counts, static_divs = [], [], []
    for k, (pred, target, mask) in enumerate(
        ((depth_pred, depth_target, depth_mask), (normal_pred, normal_target, normal_mask)), start=1
    ):
        b, ch, h, w = pred.shape
        m = _mask_arg(mask)
        grad = buffers[k]
        l1_grid = (triton.cdiv(h * w, block_p), b)
        n = l1_grid[0] * l1_grid[1]
        lp = torch.empty(2, max(n, 1), device=device, dtype=torch.float64)
        m_arg = m if m is not None else pred
        g_arg = grad if grad is not None else pred
        if n:
            _masked_l1_fwd[l1_grid](
                pred, target, m_arg, g_arg, lp[0], lp[1], h * w, w,
                *pred.stride(), *target.stride(), *m_arg.stride(), *g_arg.stride(),
                CHANNELS=ch, HAS_MASK=m is not None,
                MASK_BROADCAST=m is not None and m.shape[1] == 1 and ch > 1,
                WRITE_GRAD=grad is not None,
                COLLAPSE=_collapses(pred) and _collapses(target) and _collapses(m_arg) and _collapses(g_arg),
                BLOCK_P=block_p,
            )  # fmt: skip
        l1_parts.append(lp)
        l1_counts.append(n)
        numel = b * ch * h * w
        if reduction == "all":
            static_divs.append(numel)
        elif m is None:
            static_divs.append(max(numel, 1))
        else:
            static_divs.append(-1)  # max(sum of the broadcast mask, 1), on the device

    losses = [torch.empty((), **f32) for _ in range(3)]
    inv = torch.empty(3, **f32)
    record = torch.empty(2, device=device, dtype=torch.int64)
    div_seg = -1 if ignore_index is not None else B * H * W
    _finalize[(1,)](
        part[0], part[1], part_bad, n_seg,
        l1_parts[0][0], l1_parts[0][1], l1_counts[0],
        l1_parts[1][0], l1_parts[1][1], l1_counts[1],
        div_seg, static_divs[0], static_divs[1],
        seg_target, *seg_target.stride(), H * W, W,
        losses[0], losses[1], losses[2], inv, record,
        BLOCK=256 if triton_interpreting() else 1024,
    )  # fmt: skip
    return (*losses, *buffers, inv, record)


def scale_grad(buffer: torch.Tensor, grad_output: torch.Tensor, inv: torch.Tensor, k: int,
               dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Backward of :func:`forward`: ``(dtype)(buffer * grad_output * inv[k])``, one rounding,
    in the buffer's memory format (both dense with the same strides)."""
    out = torch.empty_like(buffer, dtype=dtype)
    if out.stride() != buffer.stride():  # empty_like keeps the strides of a dense tensor
        raise RuntimeError("multitask_loss (triton backend): gradient strides differ from the buffer's")
    n = buffer.numel()
    if n:
        block = 1024 if triton_interpreting() else 2048
        go = grad_output.to(device=buffer.device, dtype=torch.float32)
        _scale_grad[(triton.cdiv(n, block),)](buffer, out, n, go, inv[k:], BLOCK=block)
    return out


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specialisations (mgm_fast.ops._triton.aot)


def aot_specs() -> list[tuple]:
    """(label, kernel, argument types, constexprs) of the specialisations the tests lower for
    sm_90: float32 NCHW, bfloat16 / float16 with general strides and the class-chunk loop."""
    i32, i64 = "i32", "i64"
    strides = lambda *names: dict.fromkeys(names, i64)  # noqa: E731
    seg_common = dict(
        target_ptr="*i64", grad_ptr="*fp32", part_loss_ptr="*fp64", part_count_ptr="*fp64",
        part_bad_ptr="*i64", HW=i32, W=i32, C=i32, ignore_index=i64,
        **strides("l_n", "l_c", "l_h", "l_w", "t_n", "t_h", "t_w", "g_n", "g_c", "g_h", "g_w"),
    )  # fmt: skip
    l1_common = dict(
        part_loss_ptr="*fp64", part_count_ptr="*fp64", HW=i32, W=i32, grad_ptr="*fp32",
        **strides("p_n", "p_c", "p_h", "p_w", "t_n", "t_c", "t_h", "t_w",
                  "m_n", "m_c", "m_h", "m_w", "g_n", "g_c", "g_h", "g_w"),
    )  # fmt: skip
    specs = []
    for dtype, collapse, single, ignore in (("fp32", True, True, False), ("bf16", False, False, True),
                                            ("fp16", True, False, True)):  # fmt: skip
        specs.append((
            f"seg_ce_fwd[{dtype},collapse={collapse},single_chunk={single},ignore={ignore}]",
            _seg_ce_fwd,
            {**seg_common, "logits_ptr": f"*{dtype}"},
            dict(HAS_IGNORE=ignore, WRITE_GRAD=True, COLLAPSE=collapse, SINGLE_CHUNK=single,
                 BLOCK_P=128 if single else 256, BLOCK_C=64 if single else 16),
        ))  # fmt: skip
    for dtype, channels, mask, broadcast in (("fp32", 1, "*u8", False), ("bf16", 3, "*fp32", True),
                                             ("fp16", 3, "*u8", False)):  # fmt: skip
        specs.append((
            f"masked_l1_fwd[{dtype},channels={channels},mask={mask},broadcast={broadcast}]",
            _masked_l1_fwd,
            {**l1_common, "pred_ptr": f"*{dtype}", "target_ptr": "*fp32", "mask_ptr": mask},
            dict(CHANNELS=channels, HAS_MASK=True, MASK_BROADCAST=broadcast, WRITE_GRAD=True,
                 COLLAPSE=dtype != "bf16", BLOCK_P=256),
        ))  # fmt: skip
    specs.append((
        "finalize",
        _finalize,
        dict(seg_loss_ptr="*fp64", seg_count_ptr="*fp64", seg_bad_ptr="*i64", n_seg=i32,
             dep_loss_ptr="*fp64", dep_count_ptr="*fp64", n_dep=i32,
             nrm_loss_ptr="*fp64", nrm_count_ptr="*fp64", n_nrm=i32,
             div_seg=i64, div_dep=i64, div_nrm=i64, target_ptr="*i64", t_n=i64, t_h=i64, t_w=i64,
             HW=i32, W=i32, out_seg_ptr="*fp32", out_dep_ptr="*fp32", out_nrm_ptr="*fp32",
             inv_ptr="*fp32", record_ptr="*i64"),
        dict(BLOCK=1024),
    ))  # fmt: skip
    for dtype in ("fp32", "bf16", "fp16"):
        specs.append((
            f"scale_grad[{dtype}]",
            _scale_grad,
            dict(buffer_ptr="*fp32", out_ptr=f"*{dtype}", n=i64, grad_output_ptr="*fp32", inv_ptr="*fp32"),
            dict(BLOCK=2048),
        ))  # fmt: skip
    return specs
