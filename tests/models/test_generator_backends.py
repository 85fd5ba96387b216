"""The generator on each GenBlock backend against the reference generator: same weights, same
inputs -> same images, same gradients of every parameter, same buffers (BN running statistics,
spectral-norm vectors) after a training step, in training and eval mode."""

from __future__ import annotations

import pytest
import torch

from mgm_fast import _native
from mgm_fast.models.gan import GENBLOCK_IMPLS, GenBlock, Generator
from mgm_fast.ops import REGISTRY, BackendUnavailable

HAS_CPP = _native.cpp_reason() is None
TRITON_REASON = REGISTRY["genblock"].backends["triton"].unavailable_reason()


def _twins(cfg, impl, dtype=torch.float64, device="cpu"):
    """A reference generator and one on `impl`, with identical randomised weights and buffers."""
    torch.manual_seed(0)
    ref = Generator(cfg, impl="reference")
    with torch.no_grad():  # CBN affine rows and the attention gate away from their identity init
        for name, p in ref.named_parameters():
            if name.endswith("embed.weight"):
                p.normal_(0.7, 0.4)
            elif name.endswith("sigma") or name in ("bn.weight", "bn.bias"):
                p.normal_(0.5, 0.3)
    fused = Generator(cfg, impl=impl)
    fused.load_state_dict(ref.state_dict())
    return ref.to(device, dtype), fused.to(device, dtype)


def _step(g, z, y, seed=3):
    g.zero_grad(set_to_none=True)
    out = g(z, y)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad for n, p in g.named_parameters()}


def _scale(out, grads):
    return max([out.abs().max().item()] + [v.abs().max().item() for v in grads.values() if v is not None])


def _compare(got, want, buffers_got, buffers_want, rtol, atol_rel):
    (out, grads), (out_w, grads_w) = got, want
    tol = atol_rel * _scale(out_w, grads_w)
    torch.testing.assert_close(out, out_w, rtol=rtol, atol=tol)
    assert grads.keys() == grads_w.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_w[name], rtol=rtol, atol=tol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    for (name, b), b_w in zip(buffers_got, buffers_want):
        torch.testing.assert_close(b, b_w, rtol=rtol, atol=1e-7, msg=lambda m, name=name: f"buffer {name}: {m}")


def test_every_backend_name_is_accepted_and_unknown_names_are_not():
    assert set(GENBLOCK_IMPLS) >= {"reference", "auto", "cpp", "cuda", "triton"}
    with pytest.raises(ValueError, match="accepted values"):
        GenBlock(4, 4, 2, impl="opencl")


@pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")
@pytest.mark.parametrize("impl", ["cpp", "auto"])
@pytest.mark.parametrize("training", [True, False])
def test_cpp_generator_matches_reference_fp64(small_cfg, impl, training):
    cfg = small_cfg(64)  # the tiny preset
    ref, fused = _twins(cfg, impl)
    ref.train(training)
    fused.train(training)
    z = torch.randn(3, cfg.z_dim, dtype=torch.float64)
    y = torch.tensor([0, 5, 2])
    for step in range(2):  # the second step sees the buffers the first one updated
        want = _step(ref, z, y, seed=step)
        got = _step(fused, z, y, seed=step)
        _compare(got, want, list(fused.named_buffers()), list(ref.buffers()), rtol=1e-9, atol_rel=1e-11)


@pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")
def test_cpp_generator_two_x_error_rule_fp32(small_cfg):
    cfg = small_cfg(64)
    ref64, _ = _twins(cfg, "cpp")
    ref32, fused32 = _twins(cfg, "cpp", dtype=torch.float32)
    z = torch.randn(4, cfg.z_dim, dtype=torch.float64)
    y = torch.tensor([1, 1, 4, 0])
    truth = _step(ref64, z, y)
    plain = _step(ref32, z.float(), y)
    fused = _step(fused32, z.float(), y)
    floor = 1e-6 * _scale(*truth)
    for name in ["out", *truth[1]]:
        pick = (lambda r: r[0]) if name == "out" else (lambda r, name=name: r[1][name])
        want = pick(truth)
        err = (pick(fused).double() - want).abs().max().item()
        err_plain = (pick(plain).double() - want).abs().max().item()
        assert err <= 2 * err_plain + floor, f"{name}: {err:.3g} > 2 x {err_plain:.3g} + {floor:.2g}"
    for (name, b), b_ref in zip(fused32.named_buffers(), ref32.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")
def test_cpp_generator_output_keeps_nchw_and_batch_one_works(small_cfg):
    cfg = small_cfg(32)
    ref, fused = _twins(cfg, "cpp")
    z = torch.randn(1, cfg.z_dim, dtype=torch.float64)
    y = torch.tensor([2])
    want, got = _step(ref, z, y), _step(fused, z, y)
    _compare(got, want, list(fused.named_buffers()), list(ref.buffers()), rtol=1e-9, atol_rel=1e-11)
    assert got[0].is_contiguous()


def test_non_plain_batch_norm_is_never_fused_silently():
    # e.g. the SyncBatchNorm of multi-process training: statistics over all ranks
    class OtherNorm(torch.nn.BatchNorm2d):
        pass

    block = GenBlock(4, 4, 2, impl="cpp")
    other = OtherNorm(4, momentum=0.001, affine=False)
    other.load_state_dict(block.cond_bn1.bn.state_dict())
    block.cond_bn1.bn = other
    x, y = torch.randn(2, 4, 3, 3), torch.tensor([0, 1])
    with pytest.raises(BackendUnavailable, match="OtherNorm"):
        block(x, y)
    block.impl = "auto"  # auto takes the module path, which does whatever OtherNorm does
    twin = GenBlock(4, 4, 2)
    twin.load_state_dict(block.state_dict())
    torch.testing.assert_close(block(x, y), twin(x, y), rtol=0, atol=0)


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")
def test_triton_generator_matches_reference(small_cfg):
    cfg = small_cfg(32, g_conv_dim=2, attn_resolution=8)  # channels 8-8-4-2: small for the interpreter
    ref, fused = _twins(cfg, "triton", dtype=torch.float32)
    z = torch.randn(2, cfg.z_dim)
    y = torch.tensor([1, 3])
    want, got = _step(ref, z, y), _step(fused, z, y)
    _compare(got, want, list(fused.named_buffers()), list(ref.buffers()), rtol=1e-3, atol_rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton", "auto"])
def test_gpu_generator_matches_reference(small_cfg, impl, monkeypatch):
    if REGISTRY["genblock"].backends[impl if impl != "auto" else "reference"].unavailable_reason():
        pytest.skip(f"{impl} unavailable")
    cfg = small_cfg(64)
    ref, fused = _twins(cfg, impl, dtype=torch.float32, device="cuda")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 products on both sides
    z = torch.randn(8, cfg.z_dim, device="cuda")
    y = torch.randint(0, cfg.num_scenes, (8,), device="cuda")
    want, got = _step(ref, z, y), _step(fused, z, y)
    _compare(got, want, list(fused.named_buffers()), list(ref.buffers()), rtol=1e-3, atol_rel=1e-5)
