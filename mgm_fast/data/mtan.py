"""MTAN's preprocessed NYUv2 layout (the npy release most multi-task papers train on): loader and writer.

Layout (as read by ``im2im_pred/create_dataset.py`` of lorenmt/mtan)::

    root/
      train/image/<i>.npy    float (H, W, 3), RGB in [0, 1]          (loader moves axis -1 -> 0)
      train/label/<i>.npy    float (H, W), class 0..12, -1 = void    (13 classes, CE ignore_index=-1)
      train/depth/<i>.npy    float (H, W, 1), metres, 0 = no measurement
      train/normal/<i>.npy   float (H, W, 3) in [-1, 1], all-zero = no normal
      val/...                same, the 654 test images (MTAN calls the split "val")
      scenes.json            optional scene labels, see below (not part of MTAN's release)

``<i>`` runs 0..N-1 (MTAN counts the files and indexes by number). MTAN's metrics mask depth
and normals where the target is zero (``sum over channels != 0``), and its segmentation loss
ignores -1 (``im2im_pred/utils.py``). The release holds 795 train / 654 val images at 288x384;
the 13-class order below is the usual one for this release [CONVENTION: the names are not in
the MTAN repository; pass ``seg_class_names`` to override].

Decoding: ``rgb = 2 * image - 1`` (values outside [0, 1] are an error naming the file, e.g. a
0..255 image); labels must be integral, -1 or in [0, 13); depth as in the folder loader (NaN
or negative -> error unless ``allow_invalid_depth``); normals of length < 0.5 are invalid, the
rest are renormalised to unit length. Resizing: bilinear (antialiased) RGB, nearest for the
rest (mgm_fast.data.sample).

Scene labels: MGM needs one scene class per image and MTAN's release has none. They come from
``root/scenes.json`` or a file given as ``scenes=PATH``::

    {"scene_names": ["bathroom", "bedroom", ...],
     "train": [3, 0, 1, ...],      one scene index per train/<i>.npy, in order of i
     "val":   [1, 1, 4, ...],      same for val/
     "num_seg_classes": 13, "seg_class_names": [...]}   optional class metadata

Without it, loading raises an error that explains this format; ``scenes="none"`` loads without
scene labels (``scene = -1``, ``info.num_scenes = 0``) for uses other than MGM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mgm_fast.data.sample import (
    IGNORE_INDEX,
    DataError,
    DatasetInfo,
    check_labels,
    list_preview,
    make_sample,
    normalise_normals,
    read_npy,
    sanitize_depth,
    target_size,
    validate_sample,
)

__all__ = [
    "IMAGE_RANGE_TOL",
    "MODALITY_FIELDS",
    "MTAN_SEG_CLASSES",
    "SCENES_JSON",
    "MTANDataset",
    "read_scenes_json",
    "write_mtan",
]

MTAN_SEG_CLASSES = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
    "painting", "sofa", "table", "tv", "wall", "window",
)  # fmt: skip
"""NYUv2 13-class names in label order 0..12 (the usual order of this release; not stated by MTAN)."""

SCENES_JSON = "scenes.json"
SPLITS = ("train", "val")
MODALITY_FIELDS = {
    "image": ("rgb",),
    "label": ("seg",),
    "depth": ("depth", "depth_mask"),
    "normal": ("normal", "normal_mask"),
}
"""The modality folders of a split and the sample fields decoded from each one's files."""
_MODS = tuple(MODALITY_FIELDS)
IMAGE_RANGE_TOL = 1e-3
"""``image`` values may exceed [0, 1] by this much (float rounding of the release) before a
file is refused as not being in [0, 1]; they are clipped to [0, 1]."""
_INT_STEM = re.compile(r"^(0|[1-9][0-9]*)$")
_SCENES_HELP = (
    "MGM needs one scene label per image and the MTAN release has none. Provide {path} (or pass "
    'scenes=PATH) holding {{"scene_names": [...], "train": [scene of train/<i>.npy for i = 0..N-1], '
    '"val": [...]}}, or load with scenes="none" (scene = -1) for uses without scene labels.'
)


def read_scenes_json(path: Path) -> dict:
    """Parse and check the shape of a scenes file (format in the module docstring)."""
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: scenes file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot parse scenes file ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("scene_names"), list) or not meta["scene_names"]:
        raise DataError(f"{path}: expected an object with a non-empty 'scene_names' list")
    for split in SPLITS:
        if split in meta and not (
            isinstance(meta[split], list)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in meta[split])
        ):
            raise DataError(f"{path}: '{split}' must be a list of integer scene indices")
    return meta


class MTANDataset(torch.utils.data.Dataset):
    """MTAN's NYUv2 npy release (module docstring) in the sample format.

    Args:
        root: folder holding train/ and val/.
        split: ``"train"`` or ``"val"``.
        image_size: int S (S x S), (H, W), or None to keep the files' size (288x384).
        scenes: ``"auto"`` (``root/scenes.json``, required), a path to a scenes file, or
            ``"none"`` (no scene labels, scene = -1).
        num_seg_classes: default ``num_seg_classes`` of ``root/scenes.json`` if it has one, else
            13 (the release).
        seg_class_names: default ``seg_class_names`` of ``root/scenes.json``, else
            :data:`MTAN_SEG_CLASSES` for 13 classes, else ``class_<i>``.
        allow_invalid_depth: mask NaN / inf / negative depth instead of raising.
        validate: run :func:`validate_sample` on every sample returned.
    """

    layout = "mtan"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int | tuple[int, int] | None = 128,
        scenes: str | Path = "auto",
        num_seg_classes: int | None = None,
        seg_class_names: Sequence[str] | None = None,
        allow_invalid_depth: bool = False,
        validate: bool = True,
    ):
        self.root = Path(root)
        if split not in SPLITS:
            raise DataError(f"MTANDataset: split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.dir = self.root / split
        if not self.dir.is_dir():
            raise DataError(
                f"{self.dir}: missing; the MTAN layout is root/{{train,val}}/{{image,label,depth,normal}}/<i>.npy"
            )
        self.size = target_size(image_size)
        root_meta = read_scenes_json(self.root / SCENES_JSON) if (self.root / SCENES_JSON).exists() else {}
        if num_seg_classes is None:
            num_seg_classes = root_meta.get("num_seg_classes", len(MTAN_SEG_CLASSES))
        self.num_seg_classes = int(num_seg_classes)
        if seg_class_names is None and len(root_meta.get("seg_class_names", ())) == self.num_seg_classes:
            seg_class_names = tuple(root_meta["seg_class_names"])  # only when they fit the class count
        self.allow_invalid_depth = bool(allow_invalid_depth)
        self.validate = bool(validate)

        problems = []
        indices: dict[str, set[int]] = {}
        for mod in _MODS:
            folder = self.dir / mod
            if not folder.is_dir():
                problems.append(f"{folder}: missing")
                continue
            idx, odd = set(), []
            for p in folder.iterdir():
                if p.name.startswith(".") or p.suffix != ".npy":
                    continue
                if _INT_STEM.match(p.stem):
                    idx.add(int(p.stem))
                else:
                    odd.append(p.name)
            if odd:
                problems.append(
                    f"{folder}: file name(s) not of the form <i>.npy: {list_preview(sorted(odd))}"
                )
            indices[mod] = idx
        if problems:
            raise DataError(f"{self.dir}: not an MTAN split:\n  " + "\n  ".join(problems))
        n = len(indices["image"])
        if n == 0:
            raise DataError(f"{self.dir / 'image'}: no <i>.npy files")
        expected = set(range(n))
        for mod in _MODS:
            missing = sorted(expected - indices[mod])
            extra = sorted(indices[mod] - expected)
            if missing:
                problems.append(
                    f"{self.dir / mod}: missing index(es) {list_preview([str(i) for i in missing])}"
                )
            if extra:
                problems.append(
                    f"{self.dir / mod}: index(es) beyond 0..{n - 1} (files must be numbered 0..N-1): "
                    f"{list_preview([str(i) for i in extra])}"
                )
        if problems:
            raise DataError(f"{self.dir}: modalities do not match 0..{n - 1}:\n  " + "\n  ".join(problems))
        self.n = n

        if isinstance(scenes, str) and scenes == "none":
            self.scene_labels = None
            scene_names: tuple[str, ...] = ()
        else:
            path = self.root / SCENES_JSON if (isinstance(scenes, str) and scenes == "auto") else Path(scenes)
            if not path.exists():
                raise DataError(f"{path}: scene labels not found. " + _SCENES_HELP.format(path=path))
            meta = read_scenes_json(path)
            if split not in meta:
                raise DataError(f"{path}: has no '{split}' list. " + _SCENES_HELP.format(path=path))
            labels = meta[split]
            if len(labels) != n:
                raise DataError(
                    f"{path}: '{split}' has {len(labels)} scene labels for {n} images in {self.dir / 'image'}"
                )
            k = len(meta["scene_names"])
            bad = [i for i, v in enumerate(labels) if not 0 <= v < k]
            if bad:
                raise DataError(
                    f"{path}: '{split}' scene label(s) outside [0, {k}) at index(es) {list_preview([str(i) for i in bad])}"
                )
            self.scene_labels = np.asarray(labels, dtype=np.int64)
            scene_names = tuple(str(s) for s in meta["scene_names"])
        if seg_class_names is None:
            seg_class_names = (
                MTAN_SEG_CLASSES
                if self.num_seg_classes == len(MTAN_SEG_CLASSES)
                else tuple(f"class_{i}" for i in range(self.num_seg_classes))
            )
        self.info = DatasetInfo(
            num_seg_classes=self.num_seg_classes,
            num_scenes=len(scene_names),
            seg_class_names=tuple(seg_class_names),
            scene_names=scene_names,
            layout=self.layout,
            root=str(self.root),
            extra={"split": split},
        )

    def __len__(self) -> int:
        return self.n

    def files(self, i: int) -> dict[str, Path]:
        return {mod: self.dir / mod / f"{i}.npy" for mod in _MODS}

    def sample_id(self, i: int) -> str:
        """``<split>/<index>``, the id :meth:`__getitem__` gives sample ``i`` (no file read)."""
        return f"{self.split}/{i}"

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"MTANDataset: index {i} out of range for {self.n} samples")
        paths = self.files(i)

        image = read_npy(paths["image"], "image")
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype.kind not in "fiu":
            raise DataError(
                f"{paths['image']}: image has shape {image.shape} dtype {image.dtype}, expected float (H, W, 3)"
            )
        image = image.astype(np.float32)
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
        if not np.isfinite(image).all() or lo < -IMAGE_RANGE_TOL or hi > 1 + IMAGE_RANGE_TOL:
            raise DataError(
                f"{paths['image']}: image values span [{lo:.4g}, {hi:.4g}], expected finite values in [0, 1]"
            )
        hw = image.shape[:2]

        label = read_npy(paths["label"], "label map")
        if label.ndim == 3 and label.shape[-1] == 1:
            label = label[..., 0]
        if label.shape != hw:
            raise DataError(
                f"{paths['label']}: label map has shape {label.shape}, expected {hw} like {paths['image']}"
            )
        if label.dtype.kind == "f" and (not np.isfinite(label).all() or (label != np.round(label)).any()):
            raise DataError(f"{paths['label']}: label map has non-integer or non-finite values")
        if label.dtype.kind not in "fiu":
            raise DataError(f"{paths['label']}: label map has dtype {label.dtype}, expected numbers")
        seg = label.astype(np.int64)
        check_labels(seg, self.num_seg_classes, paths["label"])  # -1 is IGNORE_INDEX already

        depth = read_npy(paths["depth"], "depth")
        if depth.ndim == 3 and depth.shape[-1] == 1:
            depth = depth[..., 0]
        if depth.shape != hw or depth.dtype.kind != "f":
            raise DataError(
                f"{paths['depth']}: depth has shape {depth.shape} dtype {depth.dtype}, expected float {(*hw, 1)}"
            )
        depth, depth_valid = sanitize_depth(depth, paths["depth"], self.allow_invalid_depth)

        normal = read_npy(paths["normal"], "normal map")
        if normal.shape != (*hw, 3) or normal.dtype.kind != "f":
            raise DataError(
                f"{paths['normal']}: normals have shape {normal.shape} dtype {normal.dtype}, expected float {(*hw, 3)}"
            )
        if not np.isfinite(normal).all():
            raise DataError(f"{paths['normal']}: normals have non-finite values (invalid normals must be 0)")
        normal, normal_valid = normalise_normals(normal)

        scene = -1 if self.scene_labels is None else int(self.scene_labels[i])
        source = f"{self.dir}: sample {i} ({paths['image']})"
        sample = make_sample(
            rgb01=np.clip(image, 0.0, 1.0),
            seg=seg,
            depth=depth,
            depth_valid=depth_valid,
            normal=normal,
            normal_valid=normal_valid,
            scene=scene,
            sample_id=self.sample_id(i),
            size=self.size,
            source=source,
        )
        if self.validate:
            validate_sample(
                sample,
                self.num_seg_classes,
                source,
                self.info.num_scenes or None,
                allow_unknown_scene=self.scene_labels is None,
            )
        return sample


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def write_mtan(
    samples: Iterable[Mapping],
    root: str | Path,
    split: str,
    scene_names: Sequence[str] | None = None,
    seg_class_names: Sequence[str] | None = None,
) -> Path:
    """Write samples (sample format) as one MTAN split, numbered 0..N-1.

    ``image`` float32 (H, W, 3) ``(rgb + 1) / 2``; ``label`` float32 (H, W) with -1 void;
    ``depth`` float32 (H, W, 1) metres, 0 invalid; ``normal`` float32 (H, W, 3), 0 invalid.
    With ``scene_names`` the scene labels go into ``root/scenes.json`` (other splits kept), and
    with ``seg_class_names`` the class names and count too (the loader reads them as defaults).
    The split folder must not already hold images.
    """
    if split not in SPLITS:
        raise DataError(f"write_mtan: split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    base = root / split
    if (base / "image").exists() and any((base / "image").iterdir()):
        raise DataError(f"{base / 'image'}: already holds files; write_mtan needs an empty split folder")
    for mod in _MODS:
        (base / mod).mkdir(parents=True, exist_ok=True)
    scenes = []
    for i, s in enumerate(samples):
        rgb = _np(s["rgb"]).astype(np.float32)
        np.save(
            base / "image" / f"{i}.npy", ((rgb.transpose(1, 2, 0) + 1.0) * 0.5).clip(0, 1).astype(np.float32)
        )
        seg = _np(s["seg"]).astype(np.int64)
        np.save(base / "label" / f"{i}.npy", np.where(seg == IGNORE_INDEX, -1, seg).astype(np.float32))
        dm = _np(s["depth_mask"])[0].astype(bool)
        np.save(
            base / "depth" / f"{i}.npy", np.where(dm, _np(s["depth"])[0], 0).astype(np.float32)[..., None]
        )
        nm = _np(s["normal_mask"])[0].astype(bool)
        normal = np.where(nm[None], _np(s["normal"]), 0).astype(np.float32).transpose(1, 2, 0)
        np.save(base / "normal" / f"{i}.npy", np.ascontiguousarray(normal))
        scenes.append(int(_np(s["scene"])))
    if not scenes:
        raise DataError("write_mtan: no samples given")
    if scene_names is not None:
        path = root / SCENES_JSON
        meta = read_scenes_json(path) if path.exists() else {}
        if meta and list(meta["scene_names"]) != [str(n) for n in scene_names]:
            raise DataError(f"{path}: holds other scene_names {list_preview(meta['scene_names'])}")
        bad = [i for i, v in enumerate(scenes) if not 0 <= v < len(scene_names)]
        if bad:
            raise DataError(
                f"write_mtan: sample(s) {list_preview([str(i) for i in bad])} have scenes outside [0, {len(scene_names)})"
            )
        meta["scene_names"] = [str(n) for n in scene_names]
        meta[split] = scenes
        if seg_class_names is not None:
            meta["seg_class_names"] = [str(n) for n in seg_class_names]
            meta["num_seg_classes"] = len(seg_class_names)
        path.write_text(json.dumps(meta) + "\n")
    return root
