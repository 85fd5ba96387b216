"""Readers of the NYUv2 labelled release: the MATLAB v7.3 (HDF5) frames file, the split file,
and precomputed normals.

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


Precomputed normals (:class:`GivenNormals`)
-------------------------------------------
Single-frame Kinect depth is quantised in disparity (steps of several centimetres beyond ~3 m),
so far surfaces get noisier normals; ``--normals`` takes precomputed normals instead: a folder
with one file per frame named by the 1-based frame index (``0001.npy`` float (H, W, 3), zero =
invalid, or ``0001.png`` 8-bit ``2 p / 255 - 1`` with grey = invalid), or one ``.npy`` of shape
(N, H, W, 3); same camera frame; H x W = the file's 480 x 640 (cropped like the rest with
``--crop``) or the cropped size itself.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mgm_fast.data.sample import (
    DataError,
    decode_normals_8bit,
    list_preview,
    normalise_normals,
    read_image,
    read_npy,
)

__all__ = ["DEPTH_VARIABLES", "FRAME_HW", "GivenNormals", "LabelledFile", "read_mat_v5", "read_splits"]

FRAME_HW = (480, 640)

_REQUIRED = ("images", "labels", "names", "sceneTypes")
DEPTH_VARIABLES = {"filled": "depths", "raw": "rawDepths"}


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
        if depth not in DEPTH_VARIABLES:
            raise ValueError(f"depth must be one of {sorted(DEPTH_VARIABLES)}, got {depth!r}")
        self.depth_var = DEPTH_VARIABLES[depth]
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
# Precomputed normals.


class GivenNormals:
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
