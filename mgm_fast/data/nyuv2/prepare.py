"""The ``prepare-nyuv2`` pipeline: labelled frames -> samples -> a dataset folder with a manifest.

Crop: ``--crop none`` (default) keeps the whole 480 x 640 frame. ``--crop toolbox`` keeps the
region the NYU toolbox evaluates on (``get_projection_mask.m``: ``mask(45:471, 41:601)``, i.e.
0-based rows 44..470 and columns 40..600, 427 x 561), which drops the border that the
registration left without depth signal; the principal point moves with the crop.

Resizing and output
-------------------
Each frame becomes one sample (:func:`mgm_fast.data.sample.make_sample`) at ``--size``
(``128`` = 128 x 128 as MGM, ``288x384`` as MTAN, ``native``): RGB bilinear with antialiasing,
labels, depth, normals and masks nearest-neighbour (an invalid pixel stays invalid, a normal
stays a measured unit vector). The samples are written by the layout's own writer, so the output
is exactly what its loader and ``python -m mgm_fast.data check`` read:

* ``--layout official`` (:func:`mgm_fast.data.folder.write_folder`): ``rgb/ ss/ de/ nm/ msk/``
  with one folder per scene (``<index>_<name>``), file stem = 4-digit frame index (``0001``);
  labels stored 1..C with 0 = void, ``dataset.json`` with the class and scene names. With a split
  file (whose lists cover every frame, as the official one does) also ``split.json``, a
  :class:`mgm_fast.data.splits.Split` manifest for ``--split`` of
  ``python -m mgm_fast.train``: the 795 official train frames are the training set and the 654
  official test frames its ``val`` part (what train.py evaluates; MTAN likewise reports on the
  test frames and calls them val), labelled fraction ``--labelled-fraction``.
* ``--layout mtan`` (:func:`mgm_fast.data.mtan.write_mtan`, needs ``--splits``): ``train/`` =
  official train, ``val/`` = official test, numbered 0..N-1 in frame order, ``scenes.json``
  with scene labels and class names.

Both add ``nyuv2_manifest.json``: input file name, size and SHA-256, options, intrinsics, the
tables used, and one entry per frame (1-based index, sample id, split, scene type, scene index),
plus the counts and class histogram of the summary. The output is deterministic: the same input
and options give byte-identical files (no timestamps or absolute paths are stored, frames are
processed independently and written in frame order whatever ``--workers``). The dataset is
assembled in a hidden sibling folder and renamed into place at the end, so a failed or
interrupted run leaves nothing that looks like a dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgm_fast.data.nyuv2.normals import KINECT_RGB, NORMAL_RADIUS, NORMAL_THRESHOLDS, compute_normals
from mgm_fast.data.nyuv2.readers import DEPTH_VARIABLES, FRAME_HW, GivenNormals, LabelledFile, read_splits
from mgm_fast.data.nyuv2.tables import NUM_RAW_CLASSES, check_raw_names, check_scene_types, load_tables
from mgm_fast.data.sample import (
    DataError,
    _nearest_index,
    list_preview,
    make_sample,
    sanitize_depth,
    target_size,
)

__all__ = ["MANIFEST_NAME", "TOOLBOX_CROP", "format_prepare_summary", "parse_size", "prepare_nyuv2"]

MANIFEST_NAME = "nyuv2_manifest.json"
MANIFEST_FORMAT = "mgm_fast.nyuv2-prepare"
MANIFEST_VERSION = 1

TOOLBOX_CROP = (44, 471, 40, 601)
"""(row0, row1, col0, col1), 0-based half-open: the NYU toolbox's ``get_projection_mask.m``
(``mask(45:471, 41:601)`` in MATLAB's 1-based inclusive indexing), 427 x 561 pixels."""


# -------------------------------------------------------------------------------------------
# The command.


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """``"128"`` -> (128, 128), ``"288x384"`` -> (288, 384) (H x W), ``"native"`` / None -> None."""
    if text is None or (isinstance(text, str) and text.lower() == "native"):
        return None
    if isinstance(text, int):
        return target_size(text)
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise DataError(f"--size: expected N, HxW or native, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise DataError(f"--size: expected N, HxW or native, got {text!r}")
    return target_size(values[0] if len(values) == 1 else tuple(values))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Frame:
    """One frame as read from the file (full size): RGB uint8 (H, W, 3), depth float32 (H, W),
    raw labels (H, W)."""

    index: int  # 1-based, as in splits.mat
    rgb: np.ndarray
    depth: np.ndarray
    labels: np.ndarray


@dataclass
class _Converter:
    """Frame -> sample (sample format), the per-frame work; called from worker threads, so it
    only reads its fields."""

    mat: Path
    lut: np.ndarray
    scene_of_frame: Sequence[int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    full_hw: tuple[int, int]
    out_size: tuple[int, int] | None
    given: GivenNormals | None
    normal_radius: int
    allow_invalid_depth: bool

    def __call__(self, fr: _Frame) -> dict:
        source = f"{self.mat} frame {fr.index}"
        (r0, r1), (c0, c1) = self.rows, self.cols
        crop_hw = (r1 - r0, c1 - c0)
        labels = fr.labels[r0:r1, c0:c1].astype(np.int64)
        if labels.min() < 0 or labels.max() > NUM_RAW_CLASSES:
            bad = np.unique(labels[(labels < 0) | (labels > NUM_RAW_CLASSES)])
            raise DataError(
                f"{source}: raw label(s) {list_preview([str(int(b)) for b in bad])} outside 0..{NUM_RAW_CLASSES} "
                "(the labelled release has 894 raw classes, 0 = unlabelled)"
            )
        depth, depth_valid = sanitize_depth(fr.depth[r0:r1, c0:c1], Path(source), self.allow_invalid_depth)
        if self.given is None:
            # With a resize, only the pixels that make_sample's nearest-neighbour resize keeps are
            # computed: the same values as the full map there, ~3x faster at 128 x 128.
            grid = {}
            if self.out_size is not None:
                grid = {
                    "rows": _nearest_index(crop_hw[0], self.out_size[0]),
                    "cols": _nearest_index(crop_hw[1], self.out_size[1]),
                }
            normal, normal_valid = compute_normals(depth, offset=(r0, c0), radius=self.normal_radius, **grid)
        else:
            normal, normal_valid, nsrc = self.given.get(fr.index)
            if normal.shape[:2] == self.full_hw and crop_hw != self.full_hw:
                normal, normal_valid = normal[r0:r1, c0:c1], normal_valid[r0:r1, c0:c1]
            if normal.shape[:2] != crop_hw:
                also = (
                    f" (or the full {self.full_hw[0]}x{self.full_hw[1]} frame)"
                    if crop_hw != self.full_hw
                    else ""
                )
                raise DataError(
                    f"{nsrc}: normals are {normal.shape[0]}x{normal.shape[1]}; expected {crop_hw[0]}x{crop_hw[1]}{also}"
                )
        return make_sample(
            rgb01=fr.rgb[r0:r1, c0:c1].astype(np.float32) * np.float32(1 / 255),
            seg=self.lut[labels],
            depth=depth,
            depth_valid=depth_valid,
            normal=normal,
            normal_valid=normal_valid,
            scene=self.scene_of_frame[fr.index - 1],
            sample_id=f"{fr.index:04d}",
            size=self.out_size,
            source=source,
        )


def _frame_samples(
    src: LabelledFile,
    indices: Sequence[int],
    convert: _Converter,
    workers: int,
    block: int,
    on_sample: Callable[[int, dict], None],
) -> Iterator[dict]:
    """Samples of the 1-based frames ``indices`` (ascending), in that order, converted in a
    thread pool (numpy and torch release the GIL in their loops).

    Frames are read in contiguous runs of at most ``block`` (one HDF5 read each) and submitted
    to the pool; one run stays in flight while the next is read and the consumer (the layout's
    writer) stores finished samples, so the workers rarely wait. ``on_sample(index, sample)`` is
    called for each sample, in order, before it is yielded.
    """
    pending: deque = deque()

    def finish() -> dict:
        index, future = pending.popleft()
        sample = future.result()
        on_sample(index, sample)
        return sample

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            pos = 0
            while pos < len(indices):
                run = [indices[pos]]
                while (
                    pos + len(run) < len(indices)
                    and len(run) < block
                    and indices[pos + len(run)] == run[-1] + 1
                ):
                    run.append(indices[pos + len(run)])
                rgb, depth, labels = src.read(run[0] - 1, run[-1])
                for j, k in enumerate(run):
                    pending.append((k, pool.submit(convert, _Frame(k, rgb[j], depth[j], labels[j]))))
                pos += len(run)
                while len(pending) > block:
                    yield finish()
            while pending:
                yield finish()
        finally:
            for _, future in pending:  # after an error: do not compute what nobody will read
                future.cancel()


def prepare_nyuv2(
    mat: str | os.PathLike,
    out: str | os.PathLike,
    *,
    splits: str | os.PathLike | None = None,
    layout: str = "official",
    size: str | int | tuple[int, int] | None = 128,
    classes: int = 40,
    scene_set: int = 27,
    depth: str = "filled",
    crop: str = "none",
    normals: str | os.PathLike | None = None,
    limit: int | None = None,
    labelled_fraction: float = 1.0,
    split_seed: int = 0,
    allow_invalid_depth: bool = False,
    check_names: bool = True,
    normal_radius: int = NORMAL_RADIUS,
    workers: int | None = None,
    block: int = 8,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Convert the NYUv2 labelled release into a dataset folder (:mod:`mgm_fast.data.nyuv2` and its
    modules' docstrings).

    Args:
        mat: ``nyu_depth_v2_labeled.mat``.
        out: output folder; must not exist or be empty.
        splits: ``splits.mat`` with trainNdxs / testNdxs (required for ``layout="mtan"``).
        layout: ``"official"`` (released-code folders) or ``"mtan"`` (MTAN npy).
        size: output size: int S, (H, W), ``"HxW"`` or ``"native"`` / None.
        classes: 40 (Gupta et al.) or 13 (Couprie et al.).
        scene_set: 27 (scene types) or 10 (grouping).
        depth: ``"filled"`` or ``"raw"``.
        crop: ``"none"`` or ``"toolbox"`` (:data:`TOOLBOX_CROP`).
        normals: precomputed normals (folder or .npy); None computes them from the depth.
        limit: process only frames 1..limit (a quick trial; splits are cut accordingly).
        labelled_fraction, split_seed: of the ``split.json`` manifest (official layout + splits).
        allow_invalid_depth: mask NaN / inf / negative depth instead of raising.
        check_names: check the file's raw class names against the 40-class table.
        normal_radius: window radius of :func:`compute_normals`.
        workers: frames converted in parallel threads (default min(4, CPUs)); the output does
            not depend on it.
        block: frames read from the file at a time.
        progress: show a progress bar (tqdm, on stderr).
        log: where the summary lines go (None: silent).
    Returns:
        the summary dict (also stored in the manifest, without ``seconds`` and ``out``).
    """
    t0 = time.perf_counter()
    mat, out = Path(mat), Path(out)
    choices = {"layout": (layout, ("official", "mtan")), "classes": (classes, (40, 13)),
               "scene_set": (scene_set, (27, 10)), "crop": (crop, ("none", "toolbox")),
               "depth": (depth, tuple(DEPTH_VARIABLES))}  # fmt: skip
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise DataError(f"prepare-nyuv2: {name} must be one of {allowed}, got {value!r}")
    if layout == "mtan" and splits is None:
        raise DataError(
            "prepare-nyuv2: the MTAN layout is split into train/ and val/; pass --splits splits.mat "
            "(the official 795/654 split)"
        )
    if limit is not None and limit < 1:
        raise DataError(f"prepare-nyuv2: --limit must be >= 1, got {limit}")
    out_size = target_size(size) if isinstance(size, tuple) else parse_size(size)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not an empty folder; choose a new --out")
    tables = load_tables()
    class_names = tables.class_names(classes)
    scene_names = tables.scene_names(scene_set)
    scene_of = tables.scene_index(scene_set)

    with LabelledFile(mat, depth) as src:
        # everything that can be checked before writing is checked here
        if check_names:
            check_raw_names(src.names, tables, mat)
        if crop == "toolbox" and (src.height, src.width) != FRAME_HW:
            raise DataError(f"{mat}: frames are {src.height}x{src.width}; --crop toolbox needs 480x640")
        n_use = src.n if limit is None else min(limit, src.n)
        check_scene_types(src.scene_types[:n_use], scene_of, tables, mat)
        split_of = dict.fromkeys(range(1, n_use + 1), "none")
        train_idx: list[int] = []
        test_idx: list[int] = []
        if splits is not None:
            train_all, test_all = read_splits(splits, src.n)
            train_idx = [i for i in train_all if i <= n_use]
            test_idx = [i for i in test_all if i <= n_use]
            split_of.update(dict.fromkeys(train_idx, "train"))
            split_of.update(dict.fromkeys(test_idx, "test"))
            if layout == "mtan" and (not train_idx or not test_idx):
                raise DataError(
                    f"prepare-nyuv2: the first {n_use} frame(s) hold {len(train_idx)} train and "
                    f"{len(test_idx)} test frame(s); the MTAN layout needs both (raise --limit)"
                )
        rows = (0, src.height) if crop == "none" else TOOLBOX_CROP[:2]
        cols = (0, src.width) if crop == "none" else TOOLBOX_CROP[2:]
        convert = _Converter(
            mat=mat,
            lut=tables.class_lut(classes),
            scene_of_frame=[scene_of[s] for s in src.scene_types[:n_use]],
            rows=rows,
            cols=cols,
            full_hw=(src.height, src.width),
            out_size=out_size,
            given=GivenNormals(normals, src.n) if normals is not None else None,
            normal_radius=normal_radius,
            allow_invalid_depth=allow_invalid_depth,
        )
        hashes = {"mat": _sha256(mat), "splits": _sha256(Path(splits)) if splits is not None else None}

        stats = _Stats(len(class_names), len(scene_names))
        frames: dict[int, dict] = {}
        n_workers = max(1, min(4, os.cpu_count() or 1) if workers is None else int(workers))
        bar = None
        if progress:
            from tqdm import tqdm

            total = n_use if layout == "official" else len(train_idx) + len(test_idx)
            bar = tqdm(total=total, desc="prepare-nyuv2", unit="frame")

        def stream(indices: Sequence[int], part_of: Callable[[int], str]) -> Iterator[dict]:
            def on_sample(index: int, sample: dict) -> None:
                stats.add(sample, part_of(index))
                frames[index] = {"index": index, "id": None, "split": split_of[index],
                                 "scene_type": src.scene_types[index - 1], "scene": int(sample["scene"])}  # fmt: skip
                if bar is not None:
                    bar.update(1)

            return _frame_samples(src, indices, convert, n_workers, block, on_sample)

        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            if layout == "official":
                from mgm_fast.data.folder import FolderDataset, write_folder

                write_folder(
                    stream(list(range(1, n_use + 1)), split_of.__getitem__),
                    tmp,
                    scene_names,
                    seg_offset=1,
                    seg_class_names=class_names,
                    num_seg_classes=len(class_names),
                    normals_dir="nm",
                    write_mask=True,
                )
                # the ids the loader gives (scene folder / stem), read back rather than rebuilt
                ids = {
                    stem: f"{scene}/{stem}"
                    for _, scene, stem, _ in FolderDataset(tmp, None, validate=False).records
                }
                for i, info in frames.items():
                    info["id"] = ids[f"{i:04d}"]
            else:
                from mgm_fast.data.mtan import write_mtan

                for part, idx in (("train", train_idx), ("val", test_idx)):
                    write_mtan(stream(idx, lambda i, p=part: p), tmp, part, scene_names, class_names)
                    for k, i in enumerate(idx):
                        frames[i]["id"] = f"{part}/{k}"
            if bar is not None:
                bar.close()
            frame_list = [frames[i] for i in sorted(frames)]
            summary = stats.summary(class_names, scene_names)
            summary.update(layout=layout, size=list(out_size) if out_size else None, split_manifest=None)
            if layout == "official" and splits is not None and all(f["split"] != "none" for f in frame_list):
                # (a Split covers every id: frames in neither list -- none in the official
                # file -- leave split.json out; the manifest lists them)
                _split_manifest(frame_list, train_idx, test_idx, labelled_fraction, split_seed).to_json(
                    tmp / "split.json"
                )
                summary["split_manifest"] = "split.json"
            options = {
                "layout": layout,
                "size": list(out_size) if out_size else "native",
                "classes": classes,
                "scene_set": scene_set,
                "depth": f"{depth} ({DEPTH_VARIABLES[depth]})",
                "crop": "none"
                if crop == "none"
                else f"toolbox: rows {rows[0]}..{rows[1] - 1}, columns {cols[0]}..{cols[1] - 1}",
                "normals": (
                    {
                        "method": "local least-squares plane fit (mgm_fast.data.nyuv2.compute_normals)",
                        "window": 2 * normal_radius + 1,
                        **NORMAL_THRESHOLDS,
                    }
                    if normals is None
                    else {"method": "precomputed", "source": Path(normals).name}
                ),
                "limit": limit,
                "allow_invalid_depth": allow_invalid_depth,
            }
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "source": {
                    "file": mat.name,
                    "bytes": mat.stat().st_size,
                    "sha256": hashes["mat"],
                    "frames_in_file": src.n,
                    "frames_used": n_use,
                },
                "splits_file": None
                if splits is None
                else {
                    "file": Path(splits).name,
                    "sha256": hashes["splits"],
                    "train": len(train_idx),
                    "test": len(test_idx),
                },
                "options": options,
                "intrinsics": {
                    "source": "NYU Depth v2 toolbox camera_params.m, RGB camera; cx, cy 1-based",
                    **dataclasses.asdict(KINECT_RGB),
                },
                "tables": {
                    "classes": ["nyu40_from_894.tsv", *(["nyu13_from_40.tsv"] if classes == 13 else [])],
                    "scenes": [
                        "nyu_scene_types.tsv",
                        *(["nyu_scene_groups10.tsv"] if scene_set == 10 else []),
                    ],
                },
                "class_names": list(class_names),
                "scene_names": list(scene_names),
                "summary": summary,
                "frames": frame_list,
            }
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(tmp, out)
        except BaseException:
            if bar is not None:
                bar.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # not in the manifest: they vary from run to run (the files must not)
    summary.update(seconds=time.perf_counter() - t0, out=str(out))
    if log is not None:
        log(format_prepare_summary(summary, str(mat)))
    return summary


def _split_manifest(frames: list[dict], train_idx, test_idx, labelled_fraction: float, seed: int):
    """The Split for ``python -m mgm_fast.train --split``: official train -> train (labelled
    fraction drawn by :func:`mgm_fast.data.splits.make_split`), official test -> val."""
    from mgm_fast.data.splits import make_split

    by_index = {f["index"]: f["id"] for f in frames}
    split = make_split(
        [f["id"] for f in frames],
        seed,
        labelled_fraction=labelled_fraction,
        fixed={"train": [by_index[i] for i in train_idx], "val": [by_index[i] for i in test_idx], "test": []},
    )
    split.extra = {
        "dataset": "nyuv2",
        "train": "official train frames (splits.mat trainNdxs)",
        "val": "official test frames (splits.mat testNdxs)",
    }
    return split


class _Stats:
    """Counts per split part and scene, pixels per class (and void), valid depth / normal pixels."""

    def __init__(self, num_classes: int, num_scenes: int):
        self.num_classes = num_classes
        self.parts: dict[str, np.ndarray] = {}
        self.num_scenes = num_scenes
        self.class_pixels = np.zeros(num_classes + 1, dtype=np.int64)  # [0] = void
        self.pixels = self.depth_valid = self.normal_valid = 0

    def add(self, sample: dict, part: str) -> None:
        counts = self.parts.setdefault(part, np.zeros(self.num_scenes, dtype=np.int64))
        counts[int(sample["scene"])] += 1
        seg = sample["seg"].numpy().ravel()
        self.class_pixels += np.bincount(seg + 1, minlength=self.num_classes + 1)
        self.pixels += seg.size
        self.depth_valid += int(sample["depth_mask"].sum())
        self.normal_valid += int(sample["normal_mask"].sum())

    def summary(self, class_names: Sequence[str], scene_names: Sequence[str]) -> dict:
        parts = {p: self.parts[p] for p in sorted(self.parts)}
        return {
            "frames": int(sum(int(c.sum()) for c in parts.values())),
            "frames_per_split": {p: int(c.sum()) for p, c in parts.items()},
            "scene_counts": {
                name: {p: int(c[s]) for p, c in parts.items()} for s, name in enumerate(scene_names)
            },
            "class_pixels": {name: int(self.class_pixels[k + 1]) for k, name in enumerate(class_names)},
            "void_pixels": int(self.class_pixels[0]),
            "depth_valid_fraction": self.depth_valid / self.pixels if self.pixels else None,
            "normal_valid_fraction": self.normal_valid / self.pixels if self.pixels else None,
        }


def format_prepare_summary(summary: dict, source: str = "") -> str:
    """Human-readable summary of :func:`prepare_nyuv2` (counts, histogram, next commands)."""
    out, layout = summary["out"], summary["layout"]
    size = "x".join(str(s) for s in summary["size"]) if summary.get("size") else "native"
    lines = [
        f"prepared {summary['frames']} frame(s) of {source or 'NYUv2'} in {summary.get('seconds', 0):.1f} s"
        f" -> {out} ({layout} layout, {size}, {len(summary['class_pixels'])} classes, "
        f"{len(summary['scene_counts'])} scene classes)",
        "frames per split: " + ", ".join(f"{p} {c}" for p, c in summary["frames_per_split"].items()),
    ]
    parts = list(summary["frames_per_split"])
    lines.append(f"  {'scene':<20}" + "".join(f"{p:>8}" for p in parts) + f"{'all':>8}")
    for name, counts in summary["scene_counts"].items():
        total = sum(counts.values())
        if total:
            lines.append(f"  {name:<20}" + "".join(f"{counts[p]:>8}" for p in parts) + f"{total:>8}")
    pixels = sum(summary["class_pixels"].values()) + summary["void_pixels"]
    lines.append("class histogram (share of pixels at the output size):")
    items = [*summary["class_pixels"].items(), ("(void)", summary["void_pixels"])]
    cells = [f"{name[:16]:<16} {count / pixels if pixels else 0:6.4f}" for name, count in items]
    for k in range(0, len(cells), 3):
        lines.append("  " + "   ".join(cells[k : k + 3]))
    for key in ("depth_valid_fraction", "normal_valid_fraction"):
        if summary.get(key) is not None:
            lines.append(f"{key.replace('_', ' ')}: {summary[key]:.4f}")
    lines.append("next:")
    if layout == "official":
        lines.append(f"  python -m mgm_fast.data check {out} --layout official")
        split = f" --split {Path(out) / 'split.json'}" if summary.get("split_manifest") else ""
        lines.append(f"  python -m mgm_fast.train --data official:{out}{split}")
    else:
        lines.append(f"  python -m mgm_fast.data check {out} --layout mtan --split train")
        lines.append(f"  python -m mgm_fast.data check {out} --layout mtan --split val")
        lines.append(f"  python -m mgm_fast.train --data mtan:{out}:train")
    return "\n".join(lines)
