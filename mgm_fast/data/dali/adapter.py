"""What every DALI format adapter shares: the optional DALI import, the exact nearest-neighbour
resize as a torch gather, the per-pixel decoding in torch (twins of the numpy rules of
:mod:`mgm_fast.data.sample`), and :class:`FormatAdapter`, the base class that maps one dataset
type onto a DALI pipeline (package docstring of :mod:`mgm_fast.data.dali`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mgm_fast.data.sample import MAX_NORMAL_NORM, MIN_NORMAL_NORM, NORMAL8_SCALE, DataError

__all__ = [
    "INSTALL_HINT",
    "RGB_BORDER_ATOL",
    "RGB_INTERIOR_ATOL",
    "FormatAdapter",
    "GraphContext",
    "Modality",
    "dali_available",
    "dali_modules",
    "decode_normals_8bit_batch",
    "float32_value",
    "nearest_gather",
    "nearest_index",
    "normalise_normals_batch",
    "pil_luma",
    "rgb_to_sample",
    "select_keys",
    "to_device",
]

RGB_INTERIOR_ATOL = 1e-5
"""Max |DALI - dataset| of resized ``rgb`` ([-1, 1] units) away from the outermost row/column."""
RGB_BORDER_ATOL = 2 * 16 / 255
"""Max |DALI - dataset| of resized ``rgb`` ([-1, 1] units) in the outermost rows/columns
(white noise, the worst case; natural images stay within a few levels)."""

INSTALL_HINT = "pip install -e .[dali] (package nvidia-dali-cuda130)"
_L24 = (19595, 38470, 7471)  # PIL's RGB -> L weights (sum 2^16): masks threshold as convert("L")


def dali_modules():
    """The DALI modules, imported on first use (DALI is an optional extra)."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:
        raise ImportError(f"mgm_fast.data.dali needs NVIDIA DALI ({e}); install it: {INSTALL_HINT}") from e
    return fn, dmath, types, Pipeline, LastBatchPolicy, DALIGenericIterator


def dali_available() -> bool:
    """True when ``nvidia.dali`` and its PyTorch plugin import."""
    try:
        dali_modules()
    except ImportError:
        return False
    return True


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
    # non_blocking: a blocking upload would wait for every kernel queued on the device (the
    # previous training step's), once per resized map of every batch
    rows = to_device(nearest_index(hw[:, 0], size[0]), x.device)
    cols = to_device(nearest_index(hw[:, 1], size[1]), x.device)
    if uniform:
        return x.index_select(1, rows[0]).index_select(2, cols[0])
    b = torch.arange(bsz, device=x.device)[:, None, None]
    flat = ((b * hp + rows[:, :, None]) * wp + cols[:, None, :]).reshape(-1)
    rest = x.shape[3:]
    return x.reshape(bsz * hp * wp, *rest).index_select(0, flat).reshape(bsz, size[0], size[1], *rest)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x if x.device == device else x.to(device, non_blocking=True)


def float32_value(value: float) -> float:
    """The float32 value of ``value`` as a Python float (torch then multiplies in float32 by
    exactly the constant numpy uses, e.g. ``np.float32(1 / 255)``)."""
    return float(np.float32(value))


def normalise_normals_batch(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def decode_normals_8bit_batch(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, H, W, 3) 8-bit normal maps -> ``normalise_normals_batch(p * float32(2/255) - 1)``, the
    arithmetic of :func:`mgm_fast.data.sample.decode_normals_8bit`."""
    return normalise_normals_batch(torch.mul(raw, float(NORMAL8_SCALE)).sub_(1.0))


def pil_luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3) -> int32 (...): PIL's ``convert("L")``, ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``
    (grey images decoded to RGB come back unchanged)."""
    r, g, b = rgb.to(torch.int32).unbind(-1)
    return (r * _L24[0] + g * _L24[1] + b * _L24[2] + 32768) >> 16


def rgb_to_sample(x: torch.Tensor, scale: float, resized: bool) -> torch.Tensor:
    """Colour (B, H, W, 3) with values ``scale``-d to [0, 1] -> float32 (B, 3, H, W) in [-1, 1].

    ``x * float32(scale)`` first, as :func:`mgm_fast.data.sample.image_to_rgb01` does with
    1/255, so unresized 8-bit pixels are bit-identical to the dataset's; resized values are
    clamped to [0, 1] as :func:`mgm_fast.data.sample.resize_rgb` does.
    """
    y = torch.mul(x, float32_value(scale)) if scale != 1.0 else x.to(torch.float32, copy=True)
    if resized:
        y.clamp_(0.0, 1.0)
    return y.mul_(2.0).sub_(1.0).permute(0, 3, 1, 2).contiguous()


# -------------------------------------------------------------------------------------------
# Format adapters: which files a sample has, the DALI graph pieces and the torch finish of each dataset.


class Modality:
    """One modality: ``kind`` "image" (fn.readers.file + fn.decoders.image with ``output_type``
    / ``dtype``; with ``cpu_decode`` on the CPU even in a GPU pipeline, for host-side checks)
    or "npy" (fn.readers.numpy, always on the CPU). ``cast``: DALI dtype of the full-resolution
    output (torch has few uint16 kernels; fn.pad has no float64). ``pad``: pad the batch to its
    largest sample (off for fixed-size vectors)."""

    def __init__(self, kind: str, output_type=None, dtype=None, cpu_decode=False, cast=None, pad=True):
        self.kind, self.output_type, self.dtype = kind, output_type, dtype
        self.cpu_decode, self.cast, self.pad = cpu_decode, cast, pad


class GraphContext:
    """The DALI modules and the facts a layout's graph code needs."""

    def __init__(self, npy_float: Mapping[str, bool]):
        self.fn, self.dmath, self.types, *_ = dali_modules()
        self.npy_float = dict(npy_float)

    def flag(self, bad):
        """bool node -> uint8 per-sample flag, 1 where any element is set."""
        return self.fn.reductions.max(self.fn.cast(bad, dtype=self.types.UINT8))

    @staticmethod
    def nonfinite(x):
        """float node -> bool node, True at NaN and +-inf (``x - x`` is exactly 0 when finite)."""
        return (x - x) != 0


class FormatAdapter:
    """How one dataset type maps onto a DALI pipeline. Subclasses take :attr:`fields` from the
    plain loader's module, say how DALI reads each modality (:meth:`readers`), which per-sample
    checks run in DALI (:meth:`dali_checks`), and finish a batch in torch (:meth:`finish`) with
    the plain loader's decoding rules."""

    dataset_type: type = object
    """The plain loader's dataset class this adapter reads."""
    colour = "rgb"  # modality decoded as the colour image
    fields: Mapping[str, tuple[str, ...]] = {}
    """The plain loader's table of the sample fields decoded from each modality's file."""

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
        return self.ds.sample_id(i)

    def readers(self) -> dict[str, Modality]:
        """How DALI reads and decodes each modality this dataset has, in reading order."""
        raise NotImplementedError

    def modalities(self) -> dict[str, Modality]:
        """The modalities ``self.keys`` need, in reading order: those whose files feed a requested
        field (:attr:`fields`); the colour image alone when only ``scene`` is asked for (one
        modality is always read: its reader carries the epoch)."""
        readers = self.readers()
        mods = {name: mod for name, mod in readers.items() if self.wants(*self.fields[name])}
        return mods or {self.colour: readers[self.colour]}

    def dali_checks(self, name: str, node, ctx: GraphContext) -> dict:
        """output name -> uint8 per-sample flag node (1: ask the dataset for its error)."""
        return {}

    def dali_cast(self, name: str, mod: Modality, ctx: GraphContext):
        """DALI dtype the checked full-resolution ``name`` leaves the pipeline in (None: as read)."""
        return mod.cast

    def dali_colour(self, node, ctx: GraphContext, gpu: bool):
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
        x = to_device(out[self.colour], device)
        if self.size is None or self.rgb_resize == "dali":
            return rgb_to_sample(x, scale, resized=self.size is not None)
        y = torch.mul(x, float32_value(scale)) if scale != 1.0 else x.to(torch.float32)
        y = y.permute(0, 3, 1, 2)
        hw = out[f"{self.colour}_shape"][:, :2].tolist()
        kw = {"size": self.size, "mode": "bilinear", "align_corners": False, "antialias": True}
        if all(tuple(s) == tuple(y.shape[2:]) for s in hw):
            r = F.interpolate(y, **kw)
        else:  # a padded batch of mixed sizes: image by image
            r = torch.cat([F.interpolate(y[j : j + 1, :, :h, :w], **kw) for j, (h, w) in enumerate(hw)])
        return r.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0).contiguous()


def select_keys(res: dict, keys: Sequence[str], ids: list[str]) -> dict:
    """The requested fields in the sample format's order, plus ``id``."""
    return {**{k: res[k] for k in keys}, "id": ids}
