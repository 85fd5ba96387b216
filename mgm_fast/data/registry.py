"""Dataset factory: one string names any dataset mgm_fast can read.

Spec forms::

    synthetic            procedural scenes, 1000 samples (mgm_fast.data.synthetic)
    synthetic:N          N procedural scenes
    official:DIR         released-code folder layout (mgm_fast.data.folder)
    mtan:DIR             MTAN NYUv2 npy release, train split (mgm_fast.data.mtan)
    mtan:DIR:SPLIT       ... split train or val
    taskonomy:DIR        Taskonomy buildings (mgm_fast.data.taskonomy)

Keyword arguments are passed to the dataset class (e.g. ``num_seg_classes=40`` for official,
``scenes="none"`` for mtan, ``buildings=[...]`` for taskonomy, ``seed=`` for synthetic).
"""

from __future__ import annotations

from mgm_fast.data.sample import DataError, DatasetInfo

__all__ = ["SPEC_FORMS", "open_dataset"]

SPEC_FORMS = ("synthetic[:N]", "official:DIR", "mtan:DIR[:train|val]", "taskonomy:DIR")
DEFAULT_SYNTHETIC_SAMPLES = 1000


def _synthetic(arg: str | None, image_size, kw: dict):
    from mgm_fast.data.synthetic import SyntheticScenes

    n = DEFAULT_SYNTHETIC_SAMPLES
    if arg:
        try:
            n = int(arg)
        except ValueError:
            raise DataError(f"open_dataset: 'synthetic:{arg}': N must be an integer") from None
    if image_size is None:
        raise DataError("open_dataset: synthetic data needs an image_size")
    size = image_size if isinstance(image_size, int) else int(image_size[0])
    if not isinstance(image_size, int) and image_size[0] != image_size[1]:
        raise DataError(f"open_dataset: synthetic scenes are square, got image_size {image_size}")
    ds = SyntheticScenes(n, size, seed=int(kw.pop("seed", 0)))
    if kw:
        raise DataError(f"open_dataset: synthetic takes only seed=, got {sorted(kw)}")
    info = DatasetInfo(
        num_seg_classes=ds.num_seg_classes,
        num_scenes=ds.num_scenes,
        seg_class_names=tuple(ds.SEG_CLASSES),
        scene_names=tuple(ds.SCENE_CLASSES),
        layout="synthetic",
        root=None,
        extra={"seed": ds.seed},
    )
    ds.info = info
    return ds, info


def open_dataset(spec: str, image_size, **kw):
    """Open the dataset named by ``spec`` (module docstring) at ``image_size``.

    Args:
        spec: a spec string.
        image_size: int S (S x S), (H, W), or None for the files' own size (file layouts only).
        **kw: passed to the dataset class.
    Returns:
        ``(dataset, DatasetInfo)``; the dataset also carries the info as ``dataset.info``.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"open_dataset: spec must be a non-empty string, one of {', '.join(SPEC_FORMS)}")
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return _synthetic(arg, image_size, dict(kw))
    if kind in ("official", "mtan", "taskonomy") and not arg:
        raise DataError(f"open_dataset: {spec!r} lacks a folder; expected {kind}:DIR")
    if kind == "official":
        from mgm_fast.data.folder import FolderDataset

        ds = FolderDataset(arg, image_size, **kw)
        return ds, ds.info
    if kind == "mtan":
        from mgm_fast.data.mtan import SPLITS, MTANDataset

        root, split = arg, kw.pop("split", "train")
        head, sep, tail = arg.rpartition(":")
        if sep and tail in SPLITS:
            root, split = head, tail
        ds = MTANDataset(root, split=split, image_size=image_size, **kw)
        return ds, ds.info
    if kind == "taskonomy":
        from mgm_fast.data.taskonomy import TaskonomyDataset

        ds = TaskonomyDataset(arg, image_size, **kw)
        return ds, ds.info
    raise DataError(f"open_dataset: unknown dataset spec {spec!r}; expected one of: {', '.join(SPEC_FORMS)}")
