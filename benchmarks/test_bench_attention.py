"""Forward + backward of the SAGAN self-attention core (mgm_fast.ops.attention.sagan_attention):
the fused ``cpp`` backend vs the eager reference (the two lines of ``SelfAttention.forward``) and
vs torch.compile of it.

Shapes (theta (B, dq, N), phi (B, dq, M), g (B, dv, M)):

* tiny: B = 8, N = 1024 (32x32), M = 256, dq = 2, dv = 8 -- the tiny preset's attention block
  (channels 16: dq = C/8, dv = C/2);
* paper: B = 32, N = 1024, M = 256, dq = 16, dv = 64 -- a paper-preset-like block (C = 128).

Each timed step makes fresh leaves for theta, phi and g, evaluates the op and computes the
gradient of the output's sum w.r.t. all three. Variants: ``reference`` (eager, the group's
baseline), ``compile`` (``torch.compile`` of the reference; skipped under
``--benchmark-disable``), ``cpp``.

``pytest benchmarks/test_bench_attention.py --benchmark-group-by=group``
"""

from __future__ import annotations

import functools

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops import attention as at

SIZES = {  # name: (B, N, M, dq, dv)
    "tiny": (8, 1024, 256, 2, 8),
    "paper": (32, 1024, 256, 16, 64),
}


def _inputs(size):
    b, n, m, dq, dv = SIZES[size]
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, dq, n, generator=g), torch.randn(b, dq, m, generator=g), torch.randn(b, dv, m, generator=g)


@functools.cache
def _compiled():
    return torch.compile(at.sagan_attention_reference)


def _fn(impl):
    if impl == "compile":
        return _compiled()
    return functools.partial(at.sagan_attention, impl=impl)


def _step(fn, theta, phi, g):
    leaves = [t.detach().requires_grad_(True) for t in (theta, phi, g)]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out.sum(), leaves))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", ["reference", "compile", "cpp"])
def test_bench_attention_fwd_bwd_cpu(benchmark, impl, size):
    if impl == "compile" and benchmark.disabled:
        pytest.skip("torch.compile rows are skipped under --benchmark-disable (compilation dominates)")
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    inputs = _inputs(size)
    fn = _fn(impl)
    if impl == "compile":
        _step(fn, *inputs)  # compile outside the timing
    b, n, m, dq, dv = SIZES[size]
    benchmark.group = f"sagan attention fwd+bwd cpu {size} B={b} N={n} M={m} dq={dq} dv={dv}"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), batch=b, n=n, m=m, dq=dq, dv=dv,
                                baseline=impl == "reference")  # fmt: skip
    out = benchmark(_step, fn, *inputs)
    assert all(torch.isfinite(t).all() for t in out)
