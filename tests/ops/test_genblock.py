"""mgm_fast.ops.genblock: the fused GenBlock and its piece against the plain-PyTorch reference.

Fresh random inputs per case (non-trivial embeddings, running statistics and biases); values,
every gradient (x, embedding rows, weights, biases; gamma/beta/residual for the piece) and the
running statistics after the step; the paper's channel/size pairs scaled down, odd channel
counts, batch 1 and 3, non-square maps, NCHW and channels_last, training and eval, momentum
None. Low precision follows the 2x-error rule: the fused error against an fp64 evaluation of the
reference is at most twice the error of the reference run in the same precision (plus a small
absolute slack). The exact rewrites (phase weights, 1x1 before upsampling) are checked on their
own in fp64.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from mgm_fast import _native
from mgm_fast.models.gan import GenBlock
from mgm_fast.ops import REGISTRY, BackendUnavailable
from mgm_fast.ops import genblock as gb
from mgm_fast.ops.genblock import genblock_reference

OP = REGISTRY["genblock"]
PIECE = REGISTRY["cbn_relu_conv3x3"]
HAS_CPP = _native.cpp_reason() is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")
TRITON_REASON = OP.backends["triton"].unavailable_reason()
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")

BLOCK_GRADS = ("x", "embed1", "weight1", "bias1", "embed2", "weight2", "bias2", "weight0", "bias0")
BLOCK_STATE = ("running_mean1", "running_var1", "running_mean2", "running_var2",
               "num_batches_tracked1", "num_batches_tracked2")
PIECE_GRADS = ("x", "gamma", "beta", "weight", "bias", "residual")
PIECE_STATE = ("running_mean", "running_var", "num_batches_tracked")


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def block_inputs(batch, cin, cout, h, w, *, classes=5, dtype=torch.float32, device="cpu",
                 channels_last=False, seed=0) -> dict:
    """Random GenBlock inputs with the scales of a trained generator (weights ~ 1/sqrt(fan_in))."""
    g = _gen("block", batch, cin, cout, h, w, classes, seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    x = r(batch, cin, h, w, scale=1.5, shift=0.3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = dict(
        x=x,
        y=torch.randint(0, classes, (batch,), generator=g),
        embed1=torch.cat([r(classes, cin, scale=0.3, shift=1.0), r(classes, cin, scale=0.3)], 1),
        weight1=r(cout, cin, 3, 3, scale=(9 * cin) ** -0.5),
        bias1=r(cout, scale=0.1),
        embed2=torch.cat([r(classes, cout, scale=0.3, shift=1.0), r(classes, cout, scale=0.3)], 1),
        weight2=r(cout, cout, 3, 3, scale=(9 * cout) ** -0.5),
        bias2=r(cout, scale=0.1),
        weight0=r(cout, cin, 1, 1, scale=cin**-0.5),
        bias0=r(cout, scale=0.1),
        running_mean1=r(cin, scale=0.1),
        running_var1=(torch.rand(cin, generator=g) + 0.5).to(dtype),
        running_mean2=r(cout, scale=0.1),
        running_var2=(torch.rand(cout, generator=g) + 0.5).to(dtype),
        num_batches_tracked1=torch.tensor(7),
        num_batches_tracked2=torch.tensor(7),
    )
    return {k: v.to(device) for k, v in a.items()}


def piece_inputs(batch, c, cout, h, w, *, upsample=True, residual=None, dtype=torch.float32,
                 device="cpu", channels_last=False, seed=0) -> dict:
    g = _gen("piece", batch, c, cout, h, w, upsample, residual, seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    x = r(batch, c, h, w, scale=1.2, shift=-0.2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ho, wo = (2 * h, 2 * w) if upsample else (h, w)
    res = None
    if residual == "full":
        res = r(batch, cout, ho, wo)
    elif residual == "half":
        res = r(batch, cout, ho // 2, wo // 2)
    a = dict(
        x=x,
        gamma=r(batch, c, scale=0.3, shift=1.0),
        beta=r(batch, c, scale=0.3),
        weight=r(cout, c, 3, 3, scale=(9 * c) ** -0.5),
        bias=r(cout, scale=0.1),
        running_mean=r(c, scale=0.1),
        running_var=(torch.rand(c, generator=g) + 0.5).to(dtype),
        num_batches_tracked=torch.tensor(3),
        residual=res,
    )
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


def clone(a: dict, dtype=None) -> dict:
    out = {}
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone(memory_format=torch.preserve_format)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def run(fn, a: dict, grads, impl, grad_seed=1, **kw):
    """Output, gradients of (out * G).sum() w.r.t. `grads`, and the inputs after the call."""
    a = clone(a)
    leaves = [k for k in grads if a.get(k) is not None]
    for k in leaves:
        a[k].requires_grad_(True)
    out = fn(**a, **kw, impl=impl)
    go = torch.randn(out.shape, generator=_gen("go", tuple(out.shape), grad_seed)).to(out)
    got = torch.autograd.grad(out, [a[k] for k in leaves], go)
    return out.detach(), dict(zip(leaves, got)), a


def scale_of(res) -> float:
    """The largest magnitude among the output and all gradients: the absolute error scale of a
    case (a gradient that cancels to ~0, like a conv bias before batch norm, carries rounding
    noise of the size of its summands, not of its own size)."""
    return max([res[0].abs().max().item()] + [g.abs().max().item() for g in res[1].values()])


def assert_close_all(res, want, state, *, rtol=1e-5, atol=1e-6):
    """Close up to rtol plus atol relative to the case's scale; running statistics tighter."""
    out, grads, a = res
    out_w, grads_w, a_w = want
    tol = atol * scale_of(want)
    torch.testing.assert_close(out, out_w, rtol=rtol, atol=tol)
    assert set(grads) == set(grads_w)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_w[k], rtol=rtol, atol=tol, msg=lambda m, k=k: f"d{k}: {m}")
    for k in state:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], a_w[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def two_x_rule(res, plain, truth, slack=1e-6):
    """Fused error vs fp64 truth <= 2 x the plain low-precision error + slack x the case's scale."""
    floor = slack * scale_of(truth)
    pairs = [("out", res[0], plain[0], truth[0])]
    pairs += [(f"d{k}", res[1][k], plain[1][k], truth[1][k]) for k in truth[1]]
    for name, got, ref, want in pairs:
        want = want.double()
        err = (got.double() - want).abs().max().item()
        err_plain = (ref.double() - want).abs().max().item()
        assert err <= 2 * err_plain + floor, f"{name}: fused error {err:.3g} > 2 x plain {err_plain:.3g} + {floor:.2g}"


# ---------------------------------------------------------------------------------------------
# exact rewrites


@pytest.mark.parametrize(("b", "cin", "cout", "h", "w"), [(2, 3, 5, 4, 7), (1, 6, 2, 1, 3), (3, 4, 4, 5, 5)])
def test_phase_decomposition_is_exact(b, cin, cout, h, w):
    g = _gen("phase", b, cin, cout, h, w)
    x = torch.randn(b, cin, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    want = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    torch.testing.assert_close(gb.up2_conv3x3(x, weight, bias), want, rtol=1e-12, atol=1e-12)
    w1 = torch.randn(cout, cin, 1, 1, generator=g, dtype=torch.float64)
    want1 = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w1, bias)
    torch.testing.assert_close(gb.up2_conv1x1(x, w1, bias), want1, rtol=1e-12, atol=1e-12)


def test_phase_weights_sum_the_taps_that_share_a_low_resolution_pixel():
    weight = torch.arange(9.0).reshape(1, 1, 3, 3)  # taps k = 3 * ky + kx
    wp = gb.phase_weights(weight).reshape(2, 2, 2, 2)  # (p, q, r, s)
    # phase (0, 0): rows {0}, {1, 2} x columns {0}, {1, 2}
    assert wp[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # phase (1, 1): rows {0, 1}, {2} x columns {0, 1}, {2}
    assert wp[1, 1].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8.0]]
    assert wp.sum().item() == 4 * weight.sum().item()  # every tap lands once per phase


# ---------------------------------------------------------------------------------------------
# reference


def test_op_reference_is_the_module_twin_bit_for_bit():
    block = GenBlock(5, 7, num_classes=4)
    with torch.no_grad():
        block.cond_bn1.embed.weight.normal_(0.5, 0.3)
        block.cond_bn2.embed.weight.normal_(0.5, 0.3)
    x, y = torch.randn(3, 5, 4, 6), torch.tensor([3, 0, 3])
    twin = GenBlock(5, 7, num_classes=4, impl="auto")
    twin.load_state_dict(block.state_dict())
    want = genblock_reference(x, y, block)
    got = gb.genblock(
        x, y, twin.cond_bn1.embed.weight, twin.snconv2d1.sn_weight(), twin.snconv2d1.bias,
        twin.cond_bn2.embed.weight, twin.snconv2d2.sn_weight(), twin.snconv2d2.bias,
        twin.snconv2d0.sn_weight(), twin.snconv2d0.bias, twin.cond_bn1.bn.running_mean,
        twin.cond_bn1.bn.running_var, twin.cond_bn2.bn.running_mean, twin.cond_bn2.bn.running_var,
        twin.cond_bn1.bn.num_batches_tracked, twin.cond_bn2.bn.num_batches_tracked, impl="reference",
    )
    assert torch.equal(got, want)
    for (name, b1), b2 in zip(block.named_buffers(), twin.buffers()):
        assert torch.equal(b1, b2), name


# ---------------------------------------------------------------------------------------------
# cpp

# The paper's (Cin, Cout, H) pairs with channels / 32 (4x4 ... 64x64), then odd and degenerate ones.
SCALED_PAPER = [(32, 32, 4, 4), (32, 16, 8, 8), (16, 8, 16, 16), (8, 4, 32, 32), (4, 2, 64, 64)]
ODD = [(5, 7, 3, 5), (7, 3, 5, 4), (3, 9, 1, 2), (1, 1, 2, 3)]


@needs_cpp
@pytest.mark.parametrize(("cin", "cout", "h", "w"), SCALED_PAPER + ODD)
@pytest.mark.parametrize("batch", [1, 3])
def test_cpp_block_matches_reference_fp32(batch, cin, cout, h, w):
    a = block_inputs(batch, cin, cout, h, w)
    got = run(gb.genblock, a, BLOCK_GRADS, "cpp")
    want = run(gb.genblock, a, BLOCK_GRADS, "reference")
    assert_close_all(got, want, BLOCK_STATE, rtol=2e-4, atol=2e-6)


@needs_cpp
@pytest.mark.parametrize(("cin", "cout", "h", "w"), [(16, 8, 8, 8), (5, 7, 3, 5), (3, 4, 1, 6)])
@pytest.mark.parametrize("training", [True, False])
def test_cpp_block_two_x_error_rule(cin, cout, h, w, training):
    a = block_inputs(3, cin, cout, h, w)
    fused = run(gb.genblock, a, BLOCK_GRADS, "cpp", training=training)
    plain = run(gb.genblock, a, BLOCK_GRADS, "reference", training=training)
    truth = run(gb.genblock, clone(a, torch.float64), BLOCK_GRADS, "reference", training=training)
    two_x_rule(fused, plain, truth)
    for k in BLOCK_STATE:  # running statistics identical to the reference after the step
        torch.testing.assert_close(fused[2][k], plain[2][k], rtol=1e-6, atol=1e-7)


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_cpp_block_fp64_exact_and_layouts(channels_last, training):
    a = block_inputs(3, 6, 5, 5, 3, dtype=torch.float64, channels_last=channels_last)
    got = run(gb.genblock, a, BLOCK_GRADS, "cpp", training=training)
    want = run(gb.genblock, a, BLOCK_GRADS, "reference", training=training)
    assert_close_all(got, want, BLOCK_STATE, rtol=1e-10, atol=1e-12)
    out, grads, _ = got
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert grads["x"].is_contiguous(memory_format=torch.channels_last) == channels_last


@needs_cpp
def test_cpp_block_gradcheck_fp64():
    a = block_inputs(2, 3, 2, 2, 3, dtype=torch.float64)
    names = ("x", "embed1", "weight1", "bias1", "embed2", "weight2", "bias2", "weight0", "bias0")
    leaves = [a[k].clone().requires_grad_(True) for k in names]

    def f(*t):  # fresh running statistics each call: the gradient does not depend on them
        kw = {**clone(a), **dict(zip(names, t))}
        return gb.genblock(**kw, impl="cpp")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_cpp
def test_cpp_block_momentum_none_and_channels_one():
    a = block_inputs(2, 1, 3, 3, 2)
    got = run(gb.genblock, a, BLOCK_GRADS, "cpp", momentum=None)
    want = run(gb.genblock, a, BLOCK_GRADS, "reference", momentum=None)
    assert_close_all(got, want, BLOCK_STATE, rtol=2e-4, atol=2e-6)
    assert got[2]["num_batches_tracked1"].item() == 8


@needs_cpp
@pytest.mark.parametrize("upsample", [True, False])
@pytest.mark.parametrize("residual", [None, "full", "half"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_piece_matches_reference(upsample, residual, channels_last):
    a = piece_inputs(3, 5, 6, 4, 6, upsample=upsample, residual=residual, channels_last=channels_last)
    got = run(gb.cbn_relu_conv3x3, a, PIECE_GRADS, "cpp", upsample=upsample)
    want = run(gb.cbn_relu_conv3x3, a, PIECE_GRADS, "reference", upsample=upsample)
    assert_close_all(got, want, PIECE_STATE, rtol=2e-4, atol=2e-6)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last


@needs_cpp
@pytest.mark.parametrize("training", [True, False])
def test_cpp_piece_with_expanded_affine_like_the_output_head(training):
    a = piece_inputs(3, 4, 3, 5, 5, upsample=False)
    g = _gen("head")
    a["gamma"] = torch.randn(4, generator=g).expand(3, 4)
    a["beta"] = torch.randn(4, generator=g).expand(3, 4)
    got = run(gb.cbn_relu_conv3x3, a, PIECE_GRADS, "cpp", upsample=False, training=training)
    want = run(gb.cbn_relu_conv3x3, a, PIECE_GRADS, "reference", upsample=False, training=training)
    assert_close_all(got, want, PIECE_STATE, rtol=2e-4, atol=2e-6)


@needs_cpp
def test_cpp_piece_gradcheck_fp64():
    a = piece_inputs(2, 3, 2, 3, 2, upsample=True, residual="half", dtype=torch.float64)
    names = ("x", "gamma", "beta", "weight", "bias", "residual")
    leaves = [a[k].clone().requires_grad_(True) for k in names]

    def f(*t):
        return gb.cbn_relu_conv3x3(**{**clone(a), **dict(zip(names, t))}, impl="cpp")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_cpp
def test_cpp_deterministic_run_to_run_and_close_across_thread_counts():
    # The C++ kernels are bit-identical for any thread count (csrc/tests/test_genblock.cpp);
    # oneDNN's convolutions are deterministic for a fixed count but may block differently per count.
    a = block_inputs(3, 8, 8, 24, 20)  # big enough for the kernels to use several threads
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            results.append(run(gb.genblock, a, BLOCK_GRADS, "cpp"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[1][0], results[2][0])
    for k in BLOCK_GRADS:
        assert torch.equal(results[1][1][k], results[2][1][k]), k
    assert_close_all(results[0], results[1], BLOCK_STATE, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_cpp_no_grad_forward_updates_running_stats_only():
    a = block_inputs(2, 4, 4, 4, 4)
    got, want = clone(a), clone(a)
    with torch.no_grad():
        out = gb.genblock(**got, impl="cpp")
        out_want = gb.genblock(**want, impl="reference")
    torch.testing.assert_close(out, out_want, rtol=2e-4, atol=2e-5)
    for k in BLOCK_STATE:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# triton (mgm_fast.ops._triton.genblock; CPU interpreter here, small shapes)


@needs_triton
@pytest.mark.parametrize(("batch", "cin", "cout", "h", "w"), [(1, 4, 4, 2, 2), (3, 5, 3, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_block_two_x_error_rule(batch, cin, cout, h, w, dtype):
    a = block_inputs(batch, cin, cout, h, w)
    low = clone(a, dtype)
    fused = run(gb.genblock, low, BLOCK_GRADS, "triton")
    plain = run(gb.genblock, low, BLOCK_GRADS, "reference")
    truth = run(gb.genblock, clone(low, torch.float64), BLOCK_GRADS, "reference")
    two_x_rule(fused, plain, truth, slack=1e-6 if dtype == torch.float32 else 1e-4)
    for k in BLOCK_STATE:
        torch.testing.assert_close(fused[2][k].double(), plain[2][k].double(), rtol=1e-3, atol=1e-3)


@needs_triton
def test_triton_piece_matches_reference():
    a = piece_inputs(2, 3, 4, 2, 4, upsample=False, residual="half")
    got = run(gb.cbn_relu_conv3x3, a, PIECE_GRADS, "triton", upsample=False)
    want = run(gb.cbn_relu_conv3x3, a, PIECE_GRADS, "reference", upsample=False)
    assert_close_all(got, want, PIECE_STATE, rtol=1e-3, atol=1e-5)


def test_triton_unavailable_says_why(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton_module(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "mgm_fast.ops._triton" and fromlist and "genblock" in fromlist:
            raise ImportError("no module")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_triton_module)
    reason = OP.backends["triton"].unavailable_reason()
    assert reason is not None
    if "triton is not installed" not in reason:
        assert "not implemented yet" in reason
    with pytest.raises(BackendUnavailable, match="triton"):
        gb.genblock(**block_inputs(2, 2, 2, 2, 2), impl="triton")


# ---------------------------------------------------------------------------------------------
# dispatch and errors


@needs_cpp
def test_auto_on_cpu_picks_cpp_for_float32_and_reference_otherwise():
    a = block_inputs(2, 3, 3, 2, 2)
    assert OP.select("auto", **a).name == "cpp"
    for dtype in (torch.float16, torch.bfloat16):
        assert OP.select("auto", **clone(a, dtype)).name == "reference"
        with pytest.raises(BackendUnavailable, match="float32/float64"):
            gb.genblock(**clone(a, dtype), impl="cpp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert OP.select("auto", **a).name == "cpp"
        assert OP.select("auto", **{**a, "x": a["x"].bfloat16()}).name == "cpp"


@needs_cpp
def test_cpp_under_cpu_autocast_computes_in_float32():
    """Under CPU autocast the cpp block casts x and the conv tensors to float32 and returns
    float32: closer to the float64 result than the bf16 reference, and equal to cpp on float32
    inputs (a bf16 x is upcast exactly) -- output and every gradient (x's in its own bf16)."""
    torch.manual_seed(0)
    a = block_inputs(2, 8, 8, 4, 4)
    x16 = a["x"].bfloat16()
    exact = gb.genblock(**clone({**a, "x": x16.float()}, torch.float64), impl="reference")
    plain, plain_grads, _ = run(gb.genblock, {**a, "x": x16.float()}, BLOCK_GRADS, "cpp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, fused_grads, _ = run(gb.genblock, {**a, "x": x16}, BLOCK_GRADS, "cpp")
        ref = gb.genblock(**clone({**a, "x": x16}), impl="reference")
    assert fused.dtype == torch.float32 and ref.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    assert (fused.double() - exact).abs().max() < (ref.double() - exact).abs().max()
    assert fused_grads["x"].dtype == torch.bfloat16
    torch.testing.assert_close(fused_grads.pop("x"), plain_grads.pop("x").bfloat16(), rtol=0, atol=0)
    for k, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[k], g, rtol=0, atol=0, msg=lambda m, k=k: f"d{k}: {m}")


def test_forced_backends_that_cannot_run_raise_with_reasons():
    a = block_inputs(2, 3, 3, 2, 2)
    with pytest.raises(BackendUnavailable, match="cuda"):
        gb.genblock(**a, impl="cuda")
    with pytest.raises(BackendUnavailable, match="float16"):
        gb.genblock(**clone(a, torch.float16), impl="cpp")
    with pytest.raises(BackendUnavailable, match="not implemented"):
        gb.genblock(**a, impl="opencl")


@needs_cpp
def test_cpp_dtype_mismatch_is_a_reason_not_a_crash():
    a = block_inputs(2, 3, 3, 2, 2)
    a["weight2"] = a["weight2"].double()
    with pytest.raises(BackendUnavailable, match=r"weight2 is torch\.float64 but x is torch\.float32"):
        gb.genblock(**a, impl="cpp")


def test_unavailable_extension_is_reported_not_hidden(monkeypatch):
    cpp = OP.backends["cpp"]
    monkeypatch.setattr(cpp, "availability", lambda: "mgm_fast._C is not importable (test)")
    a = block_inputs(2, 3, 3, 2, 2)
    assert OP.select("auto", **a).name == "reference"
    with pytest.raises(BackendUnavailable, match=r"not importable \(test\)"):
        gb.genblock(**a, impl="cpp")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.update(x=a["x"][0]), "x must be a 4-d"),
        (lambda a: a.update(weight1=a["weight1"][:, :2]), r"weight1 must have shape \(\*, 3, 3, 3\)"),
        (lambda a: a.update(weight2=a["weight2"][:2]), "weight2 must have shape"),
        (lambda a: a.update(bias0=a["bias0"][:1]), "bias0 must have shape"),
        (lambda a: a.update(embed2=a["embed2"][:, :3]), "embed2 must have shape"),
        (lambda a: a.update(running_var1=a["running_var1"][:2]), "running_var1 must have shape"),
        (lambda a: a.update(y=a["y"].int()), "y must be a"),
        (lambda a: a.update(y=torch.tensor([0, 5])), "y holds label 5, outside"),
        (lambda a: a.update(x=a["x"][:1, :, :1, :1]), "more than 1 value per channel"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_bad_inputs_name_the_tensor(change, match, impl):
    a = block_inputs(2, 3, 4, 2, 2)
    change(a)
    with pytest.raises(ValueError, match=match):
        gb.genblock(**a, impl=impl)


def test_piece_bad_residual_is_named():
    a = piece_inputs(2, 3, 4, 2, 2, upsample=True)
    a["residual"] = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="residual must have shape"):
        gb.cbn_relu_conv3x3(**a, impl="reference")


def test_status_lists_every_backend():
    status = OP.status()
    assert status["reference"] is None
    assert set(status) == {"reference", "triton", "cpp", "cuda"}
    assert PIECE.status()["reference"] is None


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("batch", "cin", "cout", "h", "w"), [(3, 32, 16, 8, 8), (1, 5, 7, 3, 5), (4, 64, 64, 16, 12)])
def test_cuda_block_two_x_error_rule(dtype, channels_last, batch, cin, cout, h, w):
    a = block_inputs(batch, cin, cout, h, w, device="cuda", channels_last=channels_last)
    low = clone(a, dtype)
    fused = run(gb.genblock, low, BLOCK_GRADS, "cuda")
    plain = run(gb.genblock, low, BLOCK_GRADS, "reference")
    truth = run(gb.genblock, clone(low, torch.float64), BLOCK_GRADS, "reference")
    two_x_rule(fused, plain, truth, slack=1e-6 if dtype == torch.float32 else 1e-4)
    for k in BLOCK_STATE:
        torch.testing.assert_close(fused[2][k].double(), plain[2][k].double(), rtol=1e-3, atol=1e-4)
    assert fused[0].is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.gpu
@pytest.mark.parametrize("upsample", [True, False])
@pytest.mark.parametrize("residual", [None, "full", "half"])
def test_cuda_piece_matches_reference(upsample, residual):
    a = piece_inputs(3, 6, 5, 6, 4, upsample=upsample, residual=residual, device="cuda")
    got = run(gb.cbn_relu_conv3x3, a, PIECE_GRADS, "cuda", upsample=upsample)
    want = run(gb.cbn_relu_conv3x3, a, PIECE_GRADS, "reference", upsample=upsample)
    assert_close_all(got, want, PIECE_STATE, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_cuda_matches_cpp_and_auto_picks_a_fused_backend():
    a = block_inputs(2, 16, 8, 8, 8, device="cuda")
    assert OP.select("auto", **a).name in ("cuda", "triton")
    got = run(gb.genblock, a, BLOCK_GRADS, "cuda")
    if HAS_CPP:
        cpu = run(gb.genblock, {k: v.cpu() for k, v in a.items()}, BLOCK_GRADS, "cpp")
        assert_close_all((got[0].cpu(), {k: v.cpu() for k, v in got[1].items()},
                          {k: v.cpu() for k, v in got[2].items()}), cpu, BLOCK_STATE, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_cuda_autocast_bf16_follows_reference():
    a = block_inputs(4, 16, 16, 8, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = run(gb.genblock, a, BLOCK_GRADS, "cuda")
        plain = run(gb.genblock, a, BLOCK_GRADS, "reference")
    truth = run(gb.genblock, clone(a, torch.float64), BLOCK_GRADS, "reference")
    two_x_rule(fused, plain, truth, slack=1e-4)
