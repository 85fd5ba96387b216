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
drawn for all samples by :meth:`SimCLRAugment.sample_params` (this module) and applied by
:meth:`SimCLRAugment.apply`, which has no per-sample Python loop. Applying is the op
:func:`mgm_fast.ops.simclr_views.simclr_views`, which documents the semantics of every step and
the differences from torchvision: its ``reference`` backend is the batched torch path (any
device), its ``cpp`` backend a fused C++ kernel for float32 CPU images with the same semantics
(``SimCLRAugment.impl`` picks; "auto" takes cpp when the extension is built).

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

Also here: :func:`pil_views`, the released code's per-sample uint8 pipeline (PIL, OpenCV-style
blur): the reference engine's view path and the speed baseline, equal to the batched views up to
its 8-bit arithmetic (bounded step by step in ``tests/data/test_views_per_sample.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

from mgm_fast.ops._dispatch import BACKEND_NAMES, device_constant
from mgm_fast.ops.simclr_views import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    PARAM_KEYS,
    SATURATION,
    Params,
    check_images,
    check_params,
    simclr_views,
    view_reference,
)

CROP_ATTEMPTS = 10
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


@dataclass
class SimCLRAugment:
    """SimCLR view generator (see the module docstring for the steps and their semantics).

    ``brightness``/``contrast``/``saturation`` follow torchvision: a number v gives factors in
    [max(0, 1 - v), 1 + v], a pair is the range; ``hue`` h gives shifts in [-h, h] turns
    (h <= 0.5). ``out_size`` is an int (square) or (height, width); None keeps the input size.
    ``impl`` is the backend of :func:`mgm_fast.ops.simclr_views` that applies the parameters:
    "auto" (the fused C++ kernel for float32 CPU images when the extension is built, else the
    batched torch path), "cpp" or "reference"
    (:func:`mgm_fast.ops.simclr_views.simclr_views_reference`).
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
        # uploaded once per device: a tensor made from host numbers is a stream sync on a GPU
        lo = device_constant(tuple(r[0] for r in self._ranges), torch.float64, gdev)
        hi = device_constant(tuple(r[1] for r in self._ranges), torch.float64, gdev)
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
        check_images(x)
        check_params(params, x.shape[0])
        return self._apply(x, params, torch.arange(x.shape[0], device=x.device), select)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, select: str = "auto"):
        """One random view of each image."""
        check_images(x)
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
        check_images(x)
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
        check_images(x)
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
        """:func:`mgm_fast.ops.simclr_views.view_reference` (float32) with this configuration's
        output size and blur kernel: one view of one image (3, H, W), one sample's parameters."""
        return view_reference(x, params, self.output_size(x.shape[-2], x.shape[-1]), self.blur_kernel)

    def apply_pil(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:func:`pil_views` with this configuration's output size and blur kernel."""
        return pil_views(x, params, self.output_size(x.shape[2], x.shape[3]), self.blur_kernel)


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
    check_images(x)
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
