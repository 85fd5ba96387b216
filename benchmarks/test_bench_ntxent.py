"""Forward + backward of the NT-Xent loss (mgm_fast.ops.ntxent.ntxent_loss): the fused
backends vs the eager reference (:func:`mgm_fast.ops.ntxent.ntxent_loss_reference`) and vs torch.compile of it.

Shapes: 2B = 64 (the paper's SimCLR batch of 32 images, two views each) and 2B = 4096 (a large
contrastive batch), D = 64 (``ModelConfig.clr_dim``, the projection head's output), tau = 0.5.
Each timed step makes fresh leaves for both views, evaluates the loss and computes its gradient
w.r.t. both views. Variants: ``reference`` (eager, the group's baseline), ``compile``
(``torch.compile`` of the reference; skipped under ``--benchmark-disable``), ``cpp`` (CPU
rows), ``triton`` and ``cuda`` (GPU rows, only with CUDA; they also record the peak memory a
step allocates beyond its inputs -- the eager path keeps several (2B, 2B) matrices).

``pytest benchmarks/test_bench_ntxent.py --benchmark-group-by=group``
"""

from __future__ import annotations

import functools

import pytest
import torch

from mgm_fast import _native
from mgm_fast.config import ModelConfig
from mgm_fast.ops import ntxent as nx
from mgm_fast.ops._dispatch import triton_reason

DIM = ModelConfig().clr_dim
TAU = 0.5
SIZES = [64, 4096]  # 2B

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _views(two_b, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(two_b // 2, DIM, generator=g)
    z2 = z1 + 0.5 * torch.randn(two_b // 2, DIM, generator=g)
    return z1.to(device, dtype), z2.to(device, dtype)


@functools.cache
def _compiled():
    return torch.compile(nx.ntxent_loss_reference)


def _loss_fn(impl):
    if impl == "compile":
        return _compiled()
    return functools.partial(nx.ntxent_loss, impl=impl)


def _step(fn, z1, z2):
    a, b = z1.detach().requires_grad_(True), z2.detach().requires_grad_(True)
    loss = fn(a, b, TAU)
    return (loss, *torch.autograd.grad(loss, [a, b]))


def _skip_unless_runnable(benchmark, impl, device):
    if impl == "compile" and benchmark.disabled:
        pytest.skip("torch.compile rows are skipped under --benchmark-disable (compilation dominates)")
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    if impl == "cuda" and _native.cuda_reason() is not None:
        pytest.skip(f"CUDA extension unavailable: {_native.cuda_reason()}")
    if impl == "triton" and (triton_reason() is not None or device != "cuda"):
        pytest.skip("Triton rows run on CUDA only (the CPU interpreter is a correctness tool)")


@pytest.mark.parametrize("two_b", SIZES)
@pytest.mark.parametrize("impl", ["reference", "compile", "cpp"])
def test_bench_ntxent_fwd_bwd_cpu(benchmark, impl, two_b):
    _skip_unless_runnable(benchmark, impl, "cpu")
    z1, z2 = _views(two_b)
    fn = _loss_fn(impl)
    if impl == "compile":
        _step(fn, z1, z2)  # compile outside the timing
    benchmark.group = f"ntxent fwd+bwd cpu 2B={two_b} D={DIM}"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), two_b=two_b, dim=DIM,
                                baseline=impl == "reference")  # fmt: skip
    out = benchmark(_step, fn, z1, z2)
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("two_b", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "compile", "triton", "cuda"])
def test_bench_ntxent_fwd_bwd_gpu(benchmark, impl, dtype, two_b):
    _skip_unless_runnable(benchmark, impl, "cuda")
    z1, z2 = _views(two_b, "cuda", dtype)
    fn = _loss_fn(impl)

    def step():
        out = _step(fn, z1, z2)
        torch.cuda.synchronize()  # time the GPU work, not the launches
        return out

    step()  # warm-up (and compilation)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - before
    dt = str(dtype).removeprefix("torch.")
    benchmark.group = f"ntxent fwd+bwd cuda {dt} 2B={two_b} D={DIM}"
    benchmark.extra_info.update(impl=impl, dtype=dt, two_b=two_b, dim=DIM, peak_memory_bytes=peak,
                                device=torch.cuda.get_device_name(), baseline=impl == "reference")  # fmt: skip
    out = benchmark(step)
    assert all(torch.isfinite(t).all() for t in out)
