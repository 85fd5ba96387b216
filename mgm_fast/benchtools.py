"""Timing helpers for benchmarks: synchronised GPU timing, peak memory, MFU.

* :func:`time_cuda` times a function with CUDA events (warm-up excluded, median over
  iterations), rotating over several pre-made input sets so that a call never finds its inputs
  hot in L2 from the call before; :func:`time_cpu` does the same with ``time.perf_counter`` on
  the CPU, and :func:`time_on` picks one of the two for a device.
* :func:`peak_memory` is the peak of the CUDA caching allocator during one call, above what was
  allocated before it.
* :func:`mfu` is model FLOPs utilisation against a measured peak (``python -m mgm_fast.bench
  matmul-rate`` gives the card's dense bf16 matmul rate, the denominator the design asks for).
* :func:`synced_timer` is a pytest-benchmark timer (``--benchmark-timer
  mgm_fast.benchtools.synced_timer``) that waits for queued CUDA work before reading the
  clock, so asynchronous kernel launches cannot make a benchmark look faster than it is.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call times of one timed function, in seconds.

    Attributes:
        median_s, min_s, max_s: over the timed iterations (warm-up excluded).
        times_s: every timed iteration, in call order.
        warmup: untimed calls made first.
        input_sets: how many input sets were rotated.
        timer: ``"cuda-events"`` or ``"perf_counter"``.
        device: where it ran, e.g. ``"cuda:0 (NVIDIA H100 80GB HBM3)"`` or ``"cpu"``.
    """

    median_s: float
    min_s: float
    max_s: float
    times_s: tuple[float, ...]
    warmup: int
    input_sets: int
    timer: str
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PeakMemory:
    """Peak allocator memory of one call: ``bytes`` is None when it cannot be measured, and
    ``reason`` then says why."""

    bytes: int | None
    reason: str | None = None

    @property
    def mib(self) -> float | None:
        return None if self.bytes is None else self.bytes / 2**20


def _call(fn: Callable, inputs):
    # an input set is a tuple/list of positional arguments, a dict of keyword arguments, or a
    # single object passed as the only argument
    if isinstance(inputs, dict):
        return fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    return fn(inputs)


def _check_args(inputs_list: Sequence, warmup: int, iters: int) -> None:
    if isinstance(inputs_list, (str, bytes)) or not isinstance(inputs_list, Sequence) or not inputs_list:
        raise ValueError("inputs_list must be a non-empty sequence of input sets "
                         f"(tuples of arguments, dicts of keyword arguments or single objects), got {inputs_list!r:.80}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")


def _timing(times: list[float], warmup: int, input_sets: int, timer: str, device: str) -> Timing:
    return Timing(median_s=statistics.median(times), min_s=min(times), max_s=max(times), times_s=tuple(times),
                  warmup=warmup, input_sets=input_sets, timer=timer, device=device)


def time_cuda(fn: Callable, inputs_list: Sequence, warmup: int = 10, iters: int = 50,
              device: torch.device | str | int | None = None) -> Timing:
    """Times ``fn`` on a CUDA device with CUDA events.

    Call ``k`` (warm-up calls included) gets ``inputs_list[k % len(inputs_list)]``. The warm-up
    calls are followed by a device synchronise; then each timed call is bracketed by a start and
    an end event on the current stream, with no host synchronisation in between (the CPU queues
    the next call while the GPU runs, as in training), and one synchronise at the end before the
    event times are read. A call's time is GPU time from its start event to its end event, so
    launch gaps the GPU has to wait for are included.

    Raises RuntimeError without a CUDA device (use :func:`time_cpu` there).
    """
    _check_args(inputs_list, warmup, iters)
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda needs a CUDA device and none is visible; time CPU code with time_cpu")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"time_cuda: device must be a CUDA device, got {dev}")
    n = len(inputs_list)
    with torch.cuda.device(dev):
        for k in range(warmup):
            _call(fn, inputs_list[k % n])
        torch.cuda.synchronize(dev)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            inputs = inputs_list[(warmup + i) % n]
            starts[i].record()
            _call(fn, inputs)
            ends[i].record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]  # elapsed_time is in ms
        name = torch.cuda.get_device_name(dev)
    return _timing(times, warmup, n, "cuda-events", f"{dev} ({name})")


def time_cpu(fn: Callable, inputs_list: Sequence, warmup: int = 3, iters: int = 20) -> Timing:
    """Times ``fn`` on the CPU with ``time.perf_counter`` around each call; same rotation and
    warm-up rule as :func:`time_cuda`. CPU work only: queued CUDA work would not be waited for."""
    _check_args(inputs_list, warmup, iters)
    n = len(inputs_list)
    for k in range(warmup):
        _call(fn, inputs_list[k % n])
    times = []
    for i in range(iters):
        inputs = inputs_list[(warmup + i) % n]
        t0 = time.perf_counter()
        _call(fn, inputs)
        times.append(time.perf_counter() - t0)
    return _timing(times, warmup, n, "perf_counter", "cpu")


def time_on(device: torch.device | str, fn: Callable, inputs_list: Sequence, warmup: int, iters: int) -> Timing:
    """:func:`time_cuda` for a CUDA device, :func:`time_cpu` for the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return time_cuda(fn, inputs_list, warmup, iters, dev)
    if dev.type == "cpu":
        return time_cpu(fn, inputs_list, warmup, iters)
    raise ValueError(f"no timer for device {dev}: only cuda and cpu are supported")


def peak_memory(fn: Callable[[], object], device: torch.device | str | None = None) -> PeakMemory:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before it.

    Uses the caching allocator's counters (``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``), synchronising before and after the call. With ``device=None``
    the current CUDA device is used when there is one. On the CPU there is no such counter:
    ``fn`` is not run and the result has ``bytes=None`` and the reason.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return PeakMemory(None, f"peak memory comes from the CUDA caching allocator; device {dev} has none "
                                "(CPU allocations are not tracked by torch)")
    if not torch.cuda.is_available():
        return PeakMemory(None, f"device {dev} was asked for but no CUDA device is visible")
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return PeakMemory(torch.cuda.max_memory_allocated(dev) - before)


def mfu(flops_per_step: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (``flops_per_step / seconds``) over
    ``peak_flops`` (FLOP/s, e.g. the measured bf16 matmul rate). A fraction, not a percentage."""
    for name, value in (("flops_per_step", flops_per_step), ("seconds", seconds), ("peak_flops", peak_flops)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"mfu: {name} must be a finite number > 0, got {value!r}")
    return flops_per_step / seconds / peak_flops


def synced_timer() -> float:
    """``time.perf_counter()`` after waiting for the current CUDA device's queued work.

    For pytest-benchmark (``--benchmark-timer mgm_fast.benchtools.synced_timer``): the timer is
    read before and after each timed call, so a round ends only when its GPU work has finished.
    It does not initialise CUDA: CPU-only benchmarks pay nothing.
    """
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_rate(dtype: str = "bf16", size: int | None = None, device: torch.device | str | None = None,
                iters: int = 20, warmup: int = 5, input_sets: int = 3) -> dict:
    """Dense ``size x size @ size x size`` matmul throughput in TFLOP/s (2 size^3 FLOPs per call).

    Defaults: the first CUDA device when there is one (size 8192), else the CPU (size 1024; the
    result is then a CPU number, marked so). ``input_sets`` pairs of operands, filled with
    normal noise, are rotated, and every call writes into its own preallocated output; timing is
    by :func:`time_on` (CUDA events or perf_counter, warm-up excluded, median).
    """
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"matmul_rate: dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if size is None:
        size = 8192 if dev.type == "cuda" else 1024
    if size < 1 or input_sets < 1:
        raise ValueError(f"matmul_rate: size and input_sets must be >= 1, got {size} and {input_sets}")
    gen = torch.Generator(device=dev).manual_seed(0)
    sets = []
    for _ in range(input_sets):
        a = torch.randn(size, size, device=dev, generator=gen).to(dtypes[dtype])
        b = torch.randn(size, size, device=dev, generator=gen).to(dtypes[dtype])
        sets.append((a, b, torch.empty(size, size, device=dev, dtype=dtypes[dtype])))

    def step(a, b, out):
        torch.mm(a, b, out=out)

    timing = time_on(dev, step, sets, warmup, iters)
    flops = 2.0 * size**3
    out = {
        "device": timing.device,
        "dtype": dtype,
        "size": size,
        "flops_per_matmul": flops,
        "tflops_median": flops / timing.median_s / 1e12,
        "tflops_best": flops / timing.min_s / 1e12,
        "seconds_median": timing.median_s,
        "seconds_min": timing.min_s,
        "iters": iters,
        "warmup": warmup,
        "input_sets": input_sets,
        "timer": timing.timer,
    }
    if dev.type == "cuda":
        out["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    else:
        out["torch_threads"] = torch.get_num_threads()
        out["note"] = ("CPU number: the dense matmul rate of this CPU with torch's threads, "
                       "not a GPU peak; use it only as the MFU denominator of CPU runs")
    return out
