"""Deterministic, seeded dataset splits and nested labelled-data regimes.

A :class:`Split` assigns every id of a dataset to exactly one of

* ``train_labelled`` -- all dense labels and the scene label are used;
* ``train_weak`` -- training images whose scene label only is used (MGM-light, docs/method.md
  section 3.3; the released code calls them "unlabelled");
* ``val`` and ``test``.

How ids are drawn
-----------------
Every random choice is a sort by a keyed 64-bit BLAKE2b hash of ``(purpose, seed, id)``. The
result depends only on the seed and the set of ids (not on their order in the list, the Python,
NumPy or PyTorch version, or the platform), and a manifest (:meth:`Split.to_json`) records the
exact ids so a run can be reproduced even if this module changes.

1. Partition: the ids are ordered by the "partition" hash; the first ``n_test`` go to test, the
   next ``n_val`` to val, the rest to train. With ``fixed`` the partition is given instead
   (e.g. NYUv2's official 795 train / 654 test) and nothing is drawn here.
2. Labelled regime: the train ids are ordered once by the "labelled" hash and the first
   ``n_labelled`` are labelled. The order does not depend on ``labelled_fraction``, so for a
   fixed seed the labelled set at 0.1 is a subset of the one at 0.25, which is a subset of the
   one at 0.5, ...: comparisons across regimes are paired, and val/test never change.

Rounding (exact rational arithmetic on the decimal value of each fraction, so 0.2 is 1/5):
``n_test = floor(test_fraction * n)``, ``n_val = floor(val_fraction * n)``, train gets the
rest, and ``n_labelled = ceil(labelled_fraction * n_train)``. With the defaults this is the
released code's rounding (docs/method.md section 4.5): ``ceil(0.8 n)`` train and
``ceil(0.5 n_train)`` labelled, i.e. 1160 train (580 labelled / 580 weak) and 289 val for the
1449 NYUv2 frames; see :func:`released_split`.

Stratification (``scenes`` given, one integer scene label per id):

* partition: within each scene the ids are ordered by hash and the k-th one gets the key
  ``(k + u_s) / n_s`` with a hashed per-scene offset ``u_s`` in [0, 1); sorting by that key
  interleaves the scenes so every prefix -- hence test, val and train -- holds each scene in
  proportion to its size (up to one id);
* labelled order: first one id of every scene present in train (scenes in hashed order), then
  the remaining train ids interleaved as above. Every labelled set with at least as many ids as
  there are scenes in train therefore contains every scene, and larger ones are close to
  proportional; the regimes stay nested because the order is still drawn once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from mgm_fast.atomic_io import atomic_write_text

MANIFEST_FORMAT = "mgm_fast.split"
MANIFEST_VERSION = 1
_PARTS = ("train_labelled", "train_weak", "val", "test")
_SHOW = 20  # ids listed in an error message before "... and N more"


class SplitError(ValueError):
    """A split, a fixed partition or a manifest is inconsistent with the dataset."""


def _list_ids(ids: Iterable[str]) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_SHOW])
    more = f" ... and {len(ids) - _SHOW} more" if len(ids) > _SHOW else ""
    return f"{len(ids)} id(s): {shown}{more}"


def _hash(purpose: str, seed: int, item: str) -> int:
    """64-bit key of ``item``; different purposes give independent orders."""
    data = f"{purpose}\x00{seed}\x00{item}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"mgm_fast.split").digest(), "big")


def _unit(purpose: str, seed: int, item: str) -> float:
    """Hashed number in [0, 1)."""
    return _hash(purpose, seed, item) / 2.0**64


def _fraction(value: float, name: str) -> Fraction:
    """Exact rational value of a fraction argument, from its shortest decimal repr."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise SplitError(f"{name} must be a number in [0, 1], got {value!r}")
    return Fraction(repr(float(value)))


def _order(
    indices: Sequence[int],
    ids: Sequence[str],
    seed: int,
    purpose: str,
    scenes: Sequence[int] | None,
    one_per_scene_first: bool,
) -> list[int]:
    """A seeded order of ``indices`` (positions into ``ids``); see the module docstring."""
    if scenes is None:
        return sorted(indices, key=lambda i: _hash(purpose, seed, ids[i]))
    groups: dict[int, list[int]] = {}
    for i in indices:
        groups.setdefault(scenes[i], []).append(i)
    head: list[int] = []
    rest: list[tuple[float, int, int]] = []
    for scene, members in groups.items():
        members.sort(key=lambda i: _hash(purpose, seed, ids[i]))
        if one_per_scene_first:
            head.append(members[0])
            members = members[1:]
        size = len(groups[scene])
        offset = _unit(purpose + "/scene-offset", seed, str(scene))
        rest.extend(((k + offset) / size, _hash(purpose, seed, ids[i]), i) for k, i in enumerate(members))
    head.sort(key=lambda i: _hash(purpose + "/scene-head", seed, str(scenes[i])))
    rest.sort()
    return head + [i for _, _, i in rest]


@dataclass
class Split:
    """Ids of each part of a split, plus how they were drawn.

    Lists hold dataset ids (str) in the order of the ``ids`` list given to :func:`make_split`.
    ``val_fraction`` / ``test_fraction`` are the requested fractions, or the realised ones
    (``len(part) / n``) when the partition was ``fixed``.
    """

    train_labelled: list[str]
    train_weak: list[str]
    val: list[str]
    test: list[str]
    seed: int
    val_fraction: float
    test_fraction: float
    labelled_fraction: float
    fixed: bool = False
    stratified: bool = False
    extra: dict = field(default_factory=dict)
    """Free-form JSON-serialisable notes saved in the manifest (e.g. the dataset name)."""

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for part in _PARTS:
            values = getattr(self, part)
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise SplitError(f"Split.{part} must be a list of str ids")
            dup = [v for v in values if v in seen]
            if dup:
                where = sorted({seen[v] for v in dup})
                raise SplitError(f"Split.{part} shares or repeats ids (also in {where}): {_list_ids(dup)}")
            seen.update(dict.fromkeys(values, part))

    @property
    def train(self) -> list[str]:
        """All training ids (labelled first, then weak)."""
        return self.train_labelled + self.train_weak

    @property
    def ids(self) -> list[str]:
        """Every id of the split."""
        return self.train_labelled + self.train_weak + self.val + self.test

    def counts(self) -> dict[str, int]:
        return {part: len(getattr(self, part)) for part in _PARTS}

    def check_ids(self, dataset_ids: Iterable[str]) -> None:
        """Raise :class:`SplitError` listing every id of this split that the dataset lacks."""
        available = set(dataset_ids)
        missing = [i for i in self.ids if i not in available]
        if missing:
            raise SplitError(f"split manifest refers to ids missing from the dataset: {_list_ids(missing)}")

    # -- manifest -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "labelled_fraction": self.labelled_fraction,
            "fixed": self.fixed,
            "stratified": self.stratified,
            "extra": self.extra,
            "counts": self.counts(),
            **{part: list(getattr(self, part)) for part in _PARTS},
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The manifest as JSON text; with ``path`` also written there atomically."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_dict(
        cls, data: Mapping, dataset_ids: Iterable[str] | None = None, source: str = "manifest"
    ) -> Split:
        if not isinstance(data, Mapping) or data.get("format") != MANIFEST_FORMAT:
            raise SplitError(f"{source}: not a split manifest (expected format {MANIFEST_FORMAT!r})")
        if data.get("version") != MANIFEST_VERSION:
            raise SplitError(f"{source}: unsupported manifest version {data.get('version')!r}")
        keys = ("seed", "val_fraction", "test_fraction", "labelled_fraction", *_PARTS)
        absent = [k for k in keys if k not in data]
        if absent:
            raise SplitError(f"{source}: missing fields {absent}")
        try:
            split = cls(
                **{part: list(data[part]) for part in _PARTS},
                seed=int(data["seed"]),
                val_fraction=float(data["val_fraction"]),
                test_fraction=float(data["test_fraction"]),
                labelled_fraction=float(data["labelled_fraction"]),
                fixed=bool(data.get("fixed", False)),
                stratified=bool(data.get("stratified", False)),
                extra=dict(data.get("extra", {})),
            )
        except SplitError as err:
            raise SplitError(f"{source}: {err}") from None
        counts = data.get("counts")
        if counts is not None and dict(counts) != split.counts():
            raise SplitError(f"{source}: counts {dict(counts)} do not match the id lists {split.counts()}")
        if dataset_ids is not None:
            try:
                split.check_ids(dataset_ids)
            except SplitError as err:
                raise SplitError(f"{source}: {err}") from None
        return split

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike, dataset_ids: Iterable[str] | None = None) -> Split:
        """Load a manifest from JSON text or a file path.

        With ``dataset_ids`` every id of the manifest must exist in the dataset; otherwise a
        :class:`SplitError` lists the missing ones.
        """
        source = "manifest"
        text = str(text_or_path) if not isinstance(text_or_path, os.PathLike) else None
        if text is None or not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            source = str(path)
            try:
                text = path.read_text()
            except OSError as err:
                raise SplitError(f"cannot read split manifest {path}: {err}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SplitError(f"{source}: invalid JSON ({err})") from None
        return cls.from_dict(data, dataset_ids, source)


def _check_ids(ids: Sequence[str]) -> list[str]:
    ids = list(ids)
    if not ids:
        raise SplitError("make_split: the dataset has no ids")
    bad = [i for i in ids if not isinstance(i, str)]
    if bad:
        raise SplitError(f"make_split: ids must be str, got {_list_ids(bad)}")
    seen: set[str] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]
    if dup:
        raise SplitError(f"make_split: duplicate ids: {_list_ids(dup)}")
    return ids


def _fixed_partition(ids: list[str], fixed: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    unknown_keys = set(fixed) - {"train", "val", "test"}
    if unknown_keys or "train" not in fixed or "test" not in fixed:
        raise SplitError(
            f"fixed partition needs keys 'train' and 'test' (optional 'val'), got {sorted(fixed)}"
        )
    parts = {name: [str(i) for i in fixed.get(name, ())] for name in ("train", "val", "test")}
    index = set(ids)
    owner: dict[str, str] = {}
    for name, members in parts.items():
        missing = [i for i in members if i not in index]
        if missing:
            raise SplitError(
                f"fixed partition '{name}' has ids missing from the dataset: {_list_ids(missing)}"
            )
        clash = [i for i in members if i in owner]
        if clash:
            raise SplitError(f"fixed partition '{name}' repeats or shares ids: {_list_ids(clash)}")
        owner.update(dict.fromkeys(members, name))
    unassigned = [i for i in ids if i not in owner]
    if unassigned:
        raise SplitError(f"fixed partition leaves dataset ids unassigned: {_list_ids(unassigned)}")
    return parts


def make_split(
    ids: Sequence[str],
    seed: int,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    labelled_fraction: float = 0.5,
    fixed: Mapping[str, Sequence[str]] | None = None,
    scenes: Sequence[int] | None = None,
) -> Split:
    """Draw a split of ``ids`` (see the module docstring for the procedure and rounding).

    Args:
        ids: unique dataset ids.
        seed: any int; the same seed and ids give the same split.
        val_fraction, test_fraction: shares of all ids held out (defaults 0.2 and 0.0). Must be
            left unset with ``fixed``, which defines the partition.
        labelled_fraction: share of the train ids that are labelled (ceil); the rest are weak.
        fixed: a predefined partition ``{"train": [...], "test": [...], "val": [...]}``
            ("val" optional, default empty) covering every id exactly once.
        scenes: optional integer scene label per id (same order as ``ids``) to stratify by.

    Raises:
        SplitError: duplicate or non-str ids, a fraction outside [0, 1], val + test > 1,
            ``scenes`` of the wrong length, or a ``fixed`` partition that does not match ``ids``.
    """
    ids = _check_ids(ids)
    n = len(ids)
    lab = _fraction(labelled_fraction, "labelled_fraction")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SplitError(f"seed must be an int, got {seed!r}")
    if scenes is not None:
        scenes = [int(s) for s in scenes]
        if len(scenes) != n:
            raise SplitError(f"scenes has {len(scenes)} labels for {n} ids")
    position = {name: k for k, name in enumerate(ids)}

    if fixed is not None:
        if val_fraction is not None or test_fraction is not None:
            raise SplitError("val_fraction / test_fraction cannot be combined with a fixed partition")
        parts = _fixed_partition(ids, fixed)
        train_idx = sorted(position[i] for i in parts["train"])
        val_idx = sorted(position[i] for i in parts["val"])
        test_idx = sorted(position[i] for i in parts["test"])
        val_f, test_f = len(val_idx) / n, len(test_idx) / n
    else:
        val_f = 0.2 if val_fraction is None else val_fraction
        test_f = 0.0 if test_fraction is None else test_fraction
        val_q, test_q = _fraction(val_f, "val_fraction"), _fraction(test_f, "test_fraction")
        if val_q + test_q > 1:
            raise SplitError(f"val_fraction + test_fraction must be <= 1, got {val_f} + {test_f}")
        n_test, n_val = math.floor(test_q * n), math.floor(val_q * n)
        order = _order(range(n), ids, seed, "partition", scenes, one_per_scene_first=False)
        test_idx = sorted(order[:n_test])
        val_idx = sorted(order[n_test : n_test + n_val])
        train_idx = sorted(order[n_test + n_val :])

    n_lab = math.ceil(lab * len(train_idx))
    train_order = _order(train_idx, ids, seed, "labelled", scenes, one_per_scene_first=True)
    labelled = sorted(train_order[:n_lab])
    weak = sorted(train_order[n_lab:])
    return Split(
        train_labelled=[ids[i] for i in labelled],
        train_weak=[ids[i] for i in weak],
        val=[ids[i] for i in val_idx],
        test=[ids[i] for i in test_idx],
        seed=seed,
        val_fraction=float(val_f),
        test_fraction=float(test_f),
        labelled_fraction=float(labelled_fraction),
        fixed=fixed is not None,
        stratified=scenes is not None,
    )


def released_counts(n: int) -> dict[str, int]:
    """Part sizes of the released code's ``split_dataset(dset, 0.8, 0.5)`` for ``n`` images:
    ``ceil(0.8 n)`` train, of which ``ceil(0.5 n_train)`` labelled, the rest validation.
    For n = 1449: train 1160, labelled 580, weak ("unlabelled") 580, val 289."""
    if n < 1:
        raise SplitError(f"released_counts needs n >= 1, got {n}")
    train = math.ceil(Fraction(4, 5) * n)
    labelled = math.ceil(Fraction(1, 2) * train)
    return {"train": train, "train_labelled": labelled, "train_weak": train - labelled, "val": n - train}


def released_split(ids: Sequence[str] | int, seed: int = 42) -> Split:
    """A split with the released code's part sizes (:func:`released_counts`).

    ``ids`` may be an int n, meaning ids ``"0" .. str(n - 1)``. The counts are the released
    ones, but the membership is drawn by this module's hash order: the released code took a
    ``torch.randperm`` after ``torch.manual_seed(42)`` from a global RNG stream that its model
    construction had already advanced, so its exact permutation cannot be reproduced.
    """
    if isinstance(ids, int):
        ids = [str(i) for i in range(ids)]
    split = make_split(ids, seed, val_fraction=0.2, test_fraction=0.0, labelled_fraction=0.5)
    expected = released_counts(len(ids))
    got = {**split.counts(), "train": len(split.train)}
    got.pop("test")
    assert got == expected, (got, expected)  # the rounding rules coincide by construction
    return split
