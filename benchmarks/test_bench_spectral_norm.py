"""Forward + backward of the spectral norm of a whole network (mgm_fast.ops.spectral_norm): the
``cpp`` backend (one kernel call for every layer's power iteration, one for every layer's weight
gradient, channels_last weights read in place) vs the ``reference`` backend (foreach ops, two
products per layer; a channels_last conv weight is copied by its matrix reshape).

Groups: every spectrally normalised layer of the generator and of the discriminator of the tiny
and paper presets, weights channels_last as the fast engine keeps them, training mode (one power
iteration per layer). Each timed step computes ``W / sigma`` of every layer and the gradient of
their sum of squares w.r.t. every weight.

``pytest benchmarks/test_bench_spectral_norm.py --benchmark-group-by=group``
"""

from __future__ import annotations

import functools

import pytest
import torch

from mgm_fast import _native
from mgm_fast.config import preset
from mgm_fast.models import Discriminator, Generator
from mgm_fast.models.layers import spectral_norm_layers
from mgm_fast.ops.spectral_norm import normalize_weights

NETWORKS = {"G": Generator, "D": Discriminator}


@functools.cache
def _group(size: str, net: str):
    """(weights, us, vs, steps, eps) of every SN layer of the network, weights channels_last."""
    torch.manual_seed(0)
    model = NETWORKS[net](preset(size).model).to(memory_format=torch.channels_last).train()
    layers = spectral_norm_layers(model)
    weights = [layer.weight_orig.detach() for layer in layers]
    return (weights, [layer.weight_u for layer in layers], [layer.weight_v for layer in layers],
            [layer.n_power_iterations for layer in layers], [layer.eps for layer in layers])  # fmt: skip


def _step(impl, weights, us, vs, steps, eps):
    leaves = [w.requires_grad_(True) for w in (w.detach() for w in weights)]
    out, _, _ = normalize_weights(leaves, us, vs, steps, eps, impl=impl)
    grads = torch.autograd.grad(sum(o.square().sum() for o in out), leaves)
    return out, grads


@pytest.mark.parametrize("net", list(NETWORKS))
@pytest.mark.parametrize("size", ["tiny", "paper"])
@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_bench_spectral_norm_fwd_bwd_cpu(benchmark, impl, size, net):
    if impl == "cpp" and _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    if size == "paper" and benchmark.disabled:
        pytest.skip("paper-size groups only when benchmarking (about 70M weights)")
    group = _group(size, net)
    weights = group[0]
    benchmark.group = (f"spectral norm fwd+bwd cpu {size} {net}: {len(weights)} layers, "
                       f"{sum(w.numel() for w in weights) / 1e6:.2f}M weights")  # fmt: skip
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), layers=len(weights),
                                baseline=impl == "reference")  # fmt: skip
    out, grads = benchmark(_step, impl, *group)
    assert all(torch.isfinite(t).all() for t in (*out, *grads))
