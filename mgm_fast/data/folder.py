"""The released code's folder layout ("official", docs/method.md section 4.1): loader and writer.

Layout::

    root/
      dataset.json              optional metadata, see below (written by write_folder)
      rgb/<scene>/<stem>.png    colour image, 8-bit PNG or JPEG (.png .jpg .jpeg)
      ss/<scene>/<stem>.npy     integer label map (H, W)
      de/<scene>/<stem>.npy     float depth (H, W) in metres, 0 = no measurement
      nm/<scene>/<stem>.png     8-bit normal map, channel p -> 2 p / 255 - 1
        (or sn/<scene>/...)     the readme calls the folder sn/, the code reads nm/: both are
                                accepted, both at once is an error
      msk/<scene>/<stem>.png    optional normal validity mask, 8-bit, > 127 = valid

Scenes: the scene index is the position of the folder name in the sorted list of folders under
``rgb/`` (as in the released code). Modalities are paired by file stem within a scene folder,
not by sort position (the released code pairs by walk order and never checks): a stem that is
missing from a modality, or one that a modality has in excess, is an error listing the stems
and the folder. Hidden files are ignored.

Decoding (each rule exists to avoid a released-code bug, B3/B4):

* ``seg = raw + label_offset`` with ``raw == ignore_value`` -> ``IGNORE_INDEX``. NYUv2-40 label
  maps are often stored 1..40 with 0 = void: ``label_offset=-1`` maps 0 to -1 (ignored) and
  1..40 to 0..39. Any other label outside [0, num_seg_classes) is an error naming the file.
* depth must be a float array in metres; 0 means "no measurement". NaN, inf or negative values
  are errors naming the file unless ``allow_invalid_depth=True``, which masks them instead. The
  released code trains depth with an all-ones mask; here ``depth_mask = depth > 0``.
* normals: ``2 p / 255 - 1`` renormalised to unit length; vectors of length outside [0.5, 1.5]
  (grey "no normal" fill, black fill) are invalid. ``normal_mask = valid & (msk > 127)`` when
  ``msk/`` exists (the released code resizes the mask bilinearly into soft values instead).
* resizing to ``image_size`` follows :func:`mgm_fast.data.sample.make_sample`: bilinear
  (antialiased) RGB, nearest for labels, depth, normals and masks.

Number of classes: ``num_seg_classes`` argument, else ``dataset.json``'s ``num_seg_classes``,
else an error. It is never inferred from the data: a split that happens to lack the last class
would silently shrink the model's output.

``dataset.json`` (all keys optional except ``num_seg_classes``)::

    {"format": "mgm_fast.folder", "version": 1,
     "num_seg_classes": 40, "seg_class_names": [...40 names...],
     "scene_names": [...one per scene folder, in sorted folder order...],
     "scene_dirs": [...the sorted scene folder names, checked against the disk...],
     "label_offset": 0, "ignore_value": null}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mgm_fast.data.sample import (
    IGNORE_INDEX,
    DataError,
    DatasetInfo,
    check_labels,
    decode_normals_8bit,
    encode_normals_8bit,
    image_to_rgb01,
    list_preview,
    make_sample,
    read_image,
    read_npy,
    sanitize_depth,
    target_size,
    validate_sample,
)

__all__ = [
    "DATASET_JSON",
    "MASK_THRESHOLD",
    "MODALITY_EXTENSIONS",
    "MODALITY_FIELDS",
    "RGB_EXTENSIONS",
    "FolderDataset",
    "apply_label_offset",
    "decode_labels",
    "read_dataset_json",
    "write_folder",
]

DATASET_JSON = "dataset.json"
FORMAT = "mgm_fast.folder"
VERSION = 1

RGB_EXTENSIONS = (".png", ".jpg", ".jpeg")
"""Colour image files under rgb/ (any case)."""
MODALITY_EXTENSIONS = {"ss": (".npy",), "de": (".npy",), "normals": (".png",), "msk": (".png",)}
"""File type of the other modalities, by their key in :meth:`FolderDataset.files` (``normals``
is the nm/ or sn/ folder)."""
MODALITY_FIELDS = {
    "rgb": ("rgb",),
    "ss": ("seg",),
    "de": ("depth", "depth_mask"),
    "normals": ("normal", "normal_mask"),
    "msk": ("normal", "normal_mask"),
}
"""Sample fields decoded from each file of a sample (keys of :meth:`FolderDataset.files`)."""
MASK_THRESHOLD = 127
"""A msk/ pixel keeps its normal valid where the pixel's PIL luma (``convert("L")``) exceeds this."""


def read_dataset_json(root: Path) -> dict:
    """The parsed ``root/dataset.json``, ``{}`` if absent; a malformed file is a DataError."""
    path = Path(root) / DATASET_JSON
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot parse ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _stems(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    """stem -> path of the files in ``folder`` with one of ``exts`` (case-insensitive)."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in exts:
            continue
        if p.stem in out:
            raise DataError(f"{folder}: two files share the stem {p.stem!r}: {out[p.stem].name}, {p.name}")
        out[p.stem] = p
    return out


def _as_2d(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    """(H, W), (H, W, 1) or (1, H, W) -> (H, W); anything else is a DataError."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise DataError(f"{path}: {what} has shape {arr.shape}, expected (H, W)")
    return arr


def decode_labels(
    arr: np.ndarray, path: Path, label_offset: int, ignore_value, num_classes: int
) -> np.ndarray:
    """Stored label map -> int64 (H, W) in [0, num_classes) or IGNORE_INDEX (see module docstring)."""
    arr = _as_2d(arr, path, "label map")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise DataError(f"{path}: label map is float ({arr.dtype}) with non-integer or non-finite values")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{path}: label map has dtype {arr.dtype}, expected integers")
    seg = apply_label_offset(arr.astype(np.int64), label_offset, ignore_value)
    check_labels(seg, num_classes, path)
    return seg


def apply_label_offset(raw, label_offset: int, ignore_value: int | None):
    """int64 stored labels (numpy array or torch tensor, any shape) -> ``raw + label_offset``,
    ``IGNORE_INDEX`` where ``raw == ignore_value`` (module docstring); same type and shape."""
    seg = raw + int(label_offset)
    if ignore_value is not None:
        seg[raw == int(ignore_value)] = IGNORE_INDEX
    return seg


class FolderDataset(torch.utils.data.Dataset):
    """Dataset over the released code's folder layout (module docstring), in the sample format.

    Args:
        root: dataset folder (holding rgb/, ss/, de/, nm/ or sn/, optional msk/).
        image_size: output size: int S (S x S), (H, W), or None to keep the files' size.
        num_seg_classes: number of classes; default from dataset.json (required somewhere).
        label_offset: added to stored labels; default from dataset.json, else 0.
        ignore_value: stored label meaning void (e.g. 255); default from dataset.json, else none.
        allow_invalid_depth: mask NaN / inf / negative depth instead of raising.
        seg_class_names: class names; default from dataset.json, else ``class_<i>``.
        scene_names: scene names, one per scene folder in sorted order; default from
            dataset.json, else the folder names.
        validate: run :func:`validate_sample` on every sample returned.

    Attributes:
        info: :class:`DatasetInfo`.
        records: list of ``(scene_index, scene_dir, stem, {modality: path})`` in index order.
    """

    layout = "official"

    def __init__(
        self,
        root: str | Path,
        image_size: int | tuple[int, int] | None = 128,
        num_seg_classes: int | None = None,
        label_offset: int | None = None,
        ignore_value: int | None = None,
        allow_invalid_depth: bool = False,
        seg_class_names: Sequence[str] | None = None,
        scene_names: Sequence[str] | None = None,
        validate: bool = True,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder does not exist")
        self.size = target_size(image_size)
        self.allow_invalid_depth = bool(allow_invalid_depth)
        self.validate = bool(validate)
        meta = read_dataset_json(self.root)
        meta_path = self.root / DATASET_JSON

        rgb_root = self.root / "rgb"
        if not rgb_root.is_dir():
            raise DataError(f"{rgb_root}: missing; the official layout needs rgb/, ss/, de/ and nm/ (or sn/)")
        for name in ("ss", "de"):
            if not (self.root / name).is_dir():
                raise DataError(
                    f"{self.root / name}: missing; the official layout needs rgb/, ss/, de/ and nm/ (or sn/)"
                )
        have = [d for d in ("nm", "sn") if (self.root / d).is_dir()]
        if not have:
            raise DataError(
                f"{self.root}: no normal folder; expected nm/ (released code) or sn/ (released readme)"
            )
        if len(have) == 2:
            raise DataError(
                f"{self.root}: both nm/ and sn/ exist; keep one normal folder (the released code reads nm/)"
            )
        self.normal_dir = have[0]
        self.has_mask = (self.root / "msk").is_dir()
        mod_dirs = {"ss": "ss", "de": "de", "normals": self.normal_dir}
        if self.has_mask:
            mod_dirs["msk"] = "msk"

        self.scene_dirs = _subdirs(rgb_root)
        if not self.scene_dirs:
            raise DataError(f"{rgb_root}: no scene folders (expected rgb/<scene>/<stem>.png)")
        problems: list[str] = []
        for d in mod_dirs.values():
            extra_scenes = sorted(set(_subdirs(self.root / d)) - set(self.scene_dirs))
            if extra_scenes:
                problems.append(f"{self.root / d}: scene folder(s) not in rgb/: {list_preview(extra_scenes)}")
        self.records: list[tuple[int, str, str, dict[str, Path]]] = []
        for s, scene in enumerate(self.scene_dirs):
            rgb_files = _stems(rgb_root / scene, RGB_EXTENSIONS)
            files = {mod: _stems(self.root / d / scene, MODALITY_EXTENSIONS[mod]) for mod, d in mod_dirs.items()}
            for mod, found in files.items():
                folder = self.root / mod_dirs[mod] / scene
                missing = sorted(set(rgb_files) - set(found))
                extra = sorted(set(found) - set(rgb_files))
                if missing:
                    problems.append(
                        f"{folder}: {len(missing)} stem(s) of {rgb_root / scene} missing: {list_preview(missing)}"
                    )
                if extra:
                    problems.append(
                        f"{folder}: {len(extra)} stem(s) with no image in {rgb_root / scene}: {list_preview(extra)}"
                    )
            for stem, rgb_path in rgb_files.items():
                paths = {"rgb": rgb_path}
                paths.update({mod: found[stem] for mod, found in files.items() if stem in found})
                self.records.append((s, scene, stem, paths))
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(f"{self.root}: modalities do not match by file stem:\n  {shown}{more}")
        if not self.records:
            raise DataError(f"{rgb_root}: no images found (extensions {', '.join(RGB_EXTENSIONS)})")

        if num_seg_classes is None:
            num_seg_classes = meta.get("num_seg_classes")
            if num_seg_classes is None:
                raise DataError(
                    f"{self.root}: number of segmentation classes unknown: pass num_seg_classes= "
                    f'or write {meta_path} with {{"num_seg_classes": C}} (it is never guessed from the labels)'
                )
        if not isinstance(num_seg_classes, int) or num_seg_classes < 1:
            raise DataError(f"{meta_path}: num_seg_classes must be a positive int, got {num_seg_classes!r}")
        self.num_seg_classes = int(num_seg_classes)
        self.label_offset = int(meta.get("label_offset", 0) if label_offset is None else label_offset)
        self.ignore_value = meta.get("ignore_value") if ignore_value is None else ignore_value

        if seg_class_names is None:
            # dataset.json's names only when they fit (num_seg_classes may be overridden)
            seg_class_names = meta.get("seg_class_names") or []
            if len(seg_class_names) != self.num_seg_classes:
                seg_class_names = [f"class_{i}" for i in range(self.num_seg_classes)]
        if len(seg_class_names) != self.num_seg_classes:
            raise DataError(
                f"{self.root}: {len(seg_class_names)} class names for {self.num_seg_classes} classes "
                f"(seg_class_names / {meta_path})"
            )
        if "scene_dirs" in meta and list(meta["scene_dirs"]) != self.scene_dirs:
            raise DataError(
                f"{meta_path}: scene_dirs {list_preview(meta['scene_dirs'])} do not match the sorted scene "
                f"folders under {rgb_root}: {list_preview(self.scene_dirs)}"
            )
        if scene_names is None:
            scene_names = meta.get("scene_names") or self.scene_dirs
        if len(scene_names) != len(self.scene_dirs):
            raise DataError(
                f"{self.root}: {len(scene_names)} scene names for {len(self.scene_dirs)} scene folders under {rgb_root}"
            )
        self.info = DatasetInfo(
            num_seg_classes=self.num_seg_classes,
            num_scenes=len(self.scene_dirs),
            seg_class_names=tuple(seg_class_names),
            scene_names=tuple(scene_names),
            layout=self.layout,
            root=str(self.root),
        )

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, i: int) -> str:
        _, scene, stem, _ = self.records[i]
        return f"{scene}/{stem}"

    def files(self, i: int) -> dict[str, Path]:
        """The files of sample ``i`` by modality (rgb, ss, de, normals, optional msk)."""
        return dict(self.records[i][3])

    def __getitem__(self, i: int) -> dict:
        s, scene, stem, paths = self.records[i]
        rgb01 = image_to_rgb01(read_image(paths["rgb"], "RGB image"), paths["rgb"])
        seg = decode_labels(
            read_npy(paths["ss"], "label map"),
            paths["ss"],
            self.label_offset,
            self.ignore_value,
            self.num_seg_classes,
        )
        depth_raw = _as_2d(read_npy(paths["de"], "depth"), paths["de"], "depth map")
        if depth_raw.dtype.kind != "f":
            raise DataError(
                f"{paths['de']}: depth has dtype {depth_raw.dtype}; expected float metres "
                "(integer depth is usually millimetres: convert it first)"
            )
        depth, depth_valid = sanitize_depth(depth_raw, paths["de"], self.allow_invalid_depth)
        normal, normal_valid = decode_normals_8bit(
            read_image(paths["normals"], "normal map"), paths["normals"]
        )
        if "msk" in paths:
            msk_img = read_image(paths["msk"], "mask")
            if msk_img.mode not in ("L", "1", "P", "RGB", "RGBA", "LA"):
                raise DataError(
                    f"{paths['msk']}: mask has PIL mode {msk_img.mode!r}; expected an 8-bit image"
                )
            msk = np.asarray(msk_img.convert("L")) > MASK_THRESHOLD
            if msk.shape != normal_valid.shape:
                raise DataError(
                    f"{paths['msk']}: mask is {msk.shape[1]}x{msk.shape[0]} but the normal map "
                    f"{paths['normals']} is {normal_valid.shape[1]}x{normal_valid.shape[0]}"
                )
            normal_valid = normal_valid & msk
        source = f"{self.root}: sample {scene}/{stem} ({paths['rgb']})"
        sample = make_sample(
            rgb01=rgb01,
            seg=seg,
            depth=depth,
            depth_valid=depth_valid,
            normal=normal,
            normal_valid=normal_valid,
            scene=s,
            sample_id=f"{scene}/{stem}",
            size=self.size,
            source=source,
        )
        if self.validate:
            validate_sample(
                sample, self.num_seg_classes, source, self.info.num_scenes, allow_unknown_scene=False
            )
        return sample


# -------------------------------------------------------------------------------------------
# Writer.

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _scene_dir_names(scene_names: Sequence[str]) -> list[str]:
    """Folder per scene, prefixed by its index so that sorting the folders reproduces the
    scene indices (the loader numbers scenes by sorted folder name)."""
    width = max(2, len(str(len(scene_names) - 1)))
    out = []
    for i, name in enumerate(scene_names):
        safe = _SAFE.sub("_", str(name)).strip("._") or "scene"
        out.append(f"{i:0{width}d}_{safe}")
    return out


def write_folder(
    dataset_samples: Iterable[Mapping],
    root: str | Path,
    scene_names: Sequence[str],
    seg_offset: int = 0,
    seg_class_names: Sequence[str] | None = None,
    num_seg_classes: int | None = None,
    normals_dir: str = "nm",
    write_mask: bool = True,
) -> Path:
    """Write samples (sample format) in the official layout, plus ``dataset.json``.

    Files: ``rgb`` PNG uint8 ``round((rgb + 1) * 127.5)``; ``ss`` .npy int16 ``seg + seg_offset``
    (void -1 becomes ``seg_offset - 1``, e.g. 0 with ``seg_offset=1``, NYUv2 style); ``de`` .npy
    float32 metres with 0 where invalid; normals PNG uint8 ``round((n + 1) / 2 * 255)`` with
    (128, 128, 128) where invalid; ``msk`` PNG uint8 0/255 from ``normal_mask``. Scene folders
    are ``<index>_<name>`` so their sorted order is the scene index; stems come from the ids.

    Args:
        dataset_samples: iterable of samples (a Dataset or a list).
        root: output folder; must not already hold an rgb/ folder.
        scene_names: names of all scenes, index = ``sample["scene"]``.
        seg_offset: added to labels when stored; dataset.json records ``label_offset = -seg_offset``
            so the loader undoes it.
        seg_class_names / num_seg_classes: class metadata for dataset.json; default: the names
            if given, else the largest label written + 1.
        normals_dir: ``"nm"`` (released code) or ``"sn"`` (released readme).
        write_mask: write ``msk/`` from ``normal_mask``.
    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    if normals_dir not in ("nm", "sn"):
        raise ValueError(f"write_folder: normals_dir must be 'nm' or 'sn', got {normals_dir!r}")
    if (root / "rgb").exists():
        raise DataError(f"{root / 'rgb'}: already exists; write_folder needs a fresh folder")
    scene_names = [str(n) for n in scene_names]
    if not scene_names:
        raise ValueError("write_folder: scene_names is empty")
    dirs = _scene_dir_names(scene_names)
    mods = ["rgb", "ss", "de", normals_dir] + (["msk"] if write_mask else [])
    for m in mods:
        for d in dirs:
            (root / m / d).mkdir(parents=True, exist_ok=True)
    max_label = -1
    seen: set[tuple[str, str]] = set()
    count = 0
    for k, sample in enumerate(dataset_samples):
        scene = int(_np(sample["scene"]))
        if not 0 <= scene < len(scene_names):
            raise DataError(
                f"write_folder: sample {sample.get('id', k)!r} has scene {scene}, not in [0, {len(scene_names)})"
            )
        stem = _SAFE.sub("_", str(sample.get("id", f"{k:06d}"))).strip("._") or f"{k:06d}"
        if (dirs[scene], stem) in seen:
            raise DataError(f"write_folder: two samples map to {dirs[scene]}/{stem}; ids must be unique")
        seen.add((dirs[scene], stem))
        rgb = np.rint((_np(sample["rgb"]).astype(np.float32).transpose(1, 2, 0) + 1.0) * 127.5)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(
            root / "rgb" / dirs[scene] / f"{stem}.png"
        )
        seg = _np(sample["seg"]).astype(np.int64)
        max_label = max(max_label, int(seg.max()))
        stored = seg + int(seg_offset)
        if stored.min() < np.iinfo(np.int16).min or stored.max() > np.iinfo(np.int16).max:
            raise DataError(f"write_folder: labels of {stem} do not fit int16 after seg_offset={seg_offset}")
        np.save(root / "ss" / dirs[scene] / f"{stem}.npy", stored.astype(np.int16))
        dmask = _np(sample["depth_mask"])[0].astype(bool)
        depth = np.where(dmask, _np(sample["depth"])[0], 0).astype(np.float32)
        np.save(root / "de" / dirs[scene] / f"{stem}.npy", depth)
        nmask = _np(sample["normal_mask"])[0].astype(bool)
        enc = encode_normals_8bit(_np(sample["normal"]).astype(np.float32).transpose(1, 2, 0), nmask)
        Image.fromarray(enc, "RGB").save(root / normals_dir / dirs[scene] / f"{stem}.png")
        if write_mask:
            Image.fromarray(nmask.astype(np.uint8) * 255, "L").save(
                root / "msk" / dirs[scene] / f"{stem}.png"
            )
        count += 1
    if count == 0:
        raise DataError("write_folder: no samples given")
    if num_seg_classes is None:
        num_seg_classes = len(seg_class_names) if seg_class_names is not None else max_label + 1
    if seg_class_names is None:
        seg_class_names = [f"class_{i}" for i in range(num_seg_classes)]
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_seg_classes": int(num_seg_classes),
        "seg_class_names": [str(n) for n in seg_class_names],
        "scene_names": scene_names,
        "scene_dirs": dirs,
        "label_offset": -int(seg_offset),
        "ignore_value": None,
        "normals_dir": normals_dir,
        "depth_unit": "metre",
        "num_samples": count,
    }
    (root / DATASET_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return root
