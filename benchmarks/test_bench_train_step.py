"""End to end: MGM joint-training steps (docs/method.md 3.2, steps 1-6) per engine, data loading
and SimCLR views included, with the same seed and config for every engine.

Rows: ``reference`` (the released code's execution, the baseline), ``fast``, the ablations
``fast-<ingredient>`` (fast with that one ingredient as in reference), so the report shows what
each ingredient is worth, and on the CPU ``fast+bf16`` (``--precision bf16``: the fast engine
keeps fp32 on the CPU by default; bf16 autocast is the opt-in, worth it on CPUs with native
bf16 instructions), and ``fast+compile`` (``--compile``: every network torch.compiled with
``fullgraph=True``). On CUDA ``fast`` itself is compiled with CUDA graph replay (the engine's
default there), ``fast-eager`` is the same engine with ``--compile off``, and the ablation rows
run eager (``--compile off``: each is ``fast-eager`` with one ingredient as in reference), so
that they measure their ingredient and not minutes of compilation each. Compilation, CUDA graph
recording and autotuning happen in the warm-up steps (``warmup_steps``), timed apart
(``warmup_s`` in the report's extra info), not in the timed rounds. One timed round = ``STEPS``
consecutive steps pulled from the engine's own loader, ending with one read-back of the logged
losses (the work is finished when the round ends; on CUDA run with ``--benchmark-timer
mgm_fast.benchtools.synced_timer``).

CPU: tiny preset, batch 8, 64x64, and (``test_bench_mgm_step_paper_cpu``, when benchmarking)
``reference`` and ``fast`` at the paper preset, batch 4, 128x128 -- the paper's networks, whose
wide GenBlocks the tiny preset does not have. CUDA: paper preset, batch 32, 128x128. ``flops`` in the
report is the model FLOPs of one step counted on the reference engine (torch's FLOP counter:
convolutions and matmuls, forward and backward), so MFU compares engines on the same work.

    pytest benchmarks/test_bench_train_step.py --benchmark-group-by=group

The engine comparison alone (what ``benchmarks/gpu_suite.sh`` times first; on CUDA the paper
preset, ``reference`` as released in fp32 against ``fast`` in bf16) is the two node ids
``benchmarks/test_bench_train_step.py::test_bench_mgm_step[reference]`` and ``...[fast]``.
"""

from __future__ import annotations

import argparse
import time

import pytest
import torch

from benchmarks.conftest import record_rate
from mgm_fast import train
from mgm_fast.engine import engines, schedule
from mgm_fast.engine.distributed import SINGLE

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PRESET, BATCH = ("paper", 32) if CUDA else ("tiny", 8)
STEPS = 4
ROWS = list(engines.ENGINES) + (["fast-eager"] if CUDA else ["fast+compile", "fast+bf16"])
VARIANTS = {"fast+compile": ("fast", ["--compile"]), "fast+bf16": ("fast", ["--precision", "bf16"]),
            "fast-eager": ("fast", ["--compile", "off"])}
"""Rows that are an engine plus command-line options: name -> (engine, extra arguments)."""


def _row_args(row: str) -> tuple[str, list[str]]:
    """(engine, extra arguments) of a row; on CUDA the ablation rows run eager."""
    engine, extra = VARIANTS.get(row, (row, []))
    if CUDA and row.startswith("fast-") and row in engines.ENGINES:
        extra = [*extra, "--compile", "off"]
    return engine, extra


PAPER_CPU_BATCH, PAPER_CPU_STEPS = 4, 2
"""The paper-preset rows on the CPU: a step of the paper's networks takes seconds there."""


def _prepare(row: str, out, preset: str = PRESET, batch: int = BATCH):
    engine, extra = _row_args(row)
    args = train.build_parser().parse_args([
        "--engine", engine, "--preset", preset, "--data", f"synthetic:{batch * 12}", "--batch-size", str(batch),
        "--device", DEVICE, "--quiet", "--out", str(out), "--regime", "1.0", *extra,
    ])
    run = train.setup(args, SINGLE, torch.device(DEVICE))
    run.metrics_file.close()
    run.metrics_file = None
    nets = train.build_nets(run)
    ctx = train.make_context(run, nets)
    loader = train.loader_for(run, run.split.train_labelled)
    return run, ctx, _forever(loader)


def _forever(loader):
    while True:
        yield from loader


def _steps(ctx: schedule.StepContext, batches, count: int) -> float:
    for _ in range(count):
        schedule.execute(schedule.mgm_step, ctx, next(batches))
    means = ctx.pop_means()
    return float(sum(means.values()))  # one read-back: the round's work is done


_FLOPS: dict[str, int] = {}


def _model_flops(tmp_path_factory) -> int:
    """FLOPs of one MGM step (reference engine), from torch's FLOP counter: counted once per
    process (it builds a reference run and takes two steps), shared by every row."""
    from torch.utils.flop_counter import FlopCounterMode

    if "step" not in _FLOPS:
        _, ctx, batches = _prepare("reference", tmp_path_factory.mktemp("flops"))
        _steps(ctx, batches, 1)  # first step allocates optimiser state
        counter = FlopCounterMode(display=False)
        with counter:
            _steps(ctx, batches, 1)
        _FLOPS["step"] = counter.get_total_flops()
    return _FLOPS["step"]


@pytest.mark.parametrize("engine", ROWS)
def test_bench_mgm_step(benchmark, engine, tmp_path, tmp_path_factory):
    disabled = benchmark.disabled
    if disabled and engine not in ("reference", "fast"):
        pytest.skip("ablation rows run only when benchmarking (CI runs reference and fast once)")
    run, ctx, batches = _prepare(engine, tmp_path / engine)
    steps = 1 if disabled else STEPS
    # warm-up: optimiser state, Triton/cuDNN autotuning, allocator; compiled networks compile in
    # the first step, and with CUDA graphs run unrecorded in it, are recorded in the second and
    # replayed from the third on
    compiled = run.execution.compile != "off"
    warmup_steps = 0 if disabled else (1 if not compiled else 2 if run.execution.compile == "default" else 3)
    start = time.perf_counter()
    if warmup_steps:
        _steps(ctx, batches, warmup_steps)
    warmup_s = time.perf_counter() - start
    benchmark.group = f"MGM step end to end, {DEVICE}, {PRESET} preset, batch {BATCH}, {STEPS} steps/round"
    value = benchmark.pedantic(_steps, args=(ctx, batches, steps), rounds=1 if disabled else 3, iterations=1)
    assert value == value, "non-finite losses"  # NaN check: the engines must train
    extra = dict(engine=engine, baseline=engine == "reference", device=DEVICE, preset=PRESET, batch=BATCH,
                 warmup_steps=warmup_steps, warmup_s=round(warmup_s, 3),
                 **{k: getattr(run.execution, k) for k in ("precision", "channels_last", "loader", "views", "readback",
                                                           "autograd", "adam", "loss_impl", "genblock_impl", "compile")})
    if not disabled:
        extra["flops"] = _model_flops(tmp_path_factory) * STEPS
    record_rate(benchmark, BATCH * steps, "images", **extra)


@pytest.mark.skipif(CUDA, reason="on CUDA every row is at the paper preset")
@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_bench_mgm_step_paper_cpu(benchmark, engine, tmp_path):
    if benchmark.disabled:
        pytest.skip("paper-preset CPU rows run only when benchmarking (a step takes seconds)")
    run, ctx, batches = _prepare(engine, tmp_path / engine, "paper", PAPER_CPU_BATCH)
    start = time.perf_counter()
    _steps(ctx, batches, 1)  # warm-up: optimiser state, the GenBlocks' one-time algorithm timing
    warmup_s = time.perf_counter() - start
    benchmark.group = (f"MGM step end to end, cpu, paper preset, batch {PAPER_CPU_BATCH}, "
                       f"{PAPER_CPU_STEPS} steps/round")  # fmt: skip
    value = benchmark.pedantic(_steps, args=(ctx, batches, PAPER_CPU_STEPS), rounds=3, iterations=1)
    assert value == value, "non-finite losses"
    record_rate(benchmark, PAPER_CPU_BATCH * PAPER_CPU_STEPS, "images", engine=engine, baseline=engine == "reference",
                device="cpu", preset="paper", batch=PAPER_CPU_BATCH, warmup_steps=1, warmup_s=round(warmup_s, 3),
                **{k: getattr(run.execution, k) for k in ("precision", "channels_last", "genblock_impl", "compile")})


def test_engine_rows_cover_every_engine():
    ablations = [e for e in ROWS if e in engines.ENGINES][2:]
    assert ROWS[:2] == ["reference", "fast"] and len(ablations) == len(engines.differing_ingredients())
    assert all(row in engines.ENGINES or row in VARIANTS for row in ROWS)
    assert isinstance(train.build_parser().parse_args(["--engine", "fast-views"]), argparse.Namespace)
