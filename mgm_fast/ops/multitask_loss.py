"""Fused MGM dense losses: segmentation CE + depth L1 + normal L1 in one call.

``multitask_loss(...)`` has the signature and semantics of :func:`multitask_loss_reference`
(the plain-PyTorch reference, built from :func:`seg_ce`, :func:`depth_l1` and :func:`normal_l1`)
plus ``impl="auto" | "reference" | "triton" | "cpp" | "cuda"``, and returns the tuple
``(seg, depth, normal)`` of 0-dim float32 losses (L_mt = seg + depth + normal).

The formulas follow docs/method.md section 2 (the released code); every deviation from the
released behaviour is an argument whose default keeps the released behaviour:

* segmentation CE: released -- no ignore index, mean over all B*H*W pixels; option
  ``ignore_index`` -- those pixels are excluded from the loss and from the mean's count;
* depth L1: released -- the mask is all ones (``depth_mask=None``) and the mean runs over all
  B*H*W elements; ``reduction="valid"`` -- masked sum divided by the number of valid pixels;
* normal L1: released -- ``mask * |pred - target|`` averaged over all B*3*H*W elements (no unit
  normalisation); ``reduction="valid"`` -- divided by the number of valid elements instead.

Shapes: B batch, C classes, H x W pixels.

* ``seg_logits`` (B, C, H, W) float; ``seg_target`` (B, H, W) int64 in [0, C) or ``ignore_index``.
* ``depth_pred`` / ``depth_target`` (B, 1, H, W) float; ``depth_mask`` the same shape, bool or
  float (weights), or None (all ones, the released code).
* ``normal_pred`` / ``normal_target`` (B, 3, H, W) float; ``normal_mask`` (B, 1 or 3, H, W).
* ``reduction`` ("all" | "valid") applies to depth and normals.

Formulas (p = (b, h, w) a pixel, e an element of the L1 tensors, m_e the mask, 1 without one)::

    seg    = sum_{p valid} [logsumexp_c x[b,:,h,w] - x[b,t_p,h,w]] / D_seg
             D_seg = B*H*W (ignore_index None; every label must lie in [0, C)),
                     max(#{p : t_p != ignore_index}, 1) otherwise (all ignored -> 0, not NaN)
    depth  = sum_e m_e |pred_e - target_e| / D,   normal: the same over (B, 3, H, W)
             D = numel ("all", released) or max(sum_e m_e, 1) ("valid"; a 1-channel normal
             mask is broadcast over the 3 channels and so counts 3 times)
    d seg / d x[b,c,h,w]  = (softmax_c(x[b,:,h,w]) - [c == t_p]) / D_seg   (0 on ignored pixels)
    d L1  / d pred_e      = sign(pred_e - target_e) * m_e / D                (sign(0) = 0)

Fused backends (the Liger-Kernel pattern): one pass over the logits computes the loss and the
gradient w.r.t. each prediction; no softmax tensor is kept. Backward only scales the saved
gradients by grad_output:

* ``cpp`` -- CPU, float32 predictions/targets (lower precisions go to ``reference`` under
  ``auto``: the CPU kernel does not implement them). The saved gradients are already divided
  by D; backward returns them as they are when grad_output == 1, else multiplies once. Any
  strides, channels_last included, without a copy; gradients take the prediction's memory
  format. Bit-reproducible for any thread count; the inner loops use AVX-512 / AVX2 where the
  CPU has them (chosen at load time). An out-of-range label raises ValueError naming the value
  and the pixel.
* ``cuda`` -- CUDA, float32/float16/bfloat16 predictions (targets may be another of these),
  float32 arithmetic. The saved buffers are float32 and undivided; backward computes
  ``buffer * grad_output / D`` on the device and rounds once to the prediction dtype (no host
  synchronisation anywhere). An out-of-range label cannot raise inside the kernel: that call's
  segmentation loss becomes NaN, and the ValueError naming the value is raised by the next
  multitask_loss call once the GPU has finished the faulty one (non-blocking check), or by
  :func:`check_cuda_label_errors`; set ``MGM_FAST_SYNC_LABEL_CHECK=1`` to check right after
  every call (one host synchronisation per call).
* ``triton`` -- the same design as ``cuda`` in Triton (mgm_fast/ops/_triton/multitask_loss.py):
  float32/float16/bfloat16, tiles of pixels x all classes, float32 unscaled buffers rescaled on
  the device in backward, deterministic float64 reductions, no host synchronisation; label
  errors are reported like ``cuda`` on the GPU (immediately on CPU tensors). It runs on CUDA
  tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (then only when forced: ``auto``
  never picks the interpreter).
* ``reference`` -- :func:`multitask_loss_reference`, any device and float dtype (the
  reductions accumulate in float32).

``torch.compile``: each fused backend is a custom op ``mgm_fast::multitask_loss_<backend>`` with
its autograd formula (cuda and triton scale their buffers in backward with
``mgm_fast::multitask_loss_<backend>_scale_grad``; :mod:`mgm_fast.ops._library`). The label-error
reporting of the device backends happens inside the op, invisible to the compiler.

The fused backends differentiate w.r.t. the three predictions only; inputs where a target or
mask requires grad go to ``reference`` under ``auto``. Masks may be bool, uint8 or float;
masks of other dtypes (e.g. int64) are converted to a float32 copy first.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping

import torch

from mgm_fast.ops._dispatch import (
    argument_list,
    cpp_backend,
    cuda_backend,
    define_op,
    native_function,
    reference_backend,
    triton_backend,
)
from mgm_fast.ops._library import autocast_off, once_differentiable, or_placeholder, placeholder, qualname

__all__ = [
    "OP",
    "REDUCTIONS",
    "check_cuda_label_errors",
    "depth_l1",
    "multitask_loss",
    "multitask_loss_reference",
    "normal_l1",
    "seg_ce",
]


# ---------------------------------------------------------------------------------------------
# reference (plain PyTorch); shapes as in the module docstring, each loss a 0-dim float32 tensor

REDUCTIONS = ("all", "valid")


def _check(name: str, tensor: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {what} of shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _reduce(err: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """The masked L1 losses' reduction of ``err`` (already multiplied by ``weight``): "all" -- the
    mean over every element; "valid" -- the sum over the weights' sum (every element when
    ``weight`` is None), 0 when nothing is valid."""
    if reduction == "all":
        return err.mean()
    if reduction == "valid":
        count = err.new_full((), err.numel()) if weight is None else weight.sum()  # a fill, no upload
        return err.sum() / count.clamp_min(1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def seg_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Per-pixel softmax cross-entropy, mean over (non-ignored) pixels.

    Args:
        logits: (B, C, H, W) raw scores (any float dtype; computed in float32).
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
    weight = None
    if mask is not None:
        _check("depth_l1 mask", mask, pred.shape, "mask")
        weight = mask.float()
        err = err * weight
    return _reduce(err, weight, reduction)


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
    weight = None
    if mask is not None:
        if mask.shape[1] not in (1, pred.shape[1]) or mask.shape[0] != pred.shape[0] or mask.shape[2:] != pred.shape[2:]:
            raise ValueError(
                f"normal_l1 mask: expected shape (B, 1 or 3, H, W) matching {tuple(pred.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        weight = mask.float().expand_as(err)
        err = err * weight
    return _reduce(err, weight, reduction)


def multitask_loss_reference(
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
    """The three dense losses of L_mt = L_seg + L_dep + L_nrm (equal weights), returned apart:
    the plain-PyTorch twin of :func:`multitask_loss` and its argument list. ``reduction``
    applies to depth and normals (segmentation always averages over non-ignored pixels)."""
    return (
        seg_ce(seg_logits, seg_target, ignore_index),
        depth_l1(depth_pred, depth_target, depth_mask, reduction),
        normal_l1(normal_pred, normal_target, normal_mask, reduction),
    )


_ARGUMENTS = argument_list(multitask_loss_reference, "multitask_loss")
"""The argument list every backend shares; its ``bind`` is plain Python, traced by torch.compile."""
_PREDICTIONS = ("seg_logits", "depth_pred", "normal_pred")
_CONSTANT_TENSORS = ("seg_target", "depth_target", "normal_target", "depth_mask", "normal_mask")


# ---------------------------------------------------------------------------------------------
# custom ops (mgm_fast.ops._library): one forward op per fused backend with its autograd formula,
# and per backend an op that scales a saved gradient buffer in backward. ``need[k]``: whether
# prediction k gets a gradient (requires_grad under grad mode); the forward writes its buffer
# only then (a placeholder otherwise). Losses whose prediction needs no gradient are constants.

_Cpp = tuple[(torch.Tensor,) * 6]  # seg, depth, normal, their gradients (already divided by D)
_Device = tuple[(torch.Tensor,) * 7]  # seg, depth, normal, float32 undivided buffers, 1/D (3,)


def _need(a: Mapping) -> list[bool]:
    grad = torch.is_grad_enabled()
    return [grad and a[name].requires_grad for name in _PREDICTIONS]


def _losses_meta(seg_logits) -> list[torch.Tensor]:
    return [torch.empty((), dtype=torch.float32, device=seg_logits.device) for _ in range(3)]


def _setup_context(ctx, inputs, output):
    """Saves the gradient buffers (and, on the device backends, 1/D and the predictions' dtypes);
    marks the buffers and the losses of predictions that need no gradient as constants."""
    need = inputs[-1]
    buffers = output[3:]
    ctx.save_for_backward(*buffers)
    ctx.pred_dtypes = tuple(t.dtype for t in inputs[:3])
    ctx.need = tuple(need)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*buffers, *(loss for loss, n in zip(output[:3], need) if not n))


def _scaled_grads(ctx, grad_outputs, scale) -> tuple:
    """The backward of a forward op: each needed prediction's gradient = scale(k, buffer, grad)."""
    saved = ctx.saved_tensors
    buffers, inv = saved[:3], (saved[3] if len(saved) > 3 else None)  # 1/D: the device backends
    grads = []
    for k, (buffer, grad_output) in enumerate(zip(buffers, grad_outputs)):
        grads.append(None if grad_output is None or not ctx.need[k] else scale(k, buffer, grad_output, inv))
    return (*grads, *([None] * 8))


# cpp: the CPU kernel saves gradients already divided by D; backward scales them by grad_output


@torch.library.custom_op(qualname("multitask_loss_cpp"), mutates_args=())
def _cpp_op(
    seg_logits: torch.Tensor, depth_pred: torch.Tensor, normal_pred: torch.Tensor, seg_target: torch.Tensor,
    depth_target: torch.Tensor, normal_target: torch.Tensor, depth_mask: torch.Tensor | None,
    normal_mask: torch.Tensor | None, ignore_index: int | None, reduction: str, need: list[bool],
) -> _Cpp:  # fmt: skip
    """(seg, depth, normal) 0-dim float32 and the gradients w.r.t. the predictions (divided by D,
    in each prediction's memory format; placeholders where ``need`` is false)."""
    preds = (seg_logits, depth_pred, normal_pred)
    with autocast_off(seg_logits):
        seg, depth, normal, *grads = native_function("multitask_loss_{device}", "cpu")(
            *preds, seg_target, depth_target, normal_target, depth_mask, normal_mask, ignore_index, reduction,
            list(need),
        )  # fmt: skip
    return seg, depth, normal, *(or_placeholder(g, p) for g, p in zip(grads, preds))


@_cpp_op.register_fake
def _(seg_logits, depth_pred, normal_pred, *rest):
    preds, need = (seg_logits, depth_pred, normal_pred), rest[-1]
    return (*_losses_meta(seg_logits), *(torch.empty_like(p) if n else placeholder(p) for p, n in zip(preds, need)))


@torch.library.custom_op(qualname("multitask_loss_cpp_scale_grad"), mutates_args=())
def _cpp_scale_op(buffer: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``buffer * grad_output`` (a saved gradient times the loss's incoming gradient), always
    scaled: testing grad_output == 1 first would read it on the host. An op of its own so that a
    double backward raises instead of treating the saved gradient as a constant."""
    return buffer * grad_output


@_cpp_scale_op.register_fake
def _(buffer, grad_output):
    return torch.empty_like(buffer)


def _cpp_backward(ctx, *grad_outputs):
    def scale(k, buffer, grad_output, inv):
        return _cpp_scale_op(buffer, grad_output)

    return _scaled_grads(ctx, grad_outputs[:3], scale)


_cpp_op.register_autograd(_cpp_backward, setup_context=_setup_context)
once_differentiable(_cpp_scale_op, "multitask_loss (cpp backend)")


def _cpp(*args, **kwargs):
    a = _ARGUMENTS.bind(args, kwargs)
    return tuple(_cpp_op(*a.values(), _need(a))[:3])


# ---------------------------------------------------------------------------------------------
# cuda


class _LabelErrorWatch:
    """Reports out-of-range labels found by the CUDA kernel without blocking the host.

    Each call copies its 2-int64 error record to pinned memory asynchronously and records an
    event; a later call looks only at records whose event has completed.
    """

    max_pending = 64

    def __init__(self) -> None:
        self._pending: collections.deque = collections.deque()

    def submit(
        self, record: torch.Tensor, shape: tuple, ignore_index: int | None, backend: str = "cuda"
    ) -> None:
        if torch.cuda.is_current_stream_capturing():
            return  # inside a CUDA graph only the NaN loss reports it
        host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        host.copy_(record, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host, shape, ignore_index, backend))
        if os.environ.get("MGM_FAST_SYNC_LABEL_CHECK") == "1":
            self.check(block=True)
        elif len(self._pending) > self.max_pending:
            self.check(block=False, at_least_one=True)

    def check(self, block: bool, at_least_one: bool = False) -> None:
        while self._pending:
            event, host, shape, ignore_index, backend = self._pending[0]
            if not (block or at_least_one) and not event.query():
                return
            event.synchronize()
            self._pending.popleft()
            at_least_one = False
            pixel, label = int(host[0]), int(host[1])
            if pixel >= 0:
                self._pending.clear()
                _, classes, height, width = shape
                b, h, w = pixel // (height * width), (pixel // width) % height, pixel % width
                why = (
                    f"and is not the ignore_index {ignore_index}"
                    if ignore_index is not None
                    else "(no ignore_index is set)"
                )
                raise ValueError(
                    f"multitask_loss ({backend} backend): seg_target held label {label} at "
                    f"(b={b}, h={h}, w={w}), outside the class range [0, {classes}) {why}; "
                    "the segmentation loss of that call is NaN (detected after the call "
                    "returned; MGM_FAST_SYNC_LABEL_CHECK=1 checks at every call)"
                )


_LABEL_WATCH = _LabelErrorWatch()


def check_cuda_label_errors() -> None:
    """Waits for every pending CUDA multitask_loss call (cuda and triton backends) and raises
    ValueError if one of them met a label outside [0, C) that is not the ignore index."""
    _LABEL_WATCH.check(block=True)


def _device_meta(seg_logits, depth_pred, normal_pred, need) -> tuple:
    """Fake outputs of the cuda and triton forward ops."""
    buffers = [torch.empty_like(p, dtype=torch.float32) if n else placeholder(p)
               for p, n in zip((seg_logits, depth_pred, normal_pred), need)]  # fmt: skip
    return (*_losses_meta(seg_logits), *buffers, torch.empty(3, dtype=torch.float32, device=seg_logits.device))


def _register_device(backend: str, forward_kernels: Callable, scale_kernel: Callable) -> Callable:
    """The custom ops of one device backend (cuda, triton) -- ``mgm_fast::multitask_loss_<backend>``
    with its autograd formula and ``..._scale_grad`` -- and the backend function calling them.

    ``forward_kernels(*arguments, need)`` runs the kernels and reports label errors: (seg, depth,
    normal, float32 undivided gradient buffers or None, 1/D (3,)); ``scale_kernel(buffer,
    grad_output, inv, k, dtype)`` is ``(dtype)(buffer * grad_output * inv[k])`` on the device, in the
    buffer's memory format."""

    @torch.library.custom_op(qualname(f"multitask_loss_{backend}"), mutates_args=())
    def forward(
        seg_logits: torch.Tensor, depth_pred: torch.Tensor, normal_pred: torch.Tensor, seg_target: torch.Tensor,
        depth_target: torch.Tensor, normal_target: torch.Tensor, depth_mask: torch.Tensor | None,
        normal_mask: torch.Tensor | None, ignore_index: int | None, reduction: str, need: list[bool],
    ) -> _Device:  # fmt: skip
        """(seg, depth, normal, float32 undivided gradient buffers, 1/D (3,)). Out-of-range labels
        are reported host-side, inside the op: invisible to torch.compile."""
        preds = (seg_logits, depth_pred, normal_pred)
        seg, depth, normal, *buffers, inv = forward_kernels(
            *preds, seg_target, depth_target, normal_target, depth_mask, normal_mask, ignore_index, reduction, need
        )
        return seg, depth, normal, *(or_placeholder(b, p) for b, p in zip(buffers, preds)), inv

    @forward.register_fake
    def _(seg_logits, depth_pred, normal_pred, *rest):
        return _device_meta(seg_logits, depth_pred, normal_pred, rest[-1])

    @torch.library.custom_op(qualname(f"multitask_loss_{backend}_scale_grad"), mutates_args=())
    def scale_grad(buffer: torch.Tensor, grad_output: torch.Tensor, inv: torch.Tensor, k: int,
                   dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        """``(dtype)(buffer * grad_output * inv[k])`` on the device, in the buffer's memory format."""
        return scale_kernel(buffer, grad_output, inv, k, dtype)

    @scale_grad.register_fake
    def _(buffer, grad_output, inv, k, dtype):
        return torch.empty_like(buffer, dtype=dtype)

    def backward(ctx, *grad_outputs):
        def scale(k, buffer, grad_output, inv):
            return scale_grad(buffer, grad_output, inv, k, ctx.pred_dtypes[k])

        return _scaled_grads(ctx, grad_outputs[:3], scale)

    forward.register_autograd(backward, setup_context=_setup_context)
    once_differentiable(scale_grad, f"multitask_loss ({backend} backend)")

    def run(*args, **kwargs):
        a = _ARGUMENTS.bind(args, kwargs)
        return tuple(forward(*a.values(), _need(a))[:3])

    run.__name__ = run.__qualname__ = f"_{backend}"
    return run


def _cuda_kernels(seg_logits, depth_pred, normal_pred, seg_target, depth_target, normal_target, depth_mask,
                  normal_mask, ignore_index, reduction, need):  # fmt: skip
    """The CUDA kernels; an out-of-range label is reported by the label watch without blocking."""
    _LABEL_WATCH.check(block=False)
    with autocast_off(seg_logits):
        *out, record = native_function("multitask_loss_{device}", "cuda")(
            seg_logits, depth_pred, normal_pred, seg_target, depth_target, normal_target, depth_mask, normal_mask,
            ignore_index, reduction, list(need),
        )  # fmt: skip
    _LABEL_WATCH.submit(record, tuple(seg_logits.shape), ignore_index)
    return out


def _cuda_scale(buffer, grad_output, inv, k, dtype):
    return native_function("multitask_loss_scale_grad_{device}", "cuda")(buffer, grad_output, inv, k, dtype)


_cuda = _register_device("cuda", _cuda_kernels, _cuda_scale)


# ---------------------------------------------------------------------------------------------
# triton


def _triton_record(record: torch.Tensor, shape: tuple, ignore_index: int | None) -> None:
    """Label errors of the triton backend: reported without blocking on CUDA, at once on CPU."""
    if record.is_cuda:
        _LABEL_WATCH.check(block=False)
        _LABEL_WATCH.submit(record, shape, ignore_index, backend="triton")
        return
    pixel, label = (int(v) for v in record)
    if pixel >= 0:
        _, classes, height, width = shape
        b, h, w = pixel // (height * width), (pixel // width) % height, pixel % width
        why = f"and is not the ignore_index {ignore_index}" if ignore_index is not None else "(no ignore_index is set)"
        raise ValueError(
            f"multitask_loss (triton backend): seg_target holds label {label} at (b={b}, h={h}, w={w}), "
            f"outside the class range [0, {classes}) {why}"
        )


def _triton_kernels(seg_logits, depth_pred, normal_pred, seg_target, depth_target, normal_target, depth_mask,
                    normal_mask, ignore_index, reduction, need):  # fmt: skip
    """The Triton kernels (mgm_fast.ops._triton.multitask_loss), label errors as _triton_record."""
    from mgm_fast.ops._triton import multitask_loss as tm

    *out, record = tm.forward(seg_logits, depth_pred, normal_pred, seg_target, depth_target, normal_target,
                              depth_mask, normal_mask, ignore_index, reduction, list(need))  # fmt: skip
    _triton_record(record, tuple(seg_logits.shape), ignore_index)
    return out


def _triton_scale(buffer, grad_output, inv, k, dtype):
    from mgm_fast.ops._triton import multitask_loss as tm

    return tm.scale_grad(buffer, grad_output, inv, k, dtype)


_triton = _register_device("triton", _triton_kernels, _triton_scale)


# ---------------------------------------------------------------------------------------------
# dispatch


def _fused_reasons(a: Mapping) -> list[str]:
    """Input conditions the fused backends need beyond device and dtype."""
    reasons = []
    for name in (*_PREDICTIONS, "depth_target", "normal_target"):
        t = a[name]
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            reasons.append(f"{name} must be a 4-d (B, C, H, W) floating tensor")
    target = a["seg_target"]
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        reasons.append("seg_target must be an int64 tensor")
    for name in _CONSTANT_TENSORS:
        t = a[name]
        if isinstance(t, torch.Tensor) and t.requires_grad:
            reasons.append(f"{name} requires grad (fused backends differentiate predictions only)")
    return reasons


OP = define_op(
    "multitask_loss",
    "seg CE + depth L1 + normal L1, loss and gradients in one pass",
    [
        reference_backend(multitask_loss_reference),
        cpp_backend(_cpp, extra_check=_fused_reasons),
        cuda_backend(_cuda, extra_check=_fused_reasons),
        triton_backend(_triton, extra_check=_fused_reasons),
    ],
)


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
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seg, depth, normal) 0-dim float32 losses; see the module docstring for the formulas.

    ``impl="auto"`` takes the first of cuda, triton, cpp, reference that supports the inputs (never
    Triton on the CPU interpreter); a forced backend that cannot run them raises :class:`~mgm_fast.ops.BackendUnavailable` with why.
    """
    return OP(
        seg_logits,
        depth_pred,
        normal_pred,
        seg_target,
        depth_target,
        normal_target,
        depth_mask,
        normal_mask,
        ignore_index,
        reduction,
        impl=impl,
    )


# ---------------------------------------------------------------------------------------------
# self-test cases (mgm_fast.ops._selftest)


def multitask_loss_float64(
    seg_logits,
    depth_pred,
    normal_pred,
    seg_target,
    depth_target,
    normal_target,
    depth_mask=None,
    normal_mask=None,
    ignore_index=None,
    reduction="all",
):
    """The formulas of the module docstring in the predictions' dtype: the float64 truth of
    the self-test (the reference accumulates in float32). Masks and targets are promoted to
    the predictions' dtype; a 1-channel normal mask counts 3 times under "valid"."""
    dtype = seg_logits.dtype
    logp = torch.log_softmax(seg_logits, dim=1)
    valid = torch.ones_like(seg_target, dtype=torch.bool) if ignore_index is None else seg_target != ignore_index
    nll = -logp.gather(1, torch.where(valid, seg_target, 0).unsqueeze(1)).squeeze(1) * valid
    seg = nll.sum() / (valid.numel() if ignore_index is None else valid.sum().clamp_min(1))

    def l1(pred, target, mask):
        err = (pred - target.to(pred.dtype)).abs()
        w = torch.ones_like(err) if mask is None else mask.to(pred.dtype).expand_as(err)
        count = err.numel() if reduction == "all" else w.sum().clamp_min(1)
        return (err * w).sum() / count

    return seg.to(dtype), l1(depth_pred, depth_target, depth_mask), l1(normal_pred, normal_target, normal_mask)


def _grid(t, step=2.0**-6):
    """t rounded to multiples of step (exact in bfloat16 / float16 for |t| < 4): ties and edge
    values built this way stay ties in every test dtype."""
    return torch.round(t / step) * step


def _selftest_cases():
    from mgm_fast.ops._selftest import Case, Inputs

    def make(b, c, h, w, *, ignore_index=None, void=0.0, reduction="all", depth_mask=None, normal_mask="bool1",
             extremes=False):  # fmt: skip
        def build(gen):
            def randn(*shape):
                return torch.randn(*shape, generator=gen, dtype=torch.float64)

            def rand(*shape):
                return torch.rand(*shape, generator=gen, dtype=torch.float64)

            seg_logits = 3.0 * randn(b, c, h, w)
            seg_target = torch.randint(0, c, (b, h, w), generator=gen)
            if ignore_index is not None:
                seg_target[rand(b, h, w) < void] = ignore_index
            depth_pred = randn(b, 1, h, w)
            depth_target = randn(b, 1, h, w)
            depth_pred.view(-1)[::7] = _grid(depth_pred.view(-1)[::7])
            depth_target.view(-1)[::7] = depth_pred.view(-1)[::7]  # exact ties: sign(0) = 0
            normal_pred = rand(b, 3, h, w)
            normal_target = (randn(b, 3, h, w).clamp(-1, 1) + 1) / 2  # "released01" targets
            if extremes:
                seg_logits[0, :, 0, 0] = -1e4  # a pixel far below ...
                seg_logits[-1, -1, -1, -1] = 1e4  # ... and a class far above the rest
                if ignore_index is not None:
                    seg_target[0] = ignore_index  # a whole image ignored
                normal_pred.view(-1)[::5] = _grid(normal_pred.view(-1)[::5])
                normal_target.view(-1)[::5] = normal_pred.view(-1)[::5]
            masks = {
                None: lambda ch: None,
                "bool1": lambda ch: rand(b, 1, h, w) > 0.3,
                "bool3": lambda ch: rand(b, ch, h, w) > 0.3,
                "uint8": lambda ch: torch.randint(0, 3, (b, ch, h, w), generator=gen, dtype=torch.uint8),
                "float3": lambda ch: _grid(rand(b, ch, h, w)),  # weights, exact in every dtype
            }
            kwargs = dict(
                seg_logits=seg_logits, depth_pred=depth_pred, normal_pred=normal_pred, seg_target=seg_target,
                depth_target=depth_target, normal_target=normal_target, depth_mask=masks[depth_mask](1),
                normal_mask=masks[normal_mask](3), ignore_index=ignore_index, reduction=reduction,
            )  # fmt: skip
            # data tensors stay float32 under any test dtype (they come from the loader); the
            # predictions come from channels_last models in the fast engine
            return Inputs(kwargs=kwargs, grad=_PREDICTIONS, channels_last=_PREDICTIONS,
                          keep_float32=("depth_target", "normal_target", "depth_mask", "normal_mask"))  # fmt: skip

        return build

    specs = [  # name, size, (B, C, H, W), options
        ("b1 c13 7x5, released (no ignore index, all, normal mask bool (B,1,H,W))", "small", (1, 13, 7, 5), {}),
        ("b2 c27 1x70 (W past the CPU tile), ignore -1 (30% void), valid, depth mask bool, normal mask float "
         "(B,3,H,W)", "small", (2, 27, 1, 70), dict(ignore_index=-1, void=0.3, reduction="valid", depth_mask="bool1",
                              normal_mask="float3")),
        ("b2 c40 9x6, ignore 255, valid, uint8 masks, logits +-1e4, an image all ignored, ties", "small",
         (2, 40, 9, 6), dict(ignore_index=255, void=0.2, reduction="valid", depth_mask="uint8",
                             normal_mask="uint8", extremes=True)),
        ("paper: b32 c40 128x128, released (no ignore index, all, normal mask bool (B,1,H,W))", "paper",
         (32, 40, 128, 128), {}),
        ("paper: b32 c40 128x128, ignore -1 (10% void), valid, depth mask bool", "paper", (32, 40, 128, 128),
         dict(ignore_index=-1, void=0.1, reduction="valid", depth_mask="bool1")),
    ]  # fmt: skip
    return [Case("multitask_loss", name, size, make(*dims, **opts), truth=multitask_loss_float64)
            for name, size, dims, opts in specs]  # fmt: skip


OP.selftest_cases = _selftest_cases
