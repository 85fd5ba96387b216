"""The DALI loader: :class:`DaliLoader` and :func:`make_dali_loader` (package docstring of
:mod:`mgm_fast.data.dali`), and :func:`not_supported_reasons`, which ``make_loader`` asks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mgm_fast.data.dali.adapter import INSTALL_HINT, FormatAdapter, GraphContext, dali_available, dali_modules
from mgm_fast.data.dali.folder import FolderAdapter
from mgm_fast.data.dali.mtan import MTANAdapter
from mgm_fast.data.dali.taskonomy import TaskonomyAdapter
from mgm_fast.data.loader_base import LoaderBase, check_keys
from mgm_fast.data.sample import DataError, list_preview

__all__ = ["ADAPTERS", "DaliLoader", "adapter_for", "make_dali_loader", "not_supported_reasons"]


def not_supported_reasons(dataset, device: torch.device | str) -> list[str]:
    """Why this module cannot load ``dataset`` onto ``device`` here; empty when it can."""
    reasons = []
    if not dali_available():
        reasons.append(f"nvidia.dali is not installed ({INSTALL_HINT})")
    try:
        adapter_for(dataset).check_supported()
    except (TypeError, DataError) as e:
        reasons.append(str(e))
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        reasons.append("device is CUDA but torch.cuda is not available")
    return reasons


ADAPTERS = (FolderAdapter, TaskonomyAdapter, MTANAdapter)
"""The format adapters, each for the dataset class of its :attr:`FormatAdapter.dataset_type`."""


def adapter_for(dataset) -> FormatAdapter:
    """The format adapter of ``dataset``; TypeError for a dataset type DALI does not read."""
    for adapter in ADAPTERS:
        if isinstance(dataset, adapter.dataset_type):
            return adapter(dataset)
    raise TypeError(
        f"the DALI loader reads FolderDataset (official layout), TaskonomyDataset and MTANDataset, not "
        f"{type(dataset).__name__} (in-memory data such as SyntheticScenes is best kept on the device)"
    )


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


class DaliLoader(LoaderBase):
    """Batches of a file dataset read, decoded and resized by DALI (package docstring of
    :mod:`mgm_fast.data.dali`); same order, state and batch format as
    :class:`mgm_fast.data.loader.TorchLoader`.

    Args (beyond the common dataset .. keys of :class:`mgm_fast.data.loader.TorchLoader`):
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
        dali_modules()  # fail at construction, not at the first batch, when DALI is missing
        super().__init__(dataset, indices, batch_size, device, seed, shuffle, drop_last, rank, world_size)
        self.keys = check_keys(keys)
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
        self.adapter = adapter_for(dataset)
        self.adapter.keys, self.adapter.rgb_resize = self.keys, rgb_resize
        self.modalities = self.adapter.modalities()
        # every selected sample's files, resolved once; the readers get them per epoch
        self._files = {int(i): self.adapter.all_files(int(i)) for i in self.indices.tolist()}
        first = self._files[int(self.indices[0])]
        self.adapter.check_first(int(self.indices[0]))
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
        fn, _, types, Pipeline, LastBatchPolicy, DALIGenericIterator = dali_modules()
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
        ctx = GraphContext(self._npy_float)
        adapter = self.adapter
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
                outs.update(adapter.dali_checks(name, node, ctx))
                cast = adapter.dali_cast(name, mod, ctx)
                if cast is not None:
                    node = fn.cast(node, dtype=cast)
                if name == adapter.colour:
                    node = adapter.dali_colour(node, ctx, gpu)
                    if adapter.dali_resizes_colour():
                        node = fn.resize(
                            node,
                            size=list(adapter.size),
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
                batch = self.adapter.finish(out, want, self.device)
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
    """A DALI loader over ``indices`` of ``dataset`` (package docstring).

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
