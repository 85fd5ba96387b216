"""Training data loaders: the dataset decoded once and resident on the device, or torch's DataLoader.

Three loaders share one interface, that of :class:`mgm_fast.data.loader_base.LoaderBase`
(iteration over batches in the sample format of :mod:`mgm_fast.data.sample`, ``len()`` =
batches per epoch on this rank, ``state_dict()`` / ``load_state_dict()``, ``epoch``,
``position``, ``kind``), and one order of the samples and one resume rule (documented there):

* :class:`MemoryLoader` decodes the selected samples ONCE (batched where the dataset offers it:
  ``render_batch`` of the synthetic scenes, ``__getitems__``, else one ``dataset[i]`` per sample,
  optionally in DataLoader worker processes), stores them as tensors on the training device and
  makes every batch by one ``index_select`` per field on the device: no worker processes and no
  per-sample Python in the loop (docs/method.md 7.3 I6). At 23 bytes per pixel (table below)
  all 1449 NYUv2 images at 128x128 take 546 MB.
* :class:`TorchLoader` re-decodes every epoch through ``torch.utils.data.DataLoader`` (workers,
  pinned memory on CUDA, non-blocking copies), for datasets too large for memory.
* ``loader="dali"`` hands over to ``mgm_fast.data.dali.make_dali_loader`` (GPU decode of file
  datasets such as Taskonomy).

:func:`make_loader` picks one (``"auto"``) or builds the one asked for, and says which (``kind``)
and why (``reason``); a forced loader that cannot run raises, it is never silently replaced.

Storage of :class:`MemoryLoader` (per sample, H x W pixels; the batch is always the sample format)

=================  ===========================  ============================================
field              stored as                    batch conversion (on the device)
=================  ===========================  ============================================
``rgb``            uint8 (3, H, W)              ``q * float32(2/255) - 1`` -> float32 [-1, 1]
``seg``            int16 (H, W)                 ``.long()`` (exact; labels and -1 fit int16)
``depth``          float32 (1, H, W)            none (exact)
``depth_mask``     bool (1, H, W)               none
``normal``         float32 (3, H, W)            none (exact); ``normal_dtype=float16`` halves it
``normal_mask``    bool (1, H, W)               none
``scene``          int64 ()                     none
``id``             Python list of str           list slice
=================  ===========================  ============================================

RGB quantisation: ``q = round((x + 1) * 127.5)`` clamped to [0, 255], read back as
``x' = fl32(q * fl32(2/255)) - 1``. That is exactly the float32 value the file loaders produce
for an 8-bit pixel ``p = q`` (``2 * p / 255 - 1`` computed as ``p * fl32(1/255) * 2 - 1``; the
factor 2 is exact in binary), so an 8-bit PNG dataset loaded at its own size comes back
bit-identical: uint8 is what it holds anyway. RGB that is not on the 8-bit grid (the synthetic
scenes are rendered in float32; bilinear resizing of files) is rounded to the nearest of the
256 levels: ``|x' - x| <= 1/255`` (half a level, plus float32 rounding). ``rgb_dtype=float32``
stores RGB exactly (4x the RGB memory). ``normal_dtype=float16`` rounds each unit-normal component
to within 2^-11 (|n| stays within 1e-3 of 1) and halves the largest field.

Every rank of a sharded :class:`MemoryLoader` keeps all the selected samples (the permutation
changes every epoch); only the batches are sharded.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

# BatchPlan, epoch_seed and resolve_indices are re-exported: callers reach every loader name here
from mgm_fast.data.loader_base import BatchPlan, LoaderBase, check_keys, epoch_seed, resolve_indices
from mgm_fast.data.sample import SAMPLE_DTYPES, DataError, collate

__all__ = [
    "LOADER_KINDS",
    "RGB_STEP",
    "BatchPlan",
    "MemoryBudgetError",
    "MemoryLoader",
    "ShardedBatchSampler",
    "TorchLoader",
    "batches",
    "default_memory_budget",
    "dequantize_rgb",
    "epoch_seed",
    "estimate_nbytes",
    "make_loader",
    "quantize_rgb",
    "resolve_indices",
]

LOADER_KINDS = ("auto", "memory", "dali", "torch")
DEFAULT_MEMORY_FRACTION = 0.25
"""Share of free device memory (CUDA) or of MemAvailable (CPU) that ``auto`` lets the
in-memory loader take by default."""

RGB_STEP = float(np.float32(2.0 / 255.0))
"""float32(2/255): one uint8 RGB level in [-1, 1] units (``x = q * RGB_STEP - 1``)."""

_DEFAULT_STORE = {
    "rgb": torch.uint8,
    "seg": torch.int16,
    "depth": torch.float32,
    "depth_mask": torch.bool,
    "normal": torch.float32,
    "normal_mask": torch.bool,
    "scene": torch.int64,
}
_ALLOWED_STORE = {
    "rgb": (torch.uint8, torch.float16, torch.float32),
    "seg": (torch.int16, torch.int32, torch.int64),
    "normal": (torch.float16, torch.float32),
}
_MEMORY_OPTIONS = {"rgb_dtype", "seg_dtype", "normal_dtype", "decode_workers", "chunk_size"}
_TORCH_OPTIONS = {"num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}
_COMMON_OPTIONS = {"shuffle", "drop_last", "keys"}
_DALI_HINT = "pip install -e .[dali] (package nvidia-dali-cuda130)"


class MemoryBudgetError(MemoryError):
    """The in-memory loader was asked for but the data does not fit the memory budget."""


# -------------------------------------------------------------------------------------------
# RGB quantisation (module docstring).


def quantize_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """float RGB in [-1, 1], any shape -> uint8 ``round((x + 1) * 127.5)`` clamped to [0, 255]."""
    return torch.round((rgb.float() + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)


def dequantize_rgb(q: torch.Tensor) -> torch.Tensor:
    """uint8 RGB levels, any shape -> float32 ``fl32(q * fl32(2/255)) - 1`` in [-1, 1], on q's device.

    Bit-identical to the file loaders' ``2 * p / 255 - 1`` for 8-bit pixels (module docstring).
    The uint8 -> float32 promotion happens inside the multiply (one kernel), then one in-place
    subtract.
    """
    return torch.mul(q, RGB_STEP).sub_(1.0)


# -------------------------------------------------------------------------------------------
# In-memory loader.


def _store_dtypes(keys, rgb_dtype, seg_dtype, normal_dtype) -> dict[str, torch.dtype]:
    chosen = dict(_DEFAULT_STORE, rgb=rgb_dtype, seg=seg_dtype, normal=normal_dtype)
    for key, allowed in _ALLOWED_STORE.items():
        if chosen[key] not in allowed:
            raise ValueError(f"{key}_dtype must be one of {[str(d) for d in allowed]}, got {chosen[key]}")
    return {k: chosen[k] for k in keys}


def _decode_chunks(dataset, indices: torch.Tensor, chunk_size: int, workers: int) -> Iterator[dict]:
    """Batches (sample format, CPU) of ``indices`` in order, ``chunk_size`` samples each, by the
    fastest path the dataset offers."""
    chunks = [indices[i : i + chunk_size].tolist() for i in range(0, len(indices), chunk_size)]
    if workers > 0:
        # Subprocess decoding for file datasets (PNG / npy); __getitems__ is used when defined.
        # Its own generator: the workers' base seed must not be drawn from the global RNG.
        yield from torch.utils.data.DataLoader(
            dataset,
            batch_sampler=chunks,
            num_workers=workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(0),
        )
        return
    for chunk in chunks:
        if hasattr(dataset, "render_batch"):
            yield dataset.render_batch(chunk)
        elif hasattr(dataset, "__getitems__"):
            yield collate(dataset.__getitems__(chunk))
        else:
            yield collate([dataset[i] for i in chunk])


def _to_store(key: str, value: torch.Tensor, dtype: torch.dtype, ids: list[str]) -> torch.Tensor:
    if key == "rgb" and dtype == torch.uint8:
        return quantize_rgb(value)
    if key == "seg" and dtype != torch.int64:
        info = torch.iinfo(dtype)
        lo, hi = int(value.min()), int(value.max())
        if lo < info.min or hi > info.max:
            raise DataError(
                f"labels span [{lo}, {hi}] in samples {ids[:3]}..., which does not fit seg_dtype={dtype}; "
                "pass seg_dtype=torch.int64"
            )
    return value.to(dtype)


class MemoryLoader(LoaderBase):
    """All selected samples decoded once and kept on ``device``; batches gathered there.

    Args:
        dataset: any map-style dataset in the sample format (``render_batch`` / ``__getitems__``
            are used when present).
        indices: dataset positions or sample ids to load (see :func:`resolve_indices`).
        batch_size: samples per batch on this rank.
        device: where the data lives and the batches appear.
        seed: order seed; shuffle, drop_last: see :mod:`mgm_fast.data.loader_base`.
        rank, world_size: shard of the batches (every rank stores all samples).
        keys: fields to keep, e.g. ``("rgb", "scene")`` for the weakly-labelled MGM-light stream;
            batches hold these plus ``id``. Default: all.
        rgb_dtype: ``torch.uint8`` (quantised, default), ``float16`` or ``float32`` (exact).
        seg_dtype: ``torch.int16`` (default; checked), ``int32`` or ``int64``.
        normal_dtype: ``torch.float32`` (exact, default) or ``float16``.
        chunk_size: samples decoded per call while loading.
        decode_workers: DataLoader worker processes for the one-time decode (0: in-process).

    Batches: dict with the requested fields in the sample dtypes on ``device``, stacked along a
    leading batch dim B (``rgb`` float32 (B, 3, H, W), ``seg`` int64 (B, H, W), ``depth`` float32
    (B, 1, H, W), masks bool (B, 1, H, W), ``normal`` float32 (B, 3, H, W), ``scene`` int64
    (B,)), and ``id``: list of B str.
    """

    kind = "memory"

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
        rgb_dtype: torch.dtype = torch.uint8,
        seg_dtype: torch.dtype = torch.int16,
        normal_dtype: torch.dtype = torch.float32,
        chunk_size: int = 256,
        decode_workers: int = 0,
    ):
        super().__init__(dataset, indices, batch_size, device, seed, shuffle, drop_last, rank, world_size)
        self.keys = check_keys(keys)
        self.store_dtypes = _store_dtypes(self.keys, rgb_dtype, seg_dtype, normal_dtype)
        self.ids: list[str] = []
        self.data: dict[str, torch.Tensor] = {}
        n = len(self.indices)
        start = 0
        for chunk in _decode_chunks(dataset, self.indices, int(chunk_size), int(decode_workers)):
            ids = [str(s) for s in chunk["id"]]
            stop = start + len(ids)
            for key, dtype in self.store_dtypes.items():
                value = _to_store(key, chunk[key], dtype, ids)
                if key not in self.data:  # allocate once, at the final size, straight on the device
                    self.data[key] = torch.empty((n, *value.shape[1:]), dtype=dtype, device=self.device)
                elif value.shape[1:] != self.data[key].shape[1:]:
                    raise DataError(
                        f"'{key}' of samples {ids[:3]} has shape {tuple(value.shape[1:])} but earlier samples "
                        f"({self.ids[:1]}) have {tuple(self.data[key].shape[1:])}; load all samples at one image_size"
                    )
                self.data[key][start:stop].copy_(value)
            self.ids.extend(ids)
            start = stop
        if start != n:
            raise DataError(f"{type(dataset).__name__}: decoding returned {start} samples for {n} indices")

    def require_labels(self, num_scenes: int | None = None, num_seg_classes: int | None = None) -> None:
        super().require_labels(num_scenes, num_seg_classes)
        self._check_label_batch(self.data, self.ids)  # once: the stored samples are all there is

    def nbytes(self) -> int:
        """Bytes held by the stored tensors (ids not counted)."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @staticmethod
    def fits(dataset, indices, device, budget_bytes: int | None = None, **storage) -> bool:
        """Whether :func:`estimate_nbytes` of this selection is within ``budget_bytes``
        (default :func:`default_memory_budget` of ``device``). ``storage``: keys / *_dtype."""
        budget = default_memory_budget(device) if budget_bytes is None else int(budget_bytes)
        return estimate_nbytes(dataset, indices, **storage) <= budget

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[dict]:
        pos = self.plan.positions(epoch)
        ids = [self.ids[i] for i in pos.tolist()]  # once per epoch; per batch only a list slice
        if self.device.type == "cuda":
            pos = pos.pin_memory()
        dev_pos = pos.to(self.device, non_blocking=True)
        for k in range(start, len(self)):
            sl = self.plan.batch_slice(k)
            yield self._gather(dev_pos[sl], ids[sl])

    def _gather(self, idx: torch.Tensor, ids: list[str]) -> dict:
        """One batch: (B,) device positions -> sample-format tensors (all on the device, no sync)."""
        out: dict = {}
        for key, stored in self.data.items():
            value = stored.index_select(0, idx)
            if key == "rgb" and value.dtype == torch.uint8:
                value = dequantize_rgb(value)
            elif value.dtype != SAMPLE_DTYPES[key]:
                value = value.to(SAMPLE_DTYPES[key])
            out[key] = value
        out["id"] = ids
        return out


def estimate_nbytes(
    dataset,
    indices,
    keys: Sequence[str] | None = None,
    rgb_dtype: torch.dtype = torch.uint8,
    seg_dtype: torch.dtype = torch.int16,
    normal_dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes a :class:`MemoryLoader` would store for ``indices``: the first selected sample is
    decoded for its shapes, times the number of samples (all samples share one size)."""
    pos = resolve_indices(dataset, indices)
    sample = dataset[int(pos[0])]
    dtypes = _store_dtypes(check_keys(keys), rgb_dtype, seg_dtype, normal_dtype)
    per_sample = sum(sample[k].numel() * torch.empty((), dtype=d).element_size() for k, d in dtypes.items())
    return per_sample * len(pos)


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget(device, fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """Bytes the in-memory loader may use on ``device`` by default: ``fraction`` of the free
    memory of a CUDA device, else of the host's available RAM (0 when it cannot be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    avail = _meminfo_available()
    return 0 if avail is None else int(avail * fraction)


# -------------------------------------------------------------------------------------------
# torch DataLoader path.


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Batch sampler of a :class:`BatchPlan`: yields lists of DATASET positions for one epoch,
    from batch ``start`` on (``set_epoch``). Runs in the main process, so workers never see it."""

    def __init__(self, plan: BatchPlan, indices: torch.Tensor):
        self.plan, self.indices = plan, indices
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return self.plan.num_batches - self.start

    def __iter__(self) -> Iterator[list[int]]:
        chosen = self.indices[self.plan.positions(self.epoch)]
        for k in range(self.start, self.plan.num_batches):
            yield chosen[self.plan.batch_slice(k)].tolist()


def _collate_keys(samples, keys: tuple[str, ...]) -> dict:
    """:func:`collate`, keeping ``keys`` and ``id`` (module-level so worker processes can pickle it)."""
    batch = collate(samples)
    return {**{k: batch[k] for k in keys}, "id": batch["id"]}


class TorchLoader(LoaderBase):
    """Batches decoded every epoch by ``torch.utils.data.DataLoader``; same order, state and
    batch format as :class:`MemoryLoader`.

    Args (beyond MemoryLoader's dataset .. keys):
        num_workers: DataLoader worker processes (0: decode in the main process).
        pin_memory: pin host batches; default True when ``device`` is CUDA.
        persistent_workers, prefetch_factor: passed to the DataLoader (with workers only).

    The DataLoader gets its own ``torch.Generator`` so that starting an epoch does not draw from
    the global RNG. Batches are copied to ``device`` with ``non_blocking=True``.
    """

    kind = "torch"

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
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
    ):
        super().__init__(dataset, indices, batch_size, device, seed, shuffle, drop_last, rank, world_size)
        self.keys = check_keys(keys)
        self.sampler = ShardedBatchSampler(self.plan, self.indices)
        pin = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        extra = {}
        if num_workers > 0:
            extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor}
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=int(num_workers),
            collate_fn=functools.partial(_collate_keys, keys=self.keys),
            pin_memory=pin,
            generator=torch.Generator().manual_seed(self.plan.seed),
            **extra,
        )

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[dict]:
        self.sampler.set_epoch(epoch, start)
        for batch in self.loader:
            self._check_label_batch(batch, batch.get("id", []))  # host tensors: no device sync
            yield {k: v.to(self.device, non_blocking=True) if k != "id" else v for k, v in batch.items()}


# -------------------------------------------------------------------------------------------
# Selection.


def _import_dali():
    """``mgm_fast.data.dali``, or an ImportError naming what to install."""
    try:
        return importlib.import_module("mgm_fast.data.dali")
    except ImportError as err:
        raise ImportError(
            f"loader='dali' needs NVIDIA DALI and mgm_fast.data.dali ({_DALI_HINT}); import failed: {err}"
        ) from err


def _dali_not_supported(dataset, device: torch.device) -> list[str]:
    """Why DALI cannot load ``dataset`` here (empty list: it can)."""
    try:
        importlib.import_module("nvidia.dali")
    except ImportError:
        return [f"nvidia.dali is not installed ({_DALI_HINT})"]
    try:
        module = _import_dali()
    except ImportError as err:
        return [str(err)]
    check = getattr(module, "not_supported_reasons", None)
    if check is not None:
        return list(check(dataset, device))
    layout = getattr(getattr(dataset, "info", None), "layout", None)
    if layout not in ("official", "taskonomy"):
        return [f"DALI reads image files (official, taskonomy layouts); this dataset's layout is {layout!r}"]
    return []


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def make_loader(
    dataset,
    indices,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    loader: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    memory_budget_bytes: int | None = None,
    **kw,
):
    """Build the training loader named by ``loader`` and report the choice.

    ``"auto"``: the in-memory loader when :func:`estimate_nbytes` fits ``memory_budget_bytes``
    (default :func:`default_memory_budget`: 25 % of free CUDA memory or of available RAM), else
    DALI when ``nvidia.dali`` imports and ``mgm_fast.data.dali`` supports the dataset, else the
    torch DataLoader. ``"memory"`` raises :class:`MemoryBudgetError` with the sizes when the data
    does not fit; ``"dali"`` raises ImportError naming the package when DALI is missing.

    Args:
        dataset, indices, batch_size, device, seed, rank, world_size: see :class:`MemoryLoader`.
        **kw: ``shuffle``, ``drop_last``, ``keys`` for every loader; ``rgb_dtype``, ``seg_dtype``,
            ``normal_dtype``, ``chunk_size``, ``decode_workers`` apply to the memory loader and
            ``num_workers``, ``pin_memory``, ``persistent_workers``, ``prefetch_factor`` to the torch
            loader, each only when that loader is the one built; other keywords go to DALI only
            (a TypeError when another loader is built, so a typo is never ignored).
    Returns:
        the loader; ``loader.kind`` is ``"memory" | "dali" | "torch"`` and ``loader.reason``
        says why it was chosen.
    """
    if loader not in LOADER_KINDS:
        raise ValueError(f"loader must be one of {LOADER_KINDS}, got {loader!r}")
    device = torch.device(device)
    unknown = set(kw) - _COMMON_OPTIONS - _MEMORY_OPTIONS - _TORCH_OPTIONS
    common = {k: v for k, v in kw.items() if k in _COMMON_OPTIONS}
    args = (dataset, indices, batch_size, device, seed)

    def build(kind: str, reason: str):
        if kind == "dali":
            dali_kw = {k: v for k, v in kw.items() if k in _COMMON_OPTIONS or k in unknown}
            out = _import_dali().make_dali_loader(*args, rank=rank, world_size=world_size, **dali_kw)
        else:
            if unknown:
                raise TypeError(f"make_loader: unknown option(s) {sorted(unknown)} for the {kind} loader")
            cls, own = (MemoryLoader, _MEMORY_OPTIONS) if kind == "memory" else (TorchLoader, _TORCH_OPTIONS)
            extra = {k: v for k, v in kw.items() if k in own}
            out = cls(*args, rank=rank, world_size=world_size, **common, **extra)
        if getattr(out, "kind", None) != kind:
            out.kind = kind
        out.reason = reason
        return out

    if loader == "dali":
        return build("dali", "dali: asked for")
    if loader == "torch":
        return build("torch", "torch: asked for")

    storage = {k: kw[k] for k in ("keys", "rgb_dtype", "seg_dtype", "normal_dtype") if k in kw}
    need = estimate_nbytes(dataset, indices, **storage)
    if memory_budget_bytes is None:
        budget = default_memory_budget(device)
        where = f"{DEFAULT_MEMORY_FRACTION:.0%} of {'free CUDA memory' if device.type == 'cuda' else 'available RAM'}"
    else:
        budget, where = int(memory_budget_bytes), "memory_budget_bytes"
    sizes = f"{_fmt_bytes(need)} needed, budget {_fmt_bytes(budget)} ({where}) on {device}"
    if loader == "memory":
        if need > budget:
            raise MemoryBudgetError(
                f"loader='memory': the selected samples need {need} bytes ({_fmt_bytes(need)}) but the budget is "
                f"{budget} bytes ({_fmt_bytes(budget)}, {where}) on {device}; raise memory_budget_bytes or use "
                "loader='torch' / 'dali'"
            )
        return build("memory", f"memory: asked for; {sizes}")
    if need <= budget:
        return build("memory", f"memory: fits ({sizes})")
    why_not = _dali_not_supported(dataset, device)
    if not why_not:
        return build("dali", f"dali: memory does not fit ({sizes}); DALI supports the dataset")
    return build("torch", f"torch: memory does not fit ({sizes}); no DALI: {'; '.join(why_not)}")


# -------------------------------------------------------------------------------------------
# Trainer helper.


def batches(loader: Iterable[dict], max_batches: int | None = None) -> Iterator[dict]:
    """Batches across epochs without end (or ``max_batches`` of them), e.g.
    ``for step, batch in zip(range(steps), batches(loader))``. No batch is fetched beyond the
    last one yielded, so the loader's ``epoch`` / ``position`` stay exact and its
    ``state_dict()`` may be saved between any two batches."""
    count = 0
    while max_batches is None or count < max_batches:
        for batch in loader:
            yield batch
            count += 1
            if max_batches is not None and count >= max_batches:
                return
