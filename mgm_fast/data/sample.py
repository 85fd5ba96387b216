"""The project's one sample format, its checks, batching, and the decoding helpers the file loaders share.

Sample format (every dataset of mgm_fast returns exactly this; ``H, W`` = output size)

==============  =========  ===========  =====================================================
key             dtype      shape        meaning
==============  =========  ===========  =====================================================
``rgb``         float32    (3, H, W)    colour image in [-1, 1] (``2 * p / 255 - 1``)
``seg``         int64      (H, W)       class in [0, num_seg_classes), ``IGNORE_INDEX`` void
``depth``       float32    (1, H, W)    metres, > 0 where valid, exactly 0 where invalid
``depth_mask``  bool       (1, H, W)    True where ``depth`` is a measurement
``normal``      float32    (3, H, W)    unit surface normal where valid, exactly 0 elsewhere
``normal_mask`` bool       (1, H, W)    True where ``normal`` is a measurement
``scene``       int64      ()           scene class in [0, num_scenes); -1 = unknown
``id``          str                     stable sample id, e.g. ``"bedroom/00012"``
==============  =========  ===========  =====================================================

The loaders decode every modality into plain numpy arrays at the file's resolution and hand
them to :func:`make_sample`, which resizes each modality with the right rule (docs/method.md
section 4.2, bugs B3/B4 of the released code):

* RGB: bilinear with antialiasing (``F.interpolate(..., mode="bilinear", antialias=True,
  align_corners=False)``), which is what PIL's bilinear ``resize`` in the released code does.
* labels, depth, normals and masks: nearest neighbour with centred sampling (output pixel
  ``i`` reads source pixel ``floor((i + 0.5) * in / out)``, like PIL's NEAREST). Labels keep
  their label set, depth keeps its validity (an invalid pixel stays exactly 0 and masked), and
  every normal is a measured unit vector rather than an average across a depth edge. The
  released code instead tiles with ``np.resize`` (B3) and resizes the normal mask bilinearly
  into soft values (B4).

Errors about data are :class:`DataError` (a ``ValueError``) and always name the file or the
sample id and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "IGNORE_INDEX",
    "MIN_NORMAL_NORM",
    "NORMAL8_SCALE",
    "RGB8_SCALE",
    "SAMPLE_DTYPES",
    "SAMPLE_KEYS",
    "TENSOR_KEYS",
    "DataError",
    "DatasetInfo",
    "check_labels",
    "collate",
    "decode_normals_8bit",
    "encode_normals_8bit",
    "image_to_rgb01",
    "labels_outside",
    "list_preview",
    "make_sample",
    "normalise_normals",
    "read_image",
    "read_npy",
    "resize_nearest",
    "resize_rgb",
    "sanitize_depth",
    "target_size",
    "validate_sample",
]

IGNORE_INDEX = -1
"""``seg`` value of void / unlabelled pixels (use it as ``ignore_index`` of the segmentation loss)."""

SAMPLE_KEYS = ("rgb", "seg", "depth", "depth_mask", "normal", "normal_mask", "scene", "id")
TENSOR_KEYS = SAMPLE_KEYS[:-1]

MIN_NORMAL_NORM = 0.5
"""Decoded normals shorter than this are "no normal" (e.g. the grey 127/128 fill of 8-bit maps,
or MTAN's all-zero pixels); longer ones are renormalised to unit length."""
MAX_NORMAL_NORM = 1.5
"""Decoded normals longer than this are invalid too: an 8-bit map's black (0, 0, 0) fill decodes
to (-1, -1, -1), length sqrt(3), which no unit vector quantised to 8 bits can produce."""

RGB8_SCALE = np.float32(1.0 / 255.0)
"""float32(1/255): an 8-bit colour level ``p`` is ``p * RGB8_SCALE`` in [0, 1]."""
NORMAL8_SCALE = np.float32(2.0 / 255.0)
"""float32(2/255): an 8-bit normal-map level ``p`` decodes to ``p * NORMAL8_SCALE - 1``."""

_SHAPES = {"rgb": 3, "seg": None, "depth": 1, "depth_mask": 1, "normal": 3, "normal_mask": 1}
SAMPLE_DTYPES = {
    "rgb": torch.float32,
    "seg": torch.int64,
    "depth": torch.float32,
    "depth_mask": torch.bool,
    "normal": torch.float32,
    "normal_mask": torch.bool,
    "scene": torch.int64,
}
"""dtype of each tensor field of a sample (and of a batch), as in the table above."""
_UNIT_TOL = 1e-3


class DataError(ValueError):
    """A file, a sample or a dataset layout is not what the loader expects."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        num_seg_classes: number of segmentation classes C (labels are 0..C-1, void is -1).
        num_scenes: number of scene classes (0 when the dataset carries no scene labels).
        seg_class_names: C names, index = label.
        scene_names: ``num_scenes`` names, index = scene label.
        layout: ``"synthetic" | "official" | "mtan" | "taskonomy"``.
        root: dataset folder (None for generated data).
    """

    num_seg_classes: int
    num_scenes: int
    seg_class_names: tuple[str, ...]
    scene_names: tuple[str, ...]
    layout: str
    root: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "seg_class_names", tuple(str(n) for n in self.seg_class_names))
        object.__setattr__(self, "scene_names", tuple(str(n) for n in self.scene_names))
        if self.num_seg_classes < 1:
            raise DataError(
                f"DatasetInfo({self.layout}): num_seg_classes must be >= 1, got {self.num_seg_classes}"
            )
        if len(self.seg_class_names) != self.num_seg_classes:
            raise DataError(
                f"DatasetInfo({self.layout}, {self.root}): {len(self.seg_class_names)} class names for "
                f"{self.num_seg_classes} classes"
            )
        if len(self.scene_names) != self.num_scenes:
            raise DataError(
                f"DatasetInfo({self.layout}, {self.root}): {len(self.scene_names)} scene names for "
                f"{self.num_scenes} scenes"
            )


# -------------------------------------------------------------------------------------------
# Checking and batching.


def _fail(source: str, msg: str) -> None:
    raise DataError(f"{source}: {msg}")


def validate_sample(
    sample: Mapping,
    num_seg_classes: int,
    source: str,
    num_scenes: int | None = None,
    allow_unknown_scene: bool = True,
) -> None:
    """Check one sample against the sample format; raise :class:`DataError` naming ``source``.

    Checks keys, dtypes and shapes (all spatial sizes equal), ``rgb`` finite and in [-1, 1],
    ``seg`` in [0, num_seg_classes) or ``IGNORE_INDEX``, ``depth`` finite, > 0 exactly where
    ``depth_mask`` and 0 elsewhere, ``normal`` unit length (to 1e-3) where ``normal_mask`` and
    0 elsewhere, ``scene`` a 0-dim int64 in [0, num_scenes) (or -1 with ``allow_unknown_scene``),
    ``id`` a non-empty string.

    Args:
        sample: the sample dict.
        num_seg_classes: number of segmentation classes C.
        source: file(s) or id the sample came from, put in every message.
        num_scenes: number of scene classes; None skips the upper bound check.
        allow_unknown_scene: accept ``scene == -1`` (datasets loaded without scene labels).
    """
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        _fail(source, f"sample lacks key(s) {missing}; expected {list(SAMPLE_KEYS)}")
    for key, dtype in SAMPLE_DTYPES.items():
        t = sample[key]
        if not isinstance(t, torch.Tensor):
            _fail(source, f"'{key}' is a {type(t).__name__}, expected a torch.Tensor")
        if t.dtype != dtype:
            _fail(source, f"'{key}' has dtype {t.dtype}, expected {dtype}")
    hw = tuple(sample["seg"].shape)
    if len(hw) != 2 or min(hw) < 1:
        _fail(source, f"'seg' has shape {tuple(sample['seg'].shape)}, expected (H, W)")
    for key, ch in _SHAPES.items():
        if ch is not None and tuple(sample[key].shape) != (ch, *hw):
            _fail(source, f"'{key}' has shape {tuple(sample[key].shape)}, expected {(ch, *hw)}")
    if sample["scene"].dim() != 0:
        _fail(source, f"'scene' has shape {tuple(sample['scene'].shape)}, expected a 0-dim tensor")
    if not isinstance(sample["id"], str) or not sample["id"]:
        _fail(source, f"'id' is {sample['id']!r}, expected a non-empty str")

    rgb = sample["rgb"]
    if not bool(torch.isfinite(rgb).all()):
        _fail(source, "'rgb' has non-finite values")
    lo, hi = float(rgb.min()), float(rgb.max())
    if lo < -1.0 - 1e-5 or hi > 1.0 + 1e-5:
        _fail(source, f"'rgb' spans [{lo:.4g}, {hi:.4g}], expected [-1, 1]")

    seg = sample["seg"]
    bad = (seg != IGNORE_INDEX) & ((seg < 0) | (seg >= num_seg_classes))
    if bool(bad.any()):
        values = sorted({int(v) for v in seg[bad].unique()[:8]})
        _fail(source, f"'seg' has label(s) {values} outside [0, {num_seg_classes}) and != {IGNORE_INDEX}")

    depth, dmask = sample["depth"], sample["depth_mask"]
    if not bool(torch.isfinite(depth).all()):
        _fail(source, "'depth' has non-finite values (invalid depth must be 0 with depth_mask False)")
    if bool((depth[dmask] <= 0).any()):
        _fail(source, "'depth' is <= 0 where depth_mask is True")
    if bool((depth[~dmask] != 0).any()):
        _fail(source, "'depth' is non-zero where depth_mask is False")

    normal, nmask = sample["normal"], sample["normal_mask"]
    if not bool(torch.isfinite(normal).all()):
        _fail(source, "'normal' has non-finite values")
    m = nmask[0]
    if bool(m.any()):
        norm = normal[:, m].norm(dim=0)
        worst = float((norm - 1).abs().max())
        if worst > _UNIT_TOL:
            _fail(
                source,
                f"'normal' is not unit length where normal_mask is True (max | |n| - 1 | = {worst:.3g})",
            )
    if bool((normal[:, ~m] != 0).any()):
        _fail(source, "'normal' is non-zero where normal_mask is False")

    scene = int(sample["scene"])
    if scene == -1 and allow_unknown_scene:
        return
    if scene < 0 or (num_scenes is not None and scene >= num_scenes):
        expected = f"[0, {num_scenes})" if num_scenes is not None else ">= 0"
        _fail(
            source,
            f"'scene' is {scene}, expected {expected}" + (" or -1 (unknown)" if allow_unknown_scene else ""),
        )


def collate(samples: Sequence[Mapping]) -> dict:
    """Stack samples into a batch: tensors gain a leading batch dim, ``id`` becomes a list.

    Raises :class:`DataError` naming the offending ids when keys or shapes differ (e.g. samples
    loaded at their native, different resolutions).
    """
    if not samples:
        raise DataError("collate: no samples given")
    out: dict = {}
    ids = [str(s.get("id", f"#{i}")) for i, s in enumerate(samples)]
    for key in TENSOR_KEYS:
        try:
            tensors = [s[key] for s in samples]
        except KeyError as e:
            raise DataError(f"collate: a sample lacks key {e}; ids {ids[:5]}") from None
        shape = tuple(tensors[0].shape)
        odd = [ids[i] for i, t in enumerate(tensors) if tuple(t.shape) != shape]
        if odd:
            raise DataError(
                f"collate: '{key}' of sample {ids[0]!r} has shape {shape} but sample(s) {odd[:5]} differ; "
                "load all samples at one image_size"
            )
        out[key] = torch.stack(tensors)
    out["id"] = ids
    return out


# -------------------------------------------------------------------------------------------
# File decoding shared by the loaders.


def read_image(path: Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file; a missing, truncated or corrupt file is a DataError."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            return im.copy()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file is missing") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode {what} ({type(e).__name__}: {e})") from None


def read_npy(path: Path, what: str = "array") -> np.ndarray:
    """Load a ``.npy`` file without pickle; a missing, truncated or corrupt file is a DataError."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file is missing") from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read {what} .npy ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive opened through the same call
        raise DataError(f"{path}: expected a single .npy array, found {type(arr).__name__}")
    return arr


def image_to_rgb01(im: Image.Image, path: Path) -> np.ndarray:
    """PIL image -> float32 (H, W, 3) in [0, 1]. 8-bit RGB, RGBA (alpha dropped), grey and palette
    images are accepted; 16-bit or float images are not (their range is ambiguous)."""
    if im.mode not in ("RGB", "RGBA", "L", "P", "LA", "1"):
        raise DataError(f"{path}: RGB image has PIL mode {im.mode!r}; expected 8-bit RGB/RGBA/L/P")
    arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return arr * RGB8_SCALE


def decode_normals_8bit(im: Image.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """8-bit RGB normal map -> (normals float32 (H, W, 3), valid bool (H, W)).

    Each channel ``p`` decodes to ``2 * p / 255 - 1``; a vector whose length lies outside
    [MIN_NORMAL_NORM, MAX_NORMAL_NORM] is invalid (grey 127/128 "no normal" fill, black fill),
    valid ones are renormalised to unit length (8-bit quantisation leaves |n| within ~1%).
    """
    if im.mode not in ("RGB", "RGBA"):
        raise DataError(f"{path}: normal map has PIL mode {im.mode!r}; expected 8-bit RGB (3 channels)")
    arr = np.asarray(im.convert("RGB"), dtype=np.float32) * NORMAL8_SCALE - np.float32(1.0)
    return normalise_normals(arr)


def normalise_normals(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (H, W, 3) decoded normals -> (unit normals with zeros where invalid, valid mask)."""
    arr = arr.astype(np.float32, copy=False)
    norm = np.sqrt((arr.astype(np.float64) ** 2).sum(-1))
    valid = np.isfinite(norm) & (norm >= MIN_NORMAL_NORM) & (norm <= MAX_NORMAL_NORM)
    out = np.zeros_like(arr, dtype=np.float32)
    out[valid] = (arr[valid] / norm[valid][:, None]).astype(np.float32)
    return out, valid


def encode_normals_8bit(normal: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W, 3) unit normals + valid mask -> uint8 (H, W, 3) ``round((n + 1) / 2 * 255)``;
    invalid pixels become (128, 128, 128), which decodes to a near-zero vector."""
    enc = np.rint((np.clip(normal, -1, 1) + 1.0) * 127.5).astype(np.uint8)
    enc[~valid] = 128
    return enc


def target_size(image_size) -> tuple[int, int] | None:
    """``None`` (keep the file's size), an int S (S x S) or (H, W) -> (H, W) or None."""
    if image_size is None:
        return None
    if isinstance(image_size, int | np.integer):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return size


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # centred sampling floor((i + 0.5) * n_in / n_out), as PIL NEAREST and
    # F.interpolate(mode="nearest-exact"); integer arithmetic so exact ties do not round down
    i = np.arange(n_out, dtype=np.int64)
    return np.minimum(((2 * i + 1) * n_in) // (2 * n_out), n_in - 1)


def resize_nearest(arr: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Nearest-neighbour resize of the first two (H, W) axes of any dtype (labels stay labels)."""
    if size is None or tuple(arr.shape[:2]) == tuple(size):
        return arr
    rows = _nearest_index(arr.shape[0], size[0])
    cols = _nearest_index(arr.shape[1], size[1])
    return arr[rows[:, None], cols[None, :]]


def resize_rgb(rgb01: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """float32 (H, W, 3) in [0, 1] -> float32 (3, h, w) in [0, 1], antialiased bilinear."""
    t = torch.from_numpy(np.ascontiguousarray(rgb01, dtype=np.float32)).permute(2, 0, 1)
    if size is None or tuple(t.shape[1:]) == tuple(size):
        return t.contiguous()
    out = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def make_sample(
    *,
    rgb01: np.ndarray,
    seg: np.ndarray,
    depth: np.ndarray,
    depth_valid: np.ndarray,
    normal: np.ndarray,
    normal_valid: np.ndarray,
    scene: int,
    sample_id: str,
    size: tuple[int, int] | None,
    source: str,
) -> dict:
    """Assemble a sample from source-resolution arrays, resizing each modality (module docstring).

    Args:
        rgb01: float32 (H, W, 3) in [0, 1].
        seg: integer (H', W') labels, void already mapped to ``IGNORE_INDEX``.
        depth: float32 (H', W') metres; ``depth_valid`` bool (H', W').
        normal: float32 (H', W', 3) unit vectors; ``normal_valid`` bool (H', W').
        scene: scene index (-1 unknown).
        sample_id: the sample's id.
        size: output (H, W), or None to keep the source size (then all modalities must agree).
        source: files of the sample, for error messages.
    """
    if size is None:
        sizes = {
            "rgb": rgb01.shape[:2],
            "seg": seg.shape[:2],
            "depth": depth.shape[:2],
            "normal": normal.shape[:2],
        }
        if len({tuple(s) for s in sizes.values()}) != 1:
            raise DataError(
                f"{source}: modalities have different sizes { ({k: tuple(v) for k, v in sizes.items()}) }; "
                "pass an image_size (e.g. --size 128) to resize them to one size"
            )
    depth = np.where(depth_valid, depth, 0).astype(np.float32)
    normal = np.where(normal_valid[..., None], normal, 0).astype(np.float32)
    rgb = resize_rgb(rgb01, size).mul_(2.0).sub_(1.0)
    seg_t = torch.from_numpy(np.ascontiguousarray(resize_nearest(seg, size), dtype=np.int64))
    d = torch.from_numpy(np.ascontiguousarray(resize_nearest(depth, size)))[None]
    dm = torch.from_numpy(np.ascontiguousarray(resize_nearest(depth_valid, size)))[None]
    n = torch.from_numpy(np.ascontiguousarray(resize_nearest(normal, size))).permute(2, 0, 1).contiguous()
    nm = torch.from_numpy(np.ascontiguousarray(resize_nearest(normal_valid, size)))[None]
    return {
        "rgb": rgb.contiguous(),
        "seg": seg_t,
        "depth": d,
        "depth_mask": dm.bool(),
        "normal": n,
        "normal_mask": nm.bool(),
        "scene": torch.tensor(int(scene), dtype=torch.int64),
        "id": sample_id,
    }


def sanitize_depth(
    depth: np.ndarray, path: Path, allow_invalid: bool, extra_invalid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float depth in metres -> (depth with 0 where invalid, valid mask).

    0 is the "no measurement" value. NaN, +-inf and negative values are errors naming ``path``
    unless ``allow_invalid``, in which case they become invalid pixels.
    """
    depth = depth.astype(np.float32, copy=False)
    finite = np.isfinite(depth)
    bad = ~finite | (np.where(finite, depth, 0) < 0)
    if bad.any() and not allow_invalid:
        n_nan = int(np.isnan(depth).sum())
        n_inf = int(np.isinf(depth).sum())
        n_neg = int((np.where(finite, depth, 0) < 0).sum())
        raise DataError(
            f"{path}: depth has {n_nan} NaN, {n_inf} infinite and {n_neg} negative value(s); "
            "invalid depth must be stored as 0 (or load with allow_invalid_depth=True to mask them)"
        )
    valid = finite & (np.where(finite, depth, 0) > 0)
    if extra_invalid is not None:
        valid &= ~extra_invalid
    return np.where(valid, depth, 0).astype(np.float32), valid


def check_labels(seg: np.ndarray, num_classes: int, path: Path) -> None:
    """Labels (void already ``IGNORE_INDEX``) must lie in [0, num_classes); else a DataError
    naming ``path`` and the offending values."""
    bad = labels_outside(seg, num_classes)
    if bad.any():
        values = np.unique(seg[bad])
        shown = ", ".join(str(int(v)) for v in values[:8]) + (" ..." if len(values) > 8 else "")
        raise DataError(
            f"{path}: {int(bad.sum())} pixel(s) with label(s) {shown} outside [0, {num_classes}) "
            f"(void must map to {IGNORE_INDEX})"
        )


def labels_outside(seg, num_classes: int):
    """Elementwise: ``seg`` is neither ``IGNORE_INDEX`` nor in [0, num_classes). ``seg``: integer
    numpy array, torch tensor or DALI graph node of any shape (the DALI adapters flag samples
    with this rule inside the pipeline)."""
    return (seg != IGNORE_INDEX) & ((seg < 0) | (seg >= num_classes))


def list_preview(items: Sequence[str], n: int = 5) -> str:
    """'a, b, c ... (+N more)' for error messages."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" ... (+{len(items) - n} more)" if len(items) > n else "")
