"""mgm_fast.ops.attention: the fused SAGAN self-attention core against the plain-PyTorch reference.

Values and gradients w.r.t. theta, phi and g on fresh random inputs: the model's sizes, dq = 1,
dv = 4, odd N / M, B = 1, one key, no queries, large logits (scores ~ +-80), non-contiguous
inputs and output gradients, each gradient alone; the 2x-error rule against float64;
bit-identity for 1 and 2 threads; CPU autocast; the SelfAttention module rebuilt on the op; bad
input; dispatch (auto's choices, forced backends that cannot run, an unbuilt extension). GPU
cases carry the ``gpu`` marker.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from mgm_fast import _native
from mgm_fast.models.layers import SelfAttention
from mgm_fast.ops import REGISTRY, BackendUnavailable
from mgm_fast.ops import attention as at

HAS_CPP = _native.cpp_reason() is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")
OP = REGISTRY["sagan_attention"]


def _gen(*key) -> torch.Generator:
    """Fresh inputs per case, reproducible run to run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def qkv(b, dq, dv, n, m, scale=1.0, key=0, dtype=torch.float32):
    """theta (B, dq, N), phi (B, dq, M), g (B, dv, M); scores ~ scale^2 sqrt(dq)."""
    g = _gen("qkv", b, dq, dv, n, m, scale, key)
    theta = torch.randn(b, dq, n, generator=g) * scale
    phi = torch.randn(b, dq, m, generator=g) * scale
    values = torch.randn(b, dv, m, generator=g)
    return theta.to(dtype), phi.to(dtype), values.to(dtype)


def out_and_grads(fn, tensors, weight):
    """fn(*leaves) and the gradients of sum(weight * out) (a non-uniform output gradient)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_outputs=weight.to(out.dtype))
    return out.detach(), grads


def _impl(name):
    return lambda a, b, c: at.sagan_attention(a, b, c, impl=name)


def _weight(tensors):
    theta, _, values = tensors
    shape = (theta.shape[0], values.shape[1], theta.shape[2])
    return torch.randn(shape, generator=_gen("weight", shape))


def _fp64_truth(tensors, weight):
    return out_and_grads(at.sagan_attention_reference, [t.double() for t in tensors], weight.double())


def _two_x_error_rule(fused, plain, truth):
    """Every result of the fused backend is at most twice as far from the float64 truth as the
    float32 reference's (plus 1e-6 of the largest true entry, for results both get ~exact)."""
    err = lambda x, y: (x.double() - y).abs().max().item()  # noqa: E731
    for name, f, p, t in zip(("out", "theta", "phi", "g"), (fused[0], *fused[1]), (plain[0], *plain[1]),
                             (truth[0], *truth[1])):  # fmt: skip
        assert f.dtype == torch.float32 and f.shape == t.shape
        floor = 1e-6 * t.abs().max().item()
        assert err(f, t) <= 2 * err(p, t) + floor, (name, err(f, t), err(p, t))


def _assert_matches_reference(tensors, rtol=1e-4, atol_rel=1e-5):
    weight = _weight(tensors)
    got = out_and_grads(_impl("cpp"), tensors, weight)
    want = out_and_grads(_impl("reference"), tensors, weight)
    for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol_rel * max(b.abs().max().item(), 1e-30))
    _two_x_error_rule(got, want, _fp64_truth(tensors, weight))
    return got


# ---------------------------------------------------------------------------------------------
# the reference


def test_reference_is_the_model_formula():
    theta, phi, values = qkv(2, 3, 5, 12, 4)
    want = torch.bmm(values, torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1).transpose(1, 2))
    assert torch.equal(at.sagan_attention(theta, phi, values, impl="reference"), want)


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_hand_values(impl):
    """One key: every query copies its value. Zero keys: uniform attention, the mean value."""
    theta, phi, values = qkv(2, 3, 4, 9, 1, scale=5.0)
    out = at.sagan_attention(theta, phi, values, impl=impl)
    torch.testing.assert_close(out, values.expand(2, 4, 9), rtol=0, atol=0)
    theta, phi, values = qkv(2, 3, 4, 9, 6)
    out = at.sagan_attention(theta, torch.zeros_like(phi), values, impl=impl)
    torch.testing.assert_close(out, values.mean(2, keepdim=True).expand(2, 4, 9), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_self_attention_module_rebuilt_on_the_op(impl):
    """SelfAttention.forward with its core replaced by the op gives the module's output."""
    torch.manual_seed(3)
    module = SelfAttention(16).eval()  # eval: no power iteration, so the convs are repeatable
    with torch.no_grad():
        module.sigma.fill_(0.7)
    x = torch.randn(2, 16, 8, 6)
    b, c, h, w = x.shape
    theta = module.snconv1x1_theta(x).reshape(b, c // 8, h * w)
    phi = torch.nn.functional.max_pool2d(module.snconv1x1_phi(x), 2).reshape(b, c // 8, h * w // 4)
    values = torch.nn.functional.max_pool2d(module.snconv1x1_g(x), 2).reshape(b, c // 2, h * w // 4)
    o = at.sagan_attention(theta, phi, values, impl=impl).reshape(b, c // 2, h, w)
    torch.testing.assert_close(x + module.sigma * module.snconv1x1_attn(o), module(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# cpp against the reference


@needs_cpp
@pytest.mark.parametrize(
    ("b", "dq", "dv", "n", "m"),
    [
        (1, 1, 4, 37, 9),  # dq = 1, dv = 4, odd N and M, B = 1
        (2, 2, 8, 64, 16),
        (3, 4, 16, 33, 17),
        (2, 16, 64, 40, 24),  # paper-like channel counts
        (1, 13, 7, 261, 133),  # every remainder of the register blocks, backward chunks
        (8, 2, 8, 1024, 256),  # the tiny preset's attention (32x32)
    ],
)
def test_cpp_matches_reference(b, dq, dv, n, m):
    _assert_matches_reference(qkv(b, dq, dv, n, m, scale=0.5 if dq >= 13 else 1.0))


@needs_cpp
def test_cpp_large_logits_stay_finite_and_accurate():
    """Scores up to ~ +-80: no overflow in the exponentials, accuracy as the reference's."""
    theta, phi, values = qkv(2, 2, 8, 48, 12, scale=4.5)
    scores = torch.bmm(theta.transpose(1, 2), phi)
    assert 60 < scores.abs().max() < 200
    got = _assert_matches_reference((theta, phi, values), rtol=1e-3, atol_rel=1e-4)
    assert all(torch.isfinite(t).all() for t in (got[0], *got[1]))


@needs_cpp
def test_cpp_no_queries_and_empty_batch():
    for b, n in ((2, 0), (0, 5)):
        theta, phi, values = (t.requires_grad_(True) for t in qkv(b, 3, 4, n, 6))
        out = at.sagan_attention(theta, phi, values, impl="cpp")
        assert out.shape == (b, 4, n)
        grads = torch.autograd.grad(out.sum(), [theta, phi, values])
        assert [tuple(g.shape) for g in grads] == [(b, 3, n), (b, 3, 6), (b, 4, 6)]
        assert all(not g.any() for g in grads)


@needs_cpp
def test_cpp_non_contiguous_inputs_and_output_gradient():
    """theta as a reshape of a channels_last conv output, strided phi / g, a transposed grad."""
    b, dq, dv, h, w = 2, 4, 8, 6, 10
    gen = _gen("strided")
    conv_out = torch.randn(b, dq, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    theta = conv_out.view(b, dq, h * w)  # a view with strides (H*W*dq, 1, dq), as in the model
    phi = torch.randn(b, 2 * dq, 15, generator=gen)[:, ::2]
    values = torch.randn(b, 15, dv, generator=gen).transpose(1, 2)
    weight = torch.randn(b, h * w, dv, generator=gen).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (theta, phi, values, weight))
    got = out_and_grads(_impl("cpp"), (theta, phi, values), weight)
    want = out_and_grads(_impl("reference"), (theta, phi, values), weight)
    for a, c in zip((got[0], *got[1]), (want[0], *want[1])):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@needs_cpp
@pytest.mark.parametrize("which", [0, 1, 2])
def test_cpp_each_gradient_alone(which):
    tensors = [t.requires_grad_(i == which) for i, t in enumerate(qkv(2, 3, 5, 20, 8))]
    (got,) = torch.autograd.grad(at.sagan_attention(*tensors, impl="cpp").sum(), tensors[which])
    (want,) = torch.autograd.grad(at.sagan_attention(*tensors, impl="reference").sum(), tensors[which])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_cpp
def test_cpp_saves_no_attention_map():
    """The graph keeps the inputs, the output and the (B, N) logsumexp: nothing of size B*N*M."""
    theta, phi, values = (t.requires_grad_(True) for t in qkv(2, 2, 4, 64, 16))
    out = at.sagan_attention(theta, phi, values, impl="cpp")
    saved = out.grad_fn.saved_tensors
    assert max(t.numel() for t in saved) < 2 * 64 * 16
    assert any(t.shape == (2, 64) and t.dtype == torch.float32 for t in saved)  # lse


@needs_cpp
def test_cpp_bit_identical_for_one_and_two_threads():
    tensors = qkv(4, 4, 16, 256, 64)  # above the kernel's parallel threshold
    weight = _weight(tensors)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = out_and_grads(_impl("cpp"), tensors, weight)
        torch.set_num_threads(2)
        two = out_and_grads(_impl("cpp"), tensors, weight)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip((one[0], *one[1]), (two[0], *two[1])))


@needs_cpp
def test_cpp_once_differentiable():
    theta, phi, values = (t.requires_grad_(True) for t in qkv(1, 2, 3, 8, 4))
    out = at.sagan_attention(theta, phi, values, impl="cpp")
    weight = torch.ones_like(out, requires_grad=True)  # a differentiable output gradient
    (g,) = torch.autograd.grad(out, theta, grad_outputs=weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


# ---------------------------------------------------------------------------------------------
# autocast


def test_reference_under_cpu_autocast_returns_the_autocast_dtype():
    theta, phi, values = qkv(2, 2, 4, 16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = at.sagan_attention(theta, phi, values, impl="reference")
    assert out.dtype == torch.bfloat16


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_under_cpu_autocast_computes_in_float32(dtype):
    """auto takes cpp under CPU autocast; it casts to float32 and returns float32, and the
    gradients come back in the inputs' dtype."""
    tensors = qkv(2, 2, 4, 16, 4, dtype=dtype)
    weight = _weight(tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert OP.select("auto", *tensors).name == "cpp"
        got = out_and_grads(lambda a, b, c: at.sagan_attention(a, b, c), tensors, weight)
    want = out_and_grads(_impl("cpp"), [t.float() for t in tensors], weight)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0)


@needs_cpp
def test_cpp_autocast_mixed_dtypes_are_cast():
    theta, phi, values = qkv(1, 2, 3, 8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = at.sagan_attention(theta.bfloat16(), phi, values.half(), impl="cpp")
    want = at.sagan_attention(theta.bfloat16().float(), phi, values.half().float(), impl="cpp")
    assert out.dtype == torch.float32 and torch.equal(out, want)


# ---------------------------------------------------------------------------------------------
# bad input and dispatch


@pytest.mark.parametrize("impl", ["reference", *(["cpp"] if HAS_CPP else [])])
def test_bad_input_names_the_tensor(impl):
    theta, phi, values = qkv(2, 3, 4, 10, 5)
    cases = [
        ((theta[0], phi, values), r"theta must be a 3-d \(B, dq, N\) floating tensor"),
        ((theta, phi.long(), values), r"phi must be a 3-d \(B, dq, M\) floating tensor"),
        ((theta, phi, "g"), r"g must be a 3-d \(B, dv, M\) floating tensor, got str"),
        ((theta, phi[:1], values), "differ in the batch size"),
        ((theta, phi, values[:1]), "differ in the batch size"),
        ((theta[:, :2], phi, values), r"differ in dq \(dim 1\)"),
        ((theta, phi, values[:, :, :4]), r"differ in M \(dim 2\)"),
        ((theta, phi[:, :, :0], values[:, :, :0]), r"at least one key position \(M >= 1\)"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            at.sagan_attention(*args, impl=impl)


def test_bad_dtype_and_device_raise():
    theta, phi, values = qkv(2, 3, 4, 10, 5)
    with pytest.raises(ValueError, match="must share one dtype"):
        at.sagan_attention(theta, phi.double(), values, impl="reference")
    with pytest.raises(ValueError, match="phi is on meta but theta on cpu"):
        at.sagan_attention_reference(theta, phi.to("meta"), values)


@needs_cpp
def test_binding_checks_its_own_inputs():
    """The C++ entry points refuse what the Python layer would never pass."""
    ext = _native.extension()
    theta, phi, values = qkv(1, 2, 3, 8, 4)
    with pytest.raises(TypeError, match="theta must be float32"):
        ext.sagan_attention_cpu_forward(theta.double(), phi, values)
    with pytest.raises(ValueError, match="differ in M"):
        ext.sagan_attention_cpu_forward(theta, phi, values[:, :, :3])
    out, lse = ext.sagan_attention_cpu_forward(theta, phi, values)
    with pytest.raises(ValueError, match="lse must be the"):
        ext.sagan_attention_cpu_backward(theta, phi, values, out, lse[:, :3], out, [True, True, True])


def test_dispatch_rules():
    theta, phi, values = qkv(2, 2, 4, 16, 4)
    assert OP.select("auto", theta, phi, values).name == ("cpp" if HAS_CPP else "reference")
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert OP.select("auto", *(t.to(dtype) for t in (theta, phi, values))).name == "reference"
    with pytest.raises(BackendUnavailable, match=r"dtype torch\.float64 not supported"):
        at.sagan_attention(theta.double(), phi.double(), values.double(), impl="cpp")
    if HAS_CPP:
        with pytest.raises(BackendUnavailable, match=r"bfloat16 not supported outside CPU autocast"):
            at.sagan_attention(theta.bfloat16(), phi.bfloat16(), values.bfloat16(), impl="cpp")
    with pytest.raises(BackendUnavailable, match="not implemented"):
        at.sagan_attention(theta, phi, values, impl="cuda")


def test_unavailable_extension_is_reported_not_hidden(monkeypatch):
    cpp = OP.backends["cpp"]
    monkeypatch.setattr(cpp, "availability", lambda: "mgm_fast._C is not importable (test)")
    theta, phi, values = qkv(2, 2, 4, 16, 4)
    assert OP.select("auto", theta, phi, values).name == "reference"
    with pytest.raises(BackendUnavailable, match=r"backend 'cpp' cannot run: mgm_fast\._C is not importable \(test\)"):
        at.sagan_attention(theta, phi, values, impl="cpp")


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)


@pytest.mark.gpu
def test_gpu_auto_is_the_reference():
    tensors = qkv(2, 4, 8, 64, 16)
    cuda = [t.cuda() for t in tensors]
    assert OP.select("auto", *cuda).name == "reference"
    with pytest.raises(BackendUnavailable, match="device cuda not supported"):
        at.sagan_attention(*cuda, impl="cpp")
    torch.testing.assert_close(at.sagan_attention(*cuda).cpu(), at.sagan_attention_reference(*tensors),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
