"""Forward + backward of every plain convolution of the multi-task, refinement and discriminator
networks (mgm_fast.ops.conv2d): the ``cpp`` backend (oneDNN or im2col + GEMM per shape, by its
cost model) vs the ``reference`` backend (``F.conv2d``: oneDNN for every shape).

Each timed step runs the op on the shapes (input, weight, stride, padding) of every ``Conv2d`` and
``SNConv2d`` call of one forward of the three networks (channels_last, as the fast engine runs
them) and the backward of their sum of squares.

``pytest benchmarks/test_bench_conv2d.py --benchmark-group-by=group``
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch

from mgm_fast import _native
from mgm_fast.config import preset
from mgm_fast.models import MultiTaskNet, RefinementNet
from mgm_fast.models.gan import Discriminator
from mgm_fast.models.layers import Conv2d, SNConv2d
from mgm_fast.ops.conv2d import conv2d

BATCH = 8


@functools.cache
def _calls(size: str) -> list[tuple]:
    """(input shape, weight shape, bias, stride, padding) of every plain convolution call of one
    forward of the three networks at batch BATCH."""
    cfg = preset(size).model
    calls = []

    def record(module, args):
        calls.append((tuple(args[0].shape), (module.out_channels, module.in_channels, *module.kernel_size),
                      module.bias is not None, tuple(module.stride), tuple(module.padding)))  # fmt: skip

    torch.manual_seed(0)
    mtl, refine, disc = MultiTaskNet(cfg), RefinementNet(cfg), Discriminator(cfg)
    for net in (mtl, refine, disc):
        for layer in net.modules():
            if isinstance(layer, (Conv2d, SNConv2d)):
                layer.register_forward_pre_hook(record)
    with torch.no_grad():
        images = torch.randn(BATCH, 3, cfg.image_size, cfg.image_size)
        refine(**mtl.decode(mtl.features(images)))
        disc(images, torch.zeros(BATCH, dtype=torch.long))
    return calls


def _inputs(size: str):
    gen = torch.Generator().manual_seed(1)
    out = []
    for shape, weight_shape, bias, stride, padding in _calls(size):
        x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(weight_shape, generator=gen) * 0.1).contiguous(memory_format=torch.channels_last)
        b = torch.randn(weight_shape[0], generator=gen) if bias else None
        out.append((x.requires_grad_(), w.requires_grad_(), None if b is None else b.requires_grad_(), stride, padding))
    return out


def _step(impl, calls):
    loss = 0.0
    for x, w, b, stride, padding in calls:
        loss = loss + conv2d(x, w, b, stride, padding, impl=impl).square().sum()
    return torch.autograd.grad(loss, [t for call in calls for t in call[:3] if t is not None])


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_bench_conv2d_fwd_bwd_cpu(benchmark, impl):
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    calls = _inputs("tiny")
    _step(impl, calls)  # a first step outside the rounds (oneDNN creates its primitives)
    kernels = collections.Counter(f"{w.shape[2]}x{w.shape[3]}" for _, w, *_ in calls)
    benchmark.group = (f"plain conv2d fwd+bwd cpu tiny (MTL + refinement + D), batch {BATCH}: {len(calls)} calls ("
                       + ", ".join(f"{n} {k}" for k, n in sorted(kernels.items())) + ")")  # fmt: skip
    # calls the cpp backend runs by im2col + GEMM (its cost model's picks; the rest run oneDNN)
    algo = _native.extension().conv2d_algo_cpu if impl == "cpp" else None
    gemm = sum(algo(x, w, b, list(s), list(p)) == 1 for x, w, b, s, p in calls) if algo else 0
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), calls=len(calls),
                                gemm_calls=gemm, baseline=impl == "reference")  # fmt: skip
    grads = benchmark(_step, impl, calls)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", ["F.conv2d", "cpp"])
def test_bench_conv2d_call_overhead_cpu(benchmark, monkeypatch, impl):
    """The op's host cost per call: a forward of a degenerate convolution (batch 2, 4 channels,
    4x4, 1x1) under no_grad, with the cpp backend forced to oneDNN, the algorithm ``F.conv2d``
    runs, so the difference is the op's argument check, backend selection and algorithm lookup."""
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    monkeypatch.setenv("MGM_FAST_CONV2D_ALGO", "conv")
    x = torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 1, 1).contiguous(memory_format=torch.channels_last)

    def call():
        with torch.no_grad():
            if impl == "cpp":
                return conv2d(x, w, None, 1, 0, impl="cpp")
            return torch.nn.functional.conv2d(x, w, None, 1, 0)

    benchmark.group = "conv2d call overhead cpu: forward, 2x4x4x4 1x1, oneDNN either way"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), baseline=impl == "F.conv2d")
    out = benchmark(call)
    assert out.shape == (2, 4, 4, 4)
