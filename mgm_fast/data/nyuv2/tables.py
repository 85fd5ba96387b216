"""The NYUv2 label and scene tables shipped in ``mgm_fast/data/tables/``, and the checks of a
labelled file's class names and scene types against them.

Labels (tables in ``mgm_fast/data/tables/``, each with its provenance in its header)
-------------------------------------------------------------------------------------
Raw labels 1..894 map to the 40 classes of Gupta et al. (CVPR 2013, ``classMapping40.mat``:
``nyu40_from_894.tsv``) and optionally on to the 13 classes of Couprie et al. (ICLR 2013,
``class13Mapping.mat``: ``nyu13_from_40.tsv``). Raw 0 (unlabelled) is void, ``IGNORE_INDEX``
(-1) in the sample format. Before anything is written, the ``names`` of the file are checked
against the 40-class table: each of the 37 named classes has exactly one raw class, and that raw
class must carry the class's name (e.g. raw 21 is "wall"), so a file whose raw classes are in
another order is refused instead of being silently mislabelled.

Scenes
------
The 27 ``sceneTypes`` strings of the labelled set, indexed in sorted order (``--scene-set 27``,
the released MGM code's 27 scene classes), or merged to the common 10-type grouping (the nine
most frequent types plus "others", ``--scene-set 10``): ``nyu_scene_types.tsv`` and
``nyu_scene_groups10.tsv``. A string not in the table is an error naming it and its frames.

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from mgm_fast.data.sample import (
    IGNORE_INDEX,
    DataError,
    list_preview,
)

__all__ = ["NUM_RAW_CLASSES", "NYUTables", "check_raw_names", "check_scene_types", "load_tables"]

NUM_RAW_CLASSES = 894

# -------------------------------------------------------------------------------------------
# Tables.


@dataclass(frozen=True)
class NYUTables:
    """The mapping tables of ``mgm_fast/data/tables/`` (see each file's header for its source).

    Attributes:
        nyu40_of_raw: int64 (895,): raw label (0 = void, 1..894) -> 40-class id (0 = void, 1..40).
        nyu13_of_40: int64 (41,): 40-class id (0 = void) -> 13-class id (0 = void, 1..13).
        nyu40_names / nyu13_names: class names, index = id - 1.
        scene_types: the 27 scene-type strings, index = scene index (sorted order).
        scene_frames: frames per scene type in the labelled set (sum 1,449).
        group10_of_scene: int64 (27,): scene index -> 10-type group index.
        group10_names: the 10 group names.
    """

    nyu40_of_raw: np.ndarray
    nyu13_of_40: np.ndarray
    nyu40_names: tuple[str, ...]
    nyu13_names: tuple[str, ...]
    scene_types: tuple[str, ...]
    scene_frames: tuple[int, ...]
    group10_of_scene: np.ndarray
    group10_names: tuple[str, ...]

    def class_lut(self, classes: int) -> np.ndarray:
        """int64 (895,): raw label -> class in [0, classes) or IGNORE_INDEX (void)."""
        if classes == 40:
            ids = self.nyu40_of_raw
        elif classes == 13:
            ids = self.nyu13_of_40[self.nyu40_of_raw]
        else:
            raise ValueError(f"classes must be 40 or 13, got {classes!r}")
        return np.where(ids == 0, IGNORE_INDEX, ids - 1).astype(np.int64)

    def class_names(self, classes: int) -> tuple[str, ...]:
        return self.nyu40_names if classes == 40 else self.nyu13_names

    def scene_names(self, scene_set: int) -> tuple[str, ...]:
        return self.scene_types if scene_set == 27 else self.group10_names

    def scene_index(self, scene_set: int) -> dict[str, int]:
        """scene-type string -> scene index of ``scene_set`` (27 or 10)."""
        if scene_set == 27:
            return {name: i for i, name in enumerate(self.scene_types)}
        return {name: int(self.group10_of_scene[i]) for i, name in enumerate(self.scene_types)}

    def anchors(self) -> dict[int, str]:
        """raw id -> 40-class name for the named classes 1..37, each of which has exactly one raw
        class (the rest go to 38-40, otherstructure / otherfurniture / otherprop)."""
        out = {}
        for c in range(1, 38):
            (raws,) = np.nonzero(self.nyu40_of_raw == c)
            if len(raws) == 1:
                out[int(raws[0])] = self.nyu40_names[c - 1]
        return out


def _read_table(name: str, columns: int) -> list[list[str]]:
    """Rows of a tab-separated table file in ``tables/``: ``#`` lines are comments, the first
    other line is the header."""
    text = resources.files("mgm_fast.data").joinpath("tables", name).read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]
    header, body = rows[0], rows[1:]
    bad = [r for r in body if len(r) != columns]
    if len(header) != columns or bad:
        raise RuntimeError(f"mgm_fast/data/tables/{name}: expected {columns} tab-separated columns")
    return body


@lru_cache(maxsize=1)
def load_tables() -> NYUTables:
    """Load and cross-check the shipped tables (cached)."""
    raw = _read_table("nyu40_from_894.tsv", 2)
    ids = [int(r[0]) for r in raw]
    if ids != list(range(1, NUM_RAW_CLASSES + 1)):
        raise RuntimeError("nyu40_from_894.tsv: raw ids must be 1..894 in order")
    nyu40_of_raw = np.array([0] + [int(r[1]) for r in raw], dtype=np.int64)
    names40 = tuple(r[1] for r in _read_table("nyu40_classes.tsv", 2))
    m13 = _read_table("nyu13_from_40.tsv", 2)
    nyu13_of_40 = np.array([0] + [int(r[1]) for r in m13], dtype=np.int64)
    names13 = tuple(r[1] for r in _read_table("nyu13_classes.tsv", 2))
    scenes = _read_table("nyu_scene_types.tsv", 4)
    groups = _read_table("nyu_scene_groups10.tsv", 3)
    tables = NYUTables(
        nyu40_of_raw=nyu40_of_raw,
        nyu13_of_40=nyu13_of_40,
        nyu40_names=names40,
        nyu13_names=names13,
        scene_types=tuple(r[1] for r in scenes),
        scene_frames=tuple(int(r[2]) for r in scenes),
        group10_of_scene=np.array([int(r[3]) for r in scenes], dtype=np.int64),
        group10_names=tuple(r[1] for r in groups),
    )
    ok = (
        len(names40) == 40
        and len(names13) == 13
        and nyu40_of_raw[1:].min() >= 1
        and nyu40_of_raw.max() <= 40
        and len(nyu13_of_40) == 41
        and nyu13_of_40[1:].min() >= 1
        and nyu13_of_40.max() <= 13
        and len(tables.scene_types) == 27
        and list(tables.scene_types) == sorted(tables.scene_types)
        and [int(r[0]) for r in scenes] == list(range(27))
        and len(tables.group10_names) == 10
        and set(tables.group10_of_scene.tolist()) == set(range(10))
    )
    if not ok:
        raise RuntimeError("mgm_fast/data/tables: inconsistent NYUv2 tables")
    for arr in (nyu40_of_raw, nyu13_of_40, tables.group10_of_scene):
        arr.flags.writeable = False  # shared by every caller of the cached tables
    return tables


def check_scene_types(
    scene_types: Sequence[str], scene_of: dict[str, int], tables: NYUTables, path: Path
) -> None:
    """Every frame's scene-type string must be a key of ``scene_of`` (:meth:`NYUTables.scene_index`);
    else a DataError names the unknown strings, their 1-based frames and the known types."""
    unknown: dict[str, list[str]] = {}
    for i, name in enumerate(scene_types):
        if name not in scene_of:
            unknown.setdefault(name, []).append(str(i + 1))
    if unknown:
        shown = "; ".join(f"{s!r} (frame(s) {list_preview(fr, 3)})" for s, fr in unknown.items())
        raise DataError(
            f"{path}: scene type(s) not among the 27 of the NYUv2 labelled set: {shown}; "
            f"known types: {', '.join(tables.scene_types)}"
        )


def check_raw_names(names: Sequence[str], tables: NYUTables, path: Path) -> None:
    """The file's raw class names must fit the 894 -> 40 table (see NYUTables.anchors)."""
    if len(names) != NUM_RAW_CLASSES:
        raise DataError(
            f"{path}: 'names' has {len(names)} raw classes; the 894 -> 40 mapping table is for the "
            f"{NUM_RAW_CLASSES} raw classes of the NYUv2 labelled release"
        )

    def norm(s: str) -> str:
        return " ".join(s.lower().replace("_", " ").split())

    wrong = [
        f"raw {raw} is {names[raw - 1]!r}, expected {name!r}"
        for raw, name in sorted(tables.anchors().items())
        if norm(names[raw - 1]) != norm(name)
    ]
    if wrong:
        raise DataError(
            f"{path}: its raw class names do not match the order the 894 -> 40 table was made for "
            f"({len(wrong)} of 37 checked classes differ: {'; '.join(wrong[:5])}); refusing to mislabel "
            "(pass --skip-names-check to convert anyway)"
        )
