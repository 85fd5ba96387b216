"""Batched, on-device SimCLR views (docs/method.md section 1.2).

Each view of each image goes through, with its own random parameters:

1. RandomResizedCrop to ``out_size`` (default: the input size): scale (0.08, 1), ratio
   (3/4, 4/3), bilinear;
2. horizontal flip with p = 0.5;
3. ColorJitter(brightness 0.8, contrast 0.8, saturation 0.8, hue 0.2) with p = 0.8, the four
   ops in a random order per sample;
4. RandomGrayscale with p = 0.2;
5. Gaussian blur with p = 0.5: a ``blur_kernel`` x ``blur_kernel`` kernel (released code: 3),
   sigma ~ U[blur_sigma] (released code: [0.01, 1.0]; SimCLR's own recipe is a kernel of ~10% of
   the image and sigma in [0.1, 2.0]).

Images come in and go out as float (B, 3, H, W) tensors in [-1, 1]; the work is done in float32
on [0, 1] values. The whole batch is processed at once on the images' device: parameters are
drawn for all samples by :meth:`SimCLRAugment.sample_params` and applied by
:meth:`SimCLRAugment.apply`, which has no per-sample Python loop. Applying goes through the op
:func:`mgm_fast.ops.simclr_views`: its ``reference`` backend is the batched torch path of this
module (:func:`apply_torch`, any device), its ``cpp`` backend a fused C++ kernel for float32
CPU images with the same semantics (``SimCLRAugment.impl`` picks; "auto" takes cpp when the
extension is built).

Not reproduced: the released code's double scaling (docs/method.md B1) -- it mapped [-1, 1]
images to [0, 255] floats and handed them to ``ToPILImage``, which multiplied by 255 again and
wrapped around in uint8, so its "views" were corrupted images. Here the pipeline sees the image
itself.

Random numbers
--------------
All parameters come from one ``torch.rand`` call of shape (N, 35) in float64 on the generator's
device (a CPU ``torch.Generator``, or one on the images' device to avoid a host-to-device copy);
they are then moved to the requested device. The same generator seed on the same generator
device gives the same parameters, hence the same views (up to floating-point differences
between devices). Row n of that draw holds every number of sample n, so a sample's parameters
do not depend on the batch size.

Semantics and known differences from torchvision
------------------------------------------------
* Crop sampling follows torchvision: 10 attempts of (area ~ U[scale] * H * W,
  log-ratio ~ U[log ratio]), width/height rounded half-to-even, first attempt that fits; else a
  centre crop clamped to the ratio bounds. All 10 attempts are drawn at once for every sample
  and the first valid one is taken (same distribution, fixed consumption of random numbers).
  The offset is uniform over the valid positions.
* Resampling is ``F.interpolate(bilinear, align_corners=False, antialias=False)`` of the integer
  crop box, implemented as two separable passes (exact up to float rounding). With the default
  ``out_size`` the crop is never larger than the output, so every crop is an upsampling and
  antialiasing would change nothing; with a smaller ``out_size`` this path does not antialias,
  whereas PIL's bilinear (used by the released code) does.
* The flip is folded into the column indices of the resampling.
* ColorJitter uses torchvision's float-tensor formulas: brightness ``clamp(f x)``; contrast
  ``clamp(f x + (1 - f) mean(gray(x)))``; saturation ``clamp(f x + (1 - f) gray(x))``; hue
  rotates H in HSV by ``h`` turns. A hue factor of exactly 0 skips the op (as torchvision does
  when hue is disabled). Unlike PIL there is no uint8 rounding between ops, and contrast uses
  the exact float mean rather than PIL's rounded integer mean.
* Grayscale uses the ITU-R 601-2 luma weights 0.299 / 0.587 / 0.114 (PIL's ``L`` mode;
  torchvision's tensor path uses 0.2989) everywhere, including contrast and saturation.
* Blur: separable normalised Gaussian ``exp(-t^2 / (2 sigma^2))`` with OpenCV's
  BORDER_REFLECT_101 borders (``F.pad(mode="reflect")``), applied as shifted multiply-adds per
  sample -- the same arithmetic as a grouped depthwise conv with one group per (sample,
  channel), which PyTorch's CPU conv runs several times slower.

Selecting samples
-----------------
Ops applied with a probability (jitter's hue step, grayscale, blur) act on a subset of the
batch. ``select="index"`` gathers that subset (``nonzero`` + ``index_select`` /
``index_copy_``): least work, but ``nonzero`` waits for the device, so it is the CPU default.
``select="where"`` computes the op for the whole batch and keeps it with ``torch.where`` (or
identity parameters): more arithmetic, no host synchronisation, the default on accelerators.
Both give the same result.

CPU cost
--------
The torch path is memory-bound float32 arithmetic, about forty passes over the batch per call
(four jitter rounds, each a fused blend plus a clamp; the hue rotation; the blur; two
transposes around the separable resampling). On CPU the "index" path therefore writes its
intermediates into per-thread scratch buffers that are reused from call to call (fresh
multi-megabyte tensors cost page faults that can exceed the arithmetic done in them); they hold
a few times the size of a batch of views and :func:`clear_workspace` frees them. The fused C++
kernel (csrc/kernels/cpu/simclr_views.*) does all steps of one view in a cache-resident buffer,
reading the source once and writing the output once, about 5x faster than the torch path and
20x faster than :func:`pil_views` at batch 32, 128 x 128 on 2 cores. Outputs are always fresh
tensors. ``benchmarks/test_bench_augment.py`` compares views/s of the three.

Also here: :func:`augment_reference`, a per-sample, per-op twin in plain torch used by the
tests, and :func:`pil_views`, the released code's per-sample uint8 pipeline (PIL, OpenCV-style
blur): the reference engine's view path and the speed baseline, equal to the batched views up to
its 8-bit arithmetic (bounded step by step in ``tests/data/test_views_per_sample.py``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from mgm_fast.ops._dispatch import BACKEND_NAMES
from mgm_fast.ops.simclr_views import simclr_views

Params = dict[str, torch.Tensor]

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights (R, G, B)."""
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
CROP_ATTEMPTS = 10
SELECT_MODES = ("auto", "index", "where")
PARAM_KEYS = ("crop", "flip", "jitter", "order", "factors", "gray", "blur", "sigma")
"""Keys of a parameter dict, for a batch of N views:

* ``crop``: (N, 4) int64 -- top, left, height, width of the crop box in input pixels;
* ``flip``: (N,) bool -- flip horizontally after the crop;
* ``jitter``: (N,) bool -- apply ColorJitter;
* ``order``: (N, 4) int64 -- a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE);
* ``factors``: (N, 4) float32 -- brightness, contrast, saturation factors and hue shift in turns;
* ``gray``: (N,) bool -- convert to grayscale;
* ``blur``: (N,) bool -- blur;
* ``sigma``: (N,) float32 -- blur sigma in pixels.
"""
_N_UNIFORMS = 2 * CROP_ATTEMPTS + 2 + 1 + 1 + 4 + 4 + 1 + 1 + 1


def _jitter_range(
    value: float | tuple[float, float], name: str, center: float, bound: float
) -> tuple[float, float]:
    """torchvision's ColorJitter argument convention: a number v means [center - v, center + v]
    (clipped to >= 0 for the multiplicative factors), a pair is the range itself."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        lo, hi = center - value, center + value
        if center == 1.0:
            lo = max(lo, 0.0)
    else:
        lo, hi = (float(v) for v in value)
    if not (-bound <= lo <= hi <= bound) or (center == 1.0 and lo < 0):
        raise ValueError(f"{name} range must satisfy lo <= hi within the valid bounds, got {value}")
    return float(lo), float(hi)


def _check_prob(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def _check_images(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a float tensor of shape (B, 3, H, W) in [-1, 1], got {got}")


def _check_params(params: Mapping[str, torch.Tensor], n: int) -> None:
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"augment params: missing keys {missing} (expected {list(PARAM_KEYS)})")
    shapes = {"crop": (n, 4), "order": (n, 4), "factors": (n, 4)}
    for key in PARAM_KEYS:
        want = shapes.get(key, (n,))
        if tuple(params[key].shape) != want:
            raise ValueError(
                f"augment params['{key}']: expected shape {want}, got {tuple(params[key].shape)}"
            )


def _resolve_select(select: str, device: torch.device) -> str:
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
    if select == "auto":
        return "index" if device.type == "cpu" else "where"
    return select


def params_for_sample(params: Mapping[str, torch.Tensor], index: int) -> Params:
    """The parameters of one sample: each tensor indexed at ``index`` along dim 0."""
    return {key: value[index] for key, value in params.items()}


def identity_params(batch: int, height: int, width: int, device: torch.device | str | None = None) -> Params:
    """Parameters under which every step is the identity (full-image crop, nothing applied).
    With ``out_size`` equal to the input size, :meth:`SimCLRAugment.apply` returns the input."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    crop = torch.tensor([0, 0, height, width], dtype=torch.int64, device=dev).repeat(batch, 1)
    false = torch.zeros(batch, dtype=torch.bool, device=dev)
    return {
        "crop": crop,
        "flip": false.clone(),
        "jitter": false.clone(),
        "order": torch.arange(4, device=dev).repeat(batch, 1),
        "factors": torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev).repeat(batch, 1),
        "gray": false.clone(),
        "blur": false.clone(),
        "sigma": torch.ones(batch, device=dev),
    }


def gaussian_kernel1d(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, OpenCV's formula for an explicit sigma.

    Args:
        sigma: (N,) float, > 0.
        size: odd kernel length.
    Returns:
        (N, size) float32, each row summing to 1 (computed in float64, so a tiny sigma gives an
        exact [0, ..., 1, ..., 0]).
    """
    t = torch.arange(size, dtype=torch.float64, device=sigma.device) - (size - 1) / 2
    s = sigma.to(torch.float64)[:, None]
    k = torch.exp(-(t * t) / (2.0 * s * s))
    return (k / k.sum(1, keepdim=True)).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Batched fast path
# ---------------------------------------------------------------------------------------------
class _Workspace:
    """Scratch tensors reused from call to call, one set per thread.

    On CPU every fresh multi-megabyte tensor costs page faults (the allocator returns large
    blocks to the OS and takes them back), which can cost more than the arithmetic done in it;
    so the CPU path writes its intermediates into these buffers with in-place / ``out=`` ops.
    Buffers only grow (a request is a view of the first ``numel`` elements). On other devices
    fresh tensors are returned: their caching allocators already reuse memory.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=torch.float32, device=like.device)
        bufs = self._local.__dict__.setdefault("bufs", {})
        numel = math.prod(shape)
        buf = bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = bufs[name] = torch.empty(numel, dtype=torch.float32)
        return buf[:numel].view(shape)

    def clear(self) -> None:
        self._local.__dict__.pop("bufs", None)


_WORKSPACE = _Workspace()


def clear_workspace() -> None:
    """Free this thread's CPU scratch buffers (they are re-created on the next call)."""
    _WORKSPACE.clear()


def _bilinear_taps(start: torch.Tensor, length: torch.Tensor, out_len: int):
    """Source indices and weights of a bilinear resize (align_corners=False) of the window
    ``[start, start + length)`` to ``out_len`` samples, with torch's float32 arithmetic.

    Args:
        start, length: (N,) int64.
    Returns:
        i0, i1: (N, out_len) int64 absolute indices; lam: (N, out_len) float32 weight of i1.
    """
    dst = torch.arange(out_len, device=start.device, dtype=torch.float32) + 0.5
    scale = length.to(torch.float32) / out_len
    src = (scale[:, None] * dst - 0.5).clamp_min_(0.0)
    i0 = src.to(torch.int64)  # truncation is floor here: src >= 0
    lam = (src - i0).clamp_(0.0, 1.0)
    last = (length - 1)[:, None]
    i0 = torch.minimum(i0, last)
    i1 = torch.minimum(i0 + 1, last)  # the window's last row is repeated, never a row outside it
    return start[:, None] + i0, start[:, None] + i1, lam


def _pairs(base: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor, lam: torch.Tensor):
    """embedding_bag inputs for rows ``base[n, c] + i{0,1}[n, l]`` weighted (1 - lam, lam).
    base: (N, C); i0, i1, lam: (N, L). Returns indices (N*C*L, 2) and weights (N*C*L, 2)."""
    n, c = base.shape
    idx = torch.stack((base[:, :, None] + i0[:, None, :], base[:, :, None] + i1[:, None, :]), dim=-1)
    wts = torch.stack((1.0 - lam, lam), dim=-1)[:, None].expand(n, c, -1, 2)
    return idx.reshape(-1, 2), wts.reshape(-1, 2)


def _crop_resize_flip(x: torch.Tensor, src: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, out_hw):
    """Crop, resize and flip every view; also maps [-1, 1] to [0, 1].

    Args:
        x: (B, 3, H, W) float images in [-1, 1].
        src: (N,) int64 -- the image of ``x`` that view n reads (two views can share one image).
        crop: (N, 4) int64; flip: (N,) bool.
    Returns:
        (N, 3, oh, ow) float32, contiguous, in [0, 1] (a new tensor).

    Bilinear is separable: a column pass then a row pass, each a weighted sum of two rows done by
    ``F.embedding_bag`` (one fused gather + lerp, exact 1 * a + 0 * b for an identity resize).
    The columns of the input are rows of its transpose, so the (small) input is transposed once
    on the way in (then mapped to [0, 1] in place) and the intermediate once between the passes.
    """
    b, c, h, w = x.shape
    n = crop.shape[0]
    oh, ow = out_hw
    top, left, ch, cw = crop.unbind(1)
    y0, y1, ly = _bilinear_taps(top, ch, oh)
    x0, x1, lx = _bilinear_taps(left, cw, ow)
    f = flip[:, None]
    x0, x1, lx = (torch.where(f, t.flip(1), t) for t in (x0, x1, lx))
    chans = torch.arange(c, device=x.device)

    xt = _WORKSPACE.get("crop.xt", (b, c, w, h), x)
    xt.copy_(x.transpose(2, 3)).mul_(0.5).add_(0.5).clamp_(0.0, 1.0)
    idx, wts = _pairs((src[:, None] * c + chans) * w, x0, x1, lx)
    cols = F.embedding_bag(idx, xt.view(-1, h), per_sample_weights=wts, mode="sum")  # (N*C*ow, H)

    rows = _WORKSPACE.get("crop.rows", (n, c, h, ow), x)
    rows.copy_(cols.view(n, c, ow, h).transpose(2, 3))
    del cols
    idx, wts = _pairs((torch.arange(n, device=x.device)[:, None] * c + chans) * h, y0, y1, ly)
    out = F.embedding_bag(idx, rows.view(-1, ow), per_sample_weights=wts, mode="sum")  # (N*C*oh, ow)
    return out.view(n, c, oh, ow)


def _luma_into(out: torch.Tensor, img: torch.Tensor, coef: torch.Tensor | None = None, shift=None):
    """``out = coef . (R, G, B) + shift`` per pixel; img (N, 3, H, W), out (N, H, W).
    coef: (N, 3) per-sample channel weights (default: the luma weights); shift: (N,) or None."""
    r, g, b = img.unbind(1)
    if coef is None:
        torch.mul(r, GRAY_WEIGHTS[0], out=out)
        out.add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])
    else:
        k = coef.view(-1, 3, 1, 1).unbind(1)
        torch.mul(r, k[0], out=out)
        out.addcmul_(g, k[1]).addcmul_(b, k[2])
    if shift is not None:
        out.add_(shift.view(-1, 1, 1))
    return out


def _hue_rotate_(img: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of every pixel by ``shift`` turns, in place.

    img: (N, 3, H, W) float32 in [0, 1]; shift: (N,).

    With max M, min m, chroma C = M - m and hue h in sextants [0, 6) (0 red, 2 green, 4 blue),
    HSV -> RGB is ``m + C * clamp(2 - d_k, 0, 1)`` where d_k is the circular distance from h to
    channel k's hue; S and V, hence m and C, do not change under a rotation. The dominant channel
    is selected with 0/1 masks ``sign(x - M) + 1`` (exact products, and much faster on CPU than
    comparisons + ``where``); R wins ties, then G, like the usual definition.
    """
    n, _, hgt, wid = img.shape
    plane = lambda name: _WORKSPACE.get("hue." + name, (n, hgt, wid), img)  # noqa: E731
    r, g, b = img.unbind(1)
    maxc, minc, chroma, inv = plane("max"), plane("min"), plane("chroma"), plane("inv")
    is_r, is_g, hue, t1, t2 = plane("is_r"), plane("is_g"), plane("hue"), plane("t1"), plane("t2")
    torch.maximum(r, g, out=maxc)
    torch.maximum(maxc, b, out=maxc)
    torch.minimum(r, g, out=minc)
    torch.minimum(minc, b, out=minc)
    torch.sub(maxc, minc, out=chroma)
    torch.clamp(chroma, min=1e-30, out=inv).reciprocal_()  # grays: numerator 0, so h = 0
    torch.sub(r, maxc, out=is_r).sign_().add_(1.0)
    torch.sub(g, maxc, out=is_g).sign_().add_(1.0)
    is_g.addcmul_(is_g, is_r, value=-1.0)
    # h = [is_r (g - b) + is_g (b - r) + is_b (r - g)] / C + 2 is_g + 4 is_b, with
    # is_b = 1 - is_r - is_g folded in:  (r - g) + is_r (2g - b - r) + is_g (b + g - 2r) ...
    torch.sub(r, g, out=hue)
    torch.sub(g, b, out=t1).sub_(hue)
    torch.sub(b, r, out=t2).sub_(hue)
    hue.addcmul_(is_r, t1).addcmul_(is_g, t2).mul_(inv)
    # ... + 4 - 4 is_r - 2 is_g, then the rotation, then wrap into [0, 6)
    hue.add_(is_r, alpha=-4.0).add_(is_g, alpha=-2.0).add_((4.0 + 6.0 * shift).view(-1, 1, 1))
    torch.div(hue, 6.0, out=t1).floor_()
    hue.sub_(t1, alpha=6.0)
    # channel = m + C * (2 - clamp(d, 1, 2)) = (m + 2C) - C * clamp(d, 1, 2)
    torch.add(minc, chroma, alpha=2.0, out=t2)
    torch.mul(hue, -1.0, out=t1).add_(6.0)
    torch.minimum(t1, hue, out=t1).clamp_(1.0, 2.0)  # circular distance to red (0)
    torch.addcmul(t2, chroma, t1, value=-1.0, out=r)
    for center, out in ((2.0, g), (4.0, b)):
        # |h - c| is the circular distance to c whenever it is < 2, and >= 2 otherwise
        torch.sub(hue, center, out=t1).abs_().clamp_(1.0, 2.0)
        torch.addcmul(t2, chroma, t1, value=-1.0, out=out)
    return img


def _select_apply_(img: torch.Tensor, mask: torch.Tensor, fn, mode: str, name: str) -> torch.Tensor:
    """Replace the samples of ``img`` selected by ``mask`` by ``fn(subset, index)``, in place.

    fn(sub, index) may modify ``sub`` (a copy) and returns the new values; index is the (k,)
    int64 positions ("index" mode) or None with sub = a copy of the whole batch ("where" mode).
    """
    if mode == "index":
        sel = mask.nonzero().squeeze(1)
        if sel.numel() == 0:
            return img
        sub = _WORKSPACE.get(name, (sel.numel(), *img.shape[1:]), img)
        torch.index_select(img, 0, sel, out=sub)
        return img.index_copy_(0, sel, fn(sub, sel))
    new = fn(img.clone(), None)
    return torch.where(mask.view(-1, 1, 1, 1), new, img, out=img)


def _color_jitter_(
    img: torch.Tensor, apply: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, mode: str
):
    """ColorJitter in place, in four rounds: in round r every sample applies its r-th op.

    Brightness, contrast and saturation are all ``clamp(a x + s)`` with the plane
    ``s = b gray(x) + c`` and per-sample (a, b, c) = (f, 0, 0), (f, 0, (1 - f) mean gray),
    (f, 1 - f, 0); a sample whose r-th op is the hue, or that skips jitter, gets (1, 0, 0), an
    exact identity. So one pass serves the whole batch; then the hue rotation runs on the samples
    whose r-th op it is.
    """
    if mode == "index" and not bool(apply.any()):
        return img
    n, _, hgt, wid = img.shape
    w = torch.tensor(GRAY_WEIGHTS, device=img.device, dtype=torch.float32)
    one, zero = torch.ones_like(factors[:, 0]), torch.zeros_like(factors[:, 0])
    for r in range(4):
        op = order[:, r]
        f = factors.gather(1, op[:, None])[:, 0]
        blend = apply & (op != HUE)
        alpha = torch.where(blend, f, one)
        beta = torch.where(blend & (op == SATURATION), 1.0 - f, zero)
        is_contrast = blend & (op == CONTRAST)
        # The host checks skip work no sample needs this round; "where" mode never syncs.
        need_mean = mode != "index" or bool(is_contrast.any())
        need_plane = need_mean or mode != "index" or bool((beta != 0).any())
        if need_plane:
            gamma = torch.where(is_contrast, 1.0 - f, zero)
            if need_mean:  # (1 - f) * mean(gray), per sample
                gamma = gamma * (img.view(n, 3, hgt * wid).mean(dim=2) @ w)
            plane = _WORKSPACE.get("jitter.plane", (n, 1, hgt, wid), img)
            _luma_into(plane[:, 0], img, beta[:, None] * w, gamma)
            torch.addcmul(plane, img, alpha.view(n, 1, 1, 1), out=img)
        else:
            img.mul_(alpha.view(n, 1, 1, 1))
        img.clamp_(0.0, 1.0)

        hue = apply & (op == HUE) & (f != 0)
        if mode != "index" or bool(hue.any()):
            _select_apply_(
                img,
                hue,
                lambda sub, sel: _hue_rotate_(sub, f if sel is None else f.index_select(0, sel)),  # noqa: B023
                mode,
                "jitter.hue",
            )
    return img


def _grayscale_(img: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Replace the selected samples by their luma replicated on 3 channels, in place."""

    def gray(sub, _sel):
        luma = _luma_into(_WORKSPACE.get("gray.luma", sub.shape[:1] + sub.shape[2:], sub), sub)
        return sub.copy_(luma.unsqueeze(1).expand_as(sub))

    return _select_apply_(img, mask, gray, mode, "gray.sub")


def _blur_separable_(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-sample separable symmetric blur with reflect-101 borders, in place.

    img: (N, 3, H, W) float32; kernel: (N, K) float32, odd K, symmetric (k[r - d] == k[r + d]).
    Equivalent to a depthwise conv with one group per (sample, channel) on an
    ``F.pad(mode="reflect")`` input, written as shifted multiply-adds into reused buffers.
    """
    n, c, h, w = img.shape
    rad = kernel.shape[1] // 2
    k = kernel.view(n, 1, 1, 1, -1).unbind(-1)
    if rad == 0:
        return img.mul_(k[0])
    pad = _WORKSPACE.get("blur.pad", (n, c, h + 2 * rad, w + 2 * rad), img)
    pad[:, :, rad : rad + h, rad : rad + w].copy_(img)
    for d in range(1, rad + 1):  # reflect-101: row -d is row d, row h - 1 + d is row h - 1 - d
        pad[:, :, rad - d, rad : rad + w].copy_(img[:, :, d])
        pad[:, :, rad + h - 1 + d, rad : rad + w].copy_(img[:, :, h - 1 - d])
    for d in range(1, rad + 1):
        pad[..., rad - d].copy_(pad[..., rad + d])
        pad[..., rad + w - 1 + d].copy_(pad[..., rad + w - 1 - d])
    rows = _WORKSPACE.get("blur.rows", (n, c, h, w + 2 * rad), img)
    torch.mul(pad[:, :, rad : rad + h], k[rad], out=rows)
    for d in range(1, rad + 1):
        rows.addcmul_(pad[:, :, rad - d : rad - d + h], k[rad + d]).addcmul_(
            pad[:, :, rad + d : rad + d + h], k[rad + d]
        )
    torch.mul(rows[..., rad : rad + w], k[rad], out=img)
    for d in range(1, rad + 1):
        img.addcmul_(rows[..., rad - d : rad - d + w], k[rad + d]).addcmul_(
            rows[..., rad + d : rad + d + w], k[rad + d]
        )
    return img


def _gaussian_blur_(img: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor, size: int, mode: str):
    """Blur the selected samples in place."""
    if mode == "index":
        return _select_apply_(
            img,
            mask,
            lambda sub, sel: _blur_separable_(sub, gaussian_kernel1d(sigma[sel], size)),
            mode,
            "blur.sub",
        )
    # Unselected samples get the kernel [0, .., 1, .., 0]: 1 * x + 0 * (...) is exactly x.
    delta = torch.zeros(size, device=img.device)
    delta[size // 2] = 1.0
    return _blur_separable_(img, torch.where(mask[:, None], gaussian_kernel1d(sigma, size), delta))


def apply_torch(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    src_index: torch.Tensor,
    out_hw: tuple[int, int],
    blur_kernel: int = 3,
    select: str = "auto",
) -> torch.Tensor:
    """The batched torch path: one view of ``x[src_index[n]]`` per parameter row n.

    The ``reference`` backend of :func:`mgm_fast.ops.simclr_views` (the ``cpp`` backend
    reproduces it up to float rounding); any device and float dtype.

    Args:
        x: (B, 3, H, W) float in [-1, 1].
        params: N views' parameters (:data:`PARAM_KEYS`), moved to ``x.device`` if needed.
        src_index: (N,) int64 on ``x.device``, the image of each view.
        out_hw: (oh, ow).
        blur_kernel: odd kernel size, ``blur_kernel // 2 < min(oh, ow)``.
        select: "auto", "index" or "where" (see the module docstring).
    Returns:
        (N, 3, oh, ow) tensor of ``x.dtype`` in [-1, 1].
    """
    mode = _resolve_select(select, x.device)
    oh, ow = out_hw
    rad = blur_kernel // 2
    if rad >= min(oh, ow):
        raise ValueError(f"blur_kernel {blur_kernel} needs an output larger than {rad} pixels, got {oh}x{ow}")
    p = {k: params[k].to(x.device) for k in PARAM_KEYS}
    if p["crop"].device.type == "cpu":  # a bounds check would cost a device sync elsewhere
        _check_crop(p["crop"], x.shape[2], x.shape[3])
    img = _crop_resize_flip(x, src_index, p["crop"], p["flip"], (oh, ow))
    _color_jitter_(img, p["jitter"], p["order"], p["factors"].to(torch.float32), mode)
    _grayscale_(img, p["gray"], mode)
    _gaussian_blur_(img, p["blur"], p["sigma"], blur_kernel, mode)
    img.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)
    return img.to(x.dtype)


@dataclass
class SimCLRAugment:
    """SimCLR view generator (see the module docstring for the steps and their semantics).

    ``brightness``/``contrast``/``saturation`` follow torchvision: a number v gives factors in
    [max(0, 1 - v), 1 + v], a pair is the range; ``hue`` h gives shifts in [-h, h] turns
    (h <= 0.5). ``out_size`` is an int (square) or (height, width); None keeps the input size.
    ``impl`` is the backend of :func:`mgm_fast.ops.simclr_views` that applies the parameters:
    "auto" (the fused C++ kernel for float32 CPU images when the extension is built, else the
    batched torch path), "cpp" or "reference" (:func:`apply_torch`).
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float | tuple[float, float] = 0.8
    contrast: float | tuple[float, float] = 0.8
    saturation: float | tuple[float, float] = 0.8
    hue: float | tuple[float, float] = 0.2
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.01, 1.0)
    out_size: int | tuple[int, int] | None = None
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.impl != "auto" and self.impl not in BACKEND_NAMES:
            raise ValueError(f"impl must be 'auto' or one of {list(BACKEND_NAMES)}, got {self.impl!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            _check_prob(getattr(self, name), name)
        self._ranges = [
            _jitter_range(self.brightness, "brightness", 1.0, math.inf),
            _jitter_range(self.contrast, "contrast", 1.0, math.inf),
            _jitter_range(self.saturation, "saturation", 1.0, math.inf),
            _jitter_range(self.hue, "hue", 0.0, 0.5),
        ]
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd int, got {self.blur_kernel}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if self.out_size is not None:
            size = (self.out_size, self.out_size) if isinstance(self.out_size, int) else tuple(self.out_size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"out_size must be a positive int or (height, width), got {self.out_size}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.out_size is None:
            return height, width
        if isinstance(self.out_size, int):
            return self.out_size, self.out_size
        return int(self.out_size[0]), int(self.out_size[1])

    # -- parameters -----------------------------------------------------------------------------
    def sample_params(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Params:
        """Draw the parameters of ``batch`` views of (height x width) images.

        Random numbers are drawn on the generator's device (the default CPU generator when None)
        and the result is moved to ``device`` (default: the generator's device). See
        :data:`PARAM_KEYS` for the keys, shapes and dtypes.
        """
        gdev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((batch, _N_UNIFORMS), generator=generator, device=gdev, dtype=torch.float64)
        cols = iter(torch.split(u, [CROP_ATTEMPTS, CROP_ATTEMPTS, 1, 1, 1, 1, 4, 4, 1, 1, 1], dim=1))

        # RandomResizedCrop: 10 attempts per sample at once; the first that fits wins.
        area = float(height * width)
        s_lo, s_hi = self.crop_scale
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        target = area * (s_lo + (s_hi - s_lo) * next(cols))
        aspect = torch.exp(log_lo + (log_hi - log_lo) * next(cols))
        cw = torch.round(torch.sqrt(target * aspect))  # half-to-even, like Python's round
        ch = torch.round(torch.sqrt(target / aspect))
        fits = (cw >= 1) & (cw <= width) & (ch >= 1) & (ch <= height)
        first = fits.to(torch.int8).argmax(1, keepdim=True)  # index of the first True
        found = fits.any(1)
        fb_h, fb_w = self._fallback_crop(height, width)
        ch = torch.where(found, ch.gather(1, first)[:, 0], float(fb_h))
        cw = torch.where(found, cw.gather(1, first)[:, 0], float(fb_w))
        u_top, u_left = next(cols)[:, 0], next(cols)[:, 0]
        top = torch.minimum(torch.floor(u_top * (height - ch + 1)), height - ch)
        left = torch.minimum(torch.floor(u_left * (width - cw + 1)), width - cw)
        top = torch.where(found, top, torch.div(height - ch, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(width - cw, 2, rounding_mode="floor"))
        crop = torch.stack((top, left, ch, cw), dim=1).to(torch.int64)

        flip = next(cols)[:, 0] < self.flip_p
        jitter = next(cols)[:, 0] < self.jitter_p
        order = torch.argsort(next(cols), dim=1)  # a uniform random permutation per sample
        lo = torch.tensor([r[0] for r in self._ranges], dtype=torch.float64, device=gdev)
        hi = torch.tensor([r[1] for r in self._ranges], dtype=torch.float64, device=gdev)
        factors = (lo + (hi - lo) * next(cols)).to(torch.float32)
        gray = next(cols)[:, 0] < self.gray_p
        blur = next(cols)[:, 0] < self.blur_p
        b_lo, b_hi = self.blur_sigma
        sigma = (b_lo + (b_hi - b_lo) * next(cols)[:, 0]).to(torch.float32)
        out = {
            "crop": crop,
            "flip": flip,
            "jitter": jitter,
            "order": order,
            "factors": factors,
            "gray": gray,
            "blur": blur,
            "sigma": sigma,
        }
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def _fallback_crop(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's fallback: the whole image, clamped to the ratio bounds (h, w)."""
        in_ratio = width / height
        lo, hi = self.crop_ratio
        if in_ratio < lo:
            return round(width / lo), width
        if in_ratio > hi:
            return height, round(height * hi)
        return height, width

    # -- application ----------------------------------------------------------------------------
    def apply(
        self, x: torch.Tensor, params: Mapping[str, torch.Tensor], select: str = "auto"
    ) -> torch.Tensor:
        """One view of each image with the given parameters (batch size N = B).

        Args:
            x: (B, 3, H, W) float in [-1, 1], any device.
            params: from :meth:`sample_params` (moved to ``x.device`` if needed).
            select: "auto", "index" or "where" (see the module docstring); only the torch path
                uses it, the fused C++ kernel has no subsets to select.
        Returns:
            (B, 3, oh, ow) tensor of ``x.dtype`` in [-1, 1].
        """
        _check_images(x)
        _check_params(params, x.shape[0])
        return self._apply(x, params, torch.arange(x.shape[0], device=x.device), select)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, select: str = "auto"):
        """One random view of each image."""
        _check_images(x)
        return self.apply(
            x, self.sample_params(x.shape[0], x.shape[2], x.shape[3], generator, x.device), select
        )

    def two_views(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        select: str = "auto",
        return_params: bool = False,
    ):
        """Two independent views of every image, made in one batched pass.

        The parameters of view 1 are drawn first, then those of view 2, so
        ``sample_params`` twice with the same generator state reproduces them.

        Returns:
            (v1, v2), each (B, 3, oh, ow) in [-1, 1]; with ``return_params`` also (p1, p2).
        """
        _check_images(x)
        b, _, h, w = x.shape
        p1 = self.sample_params(b, h, w, generator, x.device)
        p2 = self.sample_params(b, h, w, generator, x.device)
        both = {k: torch.cat((p1[k], p2[k])) for k in PARAM_KEYS}
        out = self._apply(x, both, torch.arange(b, device=x.device).repeat(2), select)
        views = (out[:b], out[b:])
        return (*views, p1, p2) if return_params else views

    def two_views_per_sample(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Two views made the released way: the images copied to the CPU and augmented one at
        a time with PIL (:func:`pil_views`), then copied back to ``x``'s device. The parameters
        are drawn exactly as in :meth:`two_views` (same generator, same order), so the two
        differ only by the released pipeline's 8-bit arithmetic (see :func:`pil_views`); this
        is the reference engine's view path and speed baseline.

        Returns:
            (v1, v2), each (B, 3, oh, ow) float32 in [-1, 1] on ``x``'s device.
        """
        _check_images(x)
        b, _, h, w = x.shape
        cpu = x.detach().to("cpu")
        p1 = self.sample_params(b, h, w, generator, "cpu")
        p2 = self.sample_params(b, h, w, generator, "cpu")
        return tuple(self.apply_pil(cpu, p).to(x.device) for p in (p1, p2))

    def _apply(self, x: torch.Tensor, params: Mapping[str, torch.Tensor], src: torch.Tensor, select: str):
        """Views of ``x[src[n]]`` through :func:`mgm_fast.ops.simclr_views` with ``self.impl``."""
        return simclr_views(
            x,
            params,
            src,
            self.output_size(x.shape[2], x.shape[3]),
            self.blur_kernel,
            select=select,
            impl=self.impl,
        )

    # -- twins ----------------------------------------------------------------------------------
    def reference(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:func:`augment_reference` with this configuration's output size and blur kernel."""
        return augment_reference(x, params, self.output_size(x.shape[-2], x.shape[-1]), self.blur_kernel)

    def apply_pil(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:func:`pil_views` with this configuration's output size and blur kernel."""
        return pil_views(x, params, self.output_size(x.shape[2], x.shape[3]), self.blur_kernel)


def _check_crop(crop: torch.Tensor, height: int, width: int) -> None:
    top, left, ch, cw = crop.unbind(1)
    bad = (top < 0) | (left < 0) | (ch < 1) | (cw < 1) | (top + ch > height) | (left + cw > width)
    if bool(bad.any()):
        n = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"augment params['crop'][{n}] = {crop[n].tolist()} (top, left, height, width) "
            f"is not inside a {height}x{width} image"
        )


# ---------------------------------------------------------------------------------------------
# Per-sample reference twin
# ---------------------------------------------------------------------------------------------
def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV with H in [0, 1) turns, S and V in [0, 1].
    Textbook formulas; H = S = 0 for grays."""
    r, g, b = rgb.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    cs = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(
        v == r,
        torch.remainder((g - b) / cs, 6.0),
        torch.where(v == g, (b - r) / cs + 2.0, (r - g) / cs + 4.0),
    )
    h = torch.where(c > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack((h, s, v), dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` by the six-sector table (p, q, t construction)."""
    h, s, v = hsv.unbind(-3)
    h6 = torch.remainder(h, 1.0) * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = sector.to(torch.int64) % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * frac)
    t = v * (1.0 - s * (1.0 - frac))
    table = {
        0: (v, t, p),
        1: (q, v, p),
        2: (p, v, t),
        3: (p, q, v),
        4: (t, p, v),
        5: (v, p, q),
    }
    out = torch.zeros_like(hsv)
    for k, (rr, gg, bb) in table.items():
        m = (sector == k).unsqueeze(-3)
        out = torch.where(m, torch.stack((rr, gg, bb), dim=-3), out)
    return out


def _gray_single(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, H, W) luma."""
    return (GRAY_WEIGHTS[0] * img[0] + GRAY_WEIGHTS[1] * img[1] + GRAY_WEIGHTS[2] * img[2]).unsqueeze(0)


def augment_reference(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    out_size: tuple[int, int] | None = None,
    blur_kernel: int = 3,
) -> torch.Tensor:
    """One view of one image, step by step with plain torch ops (the twin of the batched path).

    Args:
        x: (3, H, W) float in [-1, 1].
        params: one sample's parameters (:func:`params_for_sample`).
        out_size: (oh, ow); None keeps (H, W).
        blur_kernel: odd kernel size.
    Returns:
        (3, oh, ow) float32 in [-1, 1].
    """
    img = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    oh, ow = out_size if out_size is not None else tuple(x.shape[-2:])
    top, left, ch, cw = (int(v) for v in params["crop"].tolist())
    patch = img[None, :, top : top + ch, left : left + cw]
    img = F.interpolate(patch, size=(oh, ow), mode="bilinear", align_corners=False, antialias=False)[0]
    if bool(params["flip"]):
        img = img.flip(-1)
    if bool(params["jitter"]):
        factors = params["factors"].tolist()
        for op in params["order"].tolist():
            f = factors[op]
            if op == BRIGHTNESS:
                img = (f * img).clamp(0.0, 1.0)
            elif op == CONTRAST:
                img = (f * img + (1.0 - f) * _gray_single(img).mean()).clamp(0.0, 1.0)
            elif op == SATURATION:
                img = (f * img + (1.0 - f) * _gray_single(img)).clamp(0.0, 1.0)
            elif f != 0:
                hsv = rgb_to_hsv(img)
                hsv = torch.stack((torch.remainder(hsv[0] + f, 1.0), hsv[1], hsv[2]))
                img = hsv_to_rgb(hsv).clamp(0.0, 1.0)
    if bool(params["gray"]):
        img = _gray_single(img).expand(3, -1, -1)
    if bool(params["blur"]):
        k1 = gaussian_kernel1d(params["sigma"].reshape(1), blur_kernel)[0]
        k2 = torch.outer(k1, k1).expand(3, 1, blur_kernel, blur_kernel)
        r = blur_kernel // 2
        img = F.conv2d(F.pad(img[None], (r, r, r, r), mode="reflect"), k2, groups=3)[0]
    return (img * 2.0 - 1.0).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Released-style per-sample CPU pipeline (speed baseline)
# ---------------------------------------------------------------------------------------------
def _blur_uint8_reflect101(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """OpenCV-style separable blur of an (H, W, 3) uint8 image: BORDER_REFLECT_101 borders
    (``np.pad(mode="reflect")``), float32 arithmetic, rounded to uint8 once at the end.

    kernel: (K,) float, odd K, normalised and symmetric (k[r - d] == k[r + d]).
    """
    rad = kernel.shape[0] // 2
    h, w = img.shape[:2]
    k = kernel.astype(np.float32)
    pad = np.pad(img, ((rad, rad), (rad, rad), (0, 0)), mode="reflect").astype(np.float32)
    rows = pad[rad : rad + h] * k[rad]
    for t in range(rad):  # taps t and 2 rad - t share a weight
        rows += k[t] * (pad[t : t + h] + pad[2 * rad - t : 2 * rad - t + h])
    out = rows[:, rad : rad + w] * k[rad]
    for t in range(rad):
        out += k[t] * (rows[:, t : t + w] + rows[:, 2 * rad - t : 2 * rad - t + w])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def pil_views(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    out_size: tuple[int, int] | None = None,
    blur_kernel: int = 3,
) -> torch.Tensor:
    """The same steps one image at a time on uint8 images, as the released code did
    (docs/method.md section 1.2 and I1; without its double scaling, B1): per sample a PIL image,
    crop then bilinear resize (torchvision's ``resized_crop`` on PIL), flip, ImageEnhance
    brightness / contrast / saturation and torchvision's PIL hue shift in the sample's order,
    grayscale (PIL ``L``), an OpenCV-style Gaussian blur (reflect-101 borders), back to a tensor.

    This is the reference engine's view path and the speed baseline of the batched views. With
    the same parameters it differs from :meth:`SimCLRAugment.apply` only by the 8-bit
    arithmetic of the released pipeline -- uint8 rounding after every step, PIL's integer
    contrast mean and gray levels, the hue kept in 8 bits (PIL's HSV truncates H and S to
    1/255, and the shift is ``int(f * 255)`` hue steps) -- and, when the output is smaller than
    the crop, by PIL's antialiasing; ``tests/data/test_views_per_sample.py`` bounds each step's
    difference. Parameters come from :meth:`SimCLRAugment.sample_params` (drawn for the batch
    at once, which slightly favours this baseline over the released per-transform draws).

    Args:
        x: (B, 3, H, W) float tensor in [-1, 1] (copied to the CPU).
    Returns:
        (B, 3, oh, ow) float32 CPU tensor in [-1, 1].
    """
    _check_images(x)
    oh, ow = out_size if out_size is not None else tuple(x.shape[-2:])
    p = {k: params[k].tolist() for k in PARAM_KEYS}
    enhancers = {
        BRIGHTNESS: ImageEnhance.Brightness,
        CONTRAST: ImageEnhance.Contrast,
        SATURATION: ImageEnhance.Color,
    }
    views = []
    # Per-image conversions in NumPy (single-threaded): torch's intra-op threads would only add
    # synchronisation overhead on tensors this small and make the baseline look slower.
    x_np = x.detach().float().cpu().numpy()
    taps = np.arange(blur_kernel, dtype=np.float64) - (blur_kernel - 1) / 2
    for n in range(x.shape[0]):
        arr = np.clip(np.rint((x_np[n] + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        img = Image.fromarray(np.ascontiguousarray(arr))
        top, left, ch, cw = p["crop"][n]
        # Crop first: a resize with ``box=`` would also read pixels outside the box.
        img = img.crop((left, top, left + cw, top + ch)).resize((ow, oh), Image.Resampling.BILINEAR)
        if p["flip"][n]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if p["jitter"][n]:
            for op in p["order"][n]:
                f = p["factors"][n][op]
                if op != HUE:
                    img = enhancers[op](img).enhance(f)
                elif f != 0:  # torchvision's adjust_hue on PIL: H + int(f * 255), wrapping in uint8
                    h, s, v = img.convert("HSV").split()
                    shifted = (np.asarray(h, dtype=np.int16) + int(f * 255)) % 256
                    img = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8)), s, v)).convert("RGB")
        if p["gray"][n]:
            img = img.convert("L").convert("RGB")
        out = np.asarray(img)
        if p["blur"][n]:
            k = np.exp(-(taps * taps) / (2.0 * p["sigma"][n] ** 2))
            out = _blur_uint8_reflect101(out, k / k.sum())
        views.append(out.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(views))
