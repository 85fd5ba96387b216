"""Fused SimCLR view generation: crop + resize + flip, colour jitter, grayscale, blur, in one call.

``simclr_views(x, params, src_index, out_hw, blur_kernel=3, select="auto", impl="auto")`` makes
one view per entry of ``src_index``, with the semantics of :mod:`mgm_fast.data.augment` (see its
module docstring for every step and the differences from torchvision):

* ``x`` (B, 3, H, W) float images in [-1, 1];
* ``params`` the parameters of N views (:data:`mgm_fast.data.augment.PARAM_KEYS`): ``crop``
  (N, 4) int64 top, left, height, width; ``flip``, ``jitter``, ``gray``, ``blur`` (N,) bool;
  ``order`` (N, 4) int64 jitter op order; ``factors`` (N, 4) float; ``sigma`` (N,) float;
* ``src_index`` (N,) int64 on ``x.device``: the image of ``x`` view n reads (``two_views``
  passes ``arange(B)`` twice, so both views of an image read it once per view);
* ``out_hw`` (oh, ow); ``blur_kernel`` odd K with K // 2 < min(oh, ow);
* ``select`` "auto" | "index" | "where": how the torch path handles ops that act on a subset of
  the batch (identical results); the C++ kernel works per view and ignores it.

Returns (N, 3, oh, ow) in [-1, 1], of ``x.dtype``.

Backends:

* ``cpp`` -- CPU, float32 images (csrc/kernels/cpu/simclr_views.*): per view one fused pass in
  a thread-local buffer that stays in cache (crop-resize with the flip folded into the column
  taps, the jitter ops in the sample's order, grayscale, separable reflect-101 blur, scaling),
  OpenMP over views with ``torch.get_num_threads()`` threads. Same formulas, clamping points and
  op order as the reference, in float32 (agreement ~1e-6). The source is read once and the
  output written once, where the torch path makes ~40 passes over the batch in memory.
* ``reference`` -- :func:`mgm_fast.data.augment.apply_torch`, the batched torch path, any
  device and float dtype.

No autograd: the views are inputs of the encoder and no gradient flows back into the
augmentation, so the ``cpp`` backend is not differentiable. An ``x`` that requires grad goes
to ``reference`` under ``auto``; forcing ``cpp`` on it raises :class:`BackendUnavailable`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mgm_fast import _native
from mgm_fast.ops._dispatch import Backend, FusedOp, register_op

__all__ = ["OP", "simclr_views"]


def _augment():
    """mgm_fast.data.augment, imported late: it builds on this op."""
    from mgm_fast.data import augment

    return augment


def _out_hw(out_hw) -> tuple[int, int]:
    oh, ow = (int(v) for v in out_hw)
    if oh < 1 or ow < 1:
        raise ValueError(f"simclr_views: out_hw must be two positive sizes, got {tuple(out_hw)}")
    return oh, ow


def _validate(x, params, src_index, out_hw, blur_kernel, select) -> tuple[int, int]:
    """Checks shared by every backend (metadata, plus the src_index range on the CPU)."""
    aug = _augment()
    aug._check_images(x)
    if not isinstance(src_index, torch.Tensor) or src_index.dim() != 1 or src_index.dtype != torch.int64:
        got = (
            f"{tuple(src_index.shape)} {src_index.dtype}"
            if isinstance(src_index, torch.Tensor)
            else src_index
        )
        raise ValueError(f"simclr_views: src_index must be a (N,) int64 tensor, got {got}")
    aug._check_params(params, src_index.shape[0])
    if src_index.device.type == "cpu" and src_index.numel():  # elsewhere a check would sync
        lo, hi = int(src_index.min()), int(src_index.max())
        if lo < 0 or hi >= x.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"simclr_views: src_index holds {bad}, not an image index in [0, {x.shape[0]})")
    oh, ow = _out_hw(out_hw)
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel must be a positive odd int, got {blur_kernel}")
    rad = blur_kernel // 2
    if rad >= min(oh, ow):
        raise ValueError(f"blur_kernel {blur_kernel} needs an output larger than {rad} pixels, got {oh}x{ow}")
    aug._resolve_select(select, x.device)
    return oh, ow


# ---------------------------------------------------------------------------------------------
# backends


def _reference(x, params, src_index, out_hw, blur_kernel=3, select="auto"):
    return _augment().apply_torch(x, params, src_index, _out_hw(out_hw), blur_kernel, select)


def _cpp(x, params, src_index, out_hw, blur_kernel=3, select="auto"):
    del select  # per-view kernel: nothing to select
    oh, ow = _out_hw(out_hw)
    cpu = torch.device("cpu")

    def get(key: str, dtype: torch.dtype) -> torch.Tensor:
        return params[key].to(device=cpu, dtype=dtype)  # no copy when already so

    return _native.extension().simclr_views_cpu(
        x,
        get("crop", torch.int64),
        get("flip", torch.bool),
        get("jitter", torch.bool),
        get("order", torch.int64),
        get("factors", torch.float32),
        get("gray", torch.bool),
        get("blur", torch.bool),
        get("sigma", torch.float32),
        src_index,
        oh,
        ow,
        int(blur_kernel),
    )


def _cpp_reasons(x, params, src_index, out_hw, blur_kernel=3, select="auto") -> list[str]:
    """Input conditions of the cpp backend beyond device and dtype."""
    reasons = []
    if isinstance(x, torch.Tensor) and x.requires_grad:
        reasons.append("x requires grad (the cpp backend is not differentiable: views are inputs)")
    return reasons


OP = register_op(
    FusedOp(
        name="simclr_views",
        summary="SimCLR views: crop-resize-flip, colour jitter, grayscale, blur in one pass per view",
    )
)
OP.register(
    Backend(
        name="reference",
        fn=_reference,
        devices=("cpu", "cuda", "mps", "xpu"),
        dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16),
    )
)
OP.register(
    Backend(
        name="cpp",
        fn=_cpp,
        devices=("cpu",),
        dtypes=(torch.float32,),
        availability=_native.cpp_reason,
        extra_check=_cpp_reasons,
    )
)


def simclr_views(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    src_index: torch.Tensor,
    out_hw: tuple[int, int],
    blur_kernel: int = 3,
    *,
    select: str = "auto",
    impl: str = "auto",
) -> torch.Tensor:
    """(N, 3, oh, ow) views in [-1, 1]; see the module docstring for the arguments.

    ``impl="auto"`` takes cpp for float32 CPU images when the extension is built, else
    reference; a forced backend that cannot run the inputs raises
    :class:`~mgm_fast.ops.BackendUnavailable` with why. Bad shapes, sizes or parameters raise
    ValueError before any backend runs (crop boxes outside the image: from the backend).
    """
    oh, ow = _validate(x, params, src_index, out_hw, blur_kernel, select)
    return OP(x, params, src_index, (oh, ow), blur_kernel, select=select, impl=impl)
