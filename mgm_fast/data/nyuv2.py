"""NYUv2 labelled release -> a dataset ``python -m mgm_fast.train`` reads: ``prepare-nyuv2``.

``python -m mgm_fast.data prepare-nyuv2 nyu_depth_v2_labeled.mat --splits splits.mat --out DIR``

Input
-----
``nyu_depth_v2_labeled.mat`` (Silberman et al., ECCV 2012): the 1,449 densely labelled frames of
NYU Depth v2, a MATLAB v7.3 file, i.e. HDF5 behind a 512-byte MATLAB header. HDF5 keeps MATLAB's
column-major arrays with their axes reversed, so every variable reads transposed:

============  ===========================  =======================  ==========================
variable      MATLAB size, class           h5py shape               used here as (per frame)
============  ===========================  =======================  ==========================
images        480x640x3x1449 uint8         (1449, 3, 640, 480)      (480, 640, 3) RGB
depths        480x640x1449 single          (1449, 640, 480)         (480, 640) metres, in-painted
rawDepths     480x640x1449 single          (1449, 640, 480)         (480, 640) metres, 0 = none
labels        480x640x1449 uint16          (1449, 640, 480)         (480, 640) raw class, 0 = void
names         894x1 cell of char           (1, 894) references      the 894 raw class names
sceneTypes    1449x1 cell of char          (1, 1449) references     scene type per frame
============  ===========================  =======================  ==========================

(the file holds more: instances, scenes, accelData, ...; they are not read). A MATLAB v5 file
(``MATLAB 5.0 MAT-file`` header) is not HDF5 and is refused with an error saying so.

``splits.mat`` (optional): the official split, ``trainNdxs`` (795) and ``testNdxs`` (654),
1-based frame indices, as a MATLAB v5 file (read by the small reader :func:`read_mat_v5`, no
SciPy needed) or a v7.3 file. Frames in neither list are kept by the official layout (split
``"none"``) and dropped by the MTAN layout; an index out of range or in both lists is an error.

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

Depth and surface normals
-------------------------
``--depth filled`` (default) uses ``depths``, which the NYU toolbox in-painted (dense, no holes);
``--depth raw`` uses ``rawDepths`` (0 where the Kinect gave no measurement, masked).

Normals are computed from that depth map at the file's resolution by :func:`compute_normals`:

1. Back-projection with the RGB intrinsics of the NYU toolbox (``camera_params.m``; the labelled
   frames are undistorted and registered to the RGB camera): ``fx = 518.857901``,
   ``fy = 519.469611``, ``cx = 325.582449``, ``cy = 253.736166`` (:data:`KINECT_RGB`). The
   toolbox states ``cx, cy`` in MATLAB's 1-based pixel coordinates (its
   ``rgb_plane2rgb_world.m`` uses ``meshgrid(1:640, 1:480)``), so the 0-based pixel (row v,
   column u) is the point ``X = (u + 1 - cx) Z / fx``, ``Y = (v + 1 - cy) Z / fy``, ``Z``.
   Camera frame: x right, y down, z forward (as :mod:`mgm_fast.data.synthetic`).
2. Depth discontinuities: two 4-adjacent valid pixels whose depths differ by more than
   ``tau = 5 %`` of the nearer one are both edge pixels (from pixel to pixel a plane changes
   depth by about ``tan(theta) / f``: 2 % at theta = 85 degrees between normal and viewing ray,
   5 % only beyond 88 degrees, so only occlusion boundaries exceed it).
3. A least-squares plane (total least squares: the eigenvector of the smallest eigenvalue of the
   3x3 covariance of the window's valid points) over the ``(2r+1) x (2r+1)`` window around each
   pixel, ``r = 7`` (15 x 15 pixels, about 4 x 3 output pixels at 128 x 128). The window
   moments come from integral images and the eigenvector from the closed-form eigenvalues of a
   symmetric 3x3 matrix (trigonometric method) and a cross product of two rows of
   ``C - lambda_min I`` -- ~10x faster than batched ``numpy.linalg.eigh``, which the tests
   compare it against. With ``--size`` other than native, only the pixels that the
   nearest-neighbour resize keeps are evaluated (same values, the windows still see the
   full-resolution depth).
4. Oriented towards the camera: ``dot(n, X) < 0``.
5. Invalid (``normal_mask`` False) where the centre depth is missing, fewer than half of the
   window's pixels have depth, the window touches a depth discontinuity, the fit is poor (surface
   variation ``lambda_0 / (lambda_0 + lambda_1 + lambda_2) > 0.1``: not a plane), the points do
   not span a plane (``lambda_1 <= 1e-6 lambda_2``), or the plane is seen at a grazing angle
   (angle between normal and viewing ray above 85 degrees, as the synthetic data).

Single-frame Kinect depth is quantised in disparity (steps of several centimetres beyond ~3 m),
so far surfaces get noisier normals; ``--normals`` takes precomputed normals instead: a folder
with one file per frame named by the 1-based frame index (``0001.npy`` float (H, W, 3), zero =
invalid, or ``0001.png`` 8-bit ``2 p / 255 - 1`` with grey = invalid), or one ``.npy`` of shape
(N, H, W, 3); same camera frame; H x W = the file's 480 x 640 (cropped like the rest with
``--crop``) or the cropped size itself.

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
import math
import os
import shutil
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from mgm_fast.data.sample import (
    IGNORE_INDEX,
    DataError,
    _nearest_index,
    decode_normals_8bit,
    list_preview,
    make_sample,
    normalise_normals,
    read_image,
    read_npy,
    sanitize_depth,
    target_size,
)

__all__ = [
    "KINECT_RGB",
    "MANIFEST_NAME",
    "TOOLBOX_CROP",
    "Intrinsics",
    "LabelledFile",
    "NYUTables",
    "compute_normals",
    "format_prepare_summary",
    "load_tables",
    "parse_size",
    "prepare_nyuv2",
    "read_mat_v5",
    "read_splits",
]

MANIFEST_NAME = "nyuv2_manifest.json"
MANIFEST_FORMAT = "mgm_fast.nyuv2-prepare"
MANIFEST_VERSION = 1
NUM_RAW_CLASSES = 894
FRAME_HW = (480, 640)

TOOLBOX_CROP = (44, 471, 40, 601)
"""(row0, row1, col0, col1), 0-based half-open: the NYU toolbox's ``get_projection_mask.m``
(``mask(45:471, 41:601)`` in MATLAB's 1-based inclusive indexing), 427 x 561 pixels."""


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels; ``cx, cy`` in MATLAB's 1-based pixel coordinates."""

    fx: float
    fy: float
    cx: float
    cy: float


KINECT_RGB = Intrinsics(
    fx=5.1885790117450188e02,
    fy=5.1946961112127485e02,
    cx=3.2558244941119034e02,
    cy=2.5373616633400465e02,
)
"""RGB camera of the NYU Depth v2 toolbox (``camera_params.m``: fx_rgb, fy_rgb, cx_rgb, cy_rgb)."""

NORMAL_RADIUS = 7
"""Default window radius of :func:`compute_normals`: 15 x 15 pixels at 640 x 480."""
NORMAL_THRESHOLDS = {"min_valid": 0.5, "edge_jump": 0.05, "max_curvature": 0.1, "max_view_angle": 85.0}
"""Default validity thresholds of :func:`compute_normals` (module docstring)."""

_REQUIRED = ("images", "labels", "names", "sceneTypes")
_DEPTH_VAR = {"filled": "depths", "raw": "rawDepths"}


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


# -------------------------------------------------------------------------------------------
# MATLAB files.

_MAT_HEADER = 128
# MAT v5 data types -> numpy dtype (without byte order)
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
# mxClass ids of numeric arrays -> numpy dtype
_MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}


def _mat_header(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(_MAT_HEADER)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _mat_version(header: bytes) -> str | None:
    """The MAT-file version, "v5", "v7.3" or None, from the 128-byte header (text, subsystem offset, version,
    endian indicator "IM" / "MI"); v7.3 files are HDF5 with this header in their user block."""
    if len(header) < _MAT_HEADER or not header.startswith(b"MATLAB") or header[126:128] not in (b"IM", b"MI"):
        return None
    version = struct.unpack_from("<H" if header[126:128] == b"IM" else ">H", header, 124)[0]
    return {0x0100: "v5", 0x0200: "v7.3"}.get(version)


def _v5_elements(buf: bytes, endian: str, path: Path) -> Iterator[tuple[int, bytes]]:
    """(data type, payload) of the consecutive data elements of a MAT v5 byte string."""
    pos = 0
    while pos < len(buf):
        if pos + 8 > len(buf):
            raise DataError(f"{path}: truncated MAT v5 data element at byte {pos}")
        word, nbytes = struct.unpack_from(endian + "II", buf, pos)
        if word >> 16:  # "small data element": size in the upper half, data in the same 8 bytes
            yield word & 0xFFFF, buf[pos + 4 : pos + 4 + (word >> 16)]
            pos += 8
            continue
        start = pos + 8
        if start + nbytes > len(buf):
            raise DataError(
                f"{path}: truncated MAT v5 file (an element of {nbytes} bytes at byte {start} runs past "
                f"the end, {len(buf)} bytes)"
            )
        yield word, buf[start : start + nbytes]
        # elements are padded to 8 bytes, except compressed ones (their size is the zlib stream's)
        pos = start + nbytes + (0 if word == _MI_COMPRESSED else (-nbytes) % 8)


def _v5_matrix(payload: bytes, endian: str, path: Path) -> tuple[str, np.ndarray | None]:
    """(name, array) of an miMATRIX element; array None for non-numeric classes (cell, struct,
    char, sparse, ...) and complex arrays, which this reader does not need."""
    subs = list(_v5_elements(payload, endian, path))
    if len(subs) < 3:
        raise DataError(f"{path}: malformed MAT v5 matrix element")
    flags = struct.unpack_from(endian + "I", subs[0][1], 0)[0]
    mx_class, is_complex = flags & 0xFF, bool(flags & 0x0800)
    dims_type, dims_bytes = subs[1]
    dims = np.frombuffer(dims_bytes, dtype=endian + _MI_DTYPES.get(dims_type, "i4")).tolist()
    name = subs[2][1].decode("latin-1")
    if mx_class not in _MX_NUMERIC or is_complex or len(subs) < 4:
        return name, None
    data_type, data = subs[3]
    if data_type not in _MI_DTYPES:
        raise DataError(f"{path}: variable {name!r} has unsupported MAT v5 data type {data_type}")
    values = np.frombuffer(data, dtype=endian + _MI_DTYPES[data_type])
    if values.size != math.prod(dims):
        raise DataError(f"{path}: variable {name!r} holds {values.size} values for dimensions {dims}")
    # MATLAB stores integer-valued doubles in the smallest type that holds them: cast to the class
    return name, values.astype(_MX_NUMERIC[mx_class]).reshape(dims, order="F")


def read_mat_v5(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Numeric variables of a MATLAB v5 MAT-file (compressed or not), as numpy arrays.

    Enough for ``splits.mat`` without SciPy: real numeric matrices of any class are returned
    with MATLAB's shape (column-major data reshaped with ``order="F"``) and dtype; cells,
    structs, strings, sparse and complex variables are skipped. A truncated or corrupt file is
    a DataError naming it.
    """
    path = Path(path)
    header = _mat_header(path)
    if _mat_version(header) != "v5":
        raise DataError(f"{path}: not a MATLAB v5 MAT-file (no 'MATLAB 5.0 MAT-file' header)")
    endian = "<" if header[126:128] == b"IM" else ">"
    buf = path.read_bytes()[_MAT_HEADER:]
    out: dict[str, np.ndarray] = {}
    for dtype, payload in _v5_elements(buf, endian, path):
        if dtype == _MI_COMPRESSED:
            try:
                payload = zlib.decompress(payload)
            except zlib.error as e:
                raise DataError(f"{path}: corrupt compressed MAT v5 element ({e})") from None
            inner = list(_v5_elements(payload, endian, path))
            if len(inner) != 1:
                raise DataError(f"{path}: malformed compressed MAT v5 element")
            dtype, payload = inner[0]
        if dtype != _MI_MATRIX:
            continue
        name, arr = _v5_matrix(payload, endian, path)
        if arr is not None:
            out[name] = arr
    return out


def _require_h5py():
    try:
        import h5py
    except ImportError:
        raise DataError(
            "prepare-nyuv2 reads MATLAB v7.3 (HDF5) files with h5py, which is not installed: "
            "pip install h5py   (or pip install -e .[nyuv2])"
        ) from None
    return h5py


def _open_h5(path: Path, what: str):
    """Open a MATLAB v7.3 file; clear errors for v5 files, non-MAT files and truncated files."""
    h5py = _require_h5py()
    header = _mat_header(path)
    if not h5py.is_hdf5(str(path)):
        if _mat_version(header) == "v5":
            raise DataError(
                f"{path}: is a MATLAB v5 MAT-file ('{header[:19].decode('latin-1')}'), not HDF5; the {what} "
                "is expected as a MATLAB v7.3 (HDF5) file, as the official download is. Re-save it in "
                "MATLAB with save(..., '-v7.3') or use the original file"
            )
        size = path.stat().st_size
        raise DataError(
            f"{path}: not an HDF5 / MATLAB v7.3 file ({size} bytes, starts with {header[:16]!r}); "
            f"expected the {what}"
        )
    try:
        return h5py.File(path, "r", rdcc_nbytes=64 * 2**20)
    except OSError as e:
        raise DataError(
            f"{path}: cannot open as HDF5 ({e}); the file is probably truncated or corrupt "
            f"(an interrupted download?): expected the {what}"
        ) from None


def _mat_strings(f, name: str, path: Path) -> list[str]:
    """A MATLAB cell array of char vectors stored in HDF5 (object references to uint16 data)."""
    ds = f[name]
    out = []
    try:
        refs = ds[()].ravel(order="F")
        for ref in refs:
            item = f[ref]
            if item.attrs.get("MATLAB_empty"):
                out.append("")
                continue
            out.append("".join(chr(int(c)) for c in np.asarray(item[()]).ravel(order="F")))
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: cannot read the strings of '{name}' ({type(e).__name__}: {e})") from None
    return out


class LabelledFile:
    """Reader of ``nyu_depth_v2_labeled.mat`` (module docstring): checks the structure on open.

    Args:
        path: the .mat file.
        depth: ``"filled"`` (variable ``depths``) or ``"raw"`` (``rawDepths``).
    Attributes:
        n: number of frames; ``height, width``: frame size (480, 640 for the release).
        scene_types: list of n strings; ``names``: list of the raw class names.
    Use as a context manager; :meth:`read` returns a block of frames.
    """

    def __init__(self, path: str | os.PathLike, depth: str = "filled"):
        self.path = Path(path)
        if depth not in _DEPTH_VAR:
            raise ValueError(f"depth must be one of {sorted(_DEPTH_VAR)}, got {depth!r}")
        self.depth_var = _DEPTH_VAR[depth]
        what = "NYUv2 labelled release nyu_depth_v2_labeled.mat"
        self.file = _open_h5(self.path, what)
        try:
            self._check()
        except BaseException:
            self.file.close()
            raise

    def _check(self) -> None:
        f, path = self.file, self.path
        needed = (*_REQUIRED, self.depth_var)
        missing = [k for k in needed if k not in f]
        if missing:
            raise DataError(
                f"{path}: lacks variable(s) {', '.join(repr(k) for k in missing)}; the NYUv2 labelled "
                f"release holds images, depths, rawDepths, labels, names and sceneTypes "
                f"(found: {', '.join(sorted(f.keys())[:12])})"
            )
        images, depth, labels = f["images"], f[self.depth_var], f["labels"]
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{path}: 'images' has shape {images.shape} dtype {images.dtype}; expected uint8 "
                "(N, 3, W, H) (MATLAB H x W x 3 x N)"
            )
        n, _, w, h = images.shape
        for name, ds, kinds in ((self.depth_var, depth, "f"), ("labels", labels, "iu")):
            if ds.shape != (n, w, h) or ds.dtype.kind not in kinds:
                raise DataError(
                    f"{path}: '{name}' has shape {ds.shape} dtype {ds.dtype}; expected {(n, w, h)} "
                    f"{'float' if kinds == 'f' else 'integer'} like 'images' {images.shape}"
                )
        if f["sceneTypes"].size != n:
            raise DataError(f"{path}: 'sceneTypes' has {f['sceneTypes'].size} entries for {n} frames")
        if n == 0:
            raise DataError(f"{path}: holds no frames")
        self.n, self.height, self.width = n, h, w
        self.scene_types = _mat_strings(f, "sceneTypes", path)
        self.names = _mat_strings(f, "names", path)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames ``start .. stop - 1`` (0-based): RGB uint8 (B, H, W, 3), depth float32 (B, H, W)
        in metres, raw labels (B, H, W) as stored (uint16). A read error names the frames."""
        try:
            rgb = self.file["images"][start:stop].transpose(0, 3, 2, 1)
            depth = self.file[self.depth_var][start:stop].transpose(0, 2, 1)
            labels = self.file["labels"][start:stop].transpose(0, 2, 1)
        except (OSError, ValueError) as e:
            raise DataError(
                f"{self.path}: cannot read frames {start + 1}..{stop} ({e}); the file may be truncated or corrupt"
            ) from None
        return (
            np.ascontiguousarray(rgb),
            np.ascontiguousarray(depth, dtype=np.float32),
            np.ascontiguousarray(labels),
        )

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> LabelledFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_splits(path: str | os.PathLike, num_frames: int) -> tuple[list[int], list[int]]:
    """The official split of ``splits.mat`` (v5 or v7.3): sorted 1-based ``(train, test)`` frame
    indices. Indices must be integers in [1, num_frames], unique, and in one list only."""
    path = Path(path)
    header = _mat_header(path)
    if _mat_version(header) == "v5":
        variables = read_mat_v5(path)
    else:
        with _open_h5(path, "split file splits.mat (trainNdxs, testNdxs)") as f:
            variables = {k: np.asarray(f[k][()]) for k in ("trainNdxs", "testNdxs") if k in f}
    missing = [k for k in ("trainNdxs", "testNdxs") if k not in variables]
    if missing:
        raise DataError(
            f"{path}: lacks {', '.join(missing)}; expected the NYUv2 split file with trainNdxs and "
            f"testNdxs (1-based frame indices), found {sorted(variables) or 'no numeric variables'}"
        )
    parts = []
    for key in ("trainNdxs", "testNdxs"):
        values = np.asarray(variables[key], dtype=np.float64).ravel()
        if values.size == 0 or not np.isfinite(values).all() or (values != np.round(values)).any():
            raise DataError(f"{path}: {key} must be a non-empty list of integer frame indices")
        idx = values.astype(np.int64)
        bad = idx[(idx < 1) | (idx > num_frames)]
        if bad.size:
            raise DataError(
                f"{path}: {key} has {bad.size} index(es) outside 1..{num_frames} (1-based frame indices "
                f"of the labelled file): {list_preview([str(int(v)) for v in bad])}"
            )
        uniq, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise DataError(
                f"{path}: {key} repeats index(es) {list_preview([str(int(v)) for v in uniq[counts > 1]])}"
            )
        parts.append(uniq.tolist())
    both = sorted(set(parts[0]) & set(parts[1]))
    if both:
        raise DataError(
            f"{path}: {len(both)} frame(s) in both trainNdxs and testNdxs: {list_preview([str(v) for v in both])}"
        )
    return parts[0], parts[1]


# -------------------------------------------------------------------------------------------
# Surface normals.


def _window_sums(
    channels: np.ndarray, r: int, rows: np.ndarray | None = None, cols: np.ndarray | None = None
) -> np.ndarray:
    """Sums of float64 (C, H, W) ``channels`` over the (2r+1) x (2r+1) window around each pixel,
    zero outside the image: (C, H, W), or (C, len(rows), len(cols)) at the pixels
    (rows[i], cols[j]) only.

    One integral image per channel (two cumulative sums), then four corners per pixel, so a
    128 x 128 grid costs little more than the cumulative sums.
    """
    c, h, w = channels.shape
    integral = np.zeros((c, h + 1, w + 1))
    integral[:, 1:, 1:] = channels
    np.cumsum(integral, axis=1, out=integral)
    np.cumsum(integral, axis=2, out=integral)
    if rows is None:
        # every pixel: pad by repeating the border so that the clipped corners become slices
        k = 2 * r + 1
        p = np.pad(integral, ((0, 0), (r, r), (r, r)), mode="edge")
        return p[:, k : k + h, k : k + w] - p[:, :h, k : k + w] - p[:, k : k + h, :w] + p[:, :h, :w]
    y0, y1 = np.clip(rows - r, 0, h), np.clip(rows + r + 1, 0, h)
    x0, x1 = np.clip(cols - r, 0, w), np.clip(cols + r + 1, 0, w)
    top, bottom = integral[:, y0], integral[:, y1]
    return bottom[:, :, x1] - top[:, :, x1] - bottom[:, :, x0] + top[:, :, x0]


def _smallest_eigenvectors(a00, a11, a22, a01, a02, a12):
    """Per element, the eigenvalues (ascending) and the unit eigenvector of the smallest one of
    the symmetric 3x3 matrices [[a00, a01, a02], [a01, a11, a12], [a02, a12, a22]] (float64 (K,)).

    Eigenvalues by the trigonometric closed form; the eigenvector is the longest of the three
    cross products of rows of ``A - lambda_min I`` (each is orthogonal to the two rows, hence
    along the null vector). Returns ``(v (K, 3), l0, l1, l2, ok)``; ``ok`` False where no cross
    product is non-zero (e.g. an all-zero matrix).
    """
    q = (a00 + a11 + a22) / 3.0
    d0, d1, d2 = a00 - q, a11 - q, a22 - q
    p = np.sqrt((d0 * d0 + d1 * d1 + d2 * d2 + 2.0 * (a01 * a01 + a02 * a02 + a12 * a12)) / 6.0)
    ps = np.where(p > 0, p, 1.0)
    det = d0 * (d1 * d2 - a12 * a12) - a01 * (a01 * d2 - a12 * a02) + a02 * (a01 * a12 - d1 * a02)
    phi = np.arccos(np.clip(det / (2.0 * ps**3), -1.0, 1.0)) / 3.0
    l2 = q + 2.0 * p * np.cos(phi)
    l0 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    l1 = 3.0 * q - l2 - l0
    b00, b11, b22 = a00 - l0, a11 - l0, a22 - l0
    # rows r0 = (b00, a01, a02), r1 = (a01, b11, a12), r2 = (a02, a12, b22)
    cands = (
        (a01 * a12 - a02 * b11, a02 * a01 - b00 * a12, b00 * b11 - a01 * a01),  # r0 x r1
        (a01 * b22 - a02 * a12, a02 * a02 - b00 * b22, b00 * a12 - a01 * a02),  # r0 x r2
        (b11 * b22 - a12 * a12, a12 * a02 - a01 * b22, a01 * a12 - b11 * a02),  # r1 x r2
    )
    best = np.zeros_like(q)
    v = np.zeros((3, *q.shape))
    for c in cands:
        norm2 = c[0] * c[0] + c[1] * c[1] + c[2] * c[2]
        take = norm2 > best
        best = np.where(take, norm2, best)
        for k in range(3):
            v[k] = np.where(take, c[k], v[k])
    ok = best > 0
    v /= np.sqrt(np.where(ok, best, 1.0))
    return v.T, l0, l1, l2, ok


def compute_normals(
    depth: np.ndarray,
    intrinsics: Intrinsics = KINECT_RGB,
    offset: tuple[int, int] = (0, 0),
    radius: int = NORMAL_RADIUS,
    min_valid: float = NORMAL_THRESHOLDS["min_valid"],
    edge_jump: float = NORMAL_THRESHOLDS["edge_jump"],
    max_curvature: float = NORMAL_THRESHOLDS["max_curvature"],
    max_view_angle: float = NORMAL_THRESHOLDS["max_view_angle"],
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Surface normals of a depth map by local least-squares plane fits (module docstring).

    Args:
        depth: float (H, W) z-depth in metres; 0, negative or non-finite = no measurement.
        intrinsics: camera of the full frame (cx, cy 1-based, as the NYU toolbox).
        offset: (row, column) of ``depth[0, 0]`` in the full frame (the crop origin).
        radius: window radius r; the window is (2r+1) x (2r+1) pixels.
        min_valid: minimum fraction of the window's pixels with depth.
        edge_jump: relative depth jump between 4-neighbours that marks a discontinuity.
        max_curvature: maximum surface variation lambda_0 / (lambda_0 + lambda_1 + lambda_2).
        max_view_angle: maximum angle in degrees between the normal and the reversed view ray.
        rows, cols: optional int arrays: evaluate only the pixels (rows[i], cols[j]), e.g. the
            grid a nearest-neighbour resize keeps; the values are those of the full map there
            (the windows still see the full-resolution depth).
    Returns:
        ``(normals float32 (R, C, 3), valid bool (R, C))`` with (R, C) = (H, W) or
        (len(rows), len(cols)): unit normals in the camera frame (x right, y down, z forward)
        facing the camera where valid, exactly 0 elsewhere.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise DataError(f"compute_normals: depth has shape {depth.shape}, expected (H, W)")
    h, w = depth.shape
    full = rows is None and cols is None
    rows = np.arange(h) if rows is None else np.asarray(rows, dtype=np.int64)
    cols = np.arange(w) if cols is None else np.asarray(cols, dtype=np.int64)
    valid = np.isfinite(depth) & (depth > 0)
    z = np.where(valid, depth, 0).astype(np.float64)
    u = np.arange(w, dtype=np.float64) + offset[1] + 1.0  # MATLAB 1-based column
    v = np.arange(h, dtype=np.float64) + offset[0] + 1.0
    rx = (u - intrinsics.cx) / intrinsics.fx  # ray (rx, ry, 1) through each pixel
    ry = (v - intrinsics.cy) / intrinsics.fy

    edge = np.zeros((h, w), dtype=bool)
    jump = valid[:-1] & valid[1:] & (np.abs(z[:-1] - z[1:]) > edge_jump * np.minimum(z[:-1], z[1:]))
    edge[:-1] |= jump
    edge[1:] |= jump
    jump = (
        valid[:, :-1]
        & valid[:, 1:]
        & (np.abs(z[:, :-1] - z[:, 1:]) > edge_jump * np.minimum(z[:, :-1], z[:, 1:]))
    )
    edge[:, :-1] |= jump
    edge[:, 1:] |= jump

    # Points relative to the mean valid point: the covariance does not change, and smaller
    # values keep the integral images' rounding far below the window variances.
    zc = float(z[valid].mean()) if valid.any() else 0.0
    x = np.where(valid, rx[None, :] * z, 0.0)
    y = np.where(valid, ry[:, None] * z, 0.0)
    xc = float(x[valid].mean()) if valid.any() else 0.0
    yc = float(y[valid].mean()) if valid.any() else 0.0
    px, py, pz = np.where(valid, x - xc, 0.0), np.where(valid, y - yc, 0.0), np.where(valid, z - zc, 0.0)
    channels = np.stack(
        [valid, edge, px, py, pz, px * px, py * py, pz * pz, px * py, px * pz, py * pz]
    ).astype(np.float64, copy=False)
    sums = _window_sums(channels, radius) if full else _window_sums(channels, radius, rows, cols)
    count, edges_near = sums[0], sums[1]
    # 0.5 slack: window sums of 0/1 images are integers up to rounding
    cand = valid[rows[:, None], cols[None, :]]
    cand &= (count >= min_valid * (2 * radius + 1) ** 2 - 0.5) & (edges_near < 0.5)
    idx = np.flatnonzero(cand)
    normals = np.zeros((cand.size, 3), dtype=np.float32)
    ok_all = np.zeros(cand.size, dtype=bool)
    if idx.size:
        flat = sums.reshape(len(sums), -1)[:, idx]
        n = flat[0]
        mx, my, mz = flat[2] / n, flat[3] / n, flat[4] / n
        vec, l0, l1, l2, ok = _smallest_eigenvectors(
            flat[5] / n - mx * mx,
            flat[6] / n - my * my,
            flat[7] / n - mz * mz,
            flat[8] / n - mx * my,
            flat[9] / n - mx * mz,
            flat[10] / n - my * mz,
        )
        l0 = np.maximum(l0, 0.0)
        total = l0 + l1 + l2
        ok &= (total > 0) & (l1 > 1e-6 * l2) & (l0 <= max_curvature * np.where(total > 0, total, 1.0))
        r_i, c_i = np.divmod(idx, len(cols))
        ray = np.stack([rx[cols[c_i]], ry[rows[r_i]], np.ones(idx.size)], axis=1)
        ray /= np.linalg.norm(ray, axis=1, keepdims=True)
        cos = np.einsum("ij,ij->i", vec, ray)
        vec = np.where((cos > 0)[:, None], -vec, vec)  # face the camera: dot(n, ray) < 0
        ok &= np.abs(cos) >= math.cos(math.radians(max_view_angle))
        normals[idx] = np.where(ok[:, None], vec, 0.0).astype(np.float32)
        ok_all[idx] = ok
    return normals.reshape(len(rows), len(cols), 3), ok_all.reshape(len(rows), len(cols))


# -------------------------------------------------------------------------------------------
# Precomputed normals.


class _GivenNormals:
    """Precomputed normals: a folder of per-frame files or one (N, H, W, 3) ``.npy``."""

    def __init__(self, path: str | os.PathLike, num_frames: int):
        self.path = Path(path)
        self.array = None
        if self.path.is_dir():
            return
        if not self.path.exists():
            raise DataError(f"{self.path}: normals folder or .npy file not found")
        if self.path.suffix.lower() != ".npy":
            raise DataError(f"{self.path}: --normals must be a folder of per-frame files or one .npy array")
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot read normals .npy ({e})") from None
        if arr.ndim != 4 or arr.shape[0] != num_frames or arr.shape[-1] != 3 or arr.dtype.kind != "f":
            raise DataError(
                f"{self.path}: normals array has shape {arr.shape} dtype {arr.dtype}; expected float "
                f"({num_frames}, H, W, 3), one map per frame of the labelled file"
            )
        self.array = arr

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(normals float32 (H, W, 3), valid bool (H, W), source) of 1-based frame ``index``."""
        if self.array is not None:
            source = f"{self.path}[{index - 1}]"
            normals, valid = normalise_normals(np.asarray(self.array[index - 1], dtype=np.float32))
            return normals, valid, source
        for stem in (f"{index:04d}", str(index)):
            for ext in (".npy", ".png"):
                p = self.path / f"{stem}{ext}"
                if p.exists():
                    if ext == ".png":
                        normals, valid = decode_normals_8bit(read_image(p, "normal map"), p)
                        return normals, valid, str(p)
                    arr = read_npy(p, "normal map")
                    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype.kind != "f":
                        raise DataError(
                            f"{p}: normals have shape {arr.shape} dtype {arr.dtype}, expected float (H, W, 3)"
                        )
                    if not np.isfinite(arr).all():
                        raise DataError(f"{p}: normals have non-finite values (invalid normals must be 0)")
                    normals, valid = normalise_normals(arr)
                    return normals, valid, str(p)
        raise DataError(
            f"{self.path}: no normals for frame {index}: expected {index:04d}.npy or {index:04d}.png"
        )


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
    given: _GivenNormals | None
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
    """Convert the NYUv2 labelled release into a dataset folder (module docstring).

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
               "depth": (depth, tuple(_DEPTH_VAR))}  # fmt: skip
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
            _check_raw_names(src.names, tables, mat)
        if crop == "toolbox" and (src.height, src.width) != FRAME_HW:
            raise DataError(f"{mat}: frames are {src.height}x{src.width}; --crop toolbox needs 480x640")
        n_use = src.n if limit is None else min(limit, src.n)
        _check_scene_types(src.scene_types[:n_use], scene_of, tables, mat)
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
            given=_GivenNormals(normals, src.n) if normals is not None else None,
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
                "depth": f"{depth} ({_DEPTH_VAR[depth]})",
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


def _check_scene_types(
    scene_types: Sequence[str], scene_of: dict[str, int], tables: NYUTables, path: Path
) -> None:
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


def _check_raw_names(names: Sequence[str], tables: NYUTables, path: Path) -> None:
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
