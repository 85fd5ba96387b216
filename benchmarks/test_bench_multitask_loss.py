"""Forward + backward of mgm_fast.ops.multitask_loss on the CPU: fused C++ kernel vs the eager
reference, at the MGM NYUv2 segmentation setting (batch 8, 40 classes, 64x64).

Each timed step builds fresh leaves for the three predictions, evaluates the three losses and
computes d(seg + depth + normal) / d(predictions) with torch.autograd.grad, so both backends
do the same work: losses and all three gradients. The groups put cpp and reference side by
side:  pytest benchmarks/test_bench_multitask_loss.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops import multitask_loss as mtl

BATCH, CLASSES, HEIGHT, WIDTH = 8, 40, 64, 64

CONFIGS = {
    # the released losses: no ignore index, all-ones depth mask, 3-channel normal mask, mean over all
    "released": dict(ignore_index=None, depth_mask=False, reduction="all"),
    # the options: ignore index 255 on ~10% of pixels, depth validity mask, mean over valid
    "ignore+valid": dict(ignore_index=255, depth_mask=True, reduction="valid"),
}


def _inputs(ignore_index, depth_mask, reduction):
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, HEIGHT, WIDTH)
    seg_target = torch.randint(0, CLASSES, shape, generator=g)
    if ignore_index is not None:
        seg_target[torch.rand(shape, generator=g) < 0.1] = ignore_index
    return dict(
        seg_logits=torch.randn(BATCH, CLASSES, HEIGHT, WIDTH, generator=g) * 3,
        depth_pred=torch.rand(BATCH, 1, HEIGHT, WIDTH, generator=g) * 10,
        normal_pred=torch.rand(BATCH, 3, HEIGHT, WIDTH, generator=g),
        seg_target=seg_target,
        depth_target=torch.rand(BATCH, 1, HEIGHT, WIDTH, generator=g) * 10,
        normal_target=torch.rand(BATCH, 3, HEIGHT, WIDTH, generator=g),
        depth_mask=(torch.rand(BATCH, 1, HEIGHT, WIDTH, generator=g) > 0.2) if depth_mask else None,
        normal_mask=(torch.rand(BATCH, 3, HEIGHT, WIDTH, generator=g) > 0.1).float(),
        ignore_index=ignore_index,
        reduction=reduction,
    )


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_bench_multitask_loss_fwd_bwd_cpu(benchmark, impl, config):
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    inputs = _inputs(**CONFIGS[config])
    preds = ("seg_logits", "depth_pred", "normal_pred")

    def step():
        leaves = [inputs[k].detach().requires_grad_(True) for k in preds]
        losses = mtl.multitask_loss(**{**inputs, **dict(zip(preds, leaves))}, impl=impl)
        grads = torch.autograd.grad(losses[0] + losses[1] + losses[2], leaves)
        return losses, grads

    benchmark.group = f"multitask_loss fwd+bwd cpu b{BATCH} c{CLASSES} {HEIGHT}x{WIDTH} {config}"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), config=config)
    losses, grads = benchmark(step)
    assert all(torch.isfinite(x).all() for x in (*losses, *grads))
