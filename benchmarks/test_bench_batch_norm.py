"""Forward + backward of every training-mode BatchNorm layer of the multi-task and refinement
networks (mgm_fast.ops.batch_norm), with the residual and ReLU the network applies after it: the ``cpp``
backend (the extension's channels_last forward and backward with the ReLU fused, one C++ autograd
node) vs the ``reference`` backend (torch's BatchNorm, then ``F.relu``; torch's channels_last CPU
backward is slow at channel counts that are not a multiple of a vector, e.g. the tiny preset's 8
and 24).

Each timed step runs the op on the input shape (and ReLU flag) of every BatchNorm call of one
MTL + refinement forward (channels_last, as the fast engine runs them) and the backward of their
sum of squares.

A second set of groups times the backward alone at the tiny preset's shapes where torch's
channels_last kernel is slow (8 and 24 channels), given the forward's statistics: torch's
``batch_norm_backward`` on the channels_last tensors (the baseline), torch's on the same values in
NCHW (what the reference engine runs), and the cpp kernel on the channels_last tensors.

A last group times the op's host cost per call at a degenerate size, its argument check and
backend selection run every call or remembered per kind of call (``FusedOp.selection_key``).

``pytest benchmarks/test_bench_batch_norm.py --benchmark-group-by=group``
"""

from __future__ import annotations

import functools

import pytest
import torch

from mgm_fast import _native
from mgm_fast.config import preset
from mgm_fast.models import MultiTaskNet, RefinementNet
from mgm_fast.models.layers import BatchNorm2d
from mgm_fast.ops.batch_norm import OP, _cpp_backward_op, batch_norm_train

BATCH = 8


@functools.cache
def _calls(size: str) -> list[tuple[tuple[int, int, int, int], bool, bool]]:
    """(input shape, relu, residual) of every BatchNorm call of one forward of both networks at
    batch BATCH."""
    cfg = preset(size).model
    calls = []

    def record(module, args, kwargs):
        calls.append((tuple(args[0].shape), bool(kwargs.get("relu", False)), kwargs.get("residual") is not None))

    torch.manual_seed(0)
    mtl, refine = MultiTaskNet(cfg), RefinementNet(cfg)
    for net in (mtl, refine):
        for layer in net.modules():
            if isinstance(layer, BatchNorm2d):
                layer.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        outs = mtl.decode(mtl.features(torch.randn(BATCH, 3, cfg.image_size, cfg.image_size)))
        refine(**outs)
    return calls


def _inputs(size: str):
    gen = torch.Generator().manual_seed(1)
    out = []
    for shape, relu, residual in _calls(size):
        c = shape[1]
        x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
        shortcut = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last) if residual else None
        out.append((x.requires_grad_(), torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True),
                    torch.zeros(c), torch.ones(c), relu, None if shortcut is None else shortcut.requires_grad_()))  # fmt: skip
    return out


def _step(impl, layers):
    loss = 0.0
    for x, weight, bias, running_mean, running_var, relu, shortcut in layers:
        out = batch_norm_train(x, weight, bias, running_mean, running_var, 0.1, 1e-5, relu, shortcut, impl=impl)
        loss = loss + out.square().sum()
    return torch.autograd.grad(loss, [t for layer in layers for t in (*layer[:3], layer[-1]) if t is not None])


@pytest.mark.parametrize("size", ["tiny", "paper"])
@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_bench_batch_norm_fwd_bwd_cpu(benchmark, impl, size):
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    if size == "paper" and benchmark.disabled:
        pytest.skip("paper-size layers only when benchmarking (~1 GB of activations)")
    layers = _inputs(size)
    channels = sorted({x.shape[1] for x, *_ in layers})
    relus = sum(layer[5] for layer in layers)
    residuals = sum(layer[6] is not None for layer in layers)
    benchmark.group = (f"batch norm (+residual, relu) fwd+bwd cpu {size}, batch {BATCH}: {len(layers)} calls ({relus} "
                       f"with relu, {residuals} with a residual), channels {','.join(map(str, channels))}")  # fmt: skip
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), calls=len(layers),
                                baseline=impl == "reference")  # fmt: skip
    grads = benchmark(_step, impl, layers)
    assert all(torch.isfinite(g).all() for g in grads)


BACKWARD_SHAPES = [(8, 8, 64, 64), (8, 8, 32, 32), (8, 24, 8, 8)]


@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["reference-channels-last", "reference-nchw", "cpp"])
def test_bench_batch_norm_backward_cpu(benchmark, impl, shape):
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    gen = torch.Generator().manual_seed(2)
    c = shape[1]
    x = torch.randn(shape, generator=gen)
    grad_out = torch.randn(shape, generator=gen)
    if impl != "reference-nchw":
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    weight, running_mean, running_var = torch.randn(c, generator=gen), torch.zeros(c), torch.ones(c)
    mean, invstd = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    if impl == "cpp":
        def backward():
            return _cpp_backward_op(grad_out, x, weight, mean, invstd, None, [True, True, True, False])[:3]
    else:
        def backward():
            return torch.ops.aten.batch_norm_backward(grad_out, x, weight, running_mean, running_var, mean, invstd,
                                                      True, 1e-5, [True, True, True], torch.empty(0))  # fmt: skip
    benchmark.group = f"batch norm backward cpu {'x'.join(map(str, shape))} (N, C, H, W)"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), baseline=impl == "reference-channels-last")
    grads = benchmark(backward)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("selection", ["checked each call", "remembered"])
def test_bench_batch_norm_call_overhead_cpu(benchmark, monkeypatch, selection):
    """The op's host cost per call at a degenerate size (batch 2, 4 channels, 4x4, channels_last,
    forward under no_grad, the cpp backend either way): the argument check and backend selection
    run on every call (``checked each call``, the op without a selection key) or once per kind of
    call (``remembered``, FusedOp.selection_key)."""
    if _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    if selection != "remembered":
        monkeypatch.setattr(OP, "selection_key", None)
    x = torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    weight, bias, mean, var = torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4)

    def call():
        with torch.no_grad():
            return batch_norm_train(x, weight, bias, mean, var, 0.1, 1e-5, relu=True)

    benchmark.group = "batch norm call overhead cpu: forward, 2x4x4x4, cpp either way"
    benchmark.extra_info.update(selection=selection, threads=torch.get_num_threads(),
                                baseline=selection != "remembered")  # fmt: skip
    out = benchmark(call)
    assert out.shape == (2, 4, 4, 4)
