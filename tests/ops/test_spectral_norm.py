"""The spectral-norm op (mgm_fast.ops.spectral_norm): the cpp backend against the reference twin
and float64 truth (values of W / sigma, sigma, u, v and the weights' gradients, the 2x-error
rule), channels_last weights, mixed step counts, evaluation mode, argument errors, and the op
traced by torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops import BackendUnavailable
from mgm_fast.ops._selftest import run_op
from mgm_fast.ops.spectral_norm import OP, normalize_weights

needs_cpp = pytest.mark.skipif(_native.cpp_reason() is not None, reason="C++ extension unavailable")


def _group(dtype=torch.float32, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5, 3, 3), (9, 13), (4, 2, 1, 1), (3, 7)]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    if channels_last:
        weights = [w.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else w for w in weights]
    us = [torch.nn.functional.normalize(torch.randn(s[0], generator=gen, dtype=torch.float64), dim=0).to(dtype)
          for s in shapes]  # fmt: skip
    vs = [torch.nn.functional.normalize(torch.randn(w.numel() // w.shape[0], generator=gen, dtype=torch.float64),
                                        dim=0).to(dtype) for w in weights]  # fmt: skip
    return weights, us, vs


@needs_cpp
def test_selftest_cases_pass_on_the_cpu():
    """Every small case (two layouts, mixed steps, evaluation mode) follows the 2x-error rule."""
    results = run_op(OP, "cpu", sizes=("small",))
    assert results and all(r.verdict == "pass" for r in results), [(r.case, r.layout, r.detail) for r in results]


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_matches_reference_values_and_gradients(channels_last):
    steps, eps = [1, 2, 0, 1], [1e-12] * 4
    results = {}
    for impl in ("reference", "cpp"):
        weights, us, vs = _group(channels_last=channels_last)
        weights = [w.requires_grad_() for w in weights]
        out, new_us, new_vs = normalize_weights(weights, us, vs, steps, eps, impl=impl)
        cot = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=cot)).sum() for o in out)
        loss.backward()
        results[impl] = (out, new_us, new_vs, [w.grad for w in weights])
        for o, w in zip(out, weights):
            assert o.shape == w.shape and o.stride() == w.stride()
    for ref, got in zip(results["reference"], results["cpp"]):
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-6)


@needs_cpp
def test_evaluation_layers_keep_their_vectors_and_inputs_are_not_written():
    weights, us, vs = _group()
    before = [t.clone() for t in (*us, *vs)]
    _, new_us, new_vs = normalize_weights(weights, us, vs, [0, 1, 0, 1], [1e-12] * 4, impl="cpp")
    assert new_us[0] is us[0] and new_vs[2] is vs[2]
    assert not torch.equal(new_us[1], us[1])
    for t, b in zip((*us, *vs), before):
        assert torch.equal(t, b)


@needs_cpp
def test_cpp_refuses_float64_and_auto_takes_the_reference():
    weights, us, vs = _group(torch.float64)
    with pytest.raises(BackendUnavailable, match="float64"):
        normalize_weights(weights, us, vs, [1] * 4, [1e-12] * 4, impl="cpp")
    assert OP.select("auto", weights, us, vs, (1,) * 4, (1e-12,) * 4).name == "reference"
    floats = [[t.float() for t in group] for group in (weights, us, vs)]
    assert OP.select("auto", *floats, (1,) * 4, (1e-12,) * 4).name == "cpp"


@pytest.mark.parametrize("bad, match", [
    ("u", r"layer 1: weight \(9, 13\) needs u \(9,\)"),
    ("steps", "steps must be >= 0"),
    ("count", "4 step counts"),
])  # fmt: skip
def test_argument_errors_name_the_layer(bad, match):
    weights, us, vs = _group()
    steps, eps = [1] * 4, [1e-12] * 4
    if bad == "u":
        us[1] = us[1][:-1]
    elif bad == "steps":
        steps[2] = -1
    else:
        steps = [*steps[:3], 1, 1]
        match = "5 step counts"
    with pytest.raises(ValueError, match=match):
        normalize_weights(weights, us, vs, steps, eps)


@needs_cpp
def test_compiled_fullgraph_equals_eager():
    torch._dynamo.reset()

    def run(weights, us, vs):
        out, new_us, new_vs = normalize_weights(weights, us, vs, [1, 2, 0, 1], [1e-12] * 4, impl="cpp")
        return sum(o.square().sum() for o in out), new_us, new_vs

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    eager_w, us, vs = _group(channels_last=True)
    comp_w = [w.clone().requires_grad_() for w in eager_w]
    eager_w = [w.requires_grad_() for w in eager_w]
    loss, eu, ev = run(eager_w, us, vs)
    loss_c, cu, cv = compiled(comp_w, us, vs)
    loss.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    for a, b in zip((*eu, *ev, *[w.grad for w in eager_w]), (*cu, *cv, *[w.grad for w in comp_w])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
