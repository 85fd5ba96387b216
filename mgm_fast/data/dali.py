"""NVIDIA DALI input pipelines for the file datasets, in the project's sample format.

``make_dali_loader(dataset, indices, batch_size, device, seed, ...)`` reads the samples
``indices`` of a :class:`~mgm_fast.data.folder.FolderDataset` (released folder layout), a
:class:`~mgm_fast.data.taskonomy.TaskonomyDataset` or a :class:`~mgm_fast.data.mtan.MTANDataset`
through one DALI pipeline per epoch and yields batches in the sample format
(:mod:`mgm_fast.data.sample`), stacked like :func:`~mgm_fast.data.sample.collate`:

==============  =========  ===============  ==========================================
key             dtype      shape            where / values
==============  =========  ===============  ==========================================
``rgb``         float32    (B, 3, H, W)     ``device``, in [-1, 1]
``seg``         int64      (B, H, W)        ``device``, ``IGNORE_INDEX`` = void
``depth``       float32    (B, 1, H, W)     ``device``, metres, 0 where invalid
``depth_mask``  bool       (B, 1, H, W)     ``device``
``normal``      float32    (B, 3, H, W)     ``device``, unit vectors, 0 where invalid
``normal_mask`` bool       (B, 1, H, W)     ``device``
``scene``       int64      (B,)             ``device``
``id``          list[str]  B                host
==============  =========  ===============  ==========================================

The values equal what the dataset's own ``__getitem__`` returns (tests/data/test_dali.py checks
them tensor by tensor) except for the RGB resize, which has a documented tolerance (below).

The loader is a :mod:`mgm_fast.data.loader` loader: the same order of samples as the memory
and torch loaders for the same ``(seed, epoch)`` (its ``BatchPlan``: a seeded permutation per
epoch, rank ``r`` taking elements ``r::world_size`` of it cut to full global batches), the same
``epoch`` / ``position`` bookkeeping and the same ``state_dict`` (a run may resume with another
loader kind), and the same ``keys`` option (only the files those fields need are read).

What runs where
---------------
DALI (its C++ thread pool, and the GPU when the pipeline runs there):

* reading: one reader per modality (``fn.readers.file`` for PNG/JPEG, ``fn.readers.numpy`` for
  ``.npy``), every reader given the epoch's file list in the same order (no reader-side
  shuffling) and sharded with ``shard_id=rank, num_shards=world_size``: the list is built so
  that DALI's contiguous shard ``r`` is exactly rank ``r``'s part of the plan, from its next
  batch on (a resumed epoch starts after the consumed batches).
* decoding (``fn.decoders.image``; EXIF orientation ignored, as PIL does). In a GPU pipeline
  (``device="mixed"``) JPEG is decoded by nvJPEG; PNG is decoded on DALI's CPU threads and
  uploaded (nvImageCodec has no GPU PNG decoder), so for PNG datasets DALI's gain is its
  threaded C++ reading and decoding, not GPU decoding.
* the RGB resize: ``fn.resize`` linear with antialiasing, to float (``rgb_resize="dali"``).
* checks at the file's own resolution, reduced to one flag per sample: labels out of range,
  non-integral or non-finite float labels, non-finite or negative depth, ... A flagged sample
  is re-read with the dataset's ``__getitem__``, which raises its :class:`DataError` naming
  the file. These run on host data (npy readers and the label PNGs decode on the CPU), so
  raising never waits for the GPU.
* padding of the full-resolution maps to the largest sample of the batch (``fn.pad``) so the
  PyTorch iterator can stack samples of different sizes; the true sizes travel along.

torch, after the pipeline, one batched op per step:

* the nearest-neighbour resize of labels, depth, normals and masks as an integer index gather
  ``floor((i + 0.5) * in / out)`` (:func:`nearest_gather`), on the device where DALI left the
  data (host for .npy, the GPU for GPU-decoded maps), before the result moves to ``device``.
  DALI's ``INTERP_NN`` is not used: it picks a different source pixel at exact ties and, for
  larger images, where its float coordinates accumulate error. On a sweep of 6720 (in, out)
  size pairs, 1068 differed from PIL's NEAREST (480 -> 128 and 640 -> 128 happen to agree).
* label offset / ignore value, depth validity, 8-bit normal decoding + renormalisation (float64
  length, as the numpy code) + validity, mask thresholds (PIL's integer luma), RGB scaling to
  [-1, 1] and the channel-first layout, on ``device``.
* ids and scene labels, looked up from the planned dataset indices of the batch; every image
  reader also carries each sample's dataset index as its ``labels``, and these are checked
  against the plan batch by batch (so the modalities provably stay paired).

Not per sample: the datasets' ``validate_sample`` is not run (the invariants it checks hold
by construction; the tests run it on every sample). The files of one .npy modality must share
a dtype, as DALI batches one dtype: a mismatch raises a DataError with DALI's message, which
names both files. Taskonomy label PNGs must be 8-bit and depth PNGs 16-bit (checked on the
first file; DALI decodes to a fixed bit depth).

RGB tolerance: DALI's antialiased linear resize equals torch's ``F.interpolate(...,
mode="bilinear", antialias=True)`` (PIL's bilinear), which the datasets use, to about 1e-4/255
inside the image. In the outermost output row and column it differs, because DALI clamps the
filter at the image edge where torch/PIL renormalise the truncated filter: measured up to
16/255 on white noise and a few /255 on smooth images (:data:`RGB_BORDER_ATOL`). RGB is exact
when no resize is needed (``image_size=None`` or files already at the output size), and
``rgb_resize="torch"`` makes it exact everywhere (bit-exact on a CPU device; a GPU's
interpolation rounds differently): DALI then only decodes, and the full-resolution images are
resized by ``F.interpolate`` after the pipeline as the datasets do (more data leaves the
pipeline, and on a CPU the resize runs in the training process). PNG, and JPEG on DALI's CPU
decoder, matched PIL bit for bit in the tests; nvJPEG in a GPU pipeline can differ by a few
levels.

CPU-only hosts: the torch part runs in the training process while DALI's threads prepare the
next batches. With few cores, keep DALI's ``num_threads`` plus torch's intra-op threads within
the core count (e.g. ``torch.set_num_threads(1)`` on 2 cores): oversubscribed OpenMP regions
in torch stall (on a busy 2-core machine the torch part of an epoch took up to 5x longer
with torch's default 2 threads than with 1).

Resume: ``state_dict()`` holds ``epoch`` and ``position`` (batches of it already yielded) plus
the plan. After ``load_state_dict``, ``iter`` rebuilds the epoch's order from ``(seed, epoch)``
and starts the readers after the consumed batches, so a resumed epoch yields the same batches
as an uninterrupted one. Breaking out of a loop keeps the position, like the other loaders.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mgm_fast.data.loader import _check_keys, _Loader
from mgm_fast.data.sample import IGNORE_INDEX, MAX_NORMAL_NORM, MIN_NORMAL_NORM, DataError, list_preview

__all__ = [
    "RGB_BORDER_ATOL",
    "RGB_INTERIOR_ATOL",
    "DaliLoader",
    "dali_available",
    "make_dali_loader",
    "nearest_gather",
    "nearest_index",
    "not_supported_reasons",
]

RGB_INTERIOR_ATOL = 1e-5
"""Max |DALI - dataset| of resized ``rgb`` ([-1, 1] units) away from the outermost row/column."""
RGB_BORDER_ATOL = 2 * 16 / 255
"""Max |DALI - dataset| of resized ``rgb`` ([-1, 1] units) in the outermost rows/columns
(white noise, the worst case; natural images stay within a few levels)."""

_INSTALL_HINT = "pip install -e .[dali] (package nvidia-dali-cuda130)"
_L24 = (19595, 38470, 7471)  # PIL's RGB -> L weights (sum 2^16): masks threshold as convert("L")


def _dali():
    """The DALI modules, imported on first use (DALI is an optional extra)."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:
        raise ImportError(f"mgm_fast.data.dali needs NVIDIA DALI ({e}); install it: {_INSTALL_HINT}") from e
    return fn, dmath, types, Pipeline, LastBatchPolicy, DALIGenericIterator


def dali_available() -> bool:
    """True when ``nvidia.dali`` and its PyTorch plugin import."""
    try:
        _dali()
    except ImportError:
        return False
    return True


def not_supported_reasons(dataset, device: torch.device | str) -> list[str]:
    """Why this module cannot load ``dataset`` onto ``device`` here; empty when it can."""
    reasons = []
    if not dali_available():
        reasons.append(f"nvidia.dali is not installed ({_INSTALL_HINT})")
    try:
        layout = _layout_for(dataset)
        layout.check_supported()
    except (TypeError, DataError) as e:
        reasons.append(str(e))
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        reasons.append("device is CUDA but torch.cuda is not available")
    return reasons


# -------------------------------------------------------------------------------------------
# Nearest-neighbour resize as an exact integer gather, and the per-pixel decoding in torch.


def nearest_index(src: torch.Tensor, out: int) -> torch.Tensor:
    """Source row (or column) of each output pixel, ``floor((i + 0.5) * src / out)`` in integers.

    Args:
        src: int64 (B,) source extents (>= 1).
        out: output extent.
    Returns:
        int64 (B, out) on ``src``'s device: the indices of PIL's NEAREST and of
        :func:`mgm_fast.data.sample.resize_nearest` (identity when ``src == out``).
    """
    i = torch.arange(out, device=src.device, dtype=torch.int64)
    idx = ((2 * i + 1)[None, :] * src[:, None]) // (2 * out)
    return torch.minimum(idx, (src - 1)[:, None])


def nearest_gather(x: torch.Tensor, hw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a padded batch of maps.

    Args:
        x: (B, Hp, Wp, *rest) maps of any dtype; sample ``b`` occupies ``x[b, :h_b, :w_b]``.
        hw: int64 (B, 2) true ``(h_b, w_b)`` of each sample, on the host.
        size: output ``(H, W)``.
    Returns:
        (B, H, W, *rest) on ``x``'s device, ``out[b, i, j] = x[b, row_b(i), col_b(j)]``: ``x``
        itself when every sample already has ``size``, two ``index_select`` when all share one
        size, else one gather over the flattened batch (advanced indexing with three index
        tensors is several times slower on the CPU).
    """
    hw = hw.to(dtype=torch.int64, device="cpu")
    bsz, hp, wp = x.shape[:3]
    uniform = bool((hw == hw[:1]).all())
    if uniform and tuple(hw[0].tolist()) == tuple(size) == (hp, wp):
        return x
    rows = nearest_index(hw[:, 0], size[0]).to(x.device)
    cols = nearest_index(hw[:, 1], size[1]).to(x.device)
    if uniform:
        return x.index_select(1, rows[0]).index_select(2, cols[0])
    b = torch.arange(bsz, device=x.device)[:, None, None]
    flat = ((b * hp + rows[:, :, None]) * wp + cols[:, None, :]).reshape(-1)
    rest = x.shape[3:]
    return x.reshape(bsz * hp * wp, *rest).index_select(0, flat).reshape(bsz, size[0], size[1], *rest)


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x if x.device == device else x.to(device, non_blocking=True)


def _f32(value: float) -> float:
    """The float32 value of ``value`` as a Python float (torch then multiplies in float32 by
    exactly the constant numpy uses, e.g. ``np.float32(1 / 255)``)."""
    return float(np.float32(value))


def _normalise(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (B, H, W, 3) decoded normals -> (float32 (B, 3, H, W) unit, 0 where invalid; bool
    (B, 1, H, W) valid), as :func:`mgm_fast.data.sample.normalise_normals`: the length in
    float64 (x^2 + y^2, then + z^2), valid within [MIN_NORMAL_NORM, MAX_NORMAL_NORM], the
    division in float64."""
    n64 = n.to(torch.float64)
    x, y, z = n64.unbind(-1)
    norm = torch.sqrt(x * x + y * y + z * z)
    valid = torch.isfinite(norm) & (norm >= MIN_NORMAL_NORM) & (norm <= MAX_NORMAL_NORM)
    unit = torch.where(valid[..., None], n64 / norm[..., None], 0.0).to(torch.float32)
    return unit.permute(0, 3, 1, 2).contiguous(), valid[:, None]


def _decode_normals(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, H, W, 3) 8-bit normal maps -> ``_normalise(p * float32(2/255) - 1)``, the
    arithmetic of :func:`mgm_fast.data.sample.decode_normals_8bit`."""
    return _normalise(torch.mul(raw, _f32(2.0 / 255.0)).sub_(1.0))


def _luma_l24(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3) -> int32 (...): PIL's ``convert("L")``, ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``
    (grey images decoded to RGB come back unchanged)."""
    r, g, b = rgb.to(torch.int32).unbind(-1)
    return (r * _L24[0] + g * _L24[1] + b * _L24[2] + 32768) >> 16


def _rgb_to_sample(x: torch.Tensor, scale: float, resized: bool) -> torch.Tensor:
    """Colour (B, H, W, 3) with values ``scale``-d to [0, 1] -> float32 (B, 3, H, W) in [-1, 1].

    ``x * float32(scale)`` first, as :func:`mgm_fast.data.sample.image_to_rgb01` does with
    1/255, so unresized 8-bit pixels are bit-identical to the dataset's; resized values are
    clamped to [0, 1] as :func:`mgm_fast.data.sample.resize_rgb` does.
    """
    y = torch.mul(x, _f32(scale)) if scale != 1.0 else x.to(torch.float32, copy=True)
    if resized:
        y.clamp_(0.0, 1.0)
    return y.mul_(2.0).sub_(1.0).permute(0, 3, 1, 2).contiguous()


# -------------------------------------------------------------------------------------------
# Layouts: which files a sample has, the DALI graph pieces and the torch finish of each dataset.


class _Mod:
    """One modality: ``kind`` "image" (fn.readers.file + fn.decoders.image with ``output_type``
    / ``dtype``; with ``cpu_decode`` on the CPU even in a GPU pipeline, for host-side checks)
    or "npy" (fn.readers.numpy, always on the CPU). ``cast``: DALI dtype of the full-resolution
    output (torch has few uint16 kernels; fn.pad has no float64). ``pad``: pad the batch to its
    largest sample (off for fixed-size vectors)."""

    def __init__(self, kind: str, output_type=None, dtype=None, cpu_decode=False, cast=None, pad=True):
        self.kind, self.output_type, self.dtype = kind, output_type, dtype
        self.cpu_decode, self.cast, self.pad = cpu_decode, cast, pad


class _Ctx:
    """The DALI modules and the facts a layout's graph code needs."""

    def __init__(self, npy_float: Mapping[str, bool]):
        self.fn, self.dmath, self.types, *_ = _dali()
        self.npy_float = dict(npy_float)

    def flag(self, bad):
        """bool node -> uint8 per-sample flag, 1 where any element is set."""
        return self.fn.reductions.max(self.fn.cast(bad, dtype=self.types.UINT8))

    @staticmethod
    def nonfinite(x):
        """float node -> bool node, True at NaN and +-inf (``x - x`` is exactly 0 when finite)."""
        return (x - x) != 0


class _Layout:
    """How one dataset type maps onto a DALI pipeline. Subclasses name the modalities each
    requested key needs, the per-sample checks computed in DALI, and ``finish`` (torch)."""

    colour = "rgb"  # modality decoded as the colour image

    def __init__(self, dataset):
        self.ds = dataset
        self.size = dataset.size
        self.keys: tuple[str, ...] = ()
        self.rgb_resize = "dali"

    def check_supported(self) -> None:
        """Raise DataError when this dataset cannot go through DALI as it is."""

    def check_first(self, i: int) -> None:
        """Checks of sample ``i``'s files that DALI cannot make per sample (run on the first one)."""

    def all_files(self, i: int) -> dict[str, str]:
        return {k: str(v) for k, v in self.ds.files(i).items()}

    def sample_id(self, i: int) -> str:
        raise NotImplementedError

    def modalities(self) -> dict[str, _Mod]:
        """The modalities ``self.keys`` need, in reading order."""
        raise NotImplementedError

    def dali_checks(self, name: str, node, ctx: _Ctx) -> dict:
        """output name -> uint8 per-sample flag node (1: ask the dataset for its error)."""
        return {}

    def dali_cast(self, name: str, mod: _Mod, ctx: _Ctx):
        """DALI dtype the checked full-resolution ``name`` leaves the pipeline in (None: as read)."""
        return mod.cast

    def dali_colour(self, node, ctx: _Ctx, gpu: bool):
        """The colour node before the resize (npy colour images are converted here)."""
        return node

    def finish(self, out: Mapping[str, torch.Tensor], ids: list[int], device: torch.device) -> dict:
        raise NotImplementedError

    # -- shared helpers
    def wants(self, *keys: str) -> bool:
        return any(k in self.keys for k in keys)

    def dali_resizes_colour(self) -> bool:
        return self.size is not None and self.rgb_resize == "dali"

    def fail(self, i: int, why: str):
        """Re-read sample ``i`` with the dataset, which raises its DataError naming the file; if
        it does not, raise ``why`` with the sample's files."""
        self.ds[i]
        files = ", ".join(f"{k}={v}" for k, v in self.all_files(i).items())
        raise DataError(f"{self.sample_id(i)} ({files}): {why}")

    def check_flags(self, out: Mapping[str, torch.Tensor], ids: list[int], why: Mapping[str, str]) -> None:
        for key, text in why.items():
            if key in out and bool(out[key].any()):
                self.fail(ids[int(torch.nonzero(out[key].reshape(-1))[0, 0])], text)

    def resize(self, raw: torch.Tensor, hw: torch.Tensor, ids: list[int], name: str) -> torch.Tensor:
        """Nearest resize of a padded (B, Hp, Wp, ...) batch to ``self.size`` (torch gather on
        ``raw``'s device); with ``size=None`` the samples must share one size, as collate needs."""
        hw = hw[:, :2]
        if self.size is not None:
            return nearest_gather(raw, hw, self.size)
        ref = (int(raw.shape[1]), int(raw.shape[2]))
        odd = [self.sample_id(ids[j]) for j in range(len(ids)) if tuple(int(v) for v in hw[j]) != ref]
        if odd:
            raise DataError(
                f"DALI loader: '{name}' of sample(s) {odd[:5]} is not {ref[0]}x{ref[1]} like the rest of the "
                "batch; load all samples at one image_size"
            )
        return raw

    def check_same_size(self, hws: Mapping[str, torch.Tensor], ids: list[int]) -> None:
        """``image_size=None``: the modalities of a sample must share one (H, W)."""
        if self.size is None:
            for j, i in enumerate(ids):
                sizes = {k: tuple(int(v) for v in hw[j, :2]) for k, hw in hws.items()}
                if len(set(sizes.values())) > 1:
                    self.fail(i, f"modalities have different sizes {sizes}; pass an image_size")

    def squeeze_2d(self, raw, shape, ids, what: str, first_ok: bool = True):
        """Padded (B, H, W), (B, H, W, 1) or (B, 1, H, W) arrays -> ((B, H, W), (B, 2) sizes):
        the batch form of the loaders' ``_as_2d``. Other shapes go to the dataset for its error."""
        if raw.dim() == 3:
            return raw, shape
        if raw.dim() == 4 and bool((shape[:, 2] == 1).all()):
            return raw[..., 0], shape[:, :2]
        if first_ok and raw.dim() == 4 and bool((shape[:, 0] == 1).all()):
            return raw[:, 0], shape[:, 1:]
        for j, i in enumerate(ids):
            self.fail(
                i,
                f"{what} has shape {tuple(int(v) for v in shape[j])}; expected (H, W), one layout per batch",
            )
        raise AssertionError("unreachable")

    def colour_to_sample(
        self, out: Mapping[str, torch.Tensor], device: torch.device, scale: float
    ) -> torch.Tensor:
        """The colour output -> float32 (B, 3, H, W) in [-1, 1] on ``device``. With
        ``rgb_resize="torch"`` the full-resolution images are resized here as
        :func:`mgm_fast.data.sample.resize_rgb` does (one call per batch of equal sizes)."""
        x = _to(out[self.colour], device)
        if self.size is None or self.rgb_resize == "dali":
            return _rgb_to_sample(x, scale, resized=self.size is not None)
        y = torch.mul(x, _f32(scale)) if scale != 1.0 else x.to(torch.float32)
        y = y.permute(0, 3, 1, 2)
        hw = out[f"{self.colour}_shape"][:, :2].tolist()
        kw = {"size": self.size, "mode": "bilinear", "align_corners": False, "antialias": True}
        if all(tuple(s) == tuple(y.shape[2:]) for s in hw):
            r = F.interpolate(y, **kw)
        else:  # a padded batch of mixed sizes: image by image
            r = torch.cat([F.interpolate(y[j : j + 1, :, :h, :w], **kw) for j, (h, w) in enumerate(hw)])
        return r.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0).contiguous()


class _FolderLayout(_Layout):
    """Released folder layout: rgb/ PNG|JPEG, ss/ and de/ .npy, nm|sn/ PNG, optional msk/ PNG."""

    def sample_id(self, i: int) -> str:
        return self.ds.sample_id(i)

    def modalities(self) -> dict[str, _Mod]:
        _, _, types, *_ = _dali()
        mods = {}
        if self.wants("rgb"):
            mods["rgb"] = _Mod("image", types.RGB)
        if self.wants("normal", "normal_mask"):
            mods["normals"] = _Mod("image", types.RGB)
            if self.ds.has_mask:
                mods["msk"] = _Mod("image", types.RGB)  # PIL's luma is applied in torch, exactly
        if self.wants("seg"):
            mods["ss"] = _Mod("npy")
        if self.wants("depth", "depth_mask"):
            mods["de"] = _Mod("npy")
        if not mods:  # only "scene": still read one modality, it carries the epoch
            mods["rgb"] = _Mod("image", types.RGB)
        return mods

    def dali_checks(self, name, node, ctx) -> dict:
        fn, dmath, types = ctx.fn, ctx.dmath, ctx.types
        if name == "ss":  # decode_labels + check_labels of the dataset, at the file's resolution
            bad = None
            if ctx.npy_float["ss"]:
                bad = ctx.nonfinite(node) | (dmath.floor(node) != node)
            v = fn.cast(node, dtype=types.INT64)
            lab = v + int(self.ds.label_offset)
            out = ((lab < 0) | (lab >= int(self.ds.num_seg_classes))) & (lab != IGNORE_INDEX)
            if self.ds.ignore_value is not None:
                out = out & (v != int(self.ds.ignore_value))
            return {"ss_flag": ctx.flag(out if bad is None else bad | out)}
        if name == "de" and ctx.npy_float["de"] and not self.ds.allow_invalid_depth:
            d = fn.cast(node, dtype=types.FLOAT)  # sanitize_depth checks the float32 values
            return {"de_flag": ctx.flag(ctx.nonfinite(d) | (d < 0))}
        return {}

    def dali_cast(self, name, mod, ctx):
        # labels are checked above (in range or the ignore value): int32 holds them; depth
        # becomes float32 as in sanitize_depth (an integer depth file is left for the error)
        if name == "ss":
            return ctx.types.INT32
        if name == "de" and ctx.npy_float["de"]:
            return ctx.types.FLOAT
        return None

    def finish(self, out, ids, device) -> dict:
        ds = self.ds
        self.check_flags(
            out, ids, {"ss_flag": "label out of range", "de_flag": "depth has NaN, inf or negative values"}
        )
        hws = {}
        if "rgb" in out:
            hws["rgb"] = out["rgb_shape"]
        if "ss" in out:
            ss, hws["ss"] = self.squeeze_2d(out["ss"], out["ss_shape"], ids, "label map")
        if "de" in out:
            if not out["de"].dtype.is_floating_point:
                self.fail(ids[0], f"depth has dtype {out['de'].dtype}; expected float metres")
            de, hws["de"] = self.squeeze_2d(out["de"], out["de_shape"], ids, "depth map")
        if "normals" in out:
            hws["normals"] = out["normals_shape"]
            for j, i in enumerate(ids):
                c = int(out["normals_shape"][j, 2])
                if c not in (3, 4):
                    self.fail(i, f"normal map has {c} channel(s); expected 8-bit RGB")
                if "msk" in out and not torch.equal(out["msk_shape"][j, :2], out["normals_shape"][j, :2]):
                    self.fail(i, "mask and normal map differ in size")
        self.check_same_size(hws, ids)

        res = {}
        if self.wants("rgb"):
            res["rgb"] = self.colour_to_sample(out, device, scale=1.0 / 255.0)
        if self.wants("seg"):  # host labels: gather, then offset / ignore on the output pixels
            raw = self.resize(ss, hws["ss"], ids, "ss").to(torch.int64)
            seg = raw + int(ds.label_offset)
            if ds.ignore_value is not None:
                seg = torch.where(raw == int(ds.ignore_value), IGNORE_INDEX, seg)
            res["seg"] = _to(seg, device)
        if self.wants("depth", "depth_mask"):
            depth = _to(self.resize(de, hws["de"], ids, "de"), device).to(torch.float32)
            dmask = torch.isfinite(depth) & (depth > 0)
            res["depth"] = torch.where(dmask, depth, 0.0)[:, None]
            res["depth_mask"] = dmask[:, None]
        if self.wants("normal", "normal_mask"):
            raw = _to(self.resize(out["normals"], out["normals_shape"], ids, "normals"), device)
            normal, nmask = _decode_normals(raw)
            if "msk" in out:
                m = _to(self.resize(out["msk"], out["msk_shape"], ids, "msk"), device)
                nmask = nmask & (_luma_l24(m) > 127)[:, None]
                normal = torch.where(nmask, normal, 0.0)
            res["normal"], res["normal_mask"] = normal, nmask
        if self.wants("scene"):
            res["scene"] = _to(torch.tensor([ds.records[i][0] for i in ids], dtype=torch.int64), device)
        return _select(res, self.keys, [self.sample_id(i) for i in ids])


class _TaskonomyLayout(_Layout):
    """Taskonomy views: rgb, segment_semantic (8-bit), depth_zbuffer (16-bit) and normal PNGs,
    class_scene .npy, and the optional mask_valid / mask PNG."""

    def __init__(self, dataset):
        super().__init__(dataset)
        has = {("mask_valid" in r[3]) or ("mask" in r[3]) for r in dataset.records}
        self.has_mask = has == {True}
        self.mixed_masks = len(has) > 1

    def check_supported(self) -> None:
        if self.mixed_masks:
            raise DataError(
                f"{self.ds.root}: some buildings have a validity-mask task and others not; the DALI loader "
                "needs it in all selected buildings or in none (choose with buildings=)"
            )

    def check_first(self, i: int) -> None:
        # DALI decodes to a fixed bit depth (8-bit labels, 16-bit depth) and would rescale a file
        # of the other depth; the PNG header says which it is (the dataset checks PIL's mode)
        files = self.all_files(i)
        for task, want in (("segment_semantic", 8), ("depth_zbuffer", 16)):
            if self.wants(*(("seg",) if task == "segment_semantic" else ("depth", "depth_mask"))):
                depth = _png_bit_depth(files[task])
                if depth != want:
                    self.fail(i, f"{task} is a {depth}-bit PNG; the DALI loader reads {want}-bit {task} PNGs")

    def all_files(self, i: int) -> dict[str, str]:
        paths = self.ds.files(i)
        out = {t: str(paths[t]) for t in ("rgb", "segment_semantic", "depth_zbuffer", "normal")}
        if self.ds.use_scenes:
            out["class_scene"] = str(paths["class_scene"])
        if self.has_mask:
            out["mask"] = str(paths.get("mask_valid") or paths.get("mask"))
        return out

    def sample_id(self, i: int) -> str:
        b, p, v, _ = self.ds.records[i]
        return f"{b}/point_{p}_view_{v}"

    def modalities(self) -> dict[str, _Mod]:
        self.check_supported()
        _, _, types, *_ = _dali()
        mods = {}
        if self.wants("rgb"):
            mods["rgb"] = _Mod("image", types.RGB)
        if self.wants("seg"):  # checked at full resolution in DALI: decoded on the host
            mods["segment_semantic"] = _Mod("image", types.ANY_DATA, cpu_decode=True)
        if self.wants("depth", "depth_mask"):
            mods["depth_zbuffer"] = _Mod(
                "image", types.ANY_DATA, types.UINT16, cpu_decode=True, cast=types.INT32
            )
        if self.wants("normal", "normal_mask"):
            mods["normal"] = _Mod("image", types.RGB)
        if self.has_mask and self.wants("depth", "depth_mask", "normal", "normal_mask"):
            mods["mask"] = _Mod("image", types.RGB)
        if self.ds.use_scenes and self.wants("scene"):
            mods["class_scene"] = _Mod("npy", pad=False)  # (365,) scores, kept as read
        if not mods:
            mods["rgb"] = _Mod("image", types.RGB)
        return mods

    def dali_checks(self, name, node, ctx) -> dict:
        from mgm_fast.data.taskonomy import NUM_SEG_RAW

        if name == "segment_semantic":
            return {"seg_flag": ctx.flag(node >= NUM_SEG_RAW)}
        if name == "class_scene" and ctx.npy_float["class_scene"]:
            return {"scene_flag": ctx.flag(ctx.nonfinite(node))}
        return {}

    def finish(self, out, ids, device) -> dict:
        from mgm_fast.data.taskonomy import DEPTH_INVALID, DEPTH_UNITS_PER_METRE, NUM_PLACES

        ds = self.ds
        self.check_flags(
            out,
            ids,
            {
                "seg_flag": "segment_semantic value outside 0..17",
                "scene_flag": "class_scene has non-finite values",
            },
        )
        channels = {"segment_semantic": (1,), "depth_zbuffer": (1,), "normal": (3, 4)}
        present = [k for k in ("rgb", "segment_semantic", "depth_zbuffer", "normal") if k in out]
        for j, i in enumerate(ids):
            for name in present:
                c = int(out[f"{name}_shape"][j, 2])
                if name in channels and c not in channels[name]:
                    self.fail(i, f"{name} has {c} channel(s), expected {channels[name]}")
            if "mask" in out:
                for name in ("depth_zbuffer", "normal"):
                    if name in out and not torch.equal(out["mask_shape"][j, :2], out[f"{name}_shape"][j, :2]):
                        self.fail(i, f"mask differs in size from {name}")
        self.check_same_size({k: out[f"{k}_shape"] for k in present}, ids)

        res = {}
        mask = None
        if "mask" in out:
            mask = _luma_l24(_to(self.resize(out["mask"], out["mask_shape"], ids, "mask"), device)) > 0
        if self.wants("rgb"):
            res["rgb"] = self.colour_to_sample(out, device, scale=1.0 / 255.0)
        if self.wants("seg"):
            raw = self.resize(out["segment_semantic"], out["segment_semantic_shape"], ids, "segment_semantic")
            seg = raw[..., 0].to(torch.int64) - (2 if ds.background_as_ignore else 1)
            res["seg"] = _to(torch.where(seg < 0, IGNORE_INDEX, seg), device)
        if self.wants("depth", "depth_mask"):
            z = self.resize(out["depth_zbuffer"], out["depth_zbuffer_shape"], ids, "depth_zbuffer")[..., 0]
            z = _to(z, device)
            depth = z.to(torch.float32) / DEPTH_UNITS_PER_METRE  # exact: 16-bit / 512
            dmask = (z != DEPTH_INVALID) & (z > 0)
            if ds.max_depth is not None:
                dmask &= depth <= ds.max_depth
            if mask is not None:
                dmask &= mask
            res["depth"] = torch.where(dmask, depth, 0.0)[:, None]
            res["depth_mask"] = dmask[:, None]
        if self.wants("normal", "normal_mask"):
            raw = _to(self.resize(out["normal"], out["normal_shape"], ids, "normal"), device)
            normal, nmask = _decode_normals(raw)
            if mask is not None:
                nmask = nmask & mask[:, None]
                normal = torch.where(nmask, normal, 0.0)
            res["normal"], res["normal_mask"] = normal, nmask
        if self.wants("scene"):
            if ds.use_scenes:
                probs, shp = out["class_scene"], out["class_scene_shape"]
                for j, i in enumerate(ids):
                    if sorted(int(v) for v in shp[j]) not in ([NUM_PLACES], [1, NUM_PLACES]):
                        self.fail(
                            i, f"class_scene has shape {tuple(shp[j].tolist())}, expected ({NUM_PLACES},)"
                        )
                scene = self._scenes(probs.reshape(len(ids), NUM_PLACES), ids)
            else:
                scene = torch.full((len(ids),), -1, dtype=torch.int64)
            res["scene"] = _to(scene, device)
        return _select(res, self.keys, [self.sample_id(i) for i in ids])

    def _scenes(self, probs: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """(B, 365) host scores -> int64 (B,) labels as ``TaskonomyDataset._scene_of``: first
        arg-max (as numpy), then the kept classes with "other" / "restrict" / "drop"."""
        ds = self.ds
        if ds.keep is None:
            return probs.argmax(1).to(torch.int64)
        keep = torch.tensor(ds.keep, dtype=torch.int64)
        if ds.scene_other == "restrict":
            return probs[:, keep].argmax(1).to(torch.int64)
        hit = probs.argmax(1)[:, None] == keep[None, :]
        kept = hit.any(1)
        if ds.scene_other == "drop" and not bool(kept.all()):
            self.fail(
                ids[int(torch.nonzero(~kept)[0, 0])], "scene is outside scene_classes (the file changed?)"
            )
        return torch.where(kept, hit.to(torch.int64).argmax(1), len(ds.keep))


class _MTANLayout(_Layout):
    """MTAN npy split: image (H, W, 3) in [0, 1], label (H, W[, 1]), depth (H, W[, 1]), normal (H, W, 3)."""

    colour = "image"

    def sample_id(self, i: int) -> str:
        return f"{self.ds.split}/{i}"

    def modalities(self) -> dict[str, _Mod]:
        # the dataset checks every file against the image's size, so the image is always read
        mods = {"image": _Mod("npy")}
        if self.wants("seg"):
            mods["label"] = _Mod("npy")
        if self.wants("depth", "depth_mask"):
            mods["depth"] = _Mod("npy")
        if self.wants("normal", "normal_mask"):
            mods["normal"] = _Mod("npy")
        return mods

    def dali_checks(self, name, node, ctx) -> dict:
        fn, dmath, types = ctx.fn, ctx.dmath, ctx.types
        if name == "image":
            x = fn.cast(node, dtype=types.FLOAT)
            return {"image_flag": ctx.flag(ctx.nonfinite(x) | (x < -1e-3) | (x > 1 + 1e-3))}
        if name == "label":
            bad = ctx.nonfinite(node) | (dmath.floor(node) != node) if ctx.npy_float["label"] else None
            v = fn.cast(node, dtype=types.INT64)
            out = ((v < 0) | (v >= int(self.ds.num_seg_classes))) & (v != IGNORE_INDEX)
            return {"label_flag": ctx.flag(out if bad is None else bad | out)}
        if name == "depth" and ctx.npy_float["depth"] and not self.ds.allow_invalid_depth:
            d = fn.cast(node, dtype=types.FLOAT)
            return {"depth_flag": ctx.flag(ctx.nonfinite(d) | (d < 0))}
        if name == "normal" and ctx.npy_float["normal"]:
            return {"normal_flag": ctx.flag(ctx.nonfinite(node))}
        return {}

    def dali_cast(self, name, mod, ctx):
        if name == "label":  # checked above: integral and in range
            return ctx.types.INT32
        if name in ("depth", "normal") and ctx.npy_float[name]:  # the dataset works in float32
            return ctx.types.FLOAT
        return None

    def dali_colour(self, node, ctx, gpu):
        # the dataset resizes np.clip(image, 0, 1) in float32; fn.resize needs an HWC layout
        x = ctx.dmath.clamp(ctx.fn.cast(node, dtype=ctx.types.FLOAT), 0.0, 1.0)
        x = ctx.fn.reshape(x, layout="HWC")
        return x.gpu() if gpu else x

    def finish(self, out, ids, device) -> dict:
        ds = self.ds
        self.check_flags(
            out,
            ids,
            {
                "image_flag": "image values outside [0, 1] or non-finite",
                "label_flag": "label map out of range or not integral",
                "depth_flag": "depth has NaN, inf or negative values",
                "normal_flag": "normals have non-finite values",
            },
        )
        img = out["image_shape"]
        hws = {}
        if "label" in out:
            label, hws["label"] = self.squeeze_2d(
                out["label"], out["label_shape"], ids, "label map", first_ok=False
            )
        if "depth" in out:
            if not out["depth"].dtype.is_floating_point:
                self.fail(ids[0], f"depth has dtype {out['depth'].dtype}, expected float")
            depth, hws["depth"] = self.squeeze_2d(
                out["depth"], out["depth_shape"], ids, "depth", first_ok=False
            )
        if "normal" in out:
            if not out["normal"].dtype.is_floating_point:
                self.fail(ids[0], f"normals have dtype {out['normal'].dtype}, expected float")
            hws["normal"] = out["normal_shape"]
        for j, i in enumerate(ids):
            if img.shape[1] != 3 or int(img[j, 2]) != 3:
                self.fail(i, "image is not (H, W, 3)")
            if "normal" in out and (out["normal_shape"].shape[1] != 3 or int(out["normal_shape"][j, 2]) != 3):
                self.fail(i, "normals are not (H, W, 3)")
            if not all(torch.equal(hw[j, :2], img[j, :2]) for hw in hws.values()):
                self.fail(i, "label / depth / normal size differs from the image")

        res = {}
        if self.wants("rgb"):
            res["rgb"] = self.colour_to_sample(out, device, scale=1.0)
        if self.wants("seg"):
            res["seg"] = _to(self.resize(label, hws["label"], ids, "label").to(torch.int64), device)
        if self.wants("depth", "depth_mask"):
            d = _to(self.resize(depth, hws["depth"], ids, "depth"), device).to(torch.float32)
            dmask = torch.isfinite(d) & (d > 0)
            res["depth"], res["depth_mask"] = torch.where(dmask, d, 0.0)[:, None], dmask[:, None]
        if self.wants("normal", "normal_mask"):
            n = _to(self.resize(out["normal"], hws["normal"], ids, "normal"), device).to(torch.float32)
            res["normal"], res["normal_mask"] = _normalise(n)
        if self.wants("scene"):
            if ds.scene_labels is None:
                scene = torch.full((len(ids),), -1, dtype=torch.int64)
            else:
                scene = torch.from_numpy(ds.scene_labels[np.asarray(ids, dtype=np.int64)])
            res["scene"] = _to(scene, device)
        return _select(res, self.keys, [self.sample_id(i) for i in ids])


def _select(res: dict, keys: Sequence[str], ids: list[str]) -> dict:
    """The requested fields in the sample format's order, plus ``id``."""
    return {**{k: res[k] for k in keys}, "id": ids}


def _layout_for(dataset) -> _Layout:
    from mgm_fast.data.folder import FolderDataset
    from mgm_fast.data.mtan import MTANDataset
    from mgm_fast.data.taskonomy import TaskonomyDataset

    for cls, layout in (
        (FolderDataset, _FolderLayout),
        (TaskonomyDataset, _TaskonomyLayout),
        (MTANDataset, _MTANLayout),
    ):
        if isinstance(dataset, cls):
            return layout(dataset)
    raise TypeError(
        f"the DALI loader reads FolderDataset (official layout), TaskonomyDataset and MTANDataset, not "
        f"{type(dataset).__name__} (in-memory data such as SyntheticScenes is best kept on the device)"
    )


def _png_bit_depth(path: str) -> int | None:
    """Bits per channel from a PNG's IHDR chunk (None when the file is not a PNG)."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]


def _npy_is_float(path: str) -> bool:
    """Whether a .npy file holds floats, from its header alone (it decides which checks DALI runs)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            header = read(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the .npy header ({type(e).__name__}: {e})") from None
    return np.dtype(header[2]).kind == "f"


# -------------------------------------------------------------------------------------------
# The loader.


class DaliLoader(_Loader):
    """Batches of a file dataset read, decoded and resized by DALI (module docstring); same
    order, state and batch format as :class:`mgm_fast.data.loader.TorchLoader`.

    Args (beyond the common dataset .. keys of :mod:`mgm_fast.data.loader`):
        num_threads: DALI CPU threads.
        pipeline_device: ``"cpu"`` or ``"gpu"``; default ``"gpu"`` for a CUDA ``device``.
        prefetch_queue_depth: batches DALI prepares ahead.
        rgb_resize: ``"dali"`` (in the pipeline; borders within :data:`RGB_BORDER_ATOL`) or
            ``"torch"`` (exact; full-resolution images leave the pipeline).
    Attributes:
        kind: ``"dali"``; epoch, position, plan (BatchPlan), indices: as the other loaders.
    """

    kind = "dali"

    def __init__(
        self,
        dataset,
        indices,
        batch_size: int,
        device: torch.device | str,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        keys: Sequence[str] | None = None,
        num_threads: int = 2,
        pipeline_device: str | None = None,
        prefetch_queue_depth: int = 2,
        rgb_resize: str = "dali",
    ):
        _dali()  # fail at construction, not at the first batch, when DALI is missing
        super().__init__(dataset, indices, batch_size, device, seed, shuffle, drop_last, rank, world_size)
        self.keys = _check_keys(keys)
        if rgb_resize not in ("dali", "torch"):
            raise ValueError(f"rgb_resize must be 'dali' or 'torch', got {rgb_resize!r}")
        if pipeline_device is None:
            pipeline_device = "gpu" if self.device.type == "cuda" else "cpu"
        if pipeline_device not in ("cpu", "gpu"):
            raise ValueError(f"pipeline_device must be 'cpu' or 'gpu', got {pipeline_device!r}")
        if pipeline_device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("pipeline_device='gpu' needs a CUDA device; use pipeline_device='cpu'")
        self.pipeline_device = pipeline_device
        self.num_threads = int(num_threads)
        self.prefetch_queue_depth = int(prefetch_queue_depth)
        self.layout = _layout_for(dataset)
        self.layout.keys, self.layout.rgb_resize = self.keys, rgb_resize
        self.modalities = self.layout.modalities()
        # every selected sample's files, resolved once; the readers get them per epoch
        self._files = {int(i): self.layout.all_files(int(i)) for i in self.indices.tolist()}
        first = self._files[int(self.indices[0])]
        self.layout.check_first(int(self.indices[0]))
        self._npy_float = {
            m: _npy_is_float(first[m]) for m, mod in self.modalities.items() if mod.kind == "npy"
        }

    def rank_order(self, epoch: int, rank: int | None = None) -> list[int]:
        """The dataset indices ``rank`` (default: this one) reads in ``epoch``, batch after batch."""
        plan = self.plan
        order = plan.order(epoch)[: plan.samples_per_epoch]
        r = plan.rank if rank is None else int(rank)
        return self.indices[order[r :: plan.world_size]].tolist()

    def _build(self, epoch: int, start: int):
        """The DALI pipeline and iterator of ``epoch`` from batch ``start`` on."""
        fn, _, types, Pipeline, LastBatchPolicy, DALIGenericIterator = _dali()
        bs, world = self.batch_size, self.plan.world_size
        # rank r's remaining samples form DALI's r-th contiguous shard (all shards equal length)
        flat = [i for r in range(world) for i in self.rank_order(epoch, r)[start * bs :]]
        gpu = self.pipeline_device == "gpu"
        device_id = None
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = Pipeline(
            batch_size=bs,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=self.plan.seed,
            prefetch_queue_depth=self.prefetch_queue_depth,
        )
        # the order is in the lists; pad_last_batch keeps a short last batch inside the shard
        # (the iterator trims it) instead of reading on into the next shard
        shard = {
            "shard_id": self.plan.rank,
            "num_shards": world,
            "stick_to_shard": True,
            "pad_last_batch": True,
        }
        ctx = _Ctx(self._npy_float)
        lay = self.layout
        outs: dict[str, object] = {}
        with pipe:
            for name, mod in self.modalities.items():
                files = [self._files[i][name] for i in flat]
                if mod.kind == "image":
                    enc, outs[f"{name}_idx"] = fn.readers.file(files=files, labels=flat, name=name, **shard)
                    # the file's own (H, W, C): C tells grey from RGB; no EXIF rotation, as PIL
                    outs[f"{name}_shape"] = fn.peek_image_shape(
                        enc, image_type=types.ANY_DATA, adjust_orientation=False
                    )
                    opts = {"output_type": mod.output_type, "adjust_orientation": False}
                    if mod.dtype is not None:
                        opts["dtype"] = mod.dtype
                    node = fn.decoders.image(
                        enc, device="mixed" if gpu and not mod.cpu_decode else "cpu", **opts
                    )
                else:
                    node = fn.readers.numpy(files=files, name=name, **shard)
                    outs[f"{name}_shape"] = node.shape()
                outs.update(lay.dali_checks(name, node, ctx))
                cast = lay.dali_cast(name, mod, ctx)
                if cast is not None:
                    node = fn.cast(node, dtype=cast)
                if name == lay.colour:
                    node = lay.dali_colour(node, ctx, gpu)
                    if lay.dali_resizes_colour():
                        node = fn.resize(
                            node,
                            size=list(lay.size),
                            interp_type=types.INTERP_LINEAR,
                            antialias=True,
                            dtype=types.FLOAT,
                        )
                    else:
                        node = fn.pad(node)
                elif mod.pad:
                    node = fn.pad(node)  # full resolution: the torch gather resizes
                outs[name] = node
            names = list(outs)
            pipe.set_outputs(*[outs[k] for k in names])
        policy = LastBatchPolicy.DROP if self.plan.drop_last else LastBatchPolicy.PARTIAL
        driver = next(iter(self.modalities))  # its reader sets the epoch length
        it = DALIGenericIterator(
            [pipe], names, reader_name=driver, last_batch_policy=policy, auto_reset=False
        )
        return it, pipe

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[dict]:
        n, bs = len(self), self.batch_size
        expected = self.rank_order(epoch)[start * bs :]
        it = pipe = None
        k = 0
        try:
            try:
                it, pipe = self._build(epoch, start)
            except RuntimeError as e:  # the first batches are prepared while building
                self._diagnose(expected, 0, e)
            while start + k < n:
                try:
                    out = next(it)[0]
                except StopIteration:
                    break
                except RuntimeError as e:
                    self._diagnose(expected, k, e)
                want = expected[k * bs : (k + 1) * bs]
                carried = [out[key].reshape(-1).tolist() for key in out if key.endswith("_idx")]
                for got in carried:
                    if got != want:
                        raise RuntimeError(
                            f"DALI loader: batch {start + k} of epoch {epoch} holds samples {got[:8]}, the plan "
                            f"says {want[:8]} (a reader left the file-list order)"
                        )
                batch = self.layout.finish(out, want, self.device)
                # the loader already reads the index outputs back for every batch (above)
                self._check_label_batch(batch, batch.get("id", []))
                yield batch
                k += 1
            if start + k != n:
                raise RuntimeError(f"DALI loader: epoch {epoch} ended after {start + k} of {n} batches")
        finally:
            del it, pipe  # frees the pipeline's threads and buffers now, not at garbage collection

    def _diagnose(self, expected: list[int], k: int, err: Exception):
        """DALI failed in batch ``k`` or a prefetched one: re-read those samples with the dataset
        and raise the first DataError (it names the file), else a DataError with DALI's reason."""
        # the failing batch is the current one or one DALI prepared ahead (its queue plus the
        # readers' own prefetch); samples whose files DALI's message names are tried first
        ahead = self.prefetch_queue_depth + 2
        window = expected[k * self.batch_size : (k + ahead) * self.batch_size]
        reason = _dali_reason(err)
        text = str(err)
        window = sorted(window, key=lambda i: not any(f in text for f in self._files[i].values()))
        for i in window:
            try:
                self.dataset[i]
            except DataError as e:
                raise DataError(f"{e} [DALI: {reason}]") from err
        files = [f for i in window[:2] for f in self._files[i].values()]
        raise DataError(
            f"DALI failed on one of {len(window)} sample(s) (files include {list_preview(files)}) that the dataset "
            f"itself reads without error: {reason}"
        ) from err


def _dali_reason(err: Exception) -> str:
    """The informative line of a DALI pipeline error, the one after "encountered:" (DALI wraps it
    in the operator's name and the pipeline definition's traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for j, ln in enumerate(lines[:-1]):
        if ln.startswith("encountered"):
            return lines[j + 1]
    return lines[0] if lines else type(err).__name__


def make_dali_loader(
    dataset,
    indices,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    drop_last: bool = True,
    num_threads: int = 2,
    **kw,
) -> DaliLoader:
    """A DALI loader over ``indices`` of ``dataset`` (module docstring).

    Args:
        dataset: :class:`~mgm_fast.data.folder.FolderDataset`,
            :class:`~mgm_fast.data.taskonomy.TaskonomyDataset` or
            :class:`~mgm_fast.data.mtan.MTANDataset`; its ``image_size`` is the output size.
        indices: dataset positions or sample ids of the split (``resolve_indices``).
        batch_size: samples per batch on each rank.
        device: torch device of the batches. A CUDA device also runs the pipeline on that GPU
            (``device_id`` = its index, else ``torch.cuda.current_device()``) unless
            ``pipeline_device="cpu"``; CPU pipelines use ``device_id=None``.
        seed: order seed (same permutations as the memory and torch loaders).
        rank, world_size: this process's shard (the readers' ``shard_id`` / ``num_shards``).
        shuffle: permute every epoch; False reads ``indices`` in the given order.
        drop_last: drop the short last batch (required when ``world_size > 1``).
        num_threads: DALI CPU threads.
        **kw: ``keys``, ``pipeline_device``, ``prefetch_queue_depth``, ``rgb_resize`` (see
            :class:`DaliLoader`).
    Returns:
        :class:`DaliLoader` (``kind == "dali"``): ``len()`` batches per epoch, ``iter()`` yields
        batch dicts, ``state_dict()`` / ``load_state_dict()`` resume mid-epoch.
    """
    return DaliLoader(
        dataset,
        indices,
        batch_size,
        device,
        seed,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        num_threads=num_threads,
        **kw,
    )
