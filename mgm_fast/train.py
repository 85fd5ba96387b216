"""``python -m mgm_fast.train``: train MGM or a baseline and evaluate it.

With no arguments: full MGM (GAN pre-training, then joint training) with the ``tiny`` preset on
the embedded synthetic dataset, on the CPU in a few minutes. Everything lands in the run folder:
``config.yaml`` (the resolved config), ``split.json`` (the split manifest), ``metrics.jsonl``
(losses every ``--log-every`` steps, evaluations), ``samples/`` (generated images per scene
class), ``checkpoints/`` and ``eval.json`` / ``eval.md`` (the final evaluation).

Methods (``--method``):
  mgm        GAN pre-training (phase A), then MGM joint training (phase B, steps 1-6)
  mgm-light  steps 1-3 on labelled data + refinement/SimCLR on weakly labelled real images
  mt         multi-task baseline: shared encoder, equal loss weights (step 1 only)
  st         single-task baselines: one network per task, each trained alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from mgm_fast.config import Config, override, preset, to_dict
from mgm_fast.data.augment import SimCLRAugment
from mgm_fast.data.loader import make_loader
from mgm_fast.data.registry import SPEC_FORMS, open_dataset
from mgm_fast.data.splits import Split, make_split
from mgm_fast.engine import schedule
from mgm_fast.metrics import MultiTaskEvaluator, format_table
from mgm_fast.models import TASKS, MGMNets, build_models

METHODS = ("mgm", "mgm-light", "mt", "st")


# ------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mgm_fast.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=METHODS, default="mgm", help="what to train (default mgm)")
    p.add_argument("--tasks", default="seg,depth,normal", help="comma-separated subset of seg,depth,normal")
    p.add_argument("--preset", default="tiny", help="config preset: tiny (CPU, default) or paper (released)")
    p.add_argument("--data", default="synthetic:480",
                   help=f"dataset spec, one of {', '.join(SPEC_FORMS)} (default synthetic:480)")
    p.add_argument("--regime", type=float, default=0.5,
                   help="labelled fraction of the training split (released 0.5)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction (released 0.2)")
    p.add_argument("--split", default=None, help="reuse a split manifest (split.json of an earlier run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init, noise and views")
    p.add_argument("--epochs", type=int, default=None, help="joint-training epochs (default: preset)")
    p.add_argument("--gan-epochs", type=int, default=None, help="GAN pre-training epochs (mgm)")
    p.add_argument("--steps", type=int, default=None, help="stop every phase after this many steps")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: preset)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--loader", default="auto", choices=("auto", "memory", "dali", "torch"),
                   help="data loader (auto: on-device memory when the data fits)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast precision (fp16 uses a GradScaler)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--log-every", type=int, default=10, help="log the mean losses every N steps")
    p.add_argument("--out", default=None, help="run folder (default runs/<method>-<data>-r<regime>-s<seed>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.refine_logit_relu=false")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    cfg = preset(args.preset)
    overrides = list(args.set)
    if args.batch_size is not None:
        overrides.append(f"schedule.batch_size={args.batch_size}")
    if args.epochs is not None:
        overrides.append(f"schedule.epochs={args.epochs}")
    if args.gan_epochs is not None:
        overrides.append(f"schedule.gan_epochs={args.gan_epochs}")
    if args.steps is not None:
        overrides.append(f"schedule.max_steps={args.steps}")
    return override(cfg, overrides)


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise SystemExit(f"--tasks: expected a subset of {','.join(TASKS)}, got {text!r}")
    return tasks


# ------------------------------------------------------------------------------------------
# Run state.


@dataclass
class Run:
    cfg: Config
    args: argparse.Namespace
    out: Path
    device: torch.device
    tasks: tuple[str, ...]
    dataset: object
    info: object
    split: Split
    step: int = 0
    metrics_file: object = None

    def record(self, **row) -> None:
        row = {"time": round(time.time(), 3), **row}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()


def precision_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_context(run: Run, nets: MGMNets) -> schedule.StepContext:
    scaler = None
    if run.args.precision == "fp16":
        scaler = torch.amp.GradScaler(run.device.type)
    gen = torch.Generator(device="cpu").manual_seed(run.args.seed + 1)
    return schedule.StepContext(
        cfg=run.cfg,
        nets=nets,
        optimizers=schedule.build_optimizers(nets, run.cfg, run.device),
        augment=SimCLRAugment(),
        aug_generator=gen,
        autocast=precision_context(run.args.precision, run.device),
        scaler=scaler,
    )


def phase(run: Run, name: str, ctx: schedule.StepContext, step_fn, loader, epochs: int, weak=None) -> None:
    """Run ``step_fn`` over ``epochs`` epochs of ``loader`` (or ``max_steps``), with a progress bar
    (mean losses of the last log window, images/s, ETA) and a metrics.jsonl row every log window."""
    cfg = run.cfg
    steps_per_epoch = len(loader)
    total = steps_per_epoch * epochs
    if cfg.schedule.max_steps > 0:
        total = min(total, cfg.schedule.max_steps)
    if total == 0:
        return
    weak_iter = _forever(weak) if weak is not None else None
    bar = tqdm(total=total, desc=name, unit="step", disable=run.args.quiet, dynamic_ncols=True, file=sys.stdout)
    images, t0, done = 0, time.perf_counter(), 0
    while done < total:
        for batch in loader:
            if weak_iter is not None:
                step_fn(ctx, batch, next(weak_iter))
            else:
                step_fn(ctx, batch)
            done += 1
            run.step += 1
            images += batch["rgb"].shape[0]
            bar.update(1)
            if done % run.args.log_every == 0 or done == total:
                means = {k: float(v) for k, v in ctx.pop_means().items()}  # one sync per window
                for key, value in means.items():
                    if not torch.isfinite(torch.tensor(value)):
                        raise FloatingPointError(
                            f"{name}: loss {key} is {value} at step {run.step}; the run stops here"
                        )
                rate = images / max(time.perf_counter() - t0, 1e-9)
                run.record(phase=name, step=run.step, epoch=done // steps_per_epoch, images_per_s=rate, **means)
                bar.set_postfix({**{k.split("/")[-1] if k.startswith("mt/") else k: f"{v:.3f}"
                                    for k, v in means.items()}, "img/s": f"{rate:.0f}"})
            if done >= total:
                break
    bar.close()


def _forever(loader):
    while True:
        yield from loader


# ------------------------------------------------------------------------------------------
# Evaluation and samples.


@torch.no_grad()
def evaluate(run: Run, nets: MGMNets, loader, with_scene: bool) -> dict[str, float]:
    """Metrics of the multi-task network (and the scene accuracy of the refinement net) on the
    validation split, in eval mode (BatchNorm running statistics)."""
    nets.eval()
    tasks = (*nets.tasks, "scene") if with_scene else nets.tasks
    evaluator = MultiTaskEvaluator(tasks, run.info.num_seg_classes, run.info.num_scenes)
    for batch in loader:
        pred = nets.multitask(batch["rgb"])
        out = {k: v.float() for k, v in pred.items()}
        if with_scene:
            out["scene"] = nets.refine(**pred)
        if "normal" in out and run.cfg.schedule.normal_target == "released01":
            out["normal"] = out["normal"] * 2 - 1
        evaluator.update(out, batch)
    nets.train()
    return evaluator.compute()


@torch.no_grad()
def write_samples(run: Run, nets: MGMNets, loader, path: Path, per_scene: int = 6) -> None:
    """One row of generated images per scene class, G in eval mode, latent z + Mid(E(x)) with x
    real validation images (the phase-B conditioning)."""
    from PIL import Image

    nets.eval()
    real = next(iter(loader))["rgb"]
    rows = []
    for scene in range(run.info.num_scenes):
        x = real[torch.arange(per_scene) % real.shape[0]]
        y = torch.full((per_scene,), scene, dtype=torch.long, device=run.device)
        z = torch.randn(per_scene, run.cfg.model.z_dim, device=run.device)
        img = nets.generator(z + nets.bridge(nets.multitask.features(x)), y)
        rows.append(torch.cat(list(img), dim=2))  # (3, H, per_scene * W)
    nets.train()
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).clamp(0, 255).round().byte().permute(1, 2, 0).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)


# ------------------------------------------------------------------------------------------
# Main.


def default_out(args) -> Path:
    data = args.data.replace(":", "-").replace("/", "_").strip("_-")[:40]
    return Path("runs") / f"{args.method}-{data}-r{args.regime:g}-s{args.seed}"


def setup(args: argparse.Namespace) -> Run:
    cfg = resolve_config(args)
    tasks = parse_tasks(args.tasks)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    dataset, info = open_dataset(args.data, cfg.model.image_size)
    override(cfg, [f"model.num_seg_classes={info.num_seg_classes}", f"model.num_scenes={info.num_scenes}"])
    ids = [dataset.sample_id(i) if hasattr(dataset, "sample_id") else dataset[i]["id"] for i in range(len(dataset))]
    if args.split:
        split = Split.from_json(args.split, dataset_ids=ids)
    else:
        split = make_split(ids, args.seed, val_fraction=args.val_fraction, labelled_fraction=args.regime)
    out = Path(args.out) if args.out else default_out(args)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"method": args.method, "tasks": list(tasks), "data": args.data, "seed": args.seed,
                "regime": args.regime, "precision": args.precision, "config": to_dict(cfg)}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    split.to_json(out / "split.json")
    run = Run(cfg, args, out, device, tasks, dataset, info, split)
    run.metrics_file = open(out / "metrics.jsonl", "a")  # closed in main()
    return run


def train(run: Run) -> dict[str, float]:
    cfg, args, s = run.cfg, run.args, run.cfg.schedule
    bs = s.batch_size

    def loader_for(ids, shuffle=True, drop_last=True, keys=None):
        kw = {"keys": keys} if keys else {}
        return make_loader(run.dataset, ids, bs, run.device, args.seed, loader=args.loader,
                           shuffle=shuffle, drop_last=drop_last, **kw)

    labelled = loader_for(run.split.train_labelled)
    val = loader_for(run.split.val, shuffle=False, drop_last=False)
    print(f"run folder {run.out} | data {args.data}: {run.split.counts()} | loader {labelled.kind} | "
          f"device {run.device} | method {args.method}", flush=True)

    def build():
        nets = build_models(cfg.model, run.tasks).to(run.device)
        if args.channels_last:
            nets = nets.to(memory_format=torch.channels_last)
        return nets

    results: dict[str, dict[str, float]] = {}
    if args.method == "st":
        for task in run.tasks:
            nets = build_models(cfg.model, (task,)).to(run.device)
            ctx = make_context(run, nets)
            phase(run, f"st-{task}", ctx, schedule.supervised_step, labelled, s.epochs)
            results[f"st-{task}"] = evaluate(run, nets, val, with_scene=False)
        metrics = {k: v for r in results.values() for k, v in r.items()}
    else:
        nets = build()
        ctx = make_context(run, nets)
        if args.method == "mgm":
            phase(run, "gan-pretrain", ctx, schedule.gan_pretrain_step, labelled, s.gan_epochs)
            phase(run, "mgm", ctx, schedule.mgm_step, labelled, s.epochs)
        elif args.method == "mgm-light":
            weak = loader_for(run.split.train_weak, keys=("rgb", "scene"))
            phase(run, "mgm-light", ctx, schedule.mgm_light_step, labelled, s.epochs, weak=weak)
        else:
            phase(run, "mt", ctx, schedule.supervised_step, labelled, s.epochs)
        metrics = evaluate(run, nets, val, with_scene=args.method in ("mgm", "mgm-light"))
        if args.method == "mgm":
            write_samples(run, nets, val, run.out / "samples" / "final.png")
        torch.save({"config": to_dict(cfg), "step": run.step, "nets": nets.state_dict()},
                   run.out / "final_weights.pt")
    run.record(phase="eval", step=run.step, **metrics)
    (run.out / "eval.json").write_text(json.dumps(metrics, indent=2))
    table = format_table({args.method: metrics}, percent=True)
    (run.out / "eval.md").write_text(table + "\n")
    print(table)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = setup(args)
    try:
        train(run)
    finally:
        run.metrics_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

