"""mgm_fast.ops.gan_losses: hinge losses and instance noise against the references.

The fused noise backends draw a documented Philox stream that differs from torch.randn's, so
they are tested by what must hold: out == x + std * noise exactly (the kernels return their
draw on request), equal seeds give equal bits, the triton and cpp backends give the same
stream, and the draws look like iid N(0, 1) (moments, neighbour and lane correlations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops import REGISTRY, BackendUnavailable
from mgm_fast.ops import gan_losses as gl
from mgm_fast.ops._dispatch import triton_reason

HAS_CPP = _native.cpp_reason() is None
HAS_TRITON = triton_reason() is None
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"Triton unavailable: {triton_reason()}")

FUSED_NOISE = [
    pytest.param("cpp", "cpu", marks=needs_cpp),
    pytest.param("triton", TRITON_DEVICE, marks=needs_triton),
]


def images(shape=(3, 3, 11, 13), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 2 - 1).to(device, dtype)


# ---------------------------------------------------------------------------------------------
# instance noise


@pytest.mark.parametrize(("impl", "device"), FUSED_NOISE)
@pytest.mark.parametrize("shape", [(1,), (3, 3, 11, 13), (2, 3, 16, 16)])
def test_noise_is_exactly_x_plus_std_times_its_draw(impl, device, shape):
    x = images(shape, device=device)
    out, noise = gl.noisy(x, 0.05, 1234, return_noise=True, impl=impl)
    assert out.shape == x.shape and out.dtype == x.dtype and noise.dtype == torch.float32
    assert torch.equal(out, x + 0.05 * noise)
    assert torch.equal(out, gl.noisy(x, 0.05, 1234, impl=impl)), "equal seeds give equal bits"
    assert not torch.equal(out, gl.noisy(x, 0.05, 1235, impl=impl))


@needs_cpp
@needs_triton
def test_triton_and_cpp_draw_the_same_stream():
    x = images((5, 3, 9, 7))  # 945 elements: a partial last group of four
    _, n_cpp = gl.noisy(x, 1.0, 2**40 + 17, return_noise=True, impl="cpp")
    _, n_tri = gl.noisy(x.to(TRITON_DEVICE), 1.0, 2**40 + 17, return_noise=True, impl="triton")
    # the same Philox integers; log / cos / sin of numpy (or libdevice) and libm differ by ulps
    torch.testing.assert_close(n_tri.cpu(), n_cpp, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("impl", "device"), FUSED_NOISE)
def test_noise_moments_and_independence(impl, device):
    n = 2**14 if impl == "triton" else 2**20
    _, z = gl.noisy(torch.zeros(n, device=device), 1.0, 77, return_noise=True, impl=impl)
    z = z.double().cpu()
    tol = 5 / n**0.5
    assert abs(z.mean()) < tol
    assert abs(z.var() - 1) < 10 * tol
    assert abs((z**4).mean() - 3) < 40 * tol  # Gaussian kurtosis
    assert abs((z < 0).double().mean() - 0.5) < tol
    for lag in (1, 2, 3, 4, 1024):  # within a group of four, across groups, far apart
        assert abs((z[:-lag] * z[lag:]).mean()) < tol, lag
    for lane in range(4):  # every lane of the Box-Muller pairs is N(0, 1)
        zl = z[lane::4]
        assert abs(zl.mean()) < 2 * tol and abs(zl.var() - 1) < 20 * tol


@pytest.mark.parametrize(("impl", "device"), FUSED_NOISE)
def test_noise_generator_advances_and_reproduces(impl, device):
    x = images(device=device)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = gl.noisy(x, 0.1, g, impl=impl)
    b = gl.noisy(x, 0.1, g, impl=impl)
    assert not torch.equal(a, b), "a generator advances between calls"
    g.set_state(state)
    assert torch.equal(a, gl.noisy(x, 0.1, g, impl=impl)), "the same state draws the same noise"


@pytest.mark.parametrize(("impl", "device"), FUSED_NOISE)
def test_noise_channels_last_keeps_layout_and_gradient_is_identity(impl, device):
    x = images((2, 3, 6, 5), device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out, noise = gl.noisy(x, 0.2, 9, return_noise=True, impl=impl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.detach(), x.detach() + 0.2 * noise)
    w = torch.randn(out.shape, device=device)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.equal(g, w)
    strided = images((2, 3, 12, 5), device=device)[:, :, ::2]  # not dense: made contiguous
    out, noise = gl.noisy(strided, 0.2, 9, return_noise=True, impl=impl)
    assert torch.equal(out, strided + 0.2 * noise)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_noise_low_precision_rounds_once(dtype):
    x = images(dtype=dtype, device=TRITON_DEVICE)
    out, noise = gl.noisy(x, 0.05, 3, return_noise=True, impl="triton")
    want = (x.float() + 0.05 * noise).to(dtype)
    if dtype == torch.bfloat16 and TRITON_DEVICE == "cpu":
        # the interpreter rounds float32 -> bfloat16 toward zero (the GPU to nearest)
        torch.testing.assert_close(out, want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, want)


def test_reference_noise_is_the_released_formula():
    x = images()
    got = gl.noisy(x, 0.01, 42, impl="reference")
    want = gl.instance_noise(x, 0.01, torch.Generator().manual_seed(42))
    assert torch.equal(got, want)
    out, noise = gl.noisy(x, 0.01, 42, return_noise=True, impl="reference")
    assert torch.equal(out, want) and torch.equal(out, x + 0.01 * noise)


@pytest.mark.parametrize("impl", ["reference", *(["cpp"] if HAS_CPP else [])])
def test_noise_bad_arguments(impl):
    x = images()
    with pytest.raises(ValueError, match="std"):
        gl.noisy(x, -0.1, 1, impl=impl)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\^63\)"):
        gl.noisy(x, 0.1, -1, impl=impl)
    with pytest.raises(ValueError, match="seed_or_generator"):
        gl.noisy(x, 0.1, 1.5, impl=impl)
    with pytest.raises((ValueError, BackendUnavailable)):
        gl.noisy(torch.ones(3, dtype=torch.int64), 0.1, 1, impl=impl)


def test_noise_dispatch():
    op = REGISTRY["noisy"]
    x = images()
    assert op.select("auto", x, 0.1, 1).name == ("cpp" if HAS_CPP else "reference")
    assert op.select("auto", x.half(), 0.1, 1).name == "reference"
    if HAS_TRITON:
        with pytest.raises(BackendUnavailable, match=r"dtype torch\.float64"):
            gl.noisy(x.double().to(TRITON_DEVICE), 0.1, 1, impl="triton")


# ---------------------------------------------------------------------------------------------
# hinge losses


def scores(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * 1.5
    s.view(-1)[::5] = 1.0  # exactly on the hinges: relu'(0) = 0, as torch
    s.view(-1)[1::5] = -1.0
    return s.to(device, dtype)


def hinge_run(impl, d_real, d_fake, weight=0.7):
    r, f = (t.detach().clone().requires_grad_(True) for t in (d_real, d_fake))
    loss_d = gl.hinge_d_loss(r, f, impl=impl)
    g_r, g_f = torch.autograd.grad(weight * loss_d, [r, f])
    f2 = d_fake.detach().clone().requires_grad_(True)
    loss_g = gl.hinge_g_loss(f2, impl=impl)
    (g_g,) = torch.autograd.grad(weight * loss_g, [f2])
    return [loss_d.detach(), loss_g.detach()], [g_r, g_f, g_g]


@needs_triton
@pytest.mark.parametrize(("real_shape", "fake_shape"), [((1,), (1,)), ((7, 1), (7, 1)), ((37,), (20, 1)),
                                                        ((3, 1, 5, 5), (3, 1, 5, 5))])  # fmt: skip
def test_triton_hinge_matches_reference(real_shape, fake_shape):
    d_real = scores(real_shape, device=TRITON_DEVICE, seed=1)
    d_fake = scores(fake_shape, device=TRITON_DEVICE, seed=2)
    got, want = hinge_run("triton", d_real, d_fake), hinge_run("reference", d_real, d_fake)
    for a, b in zip(got[0], want[0]):
        assert a.dtype == torch.float32 and a.dim() == 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(got[1], want[1]):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)  # the same single rounding of +-grad / n


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_hinge_low_precision_two_x_error_rule(dtype):
    d_real = scores((64, 1), dtype=dtype, device=TRITON_DEVICE, seed=3)
    d_fake = scores((64, 1), dtype=dtype, device=TRITON_DEVICE, seed=4)
    fused, plain = hinge_run("triton", d_real, d_fake), hinge_run("reference", d_real, d_fake)
    truth = hinge_run("reference", d_real.double(), d_fake.double())
    for f, p, t in zip(fused[0], plain[0], truth[0]):
        assert (f.double() - t).abs() <= 2 * (p.double() - t).abs() + 1e-6 * t.abs()
    slack = 2.0**-7 if dtype == torch.bfloat16 and TRITON_DEVICE == "cpu" else 0.0  # interpreter rounding
    for f, p, t in zip(fused[1], plain[1], truth[1]):
        assert f.dtype == dtype
        err_f = (f.double() - t).abs().max()
        assert err_f <= 2 * (p.double() - t).abs().max() + slack * t.abs().max()


def test_hinge_reference_is_losses_and_rejects_non_float():
    d_real, d_fake = scores((5,)), scores((5,), seed=1)
    assert torch.equal(gl.hinge_d_loss(d_real, d_fake, impl="reference"), gl.hinge_d_reference(d_real, d_fake))
    assert torch.equal(gl.hinge_g_loss(d_fake, impl="reference"), gl.hinge_g_reference(d_fake))
    with pytest.raises(ValueError, match="d_fake must be a floating tensor"):
        gl.hinge_g_loss(torch.ones(3, dtype=torch.int64), impl="reference")
    assert REGISTRY["hinge_d_loss"].select("auto", d_real, d_fake).name == "reference"


# ---------------------------------------------------------------------------------------------
# ahead-of-time lowering, GPU


@needs_triton
def test_every_triton_kernel_lowers_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "mgm_fast.ops._triton.aot", "mgm_fast.ops._triton.gan_losses", "--arch", "90"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    kernels = {label.split(":")[1].split("[")[0] for label in report}
    assert kernels == {"noisy", "hinge_d_fwd", "hinge_d_bwd", "hinge_g_fwd", "hinge_g_bwd"}
    for label, sizes in report.items():
        assert sizes["ptx"] > 1000 and sizes["cubin"] > 1000, label


@pytest.mark.gpu
def test_gpu_noise_from_a_cuda_generator_matches_the_cpu_stream():
    if TRITON_DEVICE != "cuda":
        pytest.skip("TRITON_INTERPRET=1: Triton runs on CPU tensors in this process")
    x = images((4, 3, 32, 32), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    out, noise = gl.noisy(x, 0.01, g, return_noise=True, impl="triton")
    torch.testing.assert_close(out, x + 0.01 * noise, rtol=0, atol=1e-6)  # the GPU may fuse a*b+c
    if HAS_CPP:
        _, on_gpu = gl.noisy(x, 1.0, 99, return_noise=True, impl="triton")
        _, on_cpu = gl.noisy(x.cpu(), 1.0, 99, return_noise=True, impl="cpp")
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-4)
