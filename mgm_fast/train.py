"""``python -m mgm_fast.train``: train MGM or a baseline and evaluate it.

With no arguments: full MGM (GAN pre-training, then joint training) with the ``tiny`` preset on
the embedded synthetic dataset, on the CPU in a few minutes. Everything lands in the run folder:
``config.yaml`` (the resolved config and the execution record of the engine), ``split.json``
(the split manifest), ``metrics.jsonl`` (losses every ``--log-every`` steps, evaluations),
``samples/`` (generated images per scene class), ``checkpoints/`` and ``eval.json`` /
``eval.md`` (the final evaluation).

Methods (``--method``):
  mgm        GAN pre-training (phase A), then MGM joint training (phase B, steps 1-6)
  mgm-light  steps 1-3 on labelled data + refinement/SimCLR on weakly labelled real images
  mt         multi-task baseline: shared encoder, equal loss weights (step 1 only)
  st         single-task baselines: one network per task, each trained alone

Several processes (data parallel): torchrun --nproc_per_node=N -m mgm_fast.train ...
(NCCL on GPUs, gloo on the CPU; --batch-size is the global batch, split over the ranks).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image
from tqdm import tqdm

from mgm_fast.config import Config, from_dict, override, preset, to_dict
from mgm_fast.data.augment import SimCLRAugment
from mgm_fast.data.loader import make_loader
from mgm_fast.data.registry import SPEC_FORMS, open_dataset
from mgm_fast.data.splits import Split, make_split
from mgm_fast.engine import distributed, engines, schedule
from mgm_fast.engine.checkpoint import (
    CheckpointManager,
    RestoreReport,
    capture_rng,
    check_finite,
    load_checkpoint,
    restore,
    restore_rng,
)
from mgm_fast.engine.distributed import World
from mgm_fast.engine.engines import Execution
from mgm_fast.evaluate import evaluate_nets
from mgm_fast.metrics import METRIC_DIRECTIONS, delta_m, format_table
from mgm_fast.models import TASKS, MGMNets, build_models
from mgm_fast.ops import REGISTRY, conv2d, genblock
from mgm_fast.ops._verify import BackendVerificationError, backends_record, verify_for_run

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
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size, split over the torchrun ranks (default: preset)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--engine", default="fast", choices=list(engines.ENGINES),
                   help="how steps execute, never what they compute: fast (default: fused kernels, "
                        "on-device data and views, no per-step host syncs, channels_last, bf16 on "
                        "CUDA), reference (the released code's execution), or fast-<ingredient> "
                        "(fast with that ingredient as in reference); see mgm_fast/engine/engines.py")
    p.add_argument("--loader", default=None, choices=("auto", "memory", "dali", "torch"),
                   help="data loader (default: the engine's; auto = on-device memory when the data fits)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast precision, fp16 with a GradScaler (default: the engine's)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: the engine's)")
    p.add_argument("--views", default=None, choices=("batched", "per-sample"),
                   help="SimCLR views: one batched pass on the device, or per sample with PIL on "
                        "the CPU as released (default: the engine's)")
    p.add_argument("--strict-backends", action="store_true",
                   help="stop when a fused backend fails its first-use self-test on this device "
                        "(default: exclude it with a warning and use the next backend)")
    p.add_argument("--check-values", action="store_true",
                   help="debugging aid: ops check label and index values inside every step, on every "
                        "device (default: the loaders check labels once at the data boundary and a step "
                        "reads nothing back to the host)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=engines.COMPILE_MODES,
                   help="torch.compile every network: 'default' (inductor; what a bare --compile means), "
                        "'cudagraphs' (inductor + CUDA graph replay, mode reduce-overhead; CUDA only) or 'off' "
                        "(eager). The first steps are slower while compiling. Default: the engine's (fast: "
                        "cudagraphs on CUDA, off on the CPU; reference: off)")
    p.add_argument("--sync-bn", action="store_true",
                   help="torchrun: BatchNorm statistics over the global batch (default: per rank)")
    p.add_argument("--on-nonfinite", default="stop", choices=("stop", "skip"),
                   help="a NaN/inf loss stops the run (checked every log window) or skips that "
                        "sub-step's update (one host sync per sub-step)")
    p.add_argument("--log-every", type=int, default=10, help="log the mean losses every N steps")
    p.add_argument("--ckpt-every", type=int, default=200,
                   help="checkpoint every N steps and at the end of every phase (0: phase ends only)")
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints kept besides the best")
    p.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="evaluate the validation split every N steps of joint training and keep "
                        "checkpoints/best.pt by delta-m (0: evaluate at the end only)")
    p.add_argument("--baseline", default=None, metavar="RUN_DIR_OR_JSON",
                   help="single-task run (folder or eval.json) that delta-m is measured against "
                        "(default: the run's first evaluation)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its latest complete checkpoint "
                        "(its own options are reused; other options are ignored)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="checkpoint and stop after this global step (continue with --resume)")
    p.add_argument("--out", default=None, help="run folder (default runs/<method>-<data>-r<regime>-s<seed>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.refine_logit_relu=false")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_run(args: argparse.Namespace, device: torch.device) -> tuple[Config, Execution]:
    """The run's config and execution record, from its command line and device: the one place
    where ``--engine`` is resolved.

    Precedence, lowest first: the preset; the engine's backends (:meth:`Engine.configure`);
    ``--set``; ``--batch-size`` / ``--epochs`` / ``--gan-epochs`` / ``--steps``. The record takes
    the engine's ingredients unless ``--loader`` / ``--precision`` / ``--channels-last`` /
    ``--views`` name one, and the backends from the config so resolved. The dataset's class
    counts enter the config later (:func:`setup`), once the data is open."""
    engine = engines.get(args.engine)
    cfg = override(engine.configure(preset(args.preset)), list(args.set))
    schedule_options = {"batch_size": args.batch_size, "epochs": args.epochs, "gan_epochs": args.gan_epochs,
                        "max_steps": args.steps}
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(
        cfg.schedule, **{k: v for k, v in schedule_options.items() if v is not None}))
    compile = args.compile
    if isinstance(compile, bool):  # the saved options of a run from when --compile was a flag
        compile = "default" if compile else "off"
    try:
        execution = engine.execution(cfg, device, loader=args.loader, precision=args.precision,
                                     channels_last=args.channels_last, views=args.views, compile=compile)
    except ValueError as err:
        raise SystemExit(f"error: --compile: {err}") from None
    return cfg, execution


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise SystemExit(f"--tasks: expected a subset of {','.join(TASKS)}, got {text!r}")
    return tasks


# ------------------------------------------------------------------------------------------
# Run state.


class StopRequested(Exception):
    """--stop-at reached: the run was checkpointed and can be continued with --resume."""


@dataclass
class Run:
    cfg: Config
    execution: Execution
    """How this run executes (the resolved engine); every builder below reads it."""
    args: argparse.Namespace
    out: Path
    device: torch.device
    tasks: tuple[str, ...]
    dataset: object
    info: object
    split: Split
    step: int = 0
    world: World = distributed.SINGLE
    metrics_file: object = None
    manager: CheckpointManager | None = None
    verdicts: dict = dataclasses.field(default_factory=dict)
    backends_reported: set = dataclasses.field(default_factory=set)  # (op, "<device> <dtype>") printed
    resumed: RestoreReport | None = None
    resume_ckpt: dict | None = None
    baseline: dict | None = None

    def record(self, **row) -> None:
        """Append a row to metrics.jsonl (rank 0 only; other ranks have no file)."""
        if self.metrics_file is None:
            return
        row = {"time": round(time.time(), 3), **row}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()

    def say(self, text: str) -> None:
        if self.world.is_main:
            print(text, flush=True)


def verify_backends(run: Run) -> None:
    """First-use verification of every fused backend this run may pick on its device (cached per
    device, versions and source; mgm_fast/ops/_verify.py): a failing one is excluded with a
    warning, or stops the run under --strict-backends. Writes backends.json."""
    dtypes = [torch.float32, *{"bf16": [torch.bfloat16], "fp16": [torch.float16]}.get(run.execution.precision, [])]
    for op in REGISTRY.values():  # this run's own verdicts and record (several runs may share a process)
        op.reset_run_record()
    try:
        run.verdicts = verify_for_run(run.device, tuple(dtypes), strict=run.args.strict_backends,
                                      log=lambda text: print(text, file=sys.stderr, flush=True))
    except BackendVerificationError as err:
        raise SystemExit(f"error: {err}") from None
    checked = [v for per_op in run.verdicts.values() for v in per_op.values()]
    excluded = [f"{v.op}/{v.backend}" for v in checked if not v.passed]
    fresh = [v for v in checked if not v.cached]
    run.say(f"fused backends on {run.device}: {len(checked) - len(excluded)} verified"
            f"{f' ({len(fresh)} self-tested now, {sum(v.seconds for v in fresh):.1f} s)' if fresh else ' (cached)'}"
            f"{', excluded: ' + ', '.join(excluded) if excluded else ''}")
    write_backends(run)


def write_backends(run: Run) -> None:
    """backends.json: per op the verification verdicts, what auto picks on this device and why not
    the others, and the backend every call so far resolved to (rank 0)."""
    if run.world.is_main:
        record = backends_record(run.device, run.verdicts)
        (run.out / "backends.json").write_text(json.dumps(record, indent=1, default=str))


def report_backends(run: Run, phase_name: str) -> None:
    """After a phase's first logged window: print the backends its steps used that no earlier
    phase did, and rewrite backends.json."""
    write_backends(run)
    new = []
    for name, op in sorted(REGISTRY.items()):
        for kind, how in op.resolutions.items():
            if (name, kind) not in run.backends_reported:
                run.backends_reported.add((name, kind))
                new.append(f"{name} {how['backend']} ({kind})")
    if new:
        run.say(f"{phase_name} uses: {', '.join(new)} (why, in {run.out / 'backends.json'})")


def precision_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_context(run: Run, nets: MGMNets) -> schedule.StepContext:
    execution = run.execution
    scaler = None
    if execution.precision == "fp16":
        scaler = torch.amp.GradScaler(run.device.type)
    # The views' parameters are drawn on the images' device (no host-to-device copy in a step);
    # a run resumed from a checkpoint that drew them on the CPU keeps doing so.
    aug_device = _saved_generator_device(run, "augment") or run.device
    gen = torch.Generator(device=aug_device).manual_seed(run.world.seed_for(run.args.seed + 1))
    noise_gen = torch.Generator(device=run.device).manual_seed(run.world.seed_for(run.args.seed + 2))
    return schedule.StepContext(
        cfg=run.cfg,
        nets=nets,
        optimizers=schedule.build_optimizers(nets, run.cfg),
        augment=SimCLRAugment(),
        aug_generator=gen,
        noise_generator=noise_gen,
        autocast=precision_context(execution.precision, run.device),
        scaler=scaler,
        world=run.world,
        on_nonfinite=run.args.on_nonfinite,
        views=execution.views,
        readback=execution.readback,
        autograd=execution.autograd,
        check_values=run.args.check_values,
        cuda_graphs=execution.compile == "cudagraphs",
    )


def _saved_generator_device(run: Run, name: str) -> torch.device | None:
    """Device of the named generator in the checkpoint being resumed (None: no resume)."""
    if run.resume_ckpt is None:
        return None
    entry = run.resume_ckpt.get("rng", {}).get("generators", {}).get(name, {})
    return torch.device(entry["device"]) if "device" in entry else None


def phase(run: Run, index: int, name: str, ctx: schedule.StepContext, step_fn, loader, epochs: int,
          weak=None, results: dict | None = None, validate=None) -> bool:
    """Run ``step_fn`` over ``epochs`` epochs of ``loader`` (or ``max_steps``), with a progress bar
    (mean losses of the last log window, images/s, ETA), a metrics.jsonl row every log window and
    a checkpoint every ``--ckpt-every`` steps and at the end. ``index`` orders the phases of a
    run: a resumed run skips the phases its checkpoint finished and continues the one it was in.
    ``validate()`` (rank 0), when given, runs every ``--eval-every`` steps and at the end; its
    metrics rank the checkpoint saved there (best.pt by delta-m). Returns False when the phase
    was skipped (a resumed run had finished it).
    """
    cfg = run.cfg
    steps_per_epoch = len(loader)
    total = steps_per_epoch * epochs
    if cfg.schedule.max_steps > 0:
        total = min(total, cfg.schedule.max_steps)
    done = 0
    if run.resume_ckpt is not None:
        extra = run.resume_ckpt["extra"]
        if extra["phase_index"] > index:
            return False  # finished before the interruption
        if extra["phase_index"] == index:
            done = resume_into(run, ctx, loader, weak)
    if done >= total:
        return True
    weak_iter = _forever(weak) if weak is not None else None
    bar = tqdm(total=total, initial=done, desc=name, unit="step",
               disable=run.args.quiet or not run.world.is_main, dynamic_ncols=True, file=sys.stdout)
    images, t0 = 0, time.perf_counter()
    while done < total:
        for batch in loader:
            if weak_iter is not None:
                schedule.execute(step_fn, ctx, batch, next(weak_iter))
            else:
                schedule.execute(step_fn, ctx, batch)
            done += 1
            run.step += 1
            images += batch["rgb"].shape[0] * run.world.world_size
            bar.update(1)
            if done % run.args.log_every == 0 or done == total:
                # One host sync per window (and one all-reduce across ranks).
                means = {k: float(v) for k, v in distributed.average_scalars(ctx.pop_means(), run.world).items()}
                check_finite(means, run.step, run.manager.last_saved if run.manager else None, where=name)
                rate = images / max(time.perf_counter() - t0, 1e-9)
                skipped = {"skipped": dict(ctx.skipped)} if ctx.skipped else {}
                run.record(phase=name, step=run.step, epoch=done // steps_per_epoch, images_per_s=rate,
                           **means, **skipped)
                if done == run.args.log_every or done == total:
                    report_backends(run, name)
                bar.set_postfix({**{k.split("/")[-1] if k.startswith("mt/") else k: f"{v:.3f}"
                                    for k, v in means.items()}, "img/s": f"{rate:.0f}"})
            stop = run.args.stop_at is not None and run.step >= run.args.stop_at
            every, eval_every = run.args.ckpt_every, run.args.eval_every
            scores = None
            if validate is not None and (done == total or (eval_every and run.step % eval_every == 0)):
                scores = validation(run, name, validate)
            if scores is not None or done == total or stop or (every and run.step % every == 0):
                save(run, index, name, done, ctx, loader, weak, results, scores)
            if stop:
                bar.close()
                raise StopRequested(run.step)
            if done >= total:
                break
    bar.close()
    return True


def validation(run: Run, name: str, validate) -> dict | None:
    """Evaluate on rank 0 (the other ranks wait), log the metrics and their delta-m.

    delta-m is measured against ``--baseline`` (a single-task run) when given, else against the
    run's first evaluation; only the metrics both sides have count. Returns the metrics with
    ``delta_m`` on rank 0, None on the others."""
    scores = None
    if run.world.is_main:
        metrics = validate()
        if run.baseline is None:
            run.baseline = dict(metrics)
        keys = [k for k in metrics if k in run.baseline and k in METRIC_DIRECTIONS and run.baseline[k] != 0]
        scores = {**metrics, "delta_m": delta_m(metrics, run.baseline, keys=keys)}
        run.record(phase=f"{name}/val", step=run.step, **scores)
    distributed.barrier(run.world)
    return scores


def save(run: Run, index: int, name: str, done: int, ctx, loader, weak, results, scores=None) -> None:
    """Checkpoint everything needed to continue bit-exactly: nets, the six optimisers, scaler,
    RNG states (global + augmentation generator, of every rank), loader positions, unlogged loss
    sums, the cpp GenBlock's convolution algorithm per shape. Collective under torchrun (every rank's RNG state is gathered); rank 0 writes."""
    data_state = {"labelled": loader.state_dict()}
    if weak is not None:
        data_state["weak"] = weak.state_dict()
    rng = capture_rng(_generators(ctx))
    rng_per_rank = distributed.gather_objects(distributed.to_cpu(rng), run.world)
    if not run.world.is_main:
        return
    run.manager.save(
        step=run.step, epoch=done // max(len(loader), 1), phase=name, config=to_dict(run.cfg),
        modules={"nets": ctx.nets}, optimizers=ctx.optimizers, scaler=ctx.scaler,
        rng=rng, data_state=data_state, metrics=scores,
        extra={"phase_index": index, "phase_done": done, "run_step": run.step,
               "totals": dict(ctx.totals), "counts": dict(ctx.counts), "skipped": dict(ctx.skipped),
               "results": results or {}, "world_size": run.world.world_size,
               "rng_per_rank": rng_per_rank if run.world.enabled else [],
               "baseline": run.baseline, "genblock_algorithms": genblock.chosen_algorithms(),
               "conv2d_algorithms": conv2d.chosen_algorithms()},
    )


def _generators(ctx: schedule.StepContext) -> dict:
    """The run's own generators, checkpointed with the global RNG states."""
    return {"augment": ctx.aug_generator, "noise": ctx.noise_generator}


def resume_into(run: Run, ctx, loader, weak) -> int:
    """Restore the checkpoint into this phase's objects; returns the steps already done."""
    ckpt = run.resume_ckpt
    saved_world = ckpt["extra"].get("world_size", 1)
    if saved_world != run.world.world_size:
        raise SystemExit(f"--resume: the checkpoint was written by {saved_world} process(es); resume it "
                         f"with the same number (now {run.world.world_size})")
    report = restore(ckpt, {"nets": ctx.nets}, ctx.optimizers, ctx.scaler, _generators(ctx))
    if run.world.enabled:
        restore_rng(report.extra["rng_per_rank"][run.world.rank], _generators(ctx))
    loader.load_state_dict(report.data_state["labelled"])
    if weak is not None:
        weak.load_state_dict(report.data_state["weak"])
    extra = report.extra
    # the convolution algorithms (GenBlocks', plain layers') of the run this one continues, not a
    # new timing's
    genblock.restore_algorithms(extra.get("genblock_algorithms", []))
    conv2d.restore_algorithms(extra.get("conv2d_algorithms", []))
    ctx.totals, ctx.counts = dict(extra["totals"]), dict(extra["counts"])
    ctx.skipped = dict(extra.get("skipped", {}))
    run.baseline = run.baseline or extra.get("baseline")
    run.step = extra["run_step"]
    run.resumed = report
    run.resume_ckpt = None  # consumed: later phases start fresh
    return extra["phase_done"]


def _forever(loader):
    while True:
        yield from loader


# ------------------------------------------------------------------------------------------
# Evaluation and samples.


def evaluate(run: Run, nets: MGMNets, loader, with_scene: bool) -> dict[str, float]:
    """Metrics on the validation split (mgm_fast.evaluate.evaluate_nets)."""
    return evaluate_nets(nets, loader, run.info.num_seg_classes, run.info.num_scenes, with_scene,
                         run.cfg.schedule.normal_target)


@torch.no_grad()
def write_samples(run: Run, nets: MGMNets, path: Path, per_scene: int = 6) -> None:
    """One row of generated images per scene class; latent z + Mid(E(x)) with x real validation
    images (the phase-B conditioning), E and Mid in eval mode.

    G runs on a copy in training mode (batch statistics): its conditional BatchNorms use the
    released momentum 0.001, so their running statistics are still close to their initial
    values after a short run and eval-mode samples would not show what G has learnt. The copy
    keeps the run's own BN statistics and spectral-norm vectors untouched.
    """
    nets.eval()
    generator = distributed.local_copy(nets.generator).train()
    # A loader of its own: pulling a batch from the shared validation loader would leave it
    # mid-epoch and the next evaluation would see only the rest of the split.
    first = loader_for(run, run.split.val[:per_scene], shuffle=False, drop_last=False, sharded=False)
    real = next(iter(first))["rgb"]
    rows = []
    for scene in range(run.info.num_scenes):
        x = real[torch.arange(per_scene) % real.shape[0]]
        y = torch.full((per_scene,), scene, dtype=torch.long, device=run.device)
        z = torch.randn(per_scene, run.cfg.model.z_dim, device=run.device)
        img = generator(z + nets.bridge(nets.multitask.features(x)), y)
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


def load_baseline(spec: str) -> dict[str, float]:
    """Metrics of a single-task run: its folder (eval.json inside) or an eval.json file."""
    path = Path(spec)
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise SystemExit(f"--baseline {spec}: no such run folder or eval.json ({path} does not exist)")
    return {k: float(v) for k, v in json.loads(path.read_text()).items()}


def setup(args: argparse.Namespace, world: World, device: torch.device) -> Run:
    resume_ckpt = saved_run = None
    if args.resume:
        run_dir = Path(args.resume)
        saved_run = yaml.safe_load((run_dir / "config.yaml").read_text())
        stop_at = args.stop_at
        args = argparse.Namespace(**{**_new_option_defaults(), **saved_run["args"], "resume": str(run_dir),
                                     "out": str(run_dir), "stop_at": stop_at,
                                     "split": str(run_dir / "split.json")})
        # Rank 0 picks the checkpoint (and may finish an interrupted best.pt update); the
        # other ranks load the same file.
        path = None
        if world.is_main:
            resume_ckpt = CheckpointManager(run_dir / "checkpoints").load_latest()
            path = None if resume_ckpt is None else resume_ckpt["_path"]
        path = distributed.gather_objects(path, world)[0]
        if path is None:
            raise SystemExit(f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
        if resume_ckpt is None:
            resume_ckpt = load_checkpoint(path)
    cfg, execution = resolve_run(args, device) if saved_run is None else saved_record(saved_run, args, device)
    tasks = parse_tasks(args.tasks)
    if cfg.schedule.batch_size % world.world_size:
        raise SystemExit(f"--batch-size {cfg.schedule.batch_size} (global) is not divisible by the "
                         f"{world.world_size} torchrun processes")
    if execution.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    dataset, info = open_dataset(args.data, cfg.model.image_size)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_seg_classes=info.num_seg_classes,
                                                             num_scenes=info.num_scenes))
    ids = [dataset.sample_id(i) for i in range(len(dataset))]
    if args.split:
        split = Split.from_json(args.split, dataset_ids=ids)
    else:
        split = make_split(ids, args.seed, val_fraction=args.val_fraction, labelled_fraction=args.regime)
    out = Path(args.out) if args.out else default_out(args)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if resume_ckpt is None and world.is_main:
        saved_args = {k: v for k, v in vars(args).items() if k not in ("resume", "stop_at")}
        resolved = {"method": args.method, "tasks": list(tasks), "data": args.data, "seed": args.seed,
                    "regime": args.regime, **execution.to_dict(), "args": saved_args, "config": to_dict(cfg)}
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        split.to_json(out / "split.json")
    run = Run(cfg, execution, args, out, device, tasks, dataset, info, split, world=world, resume_ckpt=resume_ckpt)
    if args.baseline:
        run.baseline = load_baseline(args.baseline)
    if world.is_main:
        run.manager = CheckpointManager(out / "checkpoints", keep_last=args.keep_last,
                                        keep_best=args.eval_every > 0)
        run.metrics_file = open(out / "metrics.jsonl", "a")  # closed in main()
    if resume_ckpt is not None:
        run.say(f"resuming {out} from {resume_ckpt['_path']} (step {resume_ckpt['step']})")
    return run


def saved_record(saved_run: dict, args: argparse.Namespace, device: torch.device) -> tuple[Config, Execution]:
    """The config and execution record of a run folder's ``config.yaml`` (``saved_run``), for
    ``--resume``. A ``config.yaml`` written before the record was complete has only some of its
    fields (no readback, autograd, backends, compile); its run is resolved again from its saved
    options ``args``, which there hold the loader, precision, channels_last and views the run
    resolved, so it continues as it started."""
    execution = Execution.from_dict(saved_run)
    if execution is None:
        _, execution = resolve_run(args, device)
    return from_dict(saved_run["config"]), execution


def _new_option_defaults() -> dict:
    """Defaults of every option, for resuming runs whose config.yaml predates some of them."""
    return vars(build_parser().parse_args([]))


def loader_for(run: Run, ids, shuffle=True, drop_last=True, keys=None, sharded=True):
    """A loader over ``ids`` of the run's dataset: this rank's shard of the global batch
    (``sharded``), or the whole batch on every rank (validation)."""
    s, world = run.cfg.schedule, run.world
    kw = {"keys": keys} if keys else {}
    if sharded:
        kw.update(rank=world.rank, world_size=world.world_size)
    batch = s.batch_size // world.world_size if sharded else s.batch_size
    loader = make_loader(run.dataset, ids, batch, run.device, run.args.seed, loader=run.execution.loader,
                         shuffle=shuffle, drop_last=drop_last, **kw)
    # The data boundary of the steps' label checks (the ops skip theirs inside a step).
    uses_scenes = run.args.method in ("mgm", "mgm-light")
    loader.require_labels(num_scenes=run.info.num_scenes if uses_scenes else None,
                          num_seg_classes=run.info.num_seg_classes if "seg" in run.tasks else None)
    return loader


def build_nets(run: Run, tasks: tuple[str, ...] | None = None) -> MGMNets:
    """The networks on the run's device and memory format, identical on every rank (broadcast
    from rank 0), then this rank's own random stream (seed offset per rank)."""
    args, world = run.args, run.world
    nets = build_models(run.cfg.model, tasks or run.tasks).to(run.device)
    if run.execution.channels_last:
        nets = nets.to(memory_format=torch.channels_last)
    if args.sync_bn:
        distributed.convert_sync_batchnorm(nets, world)
    distributed.broadcast_module(nets, world)
    if world.rank > 0:
        torch.manual_seed(world.seed_for(args.seed))
    if run.execution.compile != "off":
        compile_nets(nets, mode=run.execution.compile)
    return nets


def train(run: Run) -> dict[str, float]:
    cfg, args, execution, s, world = run.cfg, run.args, run.execution, run.cfg.schedule, run.world
    labelled = loader_for(run, run.split.train_labelled)
    val = loader_for(run, run.split.val, shuffle=False, drop_last=False, sharded=False)
    ranks = f" | {world.world_size} processes x batch {s.batch_size // world.world_size}" if world.enabled else ""
    run.say(f"run folder {run.out} | data {args.data}: {run.split.counts()} | loader {labelled.kind} | "
            f"device {run.device} | method {args.method} | engine {execution.engine} ({execution.precision}"
            f"{', channels_last' if execution.channels_last else ''}"
            f"{'' if execution.compile == 'off' else ', compiled ' + execution.compile}){ranks}")
    verify_backends(run)

    def validate_fn(nets, with_scene):
        if args.eval_every <= 0 and args.baseline is None:
            return None  # only the final evaluation
        return lambda: evaluate(run, nets, val, with_scene)

    results: dict[str, dict[str, float]] = {}
    if run.resume_ckpt is not None:
        results = dict(run.resume_ckpt["extra"]["results"])
    if args.method == "st":
        for index, task in enumerate(run.tasks):
            if f"st-{task}" in results:
                continue  # trained and evaluated before the interruption
            nets = build_nets(run, (task,))
            ctx = make_context(run, nets)
            phase(run, index, f"st-{task}", ctx, schedule.supervised_step, labelled, s.epochs, results=results)
            results[f"st-{task}"] = evaluate(run, nets, val, with_scene=False) if world.is_main else {}
        metrics = {k: v for r in results.values() for k, v in r.items()}
    else:
        nets = build_nets(run)
        ctx = make_context(run, nets)
        with_scene = args.method in ("mgm", "mgm-light")
        validate = validate_fn(nets, with_scene)
        if args.method == "mgm":
            ran = phase(run, 0, "gan-pretrain", ctx, schedule.gan_pretrain_step, labelled, s.gan_epochs)
            if ran and world.is_main:
                write_samples(run, nets, run.out / "samples" / "gan-pretrain.png")
            phase(run, 1, "mgm", ctx, schedule.mgm_step, labelled, s.epochs, validate=validate)
        elif args.method == "mgm-light":
            weak = loader_for(run, run.split.train_weak, keys=("rgb", "scene"))
            phase(run, 0, "mgm-light", ctx, schedule.mgm_light_step, labelled, s.epochs, weak=weak,
                  validate=validate)
        else:
            phase(run, 0, "mt", ctx, schedule.supervised_step, labelled, s.epochs, validate=validate)
        if not world.is_main:
            distributed.barrier(world)  # rank 0 evaluates and writes
            return {}
        metrics = evaluate(run, nets, val, with_scene=with_scene)
        if args.method == "mgm":
            write_samples(run, nets, run.out / "samples" / "final.png")
        torch.save({"config": to_dict(cfg), "step": run.step, "nets": nets.state_dict()},
                   run.out / "final_weights.pt")
    if not world.is_main:
        distributed.barrier(world)
        return {}
    run.record(phase="eval", step=run.step, **metrics)
    write_backends(run)
    (run.out / "eval.json").write_text(json.dumps(metrics, indent=2))
    table = format_table({args.method: metrics}, percent=True)
    (run.out / "eval.md").write_text(table + "\n")
    print(table)
    distributed.barrier(world)
    return metrics


def compile_nets(nets: MGMNets, backend: str = "inductor", mode: str = "default") -> None:
    """torch.compile each network in place (``Module.compile``: state-dict keys unchanged, so
    checkpoints are the same as without it). Every network is compiled on its own because the
    schedule calls them separately, with different parameters trainable per sub-step.

    ``fullgraph=True``: each network's forward is one graph -- the fused ops are custom ops with
    fake kernels and their backend choice is trace-safe (:mod:`mgm_fast.ops._dispatch`) -- so a
    graph break is an error here rather than a silent slowdown. ``dynamic=False``: shapes are
    fixed per run (drop_last loaders); each sub-step's trainability, grad mode and train/eval
    mode is its own graph, compiled once in the first steps. ``backend``: torch.compile's (tests
    use "aot_eager": graph capture and AOTAutograd without inductor's code generation).

    ``mode="cudagraphs"`` (inductor only) compiles with ``mode="reduce-overhead"``: each graph,
    forward and backward, is recorded once as a CUDA graph and replayed, one launch for all its
    kernels. What makes the networks replayable: nothing in them reads a value back to the host;
    their state changes in place at fixed addresses (BatchNorm statistics, the spectral-norm
    vectors, Adam's updates of the weights); the first call of each graph runs without recording,
    so cuDNN's and the fused ops' one-time algorithm timing is done before a graph is recorded;
    and every step starts with ``torch.compiler.cudagraph_mark_step_begin()``
    (:func:`mgm_fast.engine.schedule.execute`), after which the outputs of the previous step's
    replays may be overwritten."""
    if mode not in ("default", "cudagraphs"):
        raise ValueError(f"compile_nets: mode {mode!r} is not 'default' or 'cudagraphs'")
    options = {"mode": "reduce-overhead"} if mode == "cudagraphs" else {}
    mt = nets.multitask
    for module in [mt.encoder, *mt.decoders.values(), mt.clr_head, nets.refine, nets.bridge,
                   nets.generator, nets.discriminator]:
        module.compile(backend=backend, dynamic=False, fullgraph=True, **options)


def _is_compile_error(err: BaseException) -> bool:
    """Whether ``err`` is torch.compile's (dynamo or its backend failing), without importing the
    compiler into runs that never compile."""
    exc = sys.modules.get("torch._dynamo.exc")
    return exc is not None and isinstance(err, exc.TorchDynamoException)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world, device = distributed.init_from_env(args.device)
    try:
        run = setup(args, world, device)
        try:
            train(run)
        except StopRequested as stop:
            run.say(f"stopped after step {stop.args[0]}; continue with: python -m mgm_fast.train --resume {run.out}")
        except FloatingPointError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        except Exception as err:
            if not _is_compile_error(err):
                raise
            # compilation runs in the first steps; its failure names the way back to eager
            cause = getattr(err, "inner_exception", None) or err.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(err).__name__}: {err}"
            print(f"error: compiling the networks (--compile {run.execution.compile}) failed: "
                  f"{reason.splitlines()[0] if reason else ''}\nstart again with --compile off to train eager",
                  file=sys.stderr, flush=True)  # fmt: skip
            return 2
        finally:
            if run.metrics_file is not None:
                run.metrics_file.close()
    finally:
        distributed.shutdown(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())

