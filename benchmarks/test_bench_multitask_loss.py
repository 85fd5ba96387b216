"""Forward + backward of mgm_fast.ops.multitask_loss: the fused backends vs the eager reference
and vs torch.compile of the reference, at the MGM NYUv2 setting (40 classes) in two sizes:
batch 8 at 64x64 and the paper's batch 32 at 128x128.

Each timed step builds fresh leaves for the three predictions, evaluates the three losses and
computes d(seg + depth + normal) / d(predictions) with torch.autograd.grad, so every variant
does the same work: losses and all three gradients. Variants:

* ``reference`` -- eager :func:`mgm_fast.ops.multitask_loss.multitask_loss_reference` (the baseline of each group);
* ``compile`` -- ``torch.compile`` of that same function (inductor; the first call compiles and
  is not timed). Skipped under ``--benchmark-disable`` (CI), where compiling would dominate;
* ``cpp`` -- the fused C++ kernel (CPU rows);
* ``triton``, ``cuda`` -- the fused GPU kernels (GPU rows, only with CUDA); GPU rows also record
  the peak memory a step allocates beyond its inputs (``peak_memory_bytes``).

The groups put the variants side by side:
``pytest benchmarks/test_bench_multitask_loss.py --benchmark-group-by=group``
"""

from __future__ import annotations

import functools

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops import multitask_loss as mtl
from mgm_fast.ops._dispatch import triton_reason

CLASSES = 40
SHAPES = {"b8-64x64": (8, 64, 64), "b32-128x128": (32, 128, 128)}  # (batch, height, width)

CONFIGS = {
    # the released losses: no ignore index, all-ones depth mask, 3-channel normal mask, mean over all
    "released": dict(ignore_index=None, depth_mask=False, reduction="all"),
    # the options: ignore index 255 on ~10% of pixels, depth validity mask, mean over valid
    "ignore+valid": dict(ignore_index=255, depth_mask=True, reduction="valid"),
}
PREDS = ("seg_logits", "depth_pred", "normal_pred")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(shape, ignore_index, depth_mask, reduction, device="cpu"):
    batch, height, width = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    seg_target = torch.randint(0, CLASSES, (batch, height, width), generator=g)
    if ignore_index is not None:
        seg_target[torch.rand(batch, height, width, generator=g) < 0.1] = ignore_index
    size = (batch, 1, height, width)
    inputs = dict(
        seg_logits=torch.randn(batch, CLASSES, height, width, generator=g) * 3,
        depth_pred=torch.rand(size, generator=g) * 10,
        normal_pred=torch.rand(batch, 3, height, width, generator=g),
        seg_target=seg_target,
        depth_target=torch.rand(size, generator=g) * 10,
        normal_target=torch.rand(batch, 3, height, width, generator=g),
        depth_mask=(torch.rand(size, generator=g) > 0.2) if depth_mask else None,
        normal_mask=(torch.rand(batch, 3, height, width, generator=g) > 0.1).float(),
    )
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return {**inputs, "ignore_index": ignore_index, "reduction": reduction}


@functools.cache
def _compiled():
    return torch.compile(mtl.multitask_loss_reference)


def _loss_fn(impl):
    if impl == "compile":
        return _compiled()
    return functools.partial(mtl.multitask_loss, impl=impl)


def _step(fn, inputs):
    leaves = [inputs[k].detach().requires_grad_(True) for k in PREDS]
    losses = fn(**{**inputs, **dict(zip(PREDS, leaves))})
    grads = torch.autograd.grad(losses[0] + losses[1] + losses[2], leaves)
    return losses, grads


def _skip_unless_runnable(benchmark, impl, device):
    if impl == "compile" and benchmark.disabled:
        pytest.skip("torch.compile rows are skipped under --benchmark-disable (compilation dominates)")
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    if impl == "cuda" and _native.cuda_reason() is not None:
        pytest.skip(f"CUDA extension unavailable: {_native.cuda_reason()}")
    if impl == "triton" and (triton_reason() is not None or device != "cuda"):
        pytest.skip("Triton rows run on CUDA only (the CPU interpreter is a correctness tool)")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("impl", ["reference", "compile", "cpp"])
def test_bench_multitask_loss_fwd_bwd_cpu(benchmark, impl, config, shape):
    _skip_unless_runnable(benchmark, impl, "cpu")
    inputs = _inputs(shape, **CONFIGS[config])
    fn = _loss_fn(impl)
    if impl == "compile":
        _step(fn, inputs)  # compile outside the timing
    batch, height, width = SHAPES[shape]
    benchmark.group = f"multitask_loss fwd+bwd cpu b{batch} c{CLASSES} {height}x{width} {config}"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), config=config, shape=shape,
                                baseline=impl == "reference")  # fmt: skip
    losses, grads = benchmark(_step, fn, inputs)
    assert all(torch.isfinite(x).all() for x in (*losses, *grads))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "compile", "triton", "cuda"])
def test_bench_multitask_loss_fwd_bwd_gpu(benchmark, impl, dtype, config, shape):
    _skip_unless_runnable(benchmark, impl, "cuda")
    inputs = _inputs(shape, **CONFIGS[config], device="cuda")
    for k in PREDS:
        inputs[k] = inputs[k].to(dtype)
    fn = _loss_fn(impl)

    def step():
        out = _step(fn, inputs)
        torch.cuda.synchronize()  # time the GPU work, not the launches
        return out

    step()  # warm-up (and compilation)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - before
    batch, height, width = SHAPES[shape]
    dt = str(dtype).removeprefix("torch.")
    benchmark.group = f"multitask_loss fwd+bwd cuda {dt} b{batch} c{CLASSES} {height}x{width} {config}"
    benchmark.extra_info.update(impl=impl, dtype=dt, config=config, shape=shape, peak_memory_bytes=peak,
                                device=torch.cuda.get_device_name(), baseline=impl == "reference")  # fmt: skip
    losses, grads = benchmark(step)
    assert all(torch.isfinite(x).all() for x in (*losses, *grads))
