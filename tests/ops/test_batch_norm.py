"""The batch-norm op (mgm_fast.ops.batch_norm), with and without the fused ReLU: the cpp backend
against the reference twin (outputs, running statistics and gradients close; within the 2x-error
rule against float64 truth), the choice of ``auto``, forced backends that cannot run, argument
errors, thread-count invariance, and the networks' BatchNorm layers with the op."""

from __future__ import annotations

import copy

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops import BackendUnavailable
from mgm_fast.ops._selftest import run_op
from mgm_fast.ops.batch_norm import OP, _cpp_backward_op, batch_norm_train

needs_cpp = pytest.mark.skipif(_native.cpp_reason() is not None, reason="C++ extension unavailable")


def _inputs(shape, channels_last=True, affine=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = 2.0 * torch.randn(1, c, 1, 1, generator=gen) + torch.randn(shape, generator=gen)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, generator=gen).to(dtype) if affine else None
    bias = torch.randn(c, generator=gen).to(dtype) if affine else None
    grad_out = torch.randn(shape, generator=gen).to(dtype)
    return x, weight, bias, grad_out


def _run(impl, x, weight, bias, grad_out, momentum=0.1, eps=1e-5, relu=False, residual=None):
    """(output, (grad x, grad weight, grad bias[, grad residual]), running mean, running var)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    running_mean, running_var = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
    out = batch_norm_train(leaves[0], leaves[1], leaves[2], running_mean, running_var, momentum, eps, relu,
                           leaves[3], impl=impl)  # fmt: skip
    out.backward(grad_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves], running_mean, running_var


@needs_cpp
def test_selftest_cases_pass_on_the_cpu():
    """Every small case (channel counts 8, 24, 5 without affine, with and without ReLU;
    channels_last) follows the 2x-error rule for the output and the gradients of input, weight
    and bias."""
    results = run_op(OP, "cpu", sizes=("small",))
    ran = [r for r in results if r.verdict != "n/a"]
    assert ran and all(r.verdict == "pass" for r in ran), [(r.case, r.layout, r.detail) for r in ran]
    assert {r.layout for r in ran} == {"channels_last"}  # NCHW inputs are not the backend's


@needs_cpp
@pytest.mark.parametrize("shape", [(8, 8, 64, 64), (2, 24, 5, 7), (3, 1, 4, 4), (4, 40, 3, 3), (1, 16, 1, 3)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_cpp_matches_the_reference(shape, affine, relu, residual):
    x, weight, bias, grad_out = _inputs(shape, affine=affine)
    shortcut = torch.randn(shape, generator=torch.Generator().manual_seed(9)) if residual else None  # NCHW: copied
    ref = _run("reference", x, weight, bias, grad_out, relu=relu, residual=shortcut)
    cpp = _run("cpp", x, weight, bias, grad_out, relu=relu, residual=shortcut)
    assert cpp[0].is_contiguous(memory_format=torch.channels_last)
    assert cpp[1][0].is_contiguous(memory_format=torch.channels_last)
    if relu:
        assert bool((cpp[0] >= 0).all())
    # other summation orders: float32 rounding apart
    for a, b in ((cpp[0], ref[0]), (cpp[2], ref[2]), (cpp[3], ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))
    for a, b in zip(cpp[1], ref[1]):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@needs_cpp
@pytest.mark.parametrize("relu", [False, True])
def test_results_are_as_close_to_float64_as_torchs(relu):
    """At the tiny preset's slow shape (8 channels, 64x64, batch 8) the cpp output, running
    statistics and gradients are within twice the error of torch's float32 ones against a float64
    computation."""
    x, weight, bias, grad_out = _inputs((8, 8, 64, 64), seed=3)
    truth = _run("reference", x.double(), weight.double(), bias.double(), grad_out.double(), relu=relu)
    ref = _run("reference", x, weight, bias, grad_out, relu=relu)
    cpp = _run("cpp", x, weight, bias, grad_out, relu=relu)
    named = [("output", truth[0], ref[0], cpp[0]), ("running_mean", truth[2], ref[2], cpp[2]),
             ("running_var", truth[3], ref[3], cpp[3])]  # fmt: skip
    named += list(zip(("grad input", "grad weight", "grad bias"), truth[1], ref[1], cpp[1]))
    for name, t, r, c in named:
        ref_err = float((r.double() - t).abs().max())
        cpp_err = float((c.double() - t).abs().max())
        assert cpp_err <= 2 * ref_err + 1e-6 * float(t.abs().max()), (name, cpp_err, ref_err)


@needs_cpp
def test_backward_does_not_depend_on_the_thread_count():
    """The kernel's gradients for given batch statistics (torch's forward statistics themselves
    may differ in the last bit between thread counts)."""
    x, weight, _, grad_out = _inputs((4, 24, 32, 32), seed=5)
    mean, invstd = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpp_backward_op(grad_out, x, weight, mean, invstd, None, [True, True, True, False])
        torch.set_num_threads(3)
        three = _cpp_backward_op(grad_out, x, weight, mean, invstd, None, [True, True, True, False])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one[:3], three[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpp
def test_auto_takes_cpp_for_channels_last_float32_only(monkeypatch):
    monkeypatch.setattr(OP, "resolutions", {})
    cl, weight, bias, _ = _inputs((2, 8, 4, 4))
    args = (weight, bias, torch.zeros(8), torch.ones(8), 0.1, 1e-5)
    assert OP.select("auto", cl, *args).name == "cpp"
    assert OP.select("auto", cl.contiguous(), *args).name == "reference"
    double = [t.double() for t in (cl, weight, bias)]
    assert OP.select("auto", double[0], *double[1:], torch.zeros(8).double(), torch.ones(8).double(), 0.1,
                     1e-5).name == "reference"  # fmt: skip


@needs_cpp
def test_calls_remember_their_selection_per_kind_and_check_bad_arguments_every_time(monkeypatch):
    """Eager calls check and select once per kind of call (shapes, dtypes, devices, the input's
    layout), then reuse it; the memo follows the layout, and a bad call raises every time."""
    OP.reset_run_record()
    cl, weight, bias, _ = _inputs((2, 8, 4, 4))
    checks = []
    real_check = OP.check
    monkeypatch.setattr(OP, "check", lambda *a, **k: (checks.append(1), real_check(*a, **k)))
    for _ in range(3):
        batch_norm_train(cl, weight, bias, torch.zeros(8), torch.ones(8), 0.1, 1e-5)
    batch_norm_train(cl.contiguous(), weight, bias, torch.zeros(8), torch.ones(8), 0.1, 1e-5)
    assert len(checks) == 2
    assert sorted(b.name for b in OP._selected.values()) == ["cpp", "reference"]
    for _ in range(2):
        with pytest.raises(ValueError, match=r"running_mean must be \(8,\)"):
            batch_norm_train(cl, weight, bias, torch.zeros(7), torch.ones(8), 0.1, 1e-5)
    OP.reset_run_record()


@needs_cpp
def test_forced_cpp_refuses_what_it_cannot_run():
    x, weight, bias, _ = _inputs((2, 8, 4, 4), channels_last=False)
    with pytest.raises(BackendUnavailable, match="channels_last"):
        batch_norm_train(x, weight, bias, torch.zeros(8), torch.ones(8), 0.1, 1e-5, impl="cpp")
    x64 = x.double().contiguous(memory_format=torch.channels_last)
    with pytest.raises(BackendUnavailable, match="float64"):
        batch_norm_train(x64, weight.double(), bias.double(), torch.zeros(8).double(), torch.ones(8).double(), 0.1,
                         1e-5, impl="cpp")  # fmt: skip


def test_argument_errors_name_the_tensor():
    x, weight, bias, _ = _inputs((2, 8, 4, 4))
    with pytest.raises(ValueError, match="input must be a floating"):
        batch_norm_train(x[0], weight, bias, torch.zeros(8), torch.ones(8), 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        batch_norm_train(x, weight, bias[:3], torch.zeros(8), torch.ones(8), 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"running_var must be \(8,\)"):
        batch_norm_train(x, weight, bias, torch.zeros(8), torch.ones(9), 0.1, 1e-5)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        batch_norm_train(x, weight, bias, None, None, 0.1, 1e-5)


@needs_cpp
def test_networks_with_the_op_are_as_accurate_as_torchs_batch_norm(monkeypatch):
    """The multi-task network in training mode, channels_last, its BatchNorm layers on "auto" (the
    fast engine's, ReLUs fused) and on "reference", both float32, against the same network in
    float64: every output, running statistic and gradient of the fast one is within twice the
    error of torch's float32 one (plus 1e-5 of the largest value of its kind: conv biases before
    a BatchNorm have a true gradient of ~0, whose float32 values are rounding noise)."""
    from mgm_fast.config import tiny_model
    from mgm_fast.models.layers import use_batch_norm_impl
    from mgm_fast.models.multitask import MultiTaskNet

    monkeypatch.setattr(OP, "resolutions", {})
    torch.manual_seed(0)
    ref = MultiTaskNet(tiny_model()).to(memory_format=torch.channels_last)
    fast = copy.deepcopy(ref)
    use_batch_norm_impl(fast, "auto")
    truth = copy.deepcopy(ref).double()
    images = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    results = []
    for net in (ref, fast, truth):
        out = net.decode(net.features(images.to(next(net.parameters()).dtype)))
        sum(o.square().mean() for o in out.values()).backward()
        values = {f"out {k}": v.detach() for k, v in out.items()}
        values.update({f"buffer {k}": b for k, b in net.named_buffers() if b.is_floating_point()})
        values.update({f"grad {k}": p.grad for k, p in net.named_parameters() if p.grad is not None})
        results.append({k: v.double() for k, v in values.items()})
    assert OP.resolutions["cpu float32"]["backend"] == "cpp"  # the fast network's layers ran the op
    plain, fused, exact = results
    scale = {kind: max(float(v.abs().max()) for k, v in exact.items() if k.startswith(kind))
             for kind in ("out", "buffer", "grad")}  # fmt: skip
    for name, t in exact.items():
        plain_err = float((plain[name] - t).abs().max())
        fused_err = float((fused[name] - t).abs().max())
        assert fused_err <= 2 * plain_err + 1e-5 * scale[name.split()[0]], (name, fused_err, plain_err)
