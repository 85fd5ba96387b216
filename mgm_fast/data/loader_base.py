"""The public base of every training loader: which samples a rank sees in which batch of each
epoch (:class:`BatchPlan`), and the epoch / position / state bookkeeping (:class:`LoaderBase`).

A loader is a :class:`LoaderBase` subclass that implements ``_epoch_batches(epoch, start)``:
the batches of ``epoch`` from batch ``start`` on, in the order of ``self.plan``, each a dict in
the sample format of :mod:`mgm_fast.data.sample` stacked along a new first dimension
(``"id"``: a list of str). The base class then gives it the shared interface: iteration over
batches, ``len()`` = batches per epoch on this rank, ``epoch``, ``position``, ``set_epoch``,
``state_dict()`` / ``load_state_dict()``, ``require_labels``, ``kind`` and ``reason``. The
memory and torch loaders (:mod:`mgm_fast.data.loader`) and the DALI loader
(:mod:`mgm_fast.data.dali`) are built on it, so a run may resume with another loader kind.

Order of the samples (identical for every loader)
    ``indices`` are positions into the dataset (ints) or sample ids (str, resolved through
    ``dataset.sample_id``). Epoch ``e`` uses the permutation ``torch.randperm(n, generator=g)``
    of the n selected samples, with ``g`` a CPU ``torch.Generator`` seeded by
    :func:`epoch_seed` ``(seed, e)`` (``shuffle=False``: the given order). With ``drop_last``
    the permutation is cut to a multiple of ``world_size * batch_size`` and rank ``r`` takes
    elements ``r::world_size`` of it, so every rank gets the same number of full batches, the
    ranks are disjoint, and rank r's k-th batch is elements ``r::world_size`` of the k-th batch
    of a single-rank loader with batch ``world_size * batch_size``. ``drop_last=False`` keeps
    a short last batch and is single-rank only (ranks would get different batch counts).

    The permutation is drawn on the CPU and copied to the device once per epoch (n int64): the
    order is then the same on every device type (a CPU test reproduces a GPU run), the ids of a
    batch need no device-to-host copy, and the batches themselves are gathered on the device.
    Drawing each epoch from ``(seed, epoch)`` makes the generator state a function of the epoch,
    so ``state_dict`` holds only ``seed, epoch, position`` (+ the plan, checked on load), and the
    global torch RNG is never touched (the trainer's own RNG stream stays reproducible).

Iteration and resume
    ``for batch in loader`` yields the remaining batches of the current epoch from ``position``
    and then moves to the next epoch; breaking out keeps the position, so the next loop continues
    the same epoch (like a restored loader). ``position`` counts batches handed out, so a
    ``state_dict()`` taken after a training step on batch k resumes with batch k + 1: a loader
    restored mid-epoch yields exactly the remaining batches of that epoch, then the same epochs
    as an uninterrupted one. :func:`mgm_fast.data.loader.batches` walks epochs forever for a
    step-counted trainer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from mgm_fast.data.sample import IGNORE_INDEX, TENSOR_KEYS, DataError

__all__ = ["BatchPlan", "LoaderBase", "check_keys", "epoch_seed", "resolve_indices"]


def resolve_indices(dataset, indices) -> torch.Tensor:
    """Dataset positions (ints) or sample ids (str) -> CPU int64 tensor of positions.

    Ids are looked up through ``dataset.sample_id(i)`` (e.g. a :class:`~mgm_fast.data.splits.Split`
    part such as ``split.train_weak``). Raises :class:`DataError` for positions out of range,
    unknown ids, repeats (a sample would be seen twice per epoch) or an empty selection.
    """
    if isinstance(indices, torch.Tensor | np.ndarray):
        items = indices.tolist()
    else:
        items = list(indices)
    if not items:
        raise DataError(f"{type(dataset).__name__}: no samples selected (empty indices)")
    n = len(dataset)
    if all(isinstance(i, str) for i in items):
        if not hasattr(dataset, "sample_id"):
            raise DataError(
                f"{type(dataset).__name__} has no sample_id(i), so ids cannot be resolved; pass integer "
                "positions instead"
            )
        where = {dataset.sample_id(i): i for i in range(n)}
        missing = [s for s in items if s not in where]
        if missing:
            more = f" ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(
                f"{type(dataset).__name__}: {len(missing)} id(s) not in the dataset: {missing[:5]}{more}"
            )
        items = [where[s] for s in items]
    elif not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in items):
        raise DataError("indices must be all ints (dataset positions) or all str (sample ids)")
    pos = torch.tensor([int(i) for i in items], dtype=torch.int64)
    bad = pos[(pos < 0) | (pos >= n)]
    if len(bad):
        raise DataError(f"{type(dataset).__name__}: indices {bad[:5].tolist()} out of range for {n} samples")
    uniq, counts = torch.unique(pos, return_counts=True)
    if len(uniq) != len(pos):
        raise DataError(f"indices repeat dataset position(s) {uniq[counts > 1][:5].tolist()}")
    return pos


def epoch_seed(seed: int, epoch: int) -> int:
    """63-bit seed of epoch ``epoch``'s permutation: a keyed hash of (seed, epoch), so nearby
    (seed, epoch) pairs give unrelated permutations and none coincide by arithmetic."""
    data = f"{int(seed)}\x00{int(epoch)}".encode()
    digest = hashlib.blake2b(data, digest_size=8, person=b"mgm_fast.order").digest()
    return int.from_bytes(digest, "big") >> 1


class BatchPlan:
    """Which samples rank ``rank`` sees in which batch of each epoch (module docstring).

    Args:
        num_samples: n, the number of selected samples.
        batch_size: B, samples per batch on this rank.
        seed: order seed; shuffle: permute every epoch (else the given order).
        drop_last: cut each epoch to full batches (required for world_size > 1).
        rank, world_size: this process's shard.
    Attributes:
        num_batches: batches per epoch on each rank (> 0).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if world_size > 1 and not drop_last:
            raise ValueError(
                "drop_last=False with world_size > 1 would give the ranks different numbers of batches "
                "(a collective would hang); use drop_last=True for sharded loading"
            )
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        step = self.batch_size * self.world_size
        if self.drop_last:
            self.num_batches = self.num_samples // step
            self.samples_per_epoch = self.num_batches * step  # all ranks together
        else:
            self.num_batches = -(-self.num_samples // self.batch_size)
            self.samples_per_epoch = self.num_samples
        if self.num_batches == 0:
            raise DataError(
                f"{self.num_samples} samples give no full batch of {self.batch_size} x {self.world_size} rank(s) "
                "with drop_last=True: an epoch would be empty"
            )

    def order(self, epoch: int) -> torch.Tensor:
        """CPU int64 (n,): the permutation of epoch ``epoch`` over all ranks (before sharding)."""
        if not self.shuffle:
            return torch.arange(self.num_samples, dtype=torch.int64)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def positions(self, epoch: int) -> torch.Tensor:
        """CPU int64 (num_batches * B,) (shorter last batch without drop_last): positions into
        the selection that this rank visits in epoch ``epoch``, batch after batch."""
        return self.order(epoch)[: self.samples_per_epoch][self.rank :: self.world_size]

    def batch_slice(self, k: int) -> slice:
        return slice(k * self.batch_size, (k + 1) * self.batch_size)

    def describe(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "world_size": self.world_size,
        }


def _indices_digest(indices: torch.Tensor) -> str:
    return hashlib.blake2b(indices.numpy().tobytes(), digest_size=8).hexdigest()


class LoaderBase:
    """Epoch / position / state bookkeeping of a training loader (module docstring).

    Args:
        dataset: map-style dataset in the sample format (``sample_id`` needed for id indices).
        indices: dataset positions or sample ids of the selection (:func:`resolve_indices`).
        batch_size, seed, shuffle, drop_last, rank, world_size: the :class:`BatchPlan`.
        device: where the batches appear.
    Attributes:
        indices: CPU int64 (n,) dataset positions; plan: the :class:`BatchPlan`;
        epoch, position: the next batch handed out is batch ``position`` of ``epoch``;
        kind, reason: which loader this is and why it was chosen (set by ``make_loader``).

    Subclasses implement ``_epoch_batches(epoch, start)``, the batches of ``epoch`` from batch
    ``start`` on; streaming loaders call :meth:`_check_label_batch` on each host batch.
    """

    kind = "?"
    reason = ""

    def __init__(self, dataset, indices, batch_size, device, seed, shuffle, drop_last, rank, world_size):
        self.dataset = dataset
        self.indices = resolve_indices(dataset, indices)
        self.device = torch.device(device)
        self.plan = BatchPlan(len(self.indices), batch_size, seed, shuffle, drop_last, rank, world_size)
        self.batch_size = self.plan.batch_size
        self.epoch = 0
        self.position = 0  # batches of ``epoch`` already handed out
        self._digest = _indices_digest(self.indices)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.plan.num_batches

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Continue at batch ``position`` of epoch ``epoch``."""
        if not 0 <= position <= len(self):
            raise ValueError(f"position {position} is not in [0, {len(self)}]")
        self.epoch, self.position = int(epoch), int(position)

    def __iter__(self) -> Iterator[dict]:
        if self.position >= len(self):  # the last epoch was finished before a checkpoint
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        for batch in self._epoch_batches(epoch, self.position):
            self.position += 1  # counted when handed out: a checkpoint after this step resumes after it
            yield batch
        if self.epoch == epoch and self.position >= len(self):
            self.epoch, self.position = epoch + 1, 0

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[dict]:
        raise NotImplementedError

    label_limits: dict[str, int] | None = None
    """Upper bounds of the label fields (``scene``, ``seg``) set by :meth:`require_labels`."""

    def require_labels(self, num_scenes: int | None = None, num_seg_classes: int | None = None) -> None:
        """Guarantee that every batch holds labels the networks can index: ``scene`` in
        [0, num_scenes), ``seg`` in [0, num_seg_classes) or the ignore index.

        This is the data boundary of the training engine, whose ops skip their own value checks
        (they would read device values inside every step, see
        :func:`mgm_fast.ops._dispatch.value_checks_enabled`): the memory loader checks its stored
        samples once, here; streaming loaders check each batch on the host before it is copied to
        the device. Raises :class:`DataError` naming the samples."""
        self.label_limits = {
            k: v for k, v in (("scene", num_scenes), ("seg", num_seg_classes)) if v is not None
        }

    def _check_label_batch(self, batch: Mapping, ids: Sequence[str]) -> None:
        for key, limit in (self.label_limits or {}).items():
            if key not in batch:
                continue
            value = batch[key]
            low = IGNORE_INDEX if key == "seg" else 0
            bad = (value < low) | (value >= limit)
            if key == "seg":
                bad &= value != IGNORE_INDEX
            if bad.any():
                rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist()
                shown = [ids[i] for i in rows[:3]] if len(ids) == bad.shape[0] else rows[:3]
                example = int(value[bad].flatten()[0])
                allowed = f"[0, {limit})" + (f" or {IGNORE_INDEX} (ignored)" if key == "seg" else "")
                raise DataError(
                    f"'{key}' label {example} in samples {shown}{'...' if len(rows) > 3 else ''} "
                    f"is outside {allowed} ({type(self.dataset).__name__})"
                )

    def state_dict(self) -> dict:
        """Data-order state: plain ints/bools/str (``torch.load(weights_only=True)`` safe)."""
        return {
            **self.plan.describe(),
            "epoch": self.epoch,
            "position": self.position,
            "indices": self._digest,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``epoch`` and ``position``; the plan (selection, batch size, seed, sharding)
        must be the one the state was saved with, else a ValueError lists the differences."""
        mine = {**self.plan.describe(), "indices": self._digest}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{type(self).__name__}.load_state_dict: the data plan differs ({shown})")
        self.set_epoch(int(state["epoch"]), int(state["position"]))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, samples={self.plan.num_samples}, batch_size={self.batch_size}, "
            f"batches={len(self)}, rank={self.plan.rank}/{self.plan.world_size}, device={self.device}, "
            f"epoch={self.epoch}, position={self.position})"
        )


def check_keys(keys) -> tuple[str, ...]:
    """The ``keys`` option of a loader -> the selected tensor fields of the sample format in
    canonical order (all of ``TENSOR_KEYS`` for None); ValueError for unknown or no keys."""
    if keys is None:
        return tuple(TENSOR_KEYS)
    keys = tuple(keys)
    bad = [k for k in keys if k not in TENSOR_KEYS]
    if bad or not keys:
        raise ValueError(f"keys {list(keys)} must be a non-empty subset of {list(TENSOR_KEYS)} (bad: {bad})")
    return tuple(k for k in TENSOR_KEYS if k in keys)  # canonical order, no repeats
