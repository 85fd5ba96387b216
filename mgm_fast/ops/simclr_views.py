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

The ``cpp`` kernel runs behind the custom op ``mgm_fast::simclr_views_cpp``
(:mod:`mgm_fast.ops._library`), so ``torch.compile`` traces through the op.

No autograd: the views are inputs of the encoder and no gradient flows back into the
augmentation, so the ``cpp`` backend is not differentiable. An ``x`` that requires grad goes
to ``reference`` under ``auto``; forcing ``cpp`` on it raises :class:`BackendUnavailable`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mgm_fast import _native
from mgm_fast.ops._dispatch import Backend, FusedOp, register_op, value_checks_enabled
from mgm_fast.ops._library import qualname

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
    if value_checks_enabled(src_index.device) and src_index.numel():  # a host read
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


@torch.library.custom_op(qualname("simclr_views_cpp"), mutates_args=())
def _cpp_op(
    x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, jitter: torch.Tensor, order: torch.Tensor,
    factors: torch.Tensor, gray: torch.Tensor, blur: torch.Tensor, sigma: torch.Tensor, src_index: torch.Tensor,
    out_height: int, out_width: int, blur_kernel: int,
) -> torch.Tensor:  # fmt: skip
    """(N, 3, oh, ow) contiguous views of x's dtype (the CPU kernel; parameters on the CPU). Not
    differentiable: no autograd formula (auto never sends an x that requires grad here)."""
    return _native.extension().simclr_views_cpu(
        x, crop, flip, jitter, order, factors, gray, blur, sigma, src_index, out_height, out_width, blur_kernel
    )


@_cpp_op.register_fake
def _(x, crop, flip, jitter, order, factors, gray, blur, sigma, src_index, out_height, out_width, blur_kernel):
    return x.new_empty((src_index.shape[0], 3, out_height, out_width))


def _cpp(x, params, src_index, out_hw, blur_kernel=3, select="auto"):
    del select  # per-view kernel: nothing to select
    oh, ow = _out_hw(out_hw)
    cpu = torch.device("cpu")

    def get(key: str, dtype: torch.dtype) -> torch.Tensor:
        return params[key].to(device=cpu, dtype=dtype)  # no copy when already so

    return _cpp_op(
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


# ---------------------------------------------------------------------------------------------
# float64 twin and self-test cases (mgm_fast.ops._selftest)


def simclr_views_float64(x, params, src_index, out_hw, blur_kernel=3, select="auto"):
    """The views of the module docstring one at a time in x's dtype, step by step as
    :func:`mgm_fast.data.augment.augment_reference` (which computes in float32): the float64
    truth of the self-test. Both fused and batched paths compute in float32."""
    del select
    aug = _augment()
    oh, ow = _out_hw(out_hw)
    p = {k: params[k].cpu() for k in aug.PARAM_KEYS}
    luma = torch.tensor(aug.GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
    taps = torch.arange(blur_kernel, dtype=x.dtype, device=x.device) - (blur_kernel - 1) / 2
    rad = blur_kernel // 2
    views = []
    for n, src in enumerate(src_index.tolist()):
        top, left, ch, cw = p["crop"][n].tolist()
        img = ((x[src] + 1) / 2).clamp(0, 1)[None, :, top : top + ch, left : left + cw]
        img = torch.nn.functional.interpolate(img, size=(oh, ow), mode="bilinear", align_corners=False)[0]
        if bool(p["flip"][n]):
            img = img.flip(-1)
        if bool(p["jitter"][n]):
            for op in p["order"][n].tolist():
                f = float(p["factors"][n, op])
                if op == aug.BRIGHTNESS:
                    img = (f * img).clamp(0, 1)
                elif op == aug.CONTRAST:
                    img = (f * img + (1 - f) * (luma * img).sum(0).mean()).clamp(0, 1)
                elif op == aug.SATURATION:
                    img = (f * img + (1 - f) * (luma * img).sum(0, keepdim=True)).clamp(0, 1)
                elif f != 0:
                    hsv = aug.rgb_to_hsv(img)
                    hsv = torch.stack((torch.remainder(hsv[0] + f, 1.0), hsv[1], hsv[2]))
                    img = aug.hsv_to_rgb(hsv).clamp(0, 1)
        if bool(p["gray"][n]):
            img = (luma * img).sum(0, keepdim=True).expand(3, -1, -1)
        if bool(p["blur"][n]):
            sigma = float(p["sigma"][n])
            k = torch.exp(-(taps * taps) / (2 * sigma * sigma))
            k = k / k.sum()
            padded = torch.nn.functional.pad(img[None], (rad, rad, rad, rad), mode="reflect")  # reflect-101
            img = torch.nn.functional.conv2d(padded, torch.outer(k, k).expand(3, 1, -1, -1), groups=3)[0]
        views.append((img * 2 - 1).clamp(-1, 1))
    return torch.stack(views) if views else x.new_empty(0, 3, oh, ow)


def _extreme_params(h, w):
    """Six views of two (h, w) images with edge parameters: one-pixel crops at opposite
    corners, a full-image crop, flips, hue +-0.5, zero factors, grayscale, sigma tiny / large."""
    crop = torch.tensor([[0, 0, 1, 1], [h - 1, w - 1, 1, 1], [0, 0, h, w], [1, 2, h - 1, w - 3],
                         [h - 2, 0, 2, w], [0, w - 2, h, 2]])  # fmt: skip
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 1, 2], [0, 2, 3, 1]])
    factors = torch.tensor([[1.8, 0.2, 1.8, 0.5], [0.0, 1.0, 1.0, -0.5], [1.2, 0.0, 0.0, 0.2],
                            [0.7, 1.8, 1.5, -0.2], [1.0, 1.0, 1.0, 0.5], [0.3, 1.9, 0.0, 0.0]])  # fmt: skip
    return {
        "crop": crop,
        "flip": torch.tensor([False, True, True, False, True, True]),
        "jitter": torch.tensor([True, True, True, True, True, False]),
        "order": order,
        "factors": factors,
        "gray": torch.tensor([False, False, False, True, False, True]),
        "blur": torch.tensor([True, False, True, True, True, True]),
        "sigma": torch.tensor([0.01, 1.0, 5.0, 0.3, 2.0, 1e-3]),
    }


def _selftest_cases():
    from mgm_fast.ops._selftest import Case, Inputs

    def make(b, h, w, out_hw, kernel, aug_args=None, extreme=False):
        def build(gen):
            aug = _augment()
            x = torch.rand(b, 3, h, w, generator=gen, dtype=torch.float64) * 2 - 1
            if extreme:
                params, src = _extreme_params(h, w), torch.tensor([0, 1, 1, 0, 0, 1])
                x[1, :, : h // 2] = x[1, :1, : h // 2]  # gray pixels: chroma 0 under the hue rotation
            else:  # two views of every image, as SimCLRAugment.two_views draws them
                a = aug.SimCLRAugment(**(aug_args or {}))
                p1, p2 = a.sample_params(b, h, w, gen), a.sample_params(b, h, w, gen)
                params = {k: torch.cat((p1[k], p2[k])) for k in aug.PARAM_KEYS}
                src = torch.arange(b).repeat(2)
            return Inputs(kwargs=dict(x=x, params=params, src_index=src, out_hw=out_hw, blur_kernel=kernel),
                          channels_last=("x",))  # fmt: skip

        return build

    specs = [  # name, size, (B, H, W), out_hw, blur kernel, SimCLRAugment arguments, extreme parameters
        ("b1 13x11 -> 9x15, two views, blur p 0.7", "small", (1, 13, 11), (9, 15), 3, dict(blur_p=0.7), False),
        ("b3 23x18 -> 23x18, every op on (jitter 1, gray 0.3, blur 0.7, hue 0.5), blur 5", "small",
         (3, 23, 18), (23, 18), 5, dict(jitter_p=1.0, gray_p=0.3, blur_p=0.7, hue=0.5), False),
        ("b2 17x9 -> 12x20, edge parameters (1-pixel crops, hue +-0.5, zero factors, sigma 1e-3..5)",
         "small", (2, 17, 9), (12, 20), 3, None, True),
        ("paper: b32 128x128, two views (64 views) 128x128, released augment (blur 3)", "paper",
         (32, 128, 128), (128, 128), 3, None, False),
    ]  # fmt: skip
    # No gradients (no autograd: views are inputs). The params dict passes through the self-test
    # untouched (int64 / bool / float32 CPU tensors, as drawn; the backends move them).
    return [Case("simclr_views", name, size, make(*dims, out_hw, k, args, ext), truth=simclr_views_float64)
            for name, size, dims, out_hw, k, args, ext in specs]  # fmt: skip


OP.selftest_cases = _selftest_cases
