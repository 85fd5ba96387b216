"""Check a whole dataset: decode and validate every sample, summarise, report every problem.

``check_dataset`` reads every sample (so every file is decoded once), runs
:func:`mgm_fast.data.sample.validate_sample` on it, and gathers statistics: samples per scene,
pixels per segmentation class (and void), valid depth range, fractions of valid depth and normal
pixels, sizes. A sample that fails is recorded with its error (which names the file) and the
check goes on; at the end all problems are reported together (the first ``max_problems`` listed,
then a count), so one pass finds every broken file.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from mgm_fast.data.sample import DataError, DatasetInfo, validate_sample

__all__ = ["check_dataset", "format_summary"]


def _info_of(ds) -> DatasetInfo:
    info = getattr(ds, "info", None)
    if isinstance(info, DatasetInfo):
        return info
    if hasattr(ds, "num_seg_classes") and hasattr(ds, "num_scenes"):
        seg_names = getattr(ds, "SEG_CLASSES", [f"class_{i}" for i in range(ds.num_seg_classes)])
        scene_names = getattr(ds, "SCENE_CLASSES", [f"scene_{i}" for i in range(ds.num_scenes)])
        return DatasetInfo(
            ds.num_seg_classes, ds.num_scenes, tuple(seg_names), tuple(scene_names), type(ds).__name__
        )
    raise DataError(
        f"check_dataset: {type(ds).__name__} has no DatasetInfo (.info) nor num_seg_classes/num_scenes"
    )


def check_dataset(
    spec_or_dataset,
    image_size=None,
    max_problems: int = 50,
    raise_on_error: bool = True,
    limit: int | None = None,
    **kw,
) -> dict:
    """Validate every sample of a dataset and summarise it.

    Args:
        spec_or_dataset: a spec for :func:`mgm_fast.data.registry.open_dataset` (e.g.
            ``"official:/data/nyu"``) or a dataset object (with ``.info`` or synthetic attributes).
        image_size: size to load a spec at; None keeps the files' size (file layouts).
        max_problems: problems listed in full (all are counted).
        raise_on_error: raise a DataError listing the problems at the end (its ``summary``
            attribute holds the summary); otherwise return the summary with its ``problems``.
        limit: check only the first ``limit`` samples.
        **kw: passed to ``open_dataset`` for a spec.
    Returns:
        summary dict: ``layout, root, num_samples, num_checked, num_ok, sizes, scene_counts,
        class_pixels, ignore_pixels, depth_min, depth_max, depth_mean, depth_valid_fraction,
        normal_valid_fraction, num_problems, problems``.
    """
    problems: list[str] = []
    num_problems = 0

    def add(msg: str) -> None:
        nonlocal num_problems
        num_problems += 1
        if len(problems) < max_problems:
            problems.append(msg)

    summary: dict = {"layout": None, "root": None, "num_samples": 0, "num_checked": 0, "num_ok": 0}
    ds = spec_or_dataset
    if isinstance(spec_or_dataset, str):
        from mgm_fast.data.registry import open_dataset

        summary["spec"] = spec_or_dataset
        try:
            ds, _ = open_dataset(spec_or_dataset, image_size, **kw)
        except DataError as e:
            add(str(e))
            ds = None
    if ds is not None:
        info = _info_of(ds)
        summary.update(layout=info.layout, root=info.root, num_samples=len(ds))
        summary["num_seg_classes"] = info.num_seg_classes
        summary["num_scenes"] = info.num_scenes
        n = len(ds) if limit is None else min(len(ds), int(limit))
        scene_counts: Counter = Counter()
        sizes: Counter = Counter()
        class_pixels = torch.zeros(info.num_seg_classes, dtype=torch.int64)
        ignore_pixels = total_pixels = depth_valid = normal_valid = 0
        dmin, dmax, dsum = math.inf, -math.inf, 0.0
        for i in range(n):
            try:
                sample = ds[i]
                source = (
                    f"sample {i} ({sample.get('id', '?')})" if isinstance(sample, dict) else f"sample {i}"
                )
                validate_sample(
                    sample,
                    info.num_seg_classes,
                    source,
                    info.num_scenes or None,
                    allow_unknown_scene=info.num_scenes == 0,
                )
            except DataError as e:
                add(str(e))
                continue
            finally:
                summary["num_checked"] = i + 1
            summary["num_ok"] += 1
            scene = int(sample["scene"])
            scene_counts[info.scene_names[scene] if 0 <= scene < info.num_scenes else "unknown"] += 1
            seg = sample["seg"]
            sizes[f"{seg.shape[0]}x{seg.shape[1]}"] += 1
            labelled = seg[seg >= 0]
            class_pixels += torch.bincount(labelled, minlength=info.num_seg_classes)[: info.num_seg_classes]
            ignore_pixels += int(seg.numel() - labelled.numel())
            total_pixels += seg.numel()
            dm = sample["depth_mask"]
            depth_valid += int(dm.sum())
            normal_valid += int(sample["normal_mask"].sum())
            if bool(dm.any()):
                d = sample["depth"][dm]
                dmin, dmax, dsum = (
                    min(dmin, float(d.min())),
                    max(dmax, float(d.max())),
                    dsum + float(d.double().sum()),
                )
        summary.update(
            sizes=dict(sizes),
            scene_counts=dict(sorted(scene_counts.items())),
            class_pixels={name: int(c) for name, c in zip(info.seg_class_names, class_pixels.tolist())},
            ignore_pixels=ignore_pixels,
            depth_min=dmin if depth_valid else None,
            depth_max=dmax if depth_valid else None,
            depth_mean=dsum / depth_valid if depth_valid else None,
            depth_valid_fraction=depth_valid / total_pixels if total_pixels else None,
            normal_valid_fraction=normal_valid / total_pixels if total_pixels else None,
        )
    summary["num_problems"] = num_problems
    summary["problems"] = problems
    if num_problems and raise_on_error:
        more = f"\n  ... and {num_problems - len(problems)} more" if num_problems > len(problems) else ""
        err = DataError(
            f"check_dataset: {num_problems} problem(s) in {summary.get('spec') or summary['root'] or summary['layout']}:\n  "
            + "\n  ".join(problems)
            + more
        )
        err.summary = summary
        raise err
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable multi-line rendering of a :func:`check_dataset` summary."""
    lines = [
        f"layout: {summary.get('layout')}   root: {summary.get('root')}",
        f"samples: {summary.get('num_samples')}   checked: {summary.get('num_checked')}   ok: {summary.get('num_ok')}",
    ]
    if summary.get("sizes"):
        lines.append("sizes: " + ", ".join(f"{k} x{v}" for k, v in summary["sizes"].items()))
    if "scene_counts" in summary:
        lines.append(f"scenes ({summary.get('num_scenes')}):")
        lines += [f"  {name:<24} {count}" for name, count in summary["scene_counts"].items()]
    if "class_pixels" in summary:
        total = sum(summary["class_pixels"].values()) + summary.get("ignore_pixels", 0)
        lines.append(f"segmentation classes ({summary.get('num_seg_classes')}), share of pixels:")
        for name, count in summary["class_pixels"].items():
            lines.append(f"  {name:<24} {count / total if total else 0:8.4f}")
        lines.append(f"  {'(void)':<24} {summary.get('ignore_pixels', 0) / total if total else 0:8.4f}")
    if summary.get("depth_min") is not None:
        lines.append(
            f"depth (valid): min {summary['depth_min']:.3f} m, max {summary['depth_max']:.3f} m, "
            f"mean {summary['depth_mean']:.3f} m"
        )
    for key in ("depth_valid_fraction", "normal_valid_fraction"):
        if summary.get(key) is not None:
            lines.append(f"{key.replace('_', ' ')}: {summary[key]:.4f}")
    lines.append(f"problems: {summary.get('num_problems', 0)}")
    lines += ["  - " + p.replace("\n", "\n    ") for p in summary.get("problems", [])]
    if summary.get("num_problems", 0) > len(summary.get("problems", [])):
        lines.append(f"  ... and {summary['num_problems'] - len(summary['problems'])} more")
    return "\n".join(lines)
