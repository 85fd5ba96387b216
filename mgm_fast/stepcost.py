"""What one training step costs the host: ATen ops, host synchronisations, graph breaks, host floor.

A GPU step is host-bound when the CPU needs longer to dispatch its ops than the card needs to
run them, and it stalls whenever the host reads a device value (the stream drains). Both are
properties of the code, not of the card, so they are counted here on any device, the CPU
included:

* **ops** -- every ATen op dispatched (a ``TorchDispatchMode`` sees each op once, forward and
  backward, optimiser included), per sub-step of the schedule. Not counted as ops: the
  ``detach`` calls the counting mode itself causes. While any dispatch mode is active, torch
  routes each internal shallow copy of a tensor (autograd saving an op's output for backward,
  e.g. ReLU's, and unpacking it) to the mode as an ``aten.detach``; without a mode it is a
  plain C++ copy that dispatches nothing. Such a call reaches the mode without having passed
  the autograd layer (:func:`is_mode_shallow_copy`); it is reported apart (``mode_copies``),
  and the sum of both is the count a bare ``TorchDispatchMode`` gives;
* **syncs** -- every op that reads a tensor's value on the host or copies it to the CPU
  (``aten._local_scalar_dense`` behind ``.item()``/``float(t)``/``bool(t)``, ``nonzero`` and
  other ops whose output size depends on values, copies of a non-CPU tensor to the CPU), plus
  ``Tensor.tolist()`` and ``Tensor.numpy()``, which read a CPU tensor without dispatching an op;
  and every blocking upload: a tensor made from host numbers (``aten.lift_fresh``, behind
  ``torch.tensor``/``new_tensor``; on a GPU a copy that waits for every queued kernel, counted on
  the CPU too, where it copies nothing) and a copy of a CPU tensor to another device without
  ``non_blocking``. Counted on every device, because on a GPU each one drains the stream;
* **NCHW convolutions** -- convolutions whose input is not channels_last (4-D inputs whose layout
  is unambiguous: more than one channel and more than one pixel). In a channels_last step each
  one is a layout round trip (the convolution converts its input, or runs the slower NCHW kernel);
* **graph breaks / recompiles** under ``torch.compile`` (dynamo's counters), with ``--compile``;
* **host floor** -- the wall time of a step at a degenerate size (tiny networks, 32x32 images,
  batch 2), where compute is negligible and what is left is Python and dispatch overhead.

Steps are built through the public training entry (``mgm_fast.train``'s parser, ``setup``,
``build_nets``, ``make_context``, the engine's own loader), exactly as ``python -m mgm_fast.train``
builds them. The first steps (optimiser state, compilation, caches) are run before counting.

    python -m mgm_fast.bench step-cost [--engines reference,fast,fast+compile] [--json FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from mgm_fast import train
from mgm_fast.benchenv import collect_env
from mgm_fast.engine import schedule
from mgm_fast.engine.distributed import SINGLE

METHOD_STEPS = {
    "phase-a": ("mgm", "gan_pretrain_step"),
    "mgm": ("mgm", "mgm_step"),
    "mgm-light": ("mgm-light", "mgm_light_step"),
    "mt": ("mt", "supervised_step"),
}
"""Each accounted step: name -> (``--method`` that runs it, function of ``engine.schedule``)."""

SUB_STEPS = ("supervised_step", "refine_step", "simclr_step", "d_step", "g_step")
"""Schedule functions whose ops are reported apart (with their tag where they take one)."""

SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose",
    "aten.nonzero", "aten.nonzero_static", "aten.masked_select", "aten._unique2", "aten.unique_dim",
    "aten.unique_consecutive", "aten.bincount", "aten.histc",
})
"""Ops that read device values on the host (or size their output by them): each one drains a
CUDA stream."""

UPLOAD_OPS = frozenset({"aten.lift_fresh", "aten.lift_fresh_copy"})
"""Ops that make a tensor from host numbers (``torch.tensor``, ``Tensor.new_tensor``): on a GPU a
blocking upload, which drains the stream like a read-back. Counted on every device: the same
call that is free on the CPU stalls a GPU step (:func:`mgm_fast.ops._dispatch.device_constant`
makes such constants once instead)."""

FLOOR_SET = ("model.image_size=32", "model.stem_width=4", "model.encoder_widths=4,4,4,4",
             "model.decoder_widths=4,4,4,4,4", "model.clr_dim=4", "model.refine_stem_width=4",
             "model.refine_widths=4,4,4", "model.refine_hidden=4", "model.z_dim=4",
             "model.g_conv_dim=8", "model.g_channel_mults=1,1,1,1", "model.d_conv_dim=8",
             "model.d_channel_mults=1,1,1,1", "model.attn_resolution=16")
"""The degenerate size of the host floor: the tiny preset's topology with every width cut to the
bone (8 channels where self-attention needs 8) and 32x32 images (``--set`` overrides)."""
FLOOR_BATCH = 2


_DETACH = torch.ops.aten.detach.default
_AUTOGRAD = torch._C.DispatchKey.AutogradFunctionality


def is_mode_shallow_copy(func) -> bool:
    """Whether the op a dispatch mode just received is a shallow copy torch routed to the mode
    (``TensorImpl::shallow_copy_and_detach`` with a mode active) rather than an op dispatched.

    A dispatched ``aten.detach`` passes its autograd kernel first, which excludes the autograd
    keys below it, so it arrives with them excluded; the routed copy is called from inside
    autograd's own bookkeeping and arrives with them included. ``tests/test_stepcost.py``
    checks the rule against torch's profiler, which records dispatched ops only."""
    return func is _DETACH and not torch._C._dispatch_tls_is_dispatch_key_excluded(_AUTOGRAD)


_CONVOLUTION = torch.ops.aten.convolution.default


def is_nchw_convolution(input: torch.Tensor) -> bool:
    """Whether a convolution's (B, C, H, W) ``input`` is unambiguously not channels_last. With one
    channel or one pixel both layouts have the same strides, so such an input never counts."""
    return (input.dim() == 4 and input.shape[1] > 1 and input.shape[2] * input.shape[3] > 1
            and not input.is_contiguous(memory_format=torch.channels_last))


def _is_blocking_copy(func, args, kwargs) -> bool:
    """Whether the op is a copy between host and device that waits for the stream: any copy of a
    device tensor to the CPU, and a copy of a CPU tensor to a device without ``non_blocking``."""
    name = str(func.overloadpacket)
    if name == "aten._to_copy":
        device = kwargs.get("device")
        if device is None or (torch.device(device).type == "cpu") == (args[0].device.type == "cpu"):
            return False
        return torch.device(device).type == "cpu" or not kwargs.get("non_blocking", False)
    if name == "aten.copy_":
        dst, src = args[0], args[1]
        if not isinstance(src, torch.Tensor) or (dst.device.type == "cpu") == (src.device.type == "cpu"):
            return False
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return dst.device.type == "cpu" or not non_blocking
    return False


class DispatchCounter(TorchDispatchMode):
    """Counts every ATen op and every host synchronisation, per section.

    ``section`` is the label the counts go to (set by :meth:`labelled`). ``ops[section]`` and
    ``syncs[section]`` are Counters by op name (``aten.mv``); host reads that bypass the
    dispatcher (``Tensor.tolist``/``Tensor.numpy``) are counted as ``Tensor.tolist`` /
    ``Tensor.numpy`` while the counter is active. ``mode_copies[section]`` counts the shallow
    copies torch routes to the mode (:func:`is_mode_shallow_copy`), which are not ops.
    ``nchw_convolutions[section]`` counts the convolutions whose input is not channels_last
    (:func:`is_nchw_convolution`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.section = "other"
        self.ops: dict[str, Counter] = {}
        self.syncs: dict[str, Counter] = {}
        self.mode_copies: Counter = Counter()
        self.nchw_convolutions: Counter = Counter()
        self._patches: list[tuple[str, Callable]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_mode_shallow_copy(func):
            self.mode_copies[self.section] += 1
            return func(*args, **kwargs)
        name = str(func.overloadpacket)
        self.ops.setdefault(self.section, Counter())[name] += 1
        if name in SYNC_OPS or name in UPLOAD_OPS or _is_blocking_copy(func, args, kwargs):
            self.syncs.setdefault(self.section, Counter())[name] += 1
        if func is _CONVOLUTION and is_nchw_convolution(args[0]):
            self.nchw_convolutions[self.section] += 1
        return func(*args, **kwargs)

    def _count_host_read(self, method: str):
        original = getattr(torch.Tensor, method)

        @functools.wraps(original)
        def counted(tensor, *a, **kw):
            self.syncs.setdefault(self.section, Counter())[f"Tensor.{method}"] += 1
            return original(tensor, *a, **kw)

        return original, counted

    def __enter__(self):
        for method in ("tolist", "numpy"):
            original, counted = self._count_host_read(method)
            self._patches.append((method, original))
            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patches:
            setattr(torch.Tensor, method, original)
        self._patches.clear()
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def labelled(self, section: str) -> Iterator[None]:
        previous, self.section = self.section, section
        try:
            yield
        finally:
            self.section = previous

    def total_ops(self) -> int:
        return sum(sum(c.values()) for c in self.ops.values())

    def total_syncs(self) -> int:
        return sum(sum(c.values()) for c in self.syncs.values())


@contextlib.contextmanager
def sub_step_labels(counter: DispatchCounter) -> Iterator[None]:
    """While active, each call of a schedule sub-step (``SUB_STEPS``) counts into its own section
    (``refine_step/real``, ``d_step`` ...); everything else of the step into ``other``."""
    originals = {name: getattr(schedule, name) for name in SUB_STEPS}

    def wrap(name, fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def labelled(ctx, *args, **kwargs):
            tag = signature.bind(ctx, *args, **kwargs).arguments.get("tag")
            section = f"{name}/{tag}" if tag else name
            if counter.section != "other":  # a sub-step inside another keeps the outer label
                return fn(ctx, *args, **kwargs)
            with counter.labelled(section):
                return fn(ctx, *args, **kwargs)

        return labelled

    for name, fn in originals.items():
        setattr(schedule, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(schedule, name, fn)


@dataclass
class StepCost:
    """The accounting of one step of one method."""

    step: str
    ops: int | None
    syncs: int | None
    ops_by_section: dict[str, int]
    syncs_by_op: dict[str, int]
    syncs_by_section: dict[str, dict[str, int]]
    top_ops: list[tuple[str, int]]
    mode_copies: int | None = None
    """Shallow copies the counting mode itself received as ``aten.detach`` (not ops; see the
    module docstring). ``ops + mode_copies`` is what a bare ``TorchDispatchMode`` counts."""
    nchw_convolutions: int | None = None
    """Convolutions whose input was not channels_last (:func:`is_nchw_convolution`)."""
    graph_breaks: int | None = None
    recompiles: int | None = None
    host_floor_ms: float | None = None
    extra: dict = field(default_factory=dict)


def prepare(method: str, engine: str, device: str, preset: str = "tiny", batch: int | None = None,
            extra_args: list[str] | None = None, out: str | Path | None = None):
    """(ctx, step function, batch source) of ``method`` built as ``python -m mgm_fast.train`` builds
    it. ``method`` is a key of METHOD_STEPS. The batch source yields the step's arguments."""
    train_method, step_name = METHOD_STEPS[method]
    out = out or tempfile.mkdtemp(prefix="mgm_fast-stepcost-")
    argv = ["--method", train_method, "--engine", engine, "--preset", preset, "--device", device, "--quiet",
            "--out", str(out), "--regime", "0.5", "--data", f"synthetic:{max(8, (batch or 8)) * 10}",
            *(["--batch-size", str(batch)] if batch else []), *(extra_args or [])]
    args = train.build_parser().parse_args(argv)
    run = train.setup(args, SINGLE, torch.device(device))
    run.metrics_file.close()
    run.metrics_file = None
    nets = train.build_nets(run)
    ctx = train.make_context(run, nets)
    labelled = train._forever(train.loader_for(run, run.split.train_labelled))
    weak = None
    if method == "mgm-light":
        weak = train._forever(train.loader_for(run, run.split.train_weak, keys=("rgb", "scene")))

    def batches():
        while True:
            yield (next(labelled),) if weak is None else (next(labelled), next(weak))

    def step(ctx, *args):  # looked up at call time, so that sub_step_labels sees it
        schedule.execute(getattr(schedule, step_name), ctx, *args)

    return ctx, step, batches()


def _finish(ctx) -> None:
    """Wait for the device: one read-back of the logged losses (outside the counted region)."""
    means = ctx.pop_means()
    if means:
        float(sum(v.sum() for v in means.values()))


def count_step(method: str, engine: str = "fast", device: str = "cpu", preset: str = "tiny",
               batch: int | None = None, extra_args: list[str] | None = None, warmup: int = 2,
               compiled: bool = False, timed_steps: int = 0) -> StepCost:
    """Counts one step of ``method`` after ``warmup`` uncounted steps. With ``compiled`` the
    networks are torch.compiled (``--compile``) and dynamo's graph breaks and the graphs compiled
    during the counted step (recompiles: warm-up is over) are reported too. With ``timed_steps``
    the median wall time of that many further steps is ``extra["step_ms"]`` (steady state)."""
    cost, live = _counted(method, engine, device, preset, batch, extra_args, warmup, compiled)
    if timed_steps:
        cost.extra["step_ms"] = _interleaved_median_ms([live], timed_steps)[0]
    return cost


def _counted(method, engine, device, preset, batch, extra_args, warmup, compiled):
    """(the :class:`StepCost` of one counted step, the live (step function, ctx, batches) to time
    further steps with)."""
    extra = list(extra_args or []) + (["--compile"] if compiled else [])
    ctx, step_fn, batches = prepare(method, engine, device, preset, batch, extra)
    if compiled:
        return _count_compiled_step(method, ctx, step_fn, batches, warmup), (step_fn, ctx, batches)
    for _ in range(warmup):
        step_fn(ctx, *next(batches))
    _finish(ctx)
    args = next(batches)
    counter = DispatchCounter()
    with counter, sub_step_labels(counter):
        step_fn(ctx, *args)
    _finish(ctx)
    flat = Counter()
    for c in counter.ops.values():
        flat.update(c)
    syncs = Counter()
    for c in counter.syncs.values():
        syncs.update(c)
    return StepCost(
        step=method, ops=counter.total_ops(), syncs=counter.total_syncs(),
        ops_by_section={k: sum(v.values()) for k, v in counter.ops.items()},
        syncs_by_op=dict(syncs), syncs_by_section={k: dict(v) for k, v in counter.syncs.items()},
        top_ops=flat.most_common(12), mode_copies=sum(counter.mode_copies.values()),
        nchw_convolutions=sum(counter.nchw_convolutions.values()),
    ), (step_fn, ctx, batches)


@contextlib.contextmanager
def cuda_sync_errors() -> Iterator[None]:
    """Context in which torch raises on any synchronising CUDA call -- a read-back, a blocking
    copy, a tensor made from host numbers: the CUDA runtime's own check of what
    :class:`DispatchCounter` counts on any device. Waits for the device first, so that only the
    calls made inside count. CUDA only."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


_COMPILED_CODE = ("CompiledFunction", "CompiledFunctionBackward")
"""Profiler ranges of compiled code (AOTAutograd's forward and backward), besides dynamo's
``Torch-Compiled Region: <frame>``."""


def ops_outside_graphs(fn: Callable[[], object]) -> Counter:
    """The ops (ATen and this package's custom ops, by profiler name) that ``fn()`` runs outside
    ``torch.compile``'d code, top level only: an op called by another op, or by compiled code, is
    not counted. Where CUDA graphs replay the compiled code, these are the ops a GPU step still
    dispatches one by one from the host (the autograd engine's gradient sums, the optimisers, the
    code between the networks; views and conversions that return their input count too). Read
    from torch's profiler, because dynamo does not compile under a ``TorchDispatchMode``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    out: Counter = Counter()
    for event in prof.events():
        if not event.name.startswith(("aten::", "mgm_fast::")):
            continue
        parent = event.cpu_parent
        while parent is not None:
            name = parent.name
            if name.startswith(("aten::", "mgm_fast::", "Torch-Compiled Region")) or name in _COMPILED_CODE:
                break
            parent = parent.cpu_parent
        if parent is None:
            out[event.name] += 1
    return out


_GRAPH_CODE = "## Call CompiledFxGraph"
"""Prefix of the profiler range inductor puts around one call of a compiled graph's code."""


def _step_and_finish(step_fn, ctx, args) -> None:
    step_fn(ctx, *args)
    _finish(ctx)


def host_split_ms(fn: Callable[[], object]) -> dict[str, float]:
    """Where the host time of ``fn()`` goes, under torch's profiler (ms; inflated alike by it):
    ``wall``; ``graph_code``, inside inductor-compiled graph code -- the part CUDA graphs replace
    with one replay per graph; and, of what stays on the host, ``guard_checks`` (dynamo's cache
    lookups before each compiled call) and ``optimisers`` (the ``Optimizer.step`` calls). The
    rest of ``wall`` is the autograd engine, the ops outside the graphs and the Python around
    them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    events = prof.events()

    def total(match) -> float:
        return sum(e.cpu_time_total for e in events if match(e.name)) / 1e3

    return {"wall": 1e3 * wall, "graph_code": total(lambda n: n.startswith(_GRAPH_CODE)),
            "guard_checks": total(lambda n: n == "TorchDynamo Cache Lookup"),
            "optimisers": total(lambda n: n.startswith("Optimizer.step#"))}


def _count_compiled_step(method, ctx, step_fn, batches, warmup: int) -> StepCost:
    """Graph breaks (warm-up and counted step), graphs compiled in the counted step (after the
    warm-up every graph should exist: a new one is a recompile) and, from one more step, the ops
    run outside the compiled graphs (:func:`ops_outside_graphs`; ``extra["ops_outside_graphs"]``,
    most frequent in ``extra["top_outside_graphs"]``). Dynamo does not compile under a
    TorchDispatchMode, so a compiled step's ops and syncs are not counted (None)."""
    # Fresh dynamo caches: the networks of earlier rows (other instances) are not this row's, and
    # their entries would count against the recompile limit of the shared forward code.
    torch._dynamo.reset()
    counters.clear()
    for _ in range(warmup):
        step_fn(ctx, *next(batches))
    _finish(ctx)
    graphs = counters["stats"].get("unique_graphs", 0)
    step_fn(ctx, *next(batches))
    _finish(ctx)
    extra = {"graphs": counters["stats"].get("unique_graphs", 0)}
    args = next(batches)
    outside = ops_outside_graphs(lambda: step_fn(ctx, *args))
    _finish(ctx)
    extra["ops_outside_graphs"] = sum(outside.values())
    extra["top_outside_graphs"] = outside.most_common(10)
    return StepCost(step=method, ops=None, syncs=None, ops_by_section={}, syncs_by_op={}, syncs_by_section={},
                    top_ops=[], graph_breaks=sum(counters["graph_break"].values()),
                    recompiles=extra["graphs"] - graphs, extra=extra)


FLOOR_STEPS = 10
"""Timed steps of a host floor (after 3 warm-up steps)."""


def _floor_step(method, engine, device, warmup, compiled):
    """The live (step function, ctx, batches) of ``method`` at the degenerate size (FLOOR_SET,
    batch FLOOR_BATCH), warmed up: the host floor is the median of its timed steps, each finished
    by a read-back so that device work is included."""
    extra = [a for s in FLOOR_SET for a in ("--set", s)] + (["--compile"] if compiled else [])
    ctx, step_fn, batches = prepare(method, engine, device, "tiny", FLOOR_BATCH, extra)
    if compiled:
        torch._dynamo.reset()  # this row's networks only (see _count_compiled_step)
    for _ in range(warmup):
        step_fn(ctx, *next(batches))
    _finish(ctx)
    return step_fn, ctx, batches


def _interleaved_median_ms(live: list[tuple], steps: int) -> list[float]:
    """Median step time (ms) of each live (step function, ctx, batches), timed round-robin: one
    step of each in turn, ``steps`` rounds, so that the machine's drift over the minutes of a
    report touches every row alike (timed one after another on a shared 2-core machine, one
    compiled row of the end-to-end benchmark measured 1.70x and 2.23x the reference in two runs
    of one commit)."""
    times: list[list[float]] = [[] for _ in live]
    for _ in range(steps):
        for own, (step_fn, ctx, batches) in zip(times, live):
            args = next(batches)
            t0 = time.perf_counter()
            step_fn(ctx, *args)
            _finish(ctx)  # the device's work is part of the step
            own.append(time.perf_counter() - t0)
    return [1e3 * sorted(t)[len(t) // 2] for t in times]


def parse_row(row: str) -> tuple[str, bool]:
    """``"fast+compile"`` -> ("fast", True); ``"reference"`` -> ("reference", False)."""
    engine, _, suffix = row.partition("+")
    if suffix not in ("", "compile"):
        raise ValueError(f"unknown row {row!r}: an engine name, optionally with +compile")
    return engine, suffix == "compile"


def account(methods: list[str], rows: list[str], device: str = "cpu", preset: str = "tiny",
            batch: int | None = None, floor: bool = True, timed_steps: int = 0) -> dict[str, list[StepCost]]:
    """Per row (an engine, optionally ``+compile``): :func:`count_step` of each method, with the
    host floor (``floor``) and the steady-state step time (``timed_steps``).

    With at most one compiled row, the rows' steps of a method are timed round-robin
    (:func:`_interleaved_median_ms`): first every row's counted step, then their timed steps in
    turn, then every row's floor, likewise (``extra["timing"] == "interleaved"``). Two compiled
    rows cannot be alive at once -- each row resets dynamo's caches so that only its own networks
    count against the recompile limit -- so with more the rows are timed one after another
    (``"sequential"``)."""
    parsed = [(row, *parse_row(row)) for row in rows]
    together = sum(compiled for _, _, compiled in parsed) <= 1
    groups = [parsed] if together else [[one] for one in parsed]  # rows timed round-robin with each other
    out: dict[str, list[StepCost]] = {row: [] for row in rows}
    for group in groups:
        for method in methods:
            costs, live = [], []
            for row, engine, compiled in group:
                cost, step = _counted(method, engine, device, preset, batch, None, warmup=2, compiled=compiled)
                if floor or timed_steps:
                    cost.extra["timing"] = "interleaved" if together else "sequential"
                out[row].append(cost)
                costs.append(cost)
                live.append(step)
            if timed_steps:
                for cost, ms in zip(costs, _interleaved_median_ms(live, timed_steps)):
                    cost.extra["step_ms"] = ms
            live.clear()  # the counted steps' networks go before the floor's are built
            if floor:
                live = [_floor_step(method, engine, device, warmup=3, compiled=compiled) for _, engine, compiled in group]
                for cost, ms in zip(costs, _interleaved_median_ms(live, FLOOR_STEPS)):
                    cost.host_floor_ms = ms
                for cost, (step_fn, ctx, batches), (_, _, compiled) in zip(costs, live, group):
                    if compiled:  # one more floor step, profiled: how much of it is graph code
                        run = functools.partial(_step_and_finish, step_fn, ctx, next(batches))
                        cost.extra["floor_profiled_ms"] = host_split_ms(run)
    return out


def render(costs: dict[str, list[StepCost]], title: str) -> str:
    """Markdown: one table (row x step) of ops, syncs, graph breaks, recompiles, host floor and
    steady-state step time, then per row and step the sub-step breakdown."""
    na = "–"
    timed = any("step_ms" in c.extra for cs in costs.values() for c in cs)
    lines = [f"### {title}", "", "| engine | step | ATen ops | mode copies | host syncs | NCHW convs | graph breaks "
             "| recompiles | host floor |" + (" step time |" if timed else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if timed else "")]
    for row, cs in costs.items():
        for c in cs:
            cells = [row, c.step, na if c.ops is None else f"{c.ops:,}",
                     na if c.mode_copies is None else f"{c.mode_copies:,}", na if c.syncs is None else str(c.syncs),
                     na if c.nchw_convolutions is None else str(c.nchw_convolutions),
                     na if c.graph_breaks is None else str(c.graph_breaks),
                     na if c.recompiles is None else str(c.recompiles),
                     na if c.host_floor_ms is None else f"{c.host_floor_ms:.1f} ms"]
            if timed:
                cells.append(f"{c.extra['step_ms']:.0f} ms" if "step_ms" in c.extra else na)
            lines.append("| " + " | ".join(cells) + " |")
    for row, cs in costs.items():
        for c in cs:
            if c.ops is None:
                continue
            lines += ["", f"`{row}` `{c.step}` by sub-step: " + ", ".join(f"{k} {v:,}" for k, v in c.ops_by_section.items()),
                      "most frequent: " + ", ".join(f"{k.removeprefix('aten.')} {v:,}" for k, v in c.top_ops)]
            if c.syncs:
                lines.append("syncs: " + "; ".join(f"{k}: " + ", ".join(f"{op} {n}" for op, n in v.items())
                                                   for k, v in c.syncs_by_section.items()))
    for row, cs in costs.items():
        for c in cs:
            if "ops_outside_graphs" in c.extra:
                top = ", ".join(f"{k.split('::')[-1]} {n:,}" for k, n in c.extra["top_outside_graphs"])
                lines += ["", f"`{row}` `{c.step}` outside the compiled graphs: {c.extra['ops_outside_graphs']:,} "
                              f"ops at top level ({c.extra['graphs']} graphs); most frequent: {top}"]
                if "floor_profiled_ms" in c.extra:
                    t = c.extra["floor_profiled_ms"]
                    lines.append(f"a profiled floor step: {t['wall']:.1f} ms, of which compiled graph code "
                                 f"{t['graph_code']:.1f} ms; {t['wall'] - t['graph_code']:.1f} ms outside it, among them "
                                 f"guard checks {t['guard_checks']:.1f} ms and optimiser steps {t['optimisers']:.1f} ms")
    lines += ["", "ATen ops: ops dispatched. Mode copies: the shallow copies (autograd saving an output for "
              "backward) that torch hands to any active dispatch mode as `aten.detach` and that dispatch nothing "
              "when no mode watches; a bare `TorchDispatchMode` counts ATen ops + mode copies. Host syncs: reads of "
              "a tensor's value on the host, copies to the CPU, and blocking uploads (a tensor made from host numbers, "
              "a copy to a device without non_blocking), each of which drains a GPU's stream. Outside the compiled "
              "graphs: the ops a compiled step runs between its graphs (views and no-op conversions included), which "
              "the host still dispatches one by one where CUDA graphs replay the graphs; the profiled floor step splits "
              "its time into the compiled graphs' code, which CUDA graphs replace, and the rest, which stays on the "
              "host, dynamo's guard checks and the optimiser steps among it (all inflated alike by the profiler). "
              "NCHW convs: "
              "convolutions whose input is not channels_last (the reference engine runs NCHW; in the fast engine "
              "each one would be a layout round trip)."]
    timings = {c.extra.get("timing") for cs in costs.values() for c in cs} - {None}
    if timings == {"interleaved"}:
        lines.append("Host floor and step time: medians of steps timed round-robin across the rows (one step of "
                     "each row in turn), so the machine's drift touches every row alike.")
    elif timings:
        lines.append("Host floor and step time: each row timed after the other (more than one compiled row), so "
                     "compare rows with the machine's drift in mind.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mgm_fast.bench step-cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_cli(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(METHOD_STEPS),
                   help=f"comma-separated steps to account (default {','.join(METHOD_STEPS)})")
    p.add_argument("--engines", default="fast",
                   help="comma-separated rows: an engine (fast, reference, fast-<ingredient>), optionally "
                        "with +compile, e.g. reference,fast,fast+compile (default fast)")
    p.add_argument("--compile", action="store_true", help="add +compile to every row")
    p.add_argument("--device", default="cpu", help="device (default cpu)")
    p.add_argument("--preset", default="tiny", help="preset of the counted steps (default tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="batch of the counted steps (default: preset)")
    p.add_argument("--no-floor", action="store_true", help="skip the host-floor timing")
    p.add_argument("--time-steps", type=int, default=0, metavar="N",
                   help="also time N steady-state steps at the counted size (median)")
    p.add_argument("--json", default=None, help="also write the accounting as JSON")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")


def run_cli(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_STEPS]
    if unknown:
        raise SystemExit(f"error: unknown step {', '.join(unknown)}; choose from {', '.join(METHOD_STEPS)}")
    rows = [r.strip() + ("+compile" if args.compile and "+" not in r else "") for r in args.engines.split(",")
            if r.strip()]
    try:
        for row in rows:
            parse_row(row)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    torch.manual_seed(0)
    costs = account(methods, rows, args.device, args.preset, args.batch_size, floor=not args.no_floor,
                    timed_steps=args.time_steps)
    title = f"{args.device}, {args.preset} preset{f', batch {args.batch_size}' if args.batch_size else ''}"
    text = render(costs, title)
    print(text)
    if args.out:
        env = collect_env()
        header = (f"# Step cost\n\nGenerated by `python -m mgm_fast.bench step-cost` (mgm_fast/stepcost.py) on "
                  f"{env['device_name']} ({env['cpu_cores_usable']} usable cores), torch {env['torch']}, "
                  f"{env['date'][:10]}, commit {(env['commit'] or 'unknown')[:10]}.\n\n")
        Path(args.out).write_text(header + text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"title": title, "rows": {row: [dataclasses.asdict(c) for c in cs] for row, cs in costs.items()}},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
