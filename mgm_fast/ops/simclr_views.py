"""Fused SimCLR view generation: crop + resize + flip, colour jitter, grayscale, blur, in one call.

``simclr_views(x, params, src_index, out_hw, blur_kernel=3, select="auto", impl="auto")`` makes
one view per entry of ``src_index`` (the steps: :mod:`mgm_fast.data.augment`, which draws the
parameters; their semantics below):

* ``x`` (B, 3, H, W) float images in [-1, 1];
* ``params`` the parameters of N views (:data:`PARAM_KEYS`): ``crop`` (N, 4) int64 top, left,
  height, width; ``flip``, ``jitter``, ``gray``, ``blur`` (N,) bool; ``order`` (N, 4) int64
  jitter op order; ``factors`` (N, 4) float; ``sigma`` (N,) float;
* ``src_index`` (N,) int64 on ``x.device``: the image of ``x`` view n reads (``two_views``
  passes ``arange(B)`` twice, so both views of an image read it once per view);
* ``out_hw`` (oh, ow); ``blur_kernel`` odd K with K // 2 < min(oh, ow);
* ``select`` "auto" | "index" | "where": how the torch path handles ops that act on a subset of
  the batch (identical results); the C++ kernel works per view and ignores it.

Returns (N, 3, oh, ow) in [-1, 1], of ``x.dtype``; the work is done in float32 on [0, 1] values.

Backends:

* ``cpp`` -- CPU, float32 images (csrc/kernels/cpu/simclr_views.*): per view one fused pass in
  a thread-local buffer that stays in cache (crop-resize with the flip folded into the column
  taps, the jitter ops in the sample's order, grayscale, separable reflect-101 blur, scaling),
  OpenMP over views with ``torch.get_num_threads()`` threads. Same formulas, clamping points and
  op order as the reference, in float32 (agreement ~1e-6). The source is read once and the
  output written once, where the torch path makes ~40 passes over the batch in memory.
* ``reference`` -- :func:`simclr_views_reference`, the batched torch path, any device and float
  dtype. :func:`view_reference` is its per-view, per-step twin (the tests' reference in float32,
  the self-test's truth in float64).

The ``cpp`` kernel runs behind the custom op ``mgm_fast::simclr_views_cpp``
(:mod:`mgm_fast.ops._library`), so ``torch.compile`` traces through the op.

No autograd: the views are inputs of the encoder and no gradient flows back into the
augmentation, so the ``cpp`` backend is not differentiable. An ``x`` that requires grad goes
to ``reference`` under ``auto``; forcing ``cpp`` on it raises :class:`BackendUnavailable`.

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
20x faster than :func:`mgm_fast.data.augment.pil_views` at batch 32, 128 x 128 on 2 cores. Outputs are always fresh
tensors. ``benchmarks/test_bench_augment.py`` compares views/s of the three.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mgm_fast.ops._dispatch import (
    Inputs,
    cpp_backend,
    define_op,
    device_constant,
    native_function,
    reference_backend,
    value_checks_enabled,
)
from mgm_fast.ops._library import qualname

__all__ = [
    "OP",
    "PARAM_KEYS",
    "check_images",
    "check_params",
    "clear_workspace",
    "gaussian_kernel1d",
    "hsv_to_rgb",
    "params_for_sample",
    "rgb_to_hsv",
    "simclr_views",
    "simclr_views_reference",
    "view_reference",
]

Params = dict[str, torch.Tensor]

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights (R, G, B)."""
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
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

def check_images(x: torch.Tensor, name: str = "x") -> None:
    """ValueError unless x is a float (B, 3, H, W) tensor (images in [-1, 1])."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a float tensor of shape (B, 3, H, W) in [-1, 1], got {got}")


def check_params(params: Mapping[str, torch.Tensor], n: int) -> None:
    """ValueError unless params holds every key of :data:`PARAM_KEYS` with the shapes of n views."""
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


def _out_hw(out_hw) -> tuple[int, int]:
    oh, ow = (int(v) for v in out_hw)
    if oh < 1 or ow < 1:
        raise ValueError(f"simclr_views: out_hw must be two positive sizes, got {tuple(out_hw)}")
    return oh, ow


def _validate(x, params, src_index, out_hw, blur_kernel, select) -> tuple[int, int]:
    """Checks shared by every backend (metadata, plus the src_index range on the CPU)."""
    check_images(x)
    if not isinstance(src_index, torch.Tensor) or src_index.dim() != 1 or src_index.dtype != torch.int64:
        got = (
            f"{tuple(src_index.shape)} {src_index.dtype}"
            if isinstance(src_index, torch.Tensor)
            else src_index
        )
        raise ValueError(f"simclr_views: src_index must be a (N,) int64 tensor, got {got}")
    check_params(params, src_index.shape[0])
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
    _resolve_select(select, x.device)
    return oh, ow


def params_for_sample(params: Mapping[str, torch.Tensor], index: int) -> Params:
    """The parameters of one sample: each tensor indexed at ``index`` along dim 0."""
    return {key: value[index] for key, value in params.items()}


def gaussian_kernel1d(sigma: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, OpenCV's formula for an explicit sigma.

    Args:
        sigma: (N,) float, > 0.
        size: odd kernel length.
        dtype: the result's dtype.
    Returns:
        (N, size) of ``dtype``, each row summing to 1 (computed in float64, so a tiny sigma gives
        an exact [0, ..., 1, ..., 0]).
    """
    t = torch.arange(size, dtype=torch.float64, device=sigma.device) - (size - 1) / 2
    s = sigma.to(torch.float64)[:, None]
    k = torch.exp(-(t * t) / (2.0 * s * s))
    return (k / k.sum(1, keepdim=True)).to(dtype)



# ---------------------------------------------------------------------------------------------
# reference: the batched torch path


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
    w = device_constant(GRAY_WEIGHTS, torch.float32, img.device)
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


def simclr_views_reference(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    src_index: torch.Tensor,
    out_hw: tuple[int, int],
    blur_kernel: int = 3,
    select: str = "auto",
) -> torch.Tensor:
    """The batched torch path: one view of ``x[src_index[n]]`` per parameter row n.

    The ``reference`` backend of :func:`simclr_views` (the ``cpp`` backend reproduces it up to
    float rounding); any device and float dtype.

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
    oh, ow = _out_hw(out_hw)
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
# cpp


@torch.library.custom_op(qualname("simclr_views_cpp"), mutates_args=())
def _cpp_op(
    x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, jitter: torch.Tensor, order: torch.Tensor,
    factors: torch.Tensor, gray: torch.Tensor, blur: torch.Tensor, sigma: torch.Tensor, src_index: torch.Tensor,
    out_height: int, out_width: int, blur_kernel: int,
) -> torch.Tensor:  # fmt: skip
    """(N, 3, oh, ow) contiguous views of x's dtype (the CPU kernel; parameters on the CPU). Not
    differentiable: no autograd formula (auto never sends an x that requires grad here)."""
    return native_function("simclr_views_{device}", "cpu")(
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


def _cpp_reasons(inputs: Inputs) -> list[str]:
    """Input conditions of the cpp backend beyond device and dtype."""
    reasons = []
    x = inputs["x"]
    if isinstance(x, torch.Tensor) and x.requires_grad:
        reasons.append("x requires grad (the cpp backend is not differentiable: views are inputs)")
    return reasons


OP = define_op(
    "simclr_views",
    "SimCLR views: crop-resize-flip, colour jitter, grayscale, blur in one pass per view",
    [reference_backend(simclr_views_reference), cpp_backend(_cpp, extra_check=_cpp_reasons)],
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
# the per-view twin, the float64 truth and self-test cases (mgm_fast.ops._selftest)


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


def view_reference(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    out_size: tuple[int, int] | None = None,
    blur_kernel: int = 3,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One view of one image, step by step with plain torch ops: the per-sample twin of the
    batched path (in float32, the tests' reference) and, in float64, the self-test's truth.

    Args:
        x: (3, H, W) float in [-1, 1].
        params: one sample's parameters (:func:`params_for_sample`).
        out_size: (oh, ow); None keeps (H, W).
        blur_kernel: odd kernel size.
        dtype: the dtype every step computes in.
    Returns:
        (3, oh, ow) of ``dtype`` in [-1, 1].
    """
    img = ((x.to(dtype) + 1.0) / 2.0).clamp(0.0, 1.0)
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
        k1 = gaussian_kernel1d(params["sigma"].reshape(1), blur_kernel, dtype)[0]
        k2 = torch.outer(k1, k1).expand(3, 1, blur_kernel, blur_kernel)
        r = blur_kernel // 2
        img = F.conv2d(F.pad(img[None], (r, r, r, r), mode="reflect"), k2, groups=3)[0]
    return (img * 2.0 - 1.0).clamp(-1.0, 1.0)


def simclr_views_float64(x, params, src_index, out_hw, blur_kernel=3, select="auto"):
    """The views of the module docstring one at a time in x's dtype (:func:`view_reference`):
    the float64 truth of the self-test. Both fused and batched paths compute in float32."""
    del select
    oh, ow = _out_hw(out_hw)
    p = {k: params[k].cpu() for k in PARAM_KEYS}
    views = [view_reference(x[src], params_for_sample(p, n), (oh, ow), blur_kernel, x.dtype)
             for n, src in enumerate(src_index.tolist())]  # fmt: skip
    return torch.stack(views) if views else x.new_empty(0, 3, oh, ow)


def _random_params(gen: torch.Generator, n: int, h: int, w: int, jitter_p: float = 0.8, gray_p: float = 0.2,
                   blur_p: float = 0.5, hue: float = 0.2) -> dict[str, torch.Tensor]:  # fmt: skip
    """Parameters of n random views of (h, w) images for the self-test (the layer below
    SimCLRAugment, which draws the training's): crop boxes of uniform size and place, a flip
    with p 0.5, each other step with its probability, a random jitter order, factors in the
    released ColorJitter ranges ([0.2, 1.8], hue shifts in [-hue, hue]) and sigma in the
    released [0.01, 1]."""

    def uniform(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    ch = torch.randint(1, h + 1, (n,), generator=gen)
    cw = torch.randint(1, w + 1, (n,), generator=gen)
    top = (uniform(n) * (h - ch + 1)).long()
    left = (uniform(n) * (w - cw + 1)).long()
    factors = 0.2 + 1.6 * uniform(n, 4)
    factors[:, HUE] = hue * (2 * uniform(n) - 1)
    return {
        "crop": torch.stack((top, left, ch, cw), dim=1),
        "flip": uniform(n) < 0.5,
        "jitter": uniform(n) < jitter_p,
        "order": torch.argsort(uniform(n, 4), dim=1),
        "factors": factors.to(torch.float32),
        "gray": uniform(n) < gray_p,
        "blur": uniform(n) < blur_p,
        "sigma": (0.01 + 0.99 * uniform(n)).to(torch.float32),
    }


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
            x = torch.rand(b, 3, h, w, generator=gen, dtype=torch.float64) * 2 - 1
            if extreme:
                params, src = _extreme_params(h, w), torch.tensor([0, 1, 1, 0, 0, 1])
                x[1, :, : h // 2] = x[1, :1, : h // 2]  # gray pixels: chroma 0 under the hue rotation
            else:  # two views of every image, as SimCLRAugment.two_views lays them out
                params = _random_params(gen, 2 * b, h, w, **(aug_args or {}))
                src = torch.arange(b).repeat(2)
            return Inputs(kwargs=dict(x=x, params=params, src_index=src, out_hw=out_hw, blur_kernel=kernel),
                          channels_last=("x",))  # fmt: skip

        return build

    specs = [  # name, size, (B, H, W), out_hw, blur kernel, _random_params arguments, extreme parameters
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
