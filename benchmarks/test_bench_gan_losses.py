"""Instance noise (mgm_fast.ops.gan_losses.noisy) on a batch of 32 RGB images of 128x128, the
images the discriminator sees every D / G step: fused draw (cpp on the CPU; triton on CUDA)
vs the eager reference (torch.randn, then x + std * noise). Different streams, same
distribution (see the op's docstring); the timing covers drawing the noise and adding it.

``pytest benchmarks/test_bench_gan_losses.py --benchmark-group-by=group``
"""

from __future__ import annotations

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops import gan_losses as gl
from mgm_fast.ops._dispatch import triton_reason

SHAPE = (32, 3, 128, 128)
STD = 0.01
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_bench_noisy_cpu(benchmark, impl):
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gen = torch.Generator().manual_seed(1)
    benchmark.group = "noisy cpu b32 3x128x128"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), baseline=impl == "reference")
    out = benchmark(gl.noisy, x, STD, gen, impl=impl)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bench_noisy_gpu(benchmark, impl, dtype):
    if impl == "triton" and triton_reason() is not None:
        pytest.skip(f"Triton unavailable: {triton_reason()}")
    x = (torch.rand(SHAPE, device="cuda") * 2 - 1).to(dtype)
    gen = torch.Generator(device="cuda").manual_seed(1)

    def step():
        out = gl.noisy(x, STD, gen, impl=impl)
        torch.cuda.synchronize()
        return out

    step()
    dt = str(dtype).removeprefix("torch.")
    benchmark.group = f"noisy cuda {dt} b32 3x128x128"
    benchmark.extra_info.update(impl=impl, dtype=dt, device=torch.cuda.get_device_name(),
                                baseline=impl == "reference")  # fmt: skip
    out = benchmark(step)
    assert torch.isfinite(out).all()
