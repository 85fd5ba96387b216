"""mgm_fast.ops.ntxent: fused NT-Xent backends against the plain-PyTorch references.

Values and gradients (w.r.t. both views, or rows AND columns) on fresh random inputs: batch 1,
odd projection sizes, temperatures, row subsets, strided inputs, degenerate projections (zero,
identical, huge), the identity ntxent_loss == ntxent_rows(u, u, arange) / 2B, a simulated
all-gather over two ranks, the 2x-error rule against float64, bad input, dispatch. Triton runs
under the interpreter (small shapes) and is lowered ahead of time for sm_90; GPU cases carry
the ``gpu`` marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from mgm_fast import _native
from mgm_fast.ops import REGISTRY, BackendUnavailable
from mgm_fast.ops import ntxent as nx
from mgm_fast.ops._dispatch import triton_reason

HAS_CPP = _native.cpp_reason() is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")
needs_triton = pytest.mark.skipif(triton_reason() is not None, reason=f"Triton unavailable: {triton_reason()}")
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _gen(*key) -> torch.Generator:
    """Fresh inputs per case, reproducible run to run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def views(b, d, dtype=torch.float32, device="cpu", scale=1.0, key=0):
    g = _gen("views", b, d, key)
    z1 = torch.randn(b, d, generator=g) * scale
    z2 = z1 + 0.5 * torch.randn(b, d, generator=g) * scale  # correlated, as two augmentations
    return z1.to(device, dtype), z2.to(device, dtype)


def loss_and_grads(fn, tensors, weight=0.7):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    grads = torch.autograd.grad(weight * loss, leaves)
    return loss.detach(), grads


def assert_close_grads(got, want, rtol=1e-5, atol_rel=3e-4):
    """Loss to rtol; gradients to rtol plus atol_rel of their largest entry. The gradient of
    a normalised vector is a difference of terms up to ~1/tau larger than itself
    (g - u (u . g)), so two float32 evaluations differ by up to ~1e-4 of the result; the
    float64 2x-error rule (applied alongside) is the precision check."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(b.abs().max().item(), 1e-30)
        torch.testing.assert_close(a, b, rtol=max(rtol, 1e-4), atol=atol_rel * scale)


def rows_case(n, r, d, key=0, dtype=torch.float32, device="cpu"):
    """cols (2N, D), a random subset of R of them as rows (separate tensors), row_index."""
    g = _gen("rows", n, r, d, key)
    cols = torch.randn(2 * n, d, generator=g)
    index = torch.randperm(2 * n, generator=g)[:r]
    rows = cols[index].clone()
    return rows.to(device, dtype), cols.to(device, dtype), index.to(device)


# ---------------------------------------------------------------------------------------------
# the references


def test_rows_reference_identity_with_losses_ntxent():
    z1, z2 = views(6, 9)
    u = torch.cat([z1, z2])
    got = nx.ntxent_rows_reference(u, u, torch.arange(12), 0.3) / 12
    torch.testing.assert_close(got, nx.ntxent_loss_reference(z1, z2, 0.3))


def test_simulated_all_gather_sums_to_the_global_loss():
    """Two ranks of b = 3 images: each takes its views against the gathered columns."""
    world, b, d, tau = 2, 3, 8, 0.4
    z1, z2 = views(world * b, d)
    z1, z2 = z1.requires_grad_(True), z2.requires_grad_(True)
    total = 0
    for rank in range(world):
        local = slice(rank * b, (rank + 1) * b)
        cols = torch.cat([z1, z2])  # what an autograd-aware all_gather returns on every rank
        rows = torch.cat([z1[local], z2[local]])
        index = torch.cat([torch.arange(b), torch.arange(b) + world * b]) + rank * b
        total = total + nx.ntxent_rows(rows, cols, index, tau, impl="reference") / (2 * world * b)
    g_ranks = torch.autograd.grad(total, [z1, z2])
    z1g, z2g = z1.detach().requires_grad_(True), z2.detach().requires_grad_(True)
    want = nx.ntxent_loss_reference(z1g, z2g, tau)
    torch.testing.assert_close(total, want)
    for a, b_ in zip(g_ranks, torch.autograd.grad(want, [z1g, z2g])):
        torch.testing.assert_close(a, b_)


# ---------------------------------------------------------------------------------------------
# cpp


@needs_cpp
@pytest.mark.parametrize(("b", "d"), [(1, 1), (1, 64), (2, 7), (5, 33), (32, 64)])
@pytest.mark.parametrize("tau", [0.5, 0.07])
def test_cpp_loss_matches_reference(b, d, tau):
    z = views(b, d)
    got = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, tau, impl="cpp"), z)
    want = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, tau, impl="reference"), z)
    assert_close_grads(got, want)
    _two_x_error_rule(got, want, _fp64_truth(*z, tau), torch.float32)


@needs_cpp
@pytest.mark.parametrize(("n", "r", "d"), [(1, 1, 3), (5, 7, 5), (19, 38, 17), (40, 13, 64)])
def test_cpp_rows_matches_reference_both_gradients(n, r, d):
    rows, cols, index = rows_case(n, r, d)
    fn = lambda impl: lambda x, y: nx.ntxent_rows(x, y, index, 0.3, impl=impl)  # noqa: E731
    assert_close_grads(loss_and_grads(fn("cpp"), (rows, cols)), loss_and_grads(fn("reference"), (rows, cols)))


@needs_cpp
def test_cpp_rows_unrelated_rows_and_strided_inputs():
    g = _gen("strided")
    cols = torch.randn(24, 40, generator=g)[:, ::2]  # D = 20 with stride 2
    rows = torch.randn(20, 9, generator=g).t()       # (9, 20), D not unit-stride
    index = torch.randint(0, 24, (9,), generator=g)  # repeats allowed
    assert not cols.is_contiguous() and not rows.is_contiguous()
    fn = lambda impl: lambda x, y: nx.ntxent_rows(x, y, index, 0.5, impl=impl)  # noqa: E731
    assert_close_grads(loss_and_grads(fn("cpp"), (rows, cols)), loss_and_grads(fn("reference"), (rows, cols)))


@needs_cpp
@pytest.mark.parametrize("case", ["zero_row", "identical", "huge", "tiny_tau"])
def test_cpp_degenerate_projections(case):
    z1, z2 = views(6, 16)
    tau = 0.5
    if case == "zero_row":
        z1[2] = 0.0  # F.normalize maps it to 0; its gradient is scaled by 1 / eps
    elif case == "identical":
        z2 = z1.clone()
        z1[1] = z1[0]
    elif case == "huge":
        z1, z2 = z1 * 1e4, z2 * 1e4
    else:
        tau = 0.02  # logits up to 50
    got = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, tau, impl="cpp"), (z1, z2))
    assert all(torch.isfinite(t).all() for t in (got[0], *got[1]))
    want = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, tau, impl="reference"), (z1, z2))
    assert_close_grads(got, want, rtol=2e-5)


@needs_cpp
def test_cpp_identity_and_retain_graph():
    z1, z2 = views(7, 12)
    u = torch.cat([z1, z2]).requires_grad_(True)
    a = nx.ntxent_rows(u, u, torch.arange(14), 0.5, impl="cpp") / 14
    b = nx.ntxent_loss(z1, z2, 0.5, impl="cpp")
    torch.testing.assert_close(a, b)
    (g1,) = torch.autograd.grad(a, u, retain_graph=True)
    (g2,) = torch.autograd.grad(2 * a, u)
    torch.testing.assert_close(g2, 2 * g1)


@needs_cpp
def test_cpp_bit_reproducible_across_thread_counts():
    rows, cols, index = rows_case(150, 300, 64)
    before = torch.get_num_threads()
    fn = lambda x, y: nx.ntxent_rows(x, y, index, 0.5, impl="cpp")  # noqa: E731
    try:
        torch.set_num_threads(1)
        one = loss_and_grads(fn, (rows, cols))
        torch.set_num_threads(2)
        two = loss_and_grads(fn, (rows, cols))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and all(torch.equal(a, b) for a, b in zip(one[1], two[1]))


@needs_cpp
def test_cpp_gradient_of_cols_only():
    rows, cols, index = rows_case(6, 5, 8)
    cols = cols.requires_grad_(True)
    loss = nx.ntxent_rows(rows, cols, index, impl="cpp")
    (g,) = torch.autograd.grad(loss, cols)
    (want,) = torch.autograd.grad(nx.ntxent_rows(rows, cols, index, impl="reference"), cols)
    torch.testing.assert_close(g, want)


# ---------------------------------------------------------------------------------------------
# triton (interpreter on the CPU)


@needs_triton
@pytest.mark.parametrize(("b", "d"), [(1, 5), (5, 7), (20, 64)])
def test_triton_loss_matches_reference(b, d):
    z = views(b, d, device=TRITON_DEVICE)
    got = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.3, impl="triton"), z)
    want = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.3, impl="reference"), z)
    assert_close_grads(got, want)
    _two_x_error_rule(_to_cpu(got), _to_cpu(want), _fp64_truth(*(t.cpu() for t in z), 0.3), torch.float32)


@needs_triton
@pytest.mark.parametrize(("n", "r", "d"), [(1, 1, 3), (25, 17, 20)])
def test_triton_rows_matches_reference_both_gradients(n, r, d):
    rows, cols, index = rows_case(n, r, d, device=TRITON_DEVICE)
    fn = lambda impl: lambda x, y: nx.ntxent_rows(x, y, index, 0.5, impl=impl)  # noqa: E731
    assert_close_grads(loss_and_grads(fn("triton"), (rows, cols)), loss_and_grads(fn("reference"), (rows, cols)))


@needs_triton
def test_triton_degenerate_projections_stay_finite():
    z1, z2 = views(5, 16, device=TRITON_DEVICE)
    z1[2] = 0.0
    z2 = z2 * 1e4
    got = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.05, impl="triton"), (z1, z2))
    assert all(torch.isfinite(t).all() for t in (got[0], *got[1]))
    want = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.05, impl="reference"), (z1, z2))
    assert_close_grads(got, want, rtol=2e-5)


def _fp64_truth(z1, z2, tau, weight=0.7):
    a, c = z1.detach().double().requires_grad_(True), z2.detach().double().requires_grad_(True)
    u = F.normalize(torch.cat([a, c]), dim=1)
    n = u.shape[0]
    sim = (u @ u.t() / tau).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    pos = torch.arange(n).roll(n // 2)
    loss = (torch.logsumexp(sim, 1) - sim[torch.arange(n), pos]).mean()
    return loss.detach(), torch.autograd.grad(weight * loss, [a, c])


def _to_cpu(result):
    return result[0].cpu(), [g.cpu() for g in result[1]]


def _two_x_error_rule(fused, plain, truth, dtype, ulp_slack=0.0):
    err = lambda x, y: (x.double() - y).abs().max().item()  # noqa: E731
    assert err(fused[0], truth[0]) <= 2 * err(plain[0], truth[0]) + 1e-6 * truth[0].abs().item()
    for f, p, t in zip(fused[1], plain[1], truth[1]):
        assert f.dtype == dtype
        floor = (1e-6 + ulp_slack) * t.abs().max().item()
        assert err(f, t) <= 2 * err(p, t) + floor, (err(f, t), err(p, t))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_two_x_error_rule(dtype):
    z = views(12, 24, dtype=dtype, device=TRITON_DEVICE)
    fused = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.2, impl="triton"), z)
    plain = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.2, impl="reference"), z)
    truth = _fp64_truth(*(t.cpu() for t in z), 0.2)
    # the interpreter rounds float32 -> bfloat16 toward zero (the GPU to nearest): one ulp
    slack = 2.0**-7 if dtype == torch.bfloat16 and TRITON_DEVICE == "cpu" else 0.0
    _two_x_error_rule(_to_cpu(fused), _to_cpu(plain), truth, dtype, slack)


@needs_cpp
def test_cpp_two_x_error_rule_float32():
    z = views(40, 64)
    fused = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.1, impl="cpp"), z)
    plain = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.1, impl="reference"), z)
    _two_x_error_rule(fused, plain, _fp64_truth(*z, 0.1), torch.float32)


@needs_triton
def test_every_triton_kernel_lowers_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "mgm_fast.ops._triton.aot", "mgm_fast.ops._triton.ntxent", "--arch", "90"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    kernels = {label.split(":")[1].split("[")[0] for label in report}
    assert kernels == {"inv_norm", "ntxent_fwd", "ntxent_bwd_rows", "ntxent_bwd_cols"}
    for label, sizes in report.items():
        assert sizes["ptx"] > 1000 and sizes["cubin"] > 1000, label


# ---------------------------------------------------------------------------------------------
# bad input and dispatch


@pytest.mark.parametrize("impl", ["reference", *(["cpp"] if HAS_CPP else [])])
def test_bad_input_names_the_tensor(impl):
    z1, z2 = views(4, 8)
    with pytest.raises(ValueError, match="same"):
        nx.ntxent_loss(z1, z2[:3], impl=impl)
    with pytest.raises(ValueError, match="temperature"):
        nx.ntxent_loss(z1, z2, 0.0, impl=impl)
    rows, cols, index = rows_case(4, 3, 8)
    with pytest.raises(ValueError, match="cols must hold the 2N views"):
        nx.ntxent_rows(rows, cols[:7], index % 7, impl=impl)
    with pytest.raises(ValueError, match="differ in D"):
        nx.ntxent_rows(rows[:, :5], cols, index, impl=impl)
    with pytest.raises(ValueError, match=r"row_index holds 8, not a column index in \[0, 8\)"):
        nx.ntxent_rows(rows, cols, torch.tensor([0, 8, 1]), impl=impl)
    with pytest.raises(ValueError, match="row_index must be an int64 tensor"):
        nx.ntxent_rows(rows, cols, index.int(), impl=impl)


def test_dispatch_rules():
    op = REGISTRY["ntxent_loss"]
    z1, z2 = views(3, 8)
    expected = "cpp" if HAS_CPP else "reference"
    assert op.select("auto", z1, z2).name == expected
    assert op.select("auto", z1.half(), z2.half()).name == "reference"
    with pytest.raises(BackendUnavailable, match="device cpu not supported"):
        nx.ntxent_loss(z1, z2, impl="cuda")
    if triton_reason() is None:
        with pytest.raises(BackendUnavailable, match="projection dim above 512"):
            nx.ntxent_loss(*views(2, 600, device=TRITON_DEVICE), impl="triton")
        with pytest.raises(BackendUnavailable, match="differ in dtype"):
            nx.ntxent_loss(z1.to(TRITON_DEVICE), z2.half().to(TRITON_DEVICE), impl="triton")


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_two_x_error_rule(impl, dtype):
    if impl == "triton" and TRITON_DEVICE != "cuda":
        pytest.skip("TRITON_INTERPRET=1: Triton runs on CPU tensors in this process")
    z = views(96, 64, dtype=dtype, device="cuda")
    fused = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.2, impl=impl), z)
    plain = loss_and_grads(lambda a, c: nx.ntxent_loss(a, c, 0.2, impl="reference"), z)
    truth = _fp64_truth(*(t.cpu() for t in z), 0.2)
    _two_x_error_rule(_to_cpu(fused), _to_cpu(plain), truth, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_rows_large_batch_matches_reference(impl):
    if impl == "triton" and TRITON_DEVICE != "cuda":
        pytest.skip("TRITON_INTERPRET=1: Triton runs on CPU tensors in this process")
    rows, cols, index = rows_case(2048, 1000, 128, device="cuda")
    fn = lambda i: lambda x, y: nx.ntxent_rows(x, y, index, 0.5, impl=i)  # noqa: E731
    assert_close_grads(loss_and_grads(fn(impl), (rows, cols)), loss_and_grads(fn("reference"), (rows, cols)),
                       rtol=1e-4)  # fmt: skip
