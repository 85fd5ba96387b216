"""Taskonomy layout: loader and writer (segmentation, z-buffer depth, normals, Places scene labels).

Folder structures (both occur in the wild; ``layout="auto"`` tells them apart)

* ``"building_first"``: ``root/<building>/<task>/<file>`` -- one folder per building, as the
  per-building archives and the public sample building (github.com/alexsax/taskonomy-sample-model-1:
  ``rgb/``, ``depth_zbuffer/``, ``normal/``, ``segment_semantic/``, ``class_scene/``, ... side by side).
* ``"task_first"``: ``root/<task>/<building>/<file>`` -- the layout of taskgrouping
  (github.com/tstandley/taskgrouping README: "root/rgb/building/point_x_view_x.png ...
  root/task/building/point_x_view_x.png") and of the omnitools downloader, which adds a component
  level, ``root/<task>/taskonomy/<building>/`` (EPFL-VILAB/omnidata ``OmnidataDataset``
  docstring); that extra ``taskonomy/`` level is recognised.

Auto-detection: ``root/rgb/`` exists -> task_first; otherwise the sub-folders of ``root`` that
hold an ``rgb/`` folder are the buildings. Both at once is an error.

File names: ``point_<p>_view_<v>_domain_<task>.<ext>`` (sample building, omnidata); the domain
suffix may be absent (taskgrouping README). A file whose domain differs from its folder's task
is an error. Files are paired by (building, point, view): a view missing from a task, or one a
task has in excess, is an error listing the files and the folder.

Decoding conventions (sources in brackets)

* ``rgb``: 8-bit RGB PNG, 512x512 [StanfordVL/taskonomy data/README.md: "RGB images in 512x512
  resolution"].
* ``depth_zbuffer``: single-channel 16-bit PNG, "Units of 1/512m with a max range of 128m"
  [StanfordVL/taskonomy data/README.md; omnidata dataset README: "In increments of 1/512m"; the
  omnidata loader divides the raw value by 512]. The value 65535 = 2^16 - 1 marks missing depth
  [taskonomy code/lib/data/load_ops.py: ``img[img == 2**16 - 1] = 0  # remap missing to 0``;
  omnidata ``task_configs.py`` masks the value 1.0 of depth scaled by 1/65535]. So
  ``depth = raw / 512`` metres, raw 65535 (and raw 0) invalid; e.g. raw 1024 -> 2.0 m.
  ``max_depth`` optionally masks far depth too (taskgrouping trains only on raw < 2^13, 16 m).
* ``normal``: 8-bit RGB PNG, "127-centered" [taskonomy data/README.md]; decoded as
  ``2 * p / 255 - 1`` [omnidata ``transform_normal_world``: ``(ToTensor(x) - 0.5) * 2``;
  taskgrouping loader: ``(x - .5) * 2``], renormalised. Pixels without geometry hold grey 128 in
  all channels [omnidata ``task_configs.py``: normal ``mask_val`` 0.502 = 128/255], which decodes
  to a near-zero vector and is therefore invalid here. The values are kept in the stored camera
  frame (omnidata documents it as +X right, +Y down, +Z out of the screen towards the viewer).
* ``segment_semantic``: single-channel 8-bit PNG, labels 0..17 "distilled from FCIS" (COCO
  objects) [taskonomy data/README.md; alexsax/taskonomy-sample-model-1 issue #3 observes values
  0..17 while the task bank's decoder has 17 outputs]. Taskonomy's own loader treats 0 as
  unlabelled and shifts the rest down by one [load_ops.py ``semantic_segment_rebalanced``:
  ``mask = img > 0.1; img[img == 0] = 1; img = img - 1``], taskgrouping ignores 0 in its loss
  (``cross_entropy(..., ignore_index=0)``). Here: raw 0 -> ``IGNORE_INDEX``, raw v -> v - 1, so
  17 classes with class 0 = raw 1, the background of the distilled detector. The class names are
  not documented with the data: defaults are ``background, class02 .. class17`` (raw values);
  pass ``seg_class_names`` to name them. ``background_as_ignore=True`` also ignores raw 1
  (16 object classes).
* ``class_scene``: ``.npy`` float vector of 365 scene probabilities "distilled from PlaceNet"
  [taskonomy data/README.md; omnidata ``task_configs.py``: class_scene has 365 outputs; Places365].
  The scene label is the arg-max. With ``scene_classes`` (Places365 indices, or names when
  ``places_names`` is given) only those classes are kept, with ``scene_other``:

  - ``"other"``: arg-max over all 365; a winner outside the list becomes one extra class "other";
  - ``"drop"``: arg-max over all 365; views whose winner is outside the list are left out of the
    dataset (all class_scene files are read when the dataset is built);
  - ``"restrict"``: arg-max over the listed classes only (Taskonomy's own loader keeps a fixed
    subset of 63 Places classes and renormalises, load_ops.py ``class_places``).
* optional validity mask: a ``mask_valid/`` (omnidata: 0 = missing geometry, 255 = valid) or
  ``mask/`` (taskgrouping) task folder; where present it masks depth and normals too.

Places365 names are not bundled. ``places_names`` may be a list of 365 names or a text file
with one name per line (``/a/airfield``, ``'/a/airfield'`` and ``/a/airfield 0`` line styles are
understood, as in the Places365 ``categories_places365.txt``); names are matched with or without
their ``/a/`` prefix. Without it scene names are ``places365_<index>``.
"""

from __future__ import annotations

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
    target_size,
    validate_sample,
)

__all__ = [
    "DEPTH_INVALID",
    "DEPTH_UNITS_PER_METRE",
    "MASK_TASKS",
    "MASK_THRESHOLD",
    "NUM_PLACES",
    "NUM_SEG_RAW",
    "REQUIRED",
    "TASK_FIELDS",
    "TaskonomyDataset",
    "decode_depth_zbuffer",
    "decode_segment_semantic",
    "depth_zbuffer_valid",
    "mask_file",
    "scene_from_scores",
    "segment_semantic_classes",
    "write_taskonomy",
]

DEPTH_UNITS_PER_METRE = 512.0
DEPTH_INVALID = 65535
NUM_PLACES = 365
NUM_SEG_RAW = 18
"""segment_semantic holds the raw values 0..NUM_SEG_RAW - 1."""
MASK_TASKS = ("mask_valid", "mask")
"""Validity-mask task folders (omnidata, taskgrouping); a building uses the first one it has."""
MASK_THRESHOLD = 0
"""A mask pixel is valid where its value (PIL luma of 8-bit masks) exceeds this."""
TASK_FIELDS = {
    "rgb": ("rgb",),
    "segment_semantic": ("seg",),
    "depth_zbuffer": ("depth", "depth_mask"),
    "normal": ("normal", "normal_mask"),
    "mask": ("depth", "depth_mask", "normal", "normal_mask"),
    "class_scene": ("scene",),
}
"""Sample fields decoded from each task's file (``"mask"``: whichever of :data:`MASK_TASKS`)."""
REQUIRED = ("rgb", "segment_semantic", "depth_zbuffer", "normal")
_EXT = {"rgb": ".png", "segment_semantic": ".png", "depth_zbuffer": ".png", "normal": ".png", "class_scene": ".npy",
        "mask_valid": ".png", "mask": ".png"}  # fmt: skip
_NAME = re.compile(r"^point_(\d+)_view_(\d+)(?:_domain_([A-Za-z0-9_]+))?$")


def decode_depth_zbuffer(
    arr: np.ndarray, path: Path, max_depth: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw 16-bit depth_zbuffer values -> (metres float32 with 0 where invalid, valid bool).
    65535 and 0 are invalid; ``max_depth`` (metres) masks farther depth too."""
    if arr.ndim != 2:
        raise DataError(
            f"{path}: depth_zbuffer has shape {arr.shape}, expected a single-channel (H, W) image"
        )
    raw = arr.astype(np.int64)
    if raw.min() < 0 or raw.max() > DEPTH_INVALID:
        raise DataError(
            f"{path}: depth_zbuffer values span [{raw.min()}, {raw.max()}], expected 16-bit 0..65535"
        )
    depth = (raw / DEPTH_UNITS_PER_METRE).astype(np.float32)
    valid = depth_zbuffer_valid(raw, depth, max_depth)
    return np.where(valid, depth, 0).astype(np.float32), valid


def depth_zbuffer_valid(raw, depth, max_depth: float | None = None):
    """Where depth_zbuffer holds a measurement: raw neither 65535 (missing) nor 0, and the depth
    in metres within ``max_depth`` when given. ``raw`` (integer) and ``depth`` (metres): numpy
    arrays or torch tensors of one shape; returns bool of that shape."""
    valid = (raw != DEPTH_INVALID) & (raw > 0)
    if max_depth is not None:
        valid &= depth <= max_depth
    return valid


def decode_segment_semantic(arr: np.ndarray, path: Path, background_as_ignore: bool = False) -> np.ndarray:
    """Raw segment_semantic labels (0..17) -> int64 classes (see module docstring)."""
    if arr.ndim != 2:
        raise DataError(
            f"{path}: segment_semantic has shape {arr.shape}, expected a single-channel (H, W) image"
        )
    raw = arr.astype(np.int64)
    bad = (raw < 0) | (raw >= NUM_SEG_RAW)
    if bad.any():
        vals = np.unique(raw[bad])
        raise DataError(
            f"{path}: segment_semantic has value(s) {', '.join(str(int(v)) for v in vals[:8])} outside 0..{NUM_SEG_RAW - 1}"
        )
    return segment_semantic_classes(raw, background_as_ignore)


def segment_semantic_classes(raw, background_as_ignore: bool = False):
    """Raw segment_semantic values in 0..17 (int64 numpy array or torch tensor, any shape) ->
    classes: ``raw - 1`` (``raw - 2`` with ``background_as_ignore``), ``IGNORE_INDEX`` below 0."""
    seg = raw - (2 if background_as_ignore else 1)
    seg[seg < 0] = IGNORE_INDEX
    return seg


def mask_file(paths: Mapping[str, Path]) -> Path | None:
    """The validity-mask file among a view's task files (the first of :data:`MASK_TASKS`), if any."""
    return next((paths[t] for t in MASK_TASKS if t in paths), None)


def scene_from_scores(scores: np.ndarray, keep: Sequence[int] | None, scene_other: str) -> np.ndarray:
    """float (..., 365) class_scene scores -> int64 (...) scene labels (module docstring): the
    first arg-max over all classes when ``keep`` is None, over the kept classes with
    ``"restrict"``; else the position in ``keep`` of the overall arg-max, or outside the list
    ``len(keep)`` (``"other"``) or -1 (``"drop"``: the view is left out)."""
    if keep is None:
        return np.argmax(scores, -1).astype(np.int64)
    if scene_other == "restrict":
        return np.argmax(scores[..., keep], -1).astype(np.int64)
    hit = np.argmax(scores, -1)[..., None] == np.asarray(keep)
    outside = len(keep) if scene_other == "other" else -1
    return np.where(hit.any(-1), np.argmax(hit, -1), outside).astype(np.int64)


def _read_places_names(places_names) -> list[str] | None:
    if places_names is None:
        return None
    if isinstance(places_names, str | Path):
        path = Path(places_names)
        try:
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise DataError(f"{path}: cannot read Places365 names ({e})") from None
        names = [ln.split()[0].strip("'\"") for ln in lines]
        where = str(path)
    else:
        names = [str(n) for n in places_names]
        where = "places_names"
    if len(names) != NUM_PLACES:
        raise DataError(f"{where}: {len(names)} Places365 names, expected {NUM_PLACES}")
    return names


def _short(name: str) -> str:
    """'/a/airport_terminal' -> 'airport_terminal' (the Places365 letter prefix removed)."""
    return re.sub(r"^/[a-z]/", "", name)


class TaskonomyDataset(torch.utils.data.Dataset):
    """Taskonomy views (module docstring) in the sample format.

    Args:
        root: dataset folder.
        image_size: int S (S x S), (H, W), or None to keep the files' size (512x512).
        buildings: building whitelist: names, or a text file with one name per line; None = all.
        layout: folder structure, ``"auto"``, ``"building_first"`` or ``"task_first"``; the one
            used is ``self.folder_layout`` (``self.layout`` is ``"taskonomy"`` like ``info.layout``).
        scenes: ``"class_scene"`` (scene labels from class_scene/, required) or ``"none"``.
        scene_classes: Places365 classes to keep (indices, or names with ``places_names``);
            None keeps all 365.
        scene_other: ``"other"``, ``"drop"`` or ``"restrict"`` (module docstring).
        places_names: 365 names or a file of them, for scene names and name lookup.
        background_as_ignore: ignore raw segment label 1 too (16 classes instead of 17).
        max_depth: mask depth beyond this many metres (None: keep everything below 128 m).
        seg_class_names: names of the segmentation classes.
        validate: run :func:`validate_sample` on every sample returned.
    """

    layout = "taskonomy"

    def __init__(
        self,
        root: str | Path,
        image_size: int | tuple[int, int] | None = 128,
        buildings: Sequence[str] | str | Path | None = None,
        layout: str = "auto",
        scenes: str = "class_scene",
        scene_classes: Sequence[int | str] | None = None,
        scene_other: str = "other",
        places_names: Sequence[str] | str | Path | None = None,
        background_as_ignore: bool = False,
        max_depth: float | None = None,
        seg_class_names: Sequence[str] | None = None,
        validate: bool = True,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder does not exist")
        self.size = target_size(image_size)
        self.background_as_ignore = bool(background_as_ignore)
        self.max_depth = max_depth
        self.validate = bool(validate)
        if scenes not in ("class_scene", "none"):
            raise DataError(f"TaskonomyDataset: scenes must be 'class_scene' or 'none', got {scenes!r}")
        if scene_other not in ("other", "drop", "restrict"):
            raise DataError(
                f"TaskonomyDataset: scene_other must be 'other', 'drop' or 'restrict', got {scene_other!r}"
            )
        self.use_scenes = scenes == "class_scene"
        self.scene_other = scene_other

        self.folder_layout = self._detect_layout(layout)
        all_buildings = self._buildings()
        if buildings is not None:
            wanted = self._whitelist(buildings)
            unknown = sorted(set(wanted) - set(all_buildings))
            if unknown:
                raise DataError(
                    f"{self.root}: whitelisted building(s) not found ({self.folder_layout} layout): {list_preview(unknown)}; "
                    f"available: {list_preview(all_buildings)}"
                )
            all_buildings = [b for b in all_buildings if b in set(wanted)]
        if not all_buildings:
            raise DataError(f"{self.root}: no buildings found ({self.folder_layout} layout)")
        self.buildings = all_buildings

        tasks = list(REQUIRED) + (["class_scene"] if self.use_scenes else [])
        problems: list[str] = []
        self.records: list[tuple[str, int, int, dict[str, Path]]] = []
        self.dropped = 0
        for b in self.buildings:
            mask_task = next((t for t in MASK_TASKS if self._task_dir(b, t).is_dir()), None)
            files = {t: self._index(b, t, problems) for t in tasks + ([mask_task] if mask_task else [])}
            keys = set(files["rgb"])
            for t, found in files.items():
                if t == "rgb":
                    continue
                missing = sorted(keys - set(found))
                extra = sorted(set(found) - keys)
                if missing:
                    problems.append(
                        f"{self._task_dir(b, t)}: {len(missing)} view(s) of {self._task_dir(b, 'rgb')} missing: "
                        f"{list_preview([f'point_{p}_view_{v}' for p, v in missing])}"
                    )
                if extra:
                    problems.append(
                        f"{self._task_dir(b, t)}: {len(extra)} view(s) with no rgb image: "
                        f"{list_preview([f'point_{p}_view_{v}' for p, v in extra])}"
                    )
            for key in sorted(keys):
                self.records.append((b, key[0], key[1], {t: f[key] for t, f in files.items() if key in f}))
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(
                f"{self.root}: Taskonomy tasks do not match by view ({self.folder_layout} layout):\n  {shown}{more}"
            )
        if not self.records:
            raise DataError(f"{self.root}: no rgb views found in building(s) {list_preview(self.buildings)}")

        # Scene classes.
        self.places_names = _read_places_names(places_names)
        if not self.use_scenes:
            self.keep = None
            scene_names: list[str] = []
        else:
            self.keep = None if scene_classes is None else self._resolve_scene_classes(scene_classes)
            base = self.places_names or [f"places365_{i:03d}" for i in range(NUM_PLACES)]
            if self.keep is None:
                scene_names = list(base)
            else:
                scene_names = [base[i] for i in self.keep]
                if scene_other == "other":
                    scene_names.append("other")
            if self.keep is not None and scene_other == "drop":
                kept = []
                for rec in self.records:
                    if self._scene_of(rec[3]["class_scene"]) >= 0:
                        kept.append(rec)
                if not kept:
                    raise DataError(
                        f"{self.root}: scene_other='drop' left no views (scene_classes {list(self.keep)})"
                    )
                self.dropped = len(self.records) - len(kept)
                self.records = kept
        self.num_seg_classes = 16 if self.background_as_ignore else 17
        if seg_class_names is None:
            raw = range(2, NUM_SEG_RAW) if self.background_as_ignore else range(1, NUM_SEG_RAW)
            seg_class_names = ["background" if v == 1 else f"class{v:02d}" for v in raw]
        self.info = DatasetInfo(
            num_seg_classes=self.num_seg_classes,
            num_scenes=len(scene_names),
            seg_class_names=tuple(seg_class_names),
            scene_names=tuple(scene_names),
            layout=self.layout,
            root=str(self.root),
            extra={"folder_layout": self.folder_layout, "buildings": tuple(self.buildings)},
        )

    # -- layout
    def _detect_layout(self, layout: str) -> str:
        if layout not in ("auto", "building_first", "task_first"):
            raise DataError(
                f"TaskonomyDataset: layout must be auto, building_first or task_first, got {layout!r}"
            )
        task_first = (self.root / "rgb").is_dir()
        building_first = any(
            (p / "rgb").is_dir()
            for p in self.root.iterdir()
            if p.is_dir() and p.name != "rgb" and not p.name.startswith(".")
        )
        if layout == "auto":
            if task_first and building_first:
                raise DataError(
                    f"{self.root}: both root/rgb/ (task_first) and root/<building>/rgb/ (building_first) exist; "
                    "pass layout= to choose"
                )
            if not (task_first or building_first):
                raise DataError(
                    f"{self.root}: no Taskonomy data: expected root/<building>/rgb/point_<p>_view_<v>_domain_rgb.png "
                    "(building_first) or root/rgb/<building>/... (task_first)"
                )
            return "task_first" if task_first else "building_first"
        return layout

    def _task_root(self, task: str) -> Path:
        d = self.root / task
        return d / "taskonomy" if (d / "taskonomy").is_dir() else d  # omnitools component level

    def _task_dir(self, building: str, task: str) -> Path:
        if self.folder_layout == "task_first":
            return self._task_root(task) / building
        return self.root / building / task

    def _buildings(self) -> list[str]:
        if self.folder_layout == "task_first":
            rgb = self._task_root("rgb")
            if not rgb.is_dir():
                raise DataError(f"{rgb}: missing (task_first layout)")
            return sorted(p.name for p in rgb.iterdir() if p.is_dir() and not p.name.startswith("."))
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "rgb").is_dir()
        )

    def _whitelist(self, buildings) -> list[str]:
        if isinstance(buildings, str | Path) and Path(buildings).is_file():
            lines = Path(buildings).read_text().splitlines()
            return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if isinstance(buildings, str):
            return [buildings]
        return [str(b) for b in buildings]

    def _index(self, building: str, task: str, problems: list[str]) -> dict[tuple[int, int], Path]:
        """(point, view) -> file of ``task`` in ``building``; naming problems are appended."""
        folder = self._task_dir(building, task)
        out: dict[tuple[int, int], Path] = {}
        if not folder.is_dir():
            problems.append(f"{folder}: task folder missing for building {building!r}")
            return out
        odd, wrong = [], []
        for p in folder.iterdir():
            if p.name.startswith(".") or p.suffix.lower() != _EXT[task]:
                continue
            m = _NAME.match(p.stem)
            if not m:
                odd.append(p.name)
                continue
            if m.group(3) is not None and m.group(3) != task:
                wrong.append(p.name)
                continue
            key = (int(m.group(1)), int(m.group(2)))
            if key in out:
                odd.append(p.name)
                continue
            out[key] = p
        if odd:
            problems.append(f"{folder}: unexpected or duplicate file name(s): {list_preview(sorted(odd))}")
        if wrong:
            problems.append(
                f"{folder}: file(s) of another domain than {task!r}: {list_preview(sorted(wrong))}"
            )
        return out

    # -- scenes
    def _resolve_scene_classes(self, scene_classes) -> list[int]:
        keep = []
        for c in scene_classes:
            if isinstance(c, int | np.integer) and not isinstance(c, bool):
                if not 0 <= int(c) < NUM_PLACES:
                    raise DataError(f"TaskonomyDataset: scene class index {c} outside [0, {NUM_PLACES})")
                keep.append(int(c))
                continue
            if self.places_names is None:
                raise DataError(
                    f"TaskonomyDataset: scene class {c!r} given by name; pass places_names= (365 names or a file) "
                    "or give Places365 indices"
                )
            hits = [i for i, n in enumerate(self.places_names) if str(c) in (n, _short(n))]
            if not hits:
                raise DataError(f"TaskonomyDataset: scene class {c!r} is not a Places365 name")
            keep.append(hits[0])
        if len(set(keep)) != len(keep) or not keep:
            raise DataError(
                f"TaskonomyDataset: scene_classes must be non-empty and distinct, got {list(scene_classes)}"
            )
        return keep

    def _scene_of(self, path: Path) -> int:
        """Scene label of one class_scene file; -1 = outside the kept classes (drop mode)."""
        arr = read_npy(path, "class_scene")
        arr = arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
        if arr.shape != (NUM_PLACES,) or arr.dtype.kind not in "fiu":
            raise DataError(
                f"{path}: class_scene has shape {arr.shape} dtype {arr.dtype}, expected ({NUM_PLACES},) floats"
            )
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: class_scene has non-finite values")
        return int(scene_from_scores(arr, self.keep, self.scene_other))

    # -- samples
    def __len__(self) -> int:
        return len(self.records)

    def files(self, i: int) -> dict[str, Path]:
        return dict(self.records[i][3])

    def sample_id(self, i: int) -> str:
        """``<building>/point_<p>_view_<v>``, the id :meth:`__getitem__` gives sample ``i``."""
        b, p, v, _ = self.records[i]
        return f"{b}/point_{p}_view_{v}"

    def __getitem__(self, i: int) -> dict:
        paths = self.records[i][3]
        rgb01 = image_to_rgb01(read_image(paths["rgb"], "RGB image"), paths["rgb"])
        seg_img = read_image(paths["segment_semantic"], "segment_semantic")
        if seg_img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise DataError(
                f"{paths['segment_semantic']}: segment_semantic has PIL mode {seg_img.mode!r}; expected a single-channel label PNG"
            )
        seg = decode_segment_semantic(
            np.asarray(seg_img), paths["segment_semantic"], self.background_as_ignore
        )
        check_labels(seg, self.num_seg_classes, paths["segment_semantic"])
        d_img = read_image(paths["depth_zbuffer"], "depth_zbuffer")
        if d_img.mode not in ("I", "I;16", "I;16B", "I;16L"):
            raise DataError(
                f"{paths['depth_zbuffer']}: depth_zbuffer has PIL mode {d_img.mode!r}; expected a 16-bit single-channel PNG"
            )
        depth, depth_valid = decode_depth_zbuffer(np.asarray(d_img), paths["depth_zbuffer"], self.max_depth)
        normal, normal_valid = decode_normals_8bit(read_image(paths["normal"], "normal map"), paths["normal"])
        mask_path = mask_file(paths)
        if mask_path is not None:
            m_img = read_image(mask_path, "validity mask")
            mask = np.asarray(m_img.convert("L") if m_img.mode not in ("I", "I;16") else m_img) > MASK_THRESHOLD
            for name, arr in (("depth_zbuffer", depth_valid), ("normal", normal_valid)):
                if mask.shape != arr.shape:
                    raise DataError(f"{mask_path}: mask is {mask.shape} but {name} is {arr.shape}")
            depth_valid = depth_valid & mask
            normal_valid = normal_valid & mask
        scene = self._scene_of(paths["class_scene"]) if self.use_scenes else -1
        if self.use_scenes and scene < 0:  # only reachable in drop mode if files changed after indexing
            raise DataError(f"{paths['class_scene']}: scene is outside scene_classes (the file changed?)")
        sid = self.sample_id(i)
        source = f"{self.root}: view {sid} ({paths['rgb']})"
        sample = make_sample(
            rgb01=rgb01,
            seg=seg,
            depth=depth,
            depth_valid=depth_valid,
            normal=normal,
            normal_valid=normal_valid,
            scene=scene,
            sample_id=sid,
            size=self.size,
            source=source,
        )
        if self.validate:
            validate_sample(
                sample,
                self.num_seg_classes,
                source,
                self.info.num_scenes or None,
                allow_unknown_scene=not self.use_scenes,
            )
        return sample


# -------------------------------------------------------------------------------------------
# Writer (tests and export).


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def write_taskonomy(
    samples: Iterable[Mapping],
    root: str | Path,
    building: str,
    layout: str = "building_first",
    places_index: Sequence[int] | None = None,
    start_point: int = 0,
    write_mask: bool = False,
) -> list[Path]:
    """Write samples (sample format) as views ``point_<start_point + k>_view_0`` of one building.

    rgb 8-bit PNG; segment_semantic 8-bit PNG ``seg + 1`` (void 0, so at most 17 classes);
    depth_zbuffer 16-bit PNG ``round(depth * 512)`` (clipped to 1..65534, 65535 where invalid);
    normal 8-bit PNG ``round((n + 1) / 2 * 255)`` (128 where invalid); class_scene .npy float32 of
    365 probabilities peaked (0.6) at ``places_index[scene]`` (default: the scene index itself);
    with ``write_mask`` also mask_valid/ (255 where depth is valid).
    Returns the rgb files written.
    """
    if layout not in ("building_first", "task_first"):
        raise ValueError(f"write_taskonomy: layout must be building_first or task_first, got {layout!r}")
    root = Path(root)
    tasks = ["rgb", "segment_semantic", "depth_zbuffer", "normal", "class_scene"] + (
        ["mask_valid"] if write_mask else []
    )

    def folder(task: str) -> Path:
        d = root / building / task if layout == "building_first" else root / task / building
        d.mkdir(parents=True, exist_ok=True)
        return d

    dirs = {t: folder(t) for t in tasks}
    written = []
    for k, s in enumerate(samples):
        name = f"point_{start_point + k}_view_0_domain_"
        rgb = np.rint((_np(s["rgb"]).astype(np.float32).transpose(1, 2, 0) + 1.0) * 127.5)
        path = dirs["rgb"] / f"{name}rgb.png"
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(path)
        written.append(path)
        seg = _np(s["seg"]).astype(np.int64)
        if seg.max() > NUM_SEG_RAW - 2:
            raise DataError(f"write_taskonomy: label {int(seg.max())} does not fit segment_semantic (max 16)")
        raw = np.where(seg == IGNORE_INDEX, 0, seg + 1).astype(np.uint8)
        Image.fromarray(raw, "L").save(dirs["segment_semantic"] / f"{name}segment_semantic.png")
        dm = _np(s["depth_mask"])[0].astype(bool)
        units = np.clip(
            np.rint(_np(s["depth"])[0].astype(np.float64) * DEPTH_UNITS_PER_METRE), 1, DEPTH_INVALID - 1
        )
        units = np.where(dm, units, DEPTH_INVALID).astype(np.uint16)
        Image.fromarray(units).save(dirs["depth_zbuffer"] / f"{name}depth_zbuffer.png")
        nm = _np(s["normal_mask"])[0].astype(bool)
        enc = encode_normals_8bit(_np(s["normal"]).astype(np.float32).transpose(1, 2, 0), nm)
        Image.fromarray(enc, "RGB").save(dirs["normal"] / f"{name}normal.png")
        scene = int(_np(s["scene"]))
        place = scene if places_index is None else int(places_index[scene])
        probs = np.full(NUM_PLACES, 0.4 / (NUM_PLACES - 1), dtype=np.float32)
        probs[place] = 0.6
        np.save(dirs["class_scene"] / f"{name}class_scene.npy", probs)
        if write_mask:
            Image.fromarray(dm.astype(np.uint8) * 255, "L").save(dirs["mask_valid"] / f"{name}mask_valid.png")
    return written
