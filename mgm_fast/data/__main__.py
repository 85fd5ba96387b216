"""Command line for datasets: ``python -m mgm_fast.data {export,check,show,prepare-nyuv2} ...``.

export --synthetic N --out DIR --layout official|mtan [--size 64] [--seed 0]
    write N procedural scenes in a file layout, so the file loaders can be exercised (and
    compared against the embedded data) without downloading anything.
check DIR --layout official|mtan|taskonomy [--size N]
    decode and validate every sample, print a summary; exit status 1 on any problem.
show DIR_OR_SPEC --out sheet.png [--layout ...] [-n 8]
    contact sheet (RGB | segmentation | depth | normals) of the first samples.
prepare-nyuv2 nyu_depth_v2_labeled.mat --out DIR [--splits splits.mat] [--layout official|mtan]
              [--size 128|288x384|native] [--classes 40|13] [--scene-set 27|10] [--check] ...
    convert the NYUv2 labelled release into a dataset folder (mgm_fast.data.nyuv2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mgm_fast.data.sample import DataError

_SPEC_PREFIXES = ("synthetic", "official:", "mtan:", "taskonomy:")


def _synthetic_samples(n: int, size: int, seed: int, chunk: int = 32):
    """Samples of SyntheticScenes(n, size, seed), rendered in batches (the fast path)."""
    from mgm_fast.data.synthetic import SyntheticScenes

    ds = SyntheticScenes(n, size, seed=seed)
    for start in range(0, n, chunk):
        batch = ds.render_batch(list(range(start, min(n, start + chunk))))
        for k, sid in enumerate(batch["id"]):
            yield {key: v[k] for key, v in batch.items() if key != "id"} | {"id": sid}


def cmd_export(args) -> int:
    from mgm_fast.data.synthetic import SCENE_CLASSES, SEG_CLASSES

    if args.synthetic < 1:
        raise DataError(f"export: --synthetic must be >= 1, got {args.synthetic}")
    out = Path(args.out)
    samples = _synthetic_samples(args.synthetic, args.size, args.seed)
    if args.layout == "official":
        from mgm_fast.data.folder import write_folder

        write_folder(samples, out, SCENE_CLASSES, seg_offset=args.seg_offset, seg_class_names=SEG_CLASSES)
    else:
        from mgm_fast.data.mtan import write_mtan

        write_mtan(samples, out, args.split, scene_names=SCENE_CLASSES, seg_class_names=SEG_CLASSES)
    print(
        f"wrote {args.synthetic} synthetic samples ({args.size}x{args.size}, seed {args.seed}) to {out} "
        f"in the {args.layout} layout"
    )
    return 0


def _spec(target: str, layout: str | None, split: str | None = None) -> str:
    if target.startswith(_SPEC_PREFIXES):
        return target
    if layout is None:
        raise DataError(f"{target}: give --layout official|mtan|taskonomy for a directory")
    if layout == "mtan" and split:
        return f"mtan:{target}:{split}"
    return f"{layout}:{target}"


def _kwargs(args) -> dict:
    kw = {}
    if getattr(args, "num_seg_classes", None) is not None:
        kw["num_seg_classes"] = args.num_seg_classes
    if getattr(args, "no_scenes", False):
        kw["scenes"] = "none"
    return kw


def cmd_check(args) -> int:
    from mgm_fast.data.check import check_dataset, format_summary

    spec = _spec(args.dir, args.layout, args.split)
    summary = check_dataset(
        spec,
        image_size=args.size,
        max_problems=args.max_problems,
        raise_on_error=False,
        limit=args.limit,
        **_kwargs(args),
    )
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(f"spec: {spec}")
        print(format_summary(summary))
    return 1 if summary["num_problems"] else 0


def cmd_show(args) -> int:
    from mgm_fast.data.registry import open_dataset
    from mgm_fast.data.visualize import contact_sheet  # imported here: only this command draws

    target = args.target
    spec = (
        target if target.startswith(_SPEC_PREFIXES) else _spec(target, args.layout or "official", args.split)
    )
    ds, info = open_dataset(spec, args.size, **_kwargs(args))
    n = min(args.n, len(ds))
    if n < 1:
        raise DataError(f"show: {spec} has no samples")
    samples = [ds[i] for i in range(n)]
    path = contact_sheet(samples, args.out, scene_names=list(info.scene_names) or None, scale=args.scale)
    print(f"wrote {path} ({n} samples of {spec})")
    return 0


def cmd_prepare_nyuv2(args) -> int:
    from mgm_fast.data.nyuv2 import prepare_nyuv2

    summary = prepare_nyuv2(
        args.mat,
        args.out,
        splits=args.splits,
        layout=args.layout,
        size=args.size,
        classes=args.classes,
        scene_set=args.scene_set,
        depth=args.depth,
        crop=args.crop,
        normals=args.normals,
        limit=args.limit,
        labelled_fraction=args.labelled_fraction,
        split_seed=args.split_seed,
        allow_invalid_depth=args.allow_invalid_depth,
        check_names=not args.skip_names_check,
        workers=args.workers,
        progress=not args.quiet,
    )
    if not args.check:
        return 0
    from mgm_fast.data.check import check_dataset, format_summary

    status = 0
    parts = [None] if args.layout == "official" else ["train", "val"]
    for part in parts:
        spec = f"official:{args.out}" if part is None else f"mtan:{args.out}:{part}"
        result = check_dataset(spec, image_size=None, raise_on_error=False)
        print(f"check {spec}:")
        print(format_summary(result))
        if result["num_problems"] or result["num_ok"] != (
            summary["frames"] if part is None else summary["frames_per_split"][part]
        ):
            status = 1
    return status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mgm_fast.data",
        description="Export, check and look at mgm_fast datasets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Dataset specs: synthetic[:N] | official:DIR | mtan:DIR[:train|val] | taskonomy:DIR",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{export,check,show,prepare-nyuv2}")

    e = sub.add_parser(
        "export",
        help="write procedural scenes in a file layout",
        description="Write N procedural (synthetic) scenes in the official folder layout or the MTAN npy "
        "layout, with their metadata (dataset.json / scenes.json), so the file loaders can be "
        "exercised on the same data as the embedded default.",
    )
    e.add_argument("--synthetic", type=int, required=True, metavar="N", help="number of synthetic samples")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (must not hold a dataset yet)")
    e.add_argument("--layout", choices=("official", "mtan"), required=True, help="file layout to write")
    e.add_argument("--size", type=int, default=64, help="square image size in pixels (default 64)")
    e.add_argument("--seed", type=int, default=0, help="synthetic dataset seed (default 0)")
    e.add_argument(
        "--split", choices=("train", "val"), default="train", help="mtan: split to write (default train)"
    )
    e.add_argument(
        "--seg-offset",
        type=int,
        default=0,
        help="official: add this to stored labels (1 = NYUv2 style, 0 = void; default 0)",
    )
    e.set_defaults(func=cmd_export)

    c = sub.add_parser(
        "check",
        help="validate every sample and print a summary",
        description="Decode and validate every sample of a dataset, print counts per scene, the class "
        "histogram, the valid depth range and the fractions of valid depth / normal pixels. Every "
        "problem is listed with the file it comes from. Exit status 1 if there is any problem.",
    )
    c.add_argument("dir", metavar="DIR", help="dataset folder (or a dataset spec)")
    c.add_argument("--layout", choices=("official", "mtan", "taskonomy"), help="layout of DIR")
    c.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize to SIZE x SIZE before checking (default: keep the files' size)",
    )
    c.add_argument(
        "--split", choices=("train", "val"), default=None, help="mtan: split to check (default train)"
    )
    c.add_argument(
        "--num-seg-classes",
        type=int,
        default=None,
        help="official: number of classes when DIR has no dataset.json",
    )
    c.add_argument("--no-scenes", action="store_true", help="mtan/taskonomy: load without scene labels")
    c.add_argument("--limit", type=int, default=None, help="check only the first LIMIT samples")
    c.add_argument("--max-problems", type=int, default=50, help="problems listed in full (default 50)")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser(
        "show",
        help="write a contact sheet of the first samples",
        description="Write a PNG with one row per sample: RGB | segmentation | depth | normals, scene name "
        "in the corner. DIR_OR_SPEC is a dataset folder (with --layout) or a spec such as synthetic:16.",
    )
    s.add_argument(
        "target", metavar="DIR_OR_SPEC", help="dataset folder or spec (synthetic[:N], official:DIR, ...)"
    )
    s.add_argument("--out", required=True, help="output PNG path")
    s.add_argument(
        "--layout",
        choices=("official", "mtan", "taskonomy"),
        default=None,
        help="layout of a folder (default official)",
    )
    s.add_argument("-n", type=int, default=8, help="number of samples (default 8)")
    s.add_argument("--size", type=int, default=128, help="image size of the tiles (default 128)")
    s.add_argument("--scale", type=int, default=1, help="integer upscaling of each tile (default 1)")
    s.add_argument("--split", choices=("train", "val"), default=None, help="mtan: split (default train)")
    s.add_argument(
        "--num-seg-classes", type=int, default=None, help="official: number of classes without dataset.json"
    )
    s.add_argument("--no-scenes", action="store_true", help="mtan/taskonomy: load without scene labels")
    s.set_defaults(func=cmd_show)

    n = sub.add_parser(
        "prepare-nyuv2",
        help="convert the NYUv2 labelled release (nyu_depth_v2_labeled.mat) into a dataset folder",
        description="Read nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5, needs h5py) and the optional "
        "official split (splits.mat), map the 894 raw labels to the 40 (Gupta et al.) or 13 (Couprie "
        "et al.) classes and the scene types to 27 or 10 scene classes, compute surface normals from the "
        "depth (or take precomputed ones), resize, and write the official folder layout or the MTAN "
        "layout with a manifest. Tables, intrinsics and methods: mgm_fast/data/nyuv2/.",
    )
    n.add_argument("mat", metavar="MAT", help="nyu_depth_v2_labeled.mat")
    n.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    n.add_argument(
        "--splits", metavar="SPLITS_MAT", help="official split file splits.mat (trainNdxs/testNdxs)"
    )
    n.add_argument(
        "--layout", choices=("official", "mtan"), default="official", help="output layout (default official)"
    )
    n.add_argument(
        "--size", default="128", help="output size: N (N x N), HxW (e.g. 288x384) or native (default 128)"
    )
    n.add_argument("--classes", type=int, choices=(40, 13), default=40, help="class set (default 40)")
    n.add_argument(
        "--scene-set", type=int, choices=(27, 10), default=27, help="27 scene types or the 10-type grouping"
    )
    n.add_argument(
        "--depth",
        choices=("filled", "raw"),
        default="filled",
        help="depth map: filled (in-painted 'depths', default) or raw ('rawDepths', holes masked)",
    )
    n.add_argument(
        "--crop",
        choices=("none", "toolbox"),
        default="none",
        help="none (full 480x640, default) or toolbox (427x561 region of get_projection_mask.m)",
    )
    n.add_argument(
        "--normals",
        metavar="PATH",
        help="precomputed normals: folder of <frame>.npy/.png (0001 = frame 1) or one (N, H, W, 3) .npy",
    )
    n.add_argument("--limit", type=int, default=None, help="convert only frames 1..LIMIT (a quick trial)")
    n.add_argument(
        "--labelled-fraction",
        type=float,
        default=1.0,
        help="split.json: labelled fraction of the train frames (default 1.0)",
    )
    n.add_argument("--split-seed", type=int, default=0, help="split.json: seed of the labelled subset")
    n.add_argument(
        "--allow-invalid-depth", action="store_true", help="mask NaN / negative depth instead of failing"
    )
    n.add_argument(
        "--skip-names-check",
        action="store_true",
        help="do not check the file's raw class names against the 894 -> 40 table",
    )
    n.add_argument(
        "--workers", type=int, default=None, help="frames processed in parallel (default min(4, CPUs))"
    )
    n.add_argument("--check", action="store_true", help="run the check command on the output afterwards")
    n.add_argument("--quiet", action="store_true", help="no progress bar")
    n.set_defaults(func=cmd_prepare_nyuv2)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
