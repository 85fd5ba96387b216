"""Contact sheets of samples in the project's sample format, for eyeballing data and predictions.

One row per sample; columns RGB | segmentation (palette) | depth (colour-mapped, invalid black) |
normals ((n + 1) / 2 as RGB, invalid black). The scene name (or index) is written in the corner
of the RGB tile when the sample carries a ``scene`` entry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# Turbo-like anchor colours for depth (near = blue, far = red), interpolated linearly.
_DEPTH_ANCHORS = np.array(
    [[48, 18, 59], [70, 107, 227], [40, 187, 236], [49, 242, 153], [162, 252, 60], [237, 208, 58], [251, 128, 34],
     [208, 47, 5], [122, 4, 3]],
    dtype=np.float32,
)  # fmt: skip


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _default_palette(n: int) -> np.ndarray:
    """Deterministic distinct-ish colours for n classes (golden-angle hues)."""
    hues = (np.arange(n) * 0.618034) % 1.0
    h6 = hues * 6
    c = np.stack([np.abs(h6 - 3) - 1, 2 - np.abs(h6 - 2), 2 - np.abs(h6 - 4)], 1).clip(0, 1)
    return (60 + 180 * c).astype(np.uint8)


def colorize_depth(depth: np.ndarray, valid: np.ndarray, dmax: float | None = None) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8; invalid pixels black. ``dmax`` defaults to the 99th
    percentile of the valid depths of this image."""
    out = np.zeros((*depth.shape, 3), dtype=np.uint8)
    if not valid.any():
        return out
    if dmax is None:
        dmax = float(np.percentile(depth[valid], 99)) or 1.0
    x = np.clip(depth / dmax, 0, 1) * (len(_DEPTH_ANCHORS) - 1)
    i = np.minimum(x.astype(np.int64), len(_DEPTH_ANCHORS) - 2)
    f = (x - i)[..., None]
    rgb = _DEPTH_ANCHORS[i] * (1 - f) + _DEPTH_ANCHORS[i + 1] * f
    out[valid] = rgb[valid].astype(np.uint8)
    return out


def _tiles(sample: dict, palette: np.ndarray) -> list[np.ndarray]:
    rgb = _np(sample["rgb"]).astype(np.float32)
    img = ((rgb.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    h, w = img.shape[:2]
    tiles = [img]
    seg = _np(sample["seg"]).astype(np.int64)
    seg_rgb = np.zeros((h, w, 3), dtype=np.uint8)
    ok = (seg >= 0) & (seg < len(palette))
    seg_rgb[ok] = palette[seg[ok]]
    tiles.append(seg_rgb)
    depth = _np(sample["depth"]).reshape(h, w).astype(np.float32)
    dmask = _np(sample.get("depth_mask", depth > 0)).reshape(h, w).astype(bool)
    tiles.append(colorize_depth(depth, dmask))
    normal = _np(sample["normal"]).astype(np.float32).transpose(1, 2, 0)
    nmask = _np(sample.get("normal_mask", np.ones((h, w), bool))).reshape(h, w).astype(bool)
    n_rgb = ((normal + 1) * 127.5).clip(0, 255).astype(np.uint8)
    n_rgb[~nmask] = 0
    tiles.append(n_rgb)
    return tiles


def contact_sheet(
    samples: list[dict],
    path: str | Path,
    seg_palette=None,
    scene_names: list[str] | None = None,
    scale: int = 1,
    pad: int = 2,
) -> Path:
    """Write a PNG grid: one row per sample, columns RGB / seg / depth / normals.

    Args:
        samples: dicts in the sample format (rgb (3, H, W) in [-1, 1], seg (H, W), depth
            (1, H, W), optional depth_mask, normal (3, H, W), optional normal_mask, optional
            scene); tensors or arrays. All samples must share H and W.
        path: output PNG file (parent folders are created).
        seg_palette: (C, 3) uint8 colours; defaults to the synthetic dataset's palette when the
            labels fit in it, else generated colours.
        scene_names: names for scene indices; defaults to the synthetic dataset's scenes.
        scale: integer upscaling of every tile (nearest), to make 32x32 or 64x64 legible.
        pad: pixels of grey between tiles.
    Returns the written path.
    """
    if not samples:
        raise ValueError("contact_sheet: no samples given")
    from mgm_fast.data.synthetic import SCENE_CLASSES, SEG_PALETTE

    max_label = max(int(_np(s["seg"]).max()) for s in samples)
    if seg_palette is None:
        seg_palette = SEG_PALETTE if max_label < len(SEG_PALETTE) else _default_palette(max_label + 1)
    palette = np.asarray(seg_palette, dtype=np.uint8)
    names = SCENE_CLASSES if scene_names is None else scene_names
    rows = [_tiles(s, palette) for s in samples]
    h, w = rows[0][0].shape[:2]
    th, tw = h * scale, w * scale
    sheet = np.full((len(rows) * (th + pad) + pad, 4 * (tw + pad) + pad, 3), 64, dtype=np.uint8)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            if tile.shape[:2] != (h, w):
                raise ValueError(f"contact_sheet: sample {r} has size {tile.shape[:2]}, expected {(h, w)}")
            big = tile.repeat(scale, 0).repeat(scale, 1)
            y, x = pad + r * (th + pad), pad + c * (tw + pad)
            sheet[y : y + th, x : x + tw] = big
    image = Image.fromarray(sheet)
    draw = ImageDraw.Draw(image)
    for r, s in enumerate(samples):
        if "scene" not in s:
            continue
        k = int(_np(s["scene"]))
        label = names[k] if 0 <= k < len(names) else str(k)
        y = pad + r * (th + pad)
        box = draw.textbbox((pad + 2, y + 1), label)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((pad + 2, y + 1), label, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
