"""What the batched spectral-norm refresh costs the host: ATen ops of one training-mode forward +
backward of the tiny-preset discriminator and generator, counted with the step-cost tool's
dispatch counter. With one power iteration per layer done per layer (reshape, t, mv, normalize,
mv, normalize, mv, dot, div and their backward), D cost 758 ops and G 845; the refresh batches
the normalisations and the W / sigma step across all layers of a network."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mgm_fast import _native
from mgm_fast.config import preset
from mgm_fast.models import Discriminator, Generator
from mgm_fast.models.layers import SpectralNormLayer, spectral_norm_layers, spectral_norm_weights
from mgm_fast.stepcost import DispatchCounter


def _count(fn) -> tuple[int, Counter]:
    counter = DispatchCounter()
    with counter:
        fn()
    flat = Counter()
    for ops in counter.ops.values():
        flat.update(ops)
    return counter.total_ops(), flat


def _fwd_bwd(net, *inputs) -> tuple[int, Counter]:
    """Ops of net(*inputs).sum().backward() in training mode, after one warm-up step."""
    net.train()
    net(*inputs).sum().backward()
    net.zero_grad(set_to_none=True)
    return _count(lambda: net(*inputs).sum().backward())


def _sn_count(net) -> int:
    return sum(isinstance(m, SpectralNormLayer) for m in net.modules())


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = preset("tiny").model
    y = torch.randint(0, cfg.num_scenes, (4,))
    return cfg, y


def test_discriminator_forward_backward_ops(tiny):
    cfg, y = tiny
    d = Discriminator(cfg)
    total, ops = _fwd_bwd(d, torch.randn(4, 3, cfg.image_size, cfg.image_size), y)
    layers = _sn_count(d)
    assert ops["aten.mv"] == 2 * layers  # W^T u and W v, no third product for sigma
    assert ops["aten.linalg_vector_norm"] == ops["aten.dot"] == ops["aten.clamp_min"] == 0
    assert total <= 420, f"{total} ops (758 with per-layer spectral norm, 370 when this was written)"


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_generator_forward_backward_ops(tiny, impl):
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    cfg, y = tiny
    g = Generator(cfg, impl=impl)
    total, ops = _fwd_bwd(g, torch.randn(4, cfg.z_dim), y)
    # The fused GenBlock path takes the refreshed weights too: one iteration per layer.
    assert ops["aten.mv"] == 2 * _sn_count(g)
    assert ops["aten.linalg_vector_norm"] == ops["aten.dot"] == 0
    bound = {"reference": 580, "cpp": 650}[impl]  # 845 / 918 before, 516 / 589 when written
    assert total <= bound, f"{total} ops"


def test_refresh_ops_per_layer(tiny):
    """The spectral norm alone: per layer only the products (and the views they need) in the
    forward, the <g, W> reduction and the views that shape u and v in the backward."""
    cfg, _ = tiny
    layers = spectral_norm_layers(Discriminator(cfg).train())
    convs = sum(layer.weight_orig.dim() == 4 for layer in layers)
    matrices = len(layers) - convs
    weights: list[torch.Tensor] = []
    forward, _ = _count(lambda: weights.extend(spectral_norm_weights(layers)))
    grads = [torch.randn_like(w) for w in weights]
    backward, ops = _count(lambda: torch.autograd.backward(weights, grads))
    backward -= ops["aten.detach"]  # AccumulateGrad storing each new .grad, not spectral norm
    assert forward <= 4 * convs + 3 * matrices + 10  # reshape, t, mv, mv + batched normalisation
    assert backward <= 3 * convs + 2 * matrices + 8  # sum, two views + batched update


@pytest.mark.skipif(_native.cpp_reason() is not None, reason="C++ extension unavailable")
def test_refresh_ops_per_network_cpp(tiny):
    """On the cpp backend the spectral norm of a whole network is a fixed handful of ops, however
    many layers it has: one kernel call for the group's iteration, one foreach division for
    W / sigma, and one kernel call for the group's weight gradients -- no per-layer op."""
    cfg, _ = tiny
    layers = spectral_norm_layers(Discriminator(cfg).train())
    assert len(layers) > 10
    weights: list[torch.Tensor] = []
    forward, fwd_ops = _count(lambda: weights.extend(spectral_norm_weights(layers, "cpp")))
    grads = [torch.randn_like(w) for w in weights]
    backward, ops = _count(lambda: torch.autograd.backward(weights, grads))
    backward -= ops["aten.detach"]  # AccumulateGrad storing each new .grad, not spectral norm
    assert fwd_ops["mgm_fast.spectral_norm_power_iteration_cpp"] == 1 and fwd_ops["aten.mv"] == 0
    assert ops["mgm_fast.spectral_norm_weight_grad_cpp"] == 1
    assert forward <= 4, fwd_ops
    assert backward <= 2, ops
