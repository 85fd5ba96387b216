"""``python -m mgm_fast.evaluate``: metrics of a trained model on a dataset.

SOURCE is one of
  * a run folder of ``python -m mgm_fast.train`` (its final weights, or with ``--checkpoint`` its
    latest checkpoint; its config, dataset and validation split are reused unless overridden);
  * one of our checkpoint files (``checkpoints/ckpt-*.pt``) or ``final_weights.pt``;
  * a checkpoint of the released code (a ``torch.save`` of its MGM state dict), imported through
    :mod:`mgm_fast.compat` (needs ``--data``; the architecture is read off the tensors).

Metrics (mgm_fast/metrics.py): segmentation mIoU and pixel accuracy, depth absolute / relative
error, normal angle mean / median / within 11.25, 22.5, 30 degrees, and the scene accuracy of
the refinement net when the model has one. Evaluation runs in eval mode (BatchNorm running
statistics).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from mgm_fast.metrics import MultiTaskEvaluator, format_table


@torch.no_grad()
def evaluate_nets(nets, loader, num_seg_classes: int, num_scenes: int, with_scene: bool,
                  normal_target: str = "released01") -> dict[str, float]:
    """Metrics of ``nets.multitask`` (and ``nets.refine`` when ``with_scene``) over ``loader``.

    ``normal_target`` says how the normal decoder was trained: "released01" predictions are in
    the (n + 1) / 2 encoding and are decoded with 2p - 1 before the angles are measured.
    The networks are put back in training mode afterwards. ``loader`` must be at the start of
    an epoch (every sample is evaluated exactly once).
    """
    position = getattr(loader, "position", 0)
    if position:
        raise RuntimeError(
            f"evaluate_nets: the loader is {position} batches into an epoch; the evaluation would "
            "miss those samples (iterate a fresh loader, or finish the epoch first)"
        )
    was_training = nets.training
    nets.eval()
    tasks = (*nets.tasks, "scene") if with_scene else tuple(nets.tasks)
    evaluator = MultiTaskEvaluator(tasks, num_seg_classes, num_scenes)
    for batch in loader:
        pred = nets.multitask(batch["rgb"])
        out = {k: v.float() for k, v in pred.items()}
        if with_scene:
            out["scene"] = nets.refine(**pred)
        if "normal" in out and normal_target == "released01":
            out["normal"] = out["normal"] * 2 - 1
        evaluator.update(out, batch)
    nets.train(was_training)
    return evaluator.compute()


def _load_source(source: Path, use_checkpoint: bool, device: torch.device):
    """(model config dict or ModelConfig, tasks, nets, run config dict or None, run dir or None)."""
    from mgm_fast.config import from_dict as config_from_dict
    from mgm_fast.models import build_models

    run_dir = source if source.is_dir() else None
    if run_dir is not None:
        run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        if use_checkpoint:
            from mgm_fast.engine.checkpoint import CheckpointManager

            ckpt = CheckpointManager(run_dir / "checkpoints").load_latest()
            if ckpt is None:
                raise SystemExit(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
            state = ckpt["modules"]["nets"]
        else:
            path = run_dir / "final_weights.pt"
            if not path.exists():
                raise SystemExit(f"{run_dir}: no final_weights.pt (unfinished run? use --checkpoint)")
            state = torch.load(path, map_location="cpu", weights_only=True)["nets"]
        model = config_from_dict(run_cfg["config"]).model
        nets = build_models(model, tuple(run_cfg["tasks"]))
        nets.load_state_dict(state)
        nets = nets.to(device)
        if run_cfg.get("channels_last"):  # the run's layout: same convolution rounding as in training
            nets = nets.to(memory_format=torch.channels_last)
        return nets, run_cfg, run_dir

    obj = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and obj.get("format") == "mgm_fast.checkpoint":
        model = config_from_dict(obj["config"]).model
        state = obj["modules"]["nets"]
    elif isinstance(obj, dict) and "nets" in obj and "config" in obj:  # final_weights.pt
        model = config_from_dict(obj["config"]).model
        state = obj["nets"]
    else:
        from mgm_fast.compat import build_from_released

        _, nets, report = build_from_released(obj)
        print(f"imported a released checkpoint: {report}", file=sys.stderr)
        return nets.to(device), None, None
    tasks = tuple(t for t in ("seg", "depth", "normal") if f"multitask.decoders.{t}.conv_decode4.weight" in state)
    nets = build_models(model, tasks)
    nets.load_state_dict(state)
    return nets.to(device), None, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mgm_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run folder, our checkpoint / final_weights.pt, or a released checkpoint")
    p.add_argument("--data", default=None, help="dataset spec (default: the run's own)")
    p.add_argument("--split", default="val", choices=("val", "test", "train", "all"),
                   help="which part of the run's split to evaluate (default val); 'all' = whole dataset")
    p.add_argument("--checkpoint", action="store_true", help="run folder: use the latest checkpoint")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = p.parse_args(argv)

    from mgm_fast.data.loader import make_loader
    from mgm_fast.data.registry import open_dataset
    from mgm_fast.data.splits import Split

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    nets, run_cfg, run_dir = _load_source(Path(args.source), args.checkpoint, device)
    spec = args.data or (run_cfg or {}).get("data")
    if spec is None:
        raise SystemExit("--data is needed to evaluate a checkpoint outside a run folder")
    dataset, info = open_dataset(spec, nets.cfg.image_size)
    if info.num_seg_classes != nets.cfg.num_seg_classes:
        raise SystemExit(
            f"{spec}: {info.num_seg_classes} segmentation classes, the model predicts {nets.cfg.num_seg_classes}"
        )
    if args.split == "all" or run_dir is None or args.data not in (None, run_cfg["data"]):
        indices = list(range(len(dataset)))
    else:
        split = Split.from_json(run_dir / "split.json")
        indices = getattr(split, args.split)
    loader = make_loader(dataset, indices, args.batch_size, device, seed=0, shuffle=False, drop_last=False)
    method = (run_cfg or {}).get("method", "mgm")
    normal_target = (run_cfg or {}).get("config", {}).get("schedule", {}).get("normal_target", "released01")
    metrics = evaluate_nets(nets, loader, info.num_seg_classes, info.num_scenes,
                            with_scene=method in ("mgm", "mgm-light") and nets.cfg.num_scenes == info.num_scenes,
                            normal_target=normal_target)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_table({Path(args.source).name: metrics}, percent=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
