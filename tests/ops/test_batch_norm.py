"""The batch-norm op (mgm_fast.ops.batch_norm): the cpp backend against the reference twin --
outputs and running statistics bit-identical (the same aten forward), gradients within the
2x-error rule against float64 truth and close to torch's --, the choice of ``auto``, forced
backends that cannot run, argument errors, thread-count invariance, and the networks' BatchNorm
layers with the op."""

from __future__ import annotations

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


def _run(impl, x, weight, bias, grad_out, momentum=0.1, eps=1e-5):
    """(output, (grad x, grad weight, grad bias), running mean, running var, num_threads)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    running_mean, running_var = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
    out = batch_norm_train(leaves[0], leaves[1], leaves[2], running_mean, running_var, momentum, eps, impl=impl)
    out.backward(grad_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves], running_mean, running_var


@needs_cpp
def test_selftest_cases_pass_on_the_cpu():
    """Every small case (channel counts 8, 24, 5 without affine; channels_last) follows the 2x-error
    rule for the output and the gradients of input, weight and bias."""
    results = run_op(OP, "cpu", sizes=("small",))
    ran = [r for r in results if r.verdict != "n/a"]
    assert ran and all(r.verdict == "pass" for r in ran), [(r.case, r.layout, r.detail) for r in ran]
    assert {r.layout for r in ran} == {"channels_last"}  # NCHW inputs are not the backend's


@needs_cpp
@pytest.mark.parametrize("shape", [(8, 8, 64, 64), (2, 24, 5, 7), (3, 1, 4, 4), (4, 40, 3, 3), (1, 16, 1, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_cpp_matches_the_reference(shape, affine):
    x, weight, bias, grad_out = _inputs(shape, affine=affine)
    ref = _run("reference", x, weight, bias, grad_out)
    cpp = _run("cpp", x, weight, bias, grad_out)
    # The forward is the same aten op: bitwise equal outputs and running statistics.
    for a, b in ((cpp[0], ref[0]), (cpp[2], ref[2]), (cpp[3], ref[3])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cpp[0].is_contiguous(memory_format=torch.channels_last)
    assert cpp[1][0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(cpp[1], ref[1]):  # other summation orders: float32 rounding apart
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@needs_cpp
def test_gradients_are_as_close_to_float64_as_torchs():
    """At the tiny preset's slow shape (8 channels, 64x64, batch 8) the cpp gradients are within
    twice the error of torch's float32 ones against a float64 computation."""
    x, weight, bias, grad_out = _inputs((8, 8, 64, 64), seed=3)
    truth = _run("reference", x.double(), weight.double(), bias.double(), grad_out.double())
    ref = _run("reference", x, weight, bias, grad_out)
    cpp = _run("cpp", x, weight, bias, grad_out)
    for name, t, r, c in zip(("input", "weight", "bias"), truth[1], ref[1], cpp[1]):
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
        one = _cpp_backward_op(grad_out, x, weight, mean, invstd, [True, True, True])
        torch.set_num_threads(3)
        three = _cpp_backward_op(grad_out, x, weight, mean, invstd, [True, True, True])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
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
def test_networks_with_the_op_match_torchs_batch_norm():
    """The multi-task network in training mode, channels_last, its BatchNorm layers on "auto" (the
    fast engine's) and on "reference": equal outputs and running statistics, close gradients."""
    from mgm_fast.config import tiny_model
    from mgm_fast.models.multitask import MultiTaskNet

    torch.manual_seed(0)
    ref = MultiTaskNet(tiny_model()).to(memory_format=torch.channels_last)
    fast = MultiTaskNet(tiny_model()).to(memory_format=torch.channels_last)
    fast.load_state_dict(ref.state_dict())
    from mgm_fast.models.layers import use_batch_norm_impl

    use_batch_norm_impl(fast, "auto")
    images = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    outs = []
    for net in (ref, fast):
        out = net.decode(net.features(images))
        loss = sum(o.square().mean() for o in out.values())
        loss.backward()
        outs.append((out, {k: p.grad for k, p in net.named_parameters()}, dict(net.named_buffers())))
    for task in outs[0][0]:
        torch.testing.assert_close(outs[1][0][task], outs[0][0][task], rtol=0, atol=0)
    for name, buf in outs[0][2].items():
        torch.testing.assert_close(outs[1][2][name], buf, rtol=0, atol=0)
    for name, grad in outs[0][1].items():
        if grad is not None:
            torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=1e-5 * max(1.0, float(grad.abs().max())))
