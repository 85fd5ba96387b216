"""mgm_fast.ops.multitask_loss: fused backends against the plain-PyTorch reference.

Fresh random inputs per case; values and gradients w.r.t. all three predictions; odd shapes
(1x1, 7x5, W above the CPU tile width), class counts 13 / 27 / 40, masks of every kind, ignore
indices, both reductions, channels_last, extreme logits, non-unit grad_output, bad labels,
dispatch. GPU cases (marker ``gpu``) apply the 2x-error rule against an fp64 ground truth.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops import REGISTRY, BackendUnavailable
from mgm_fast.ops import multitask_loss as mtl

OP = REGISTRY["multitask_loss"]
HAS_CPP = _native.cpp_reason() is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")

PREDS = ("seg_logits", "depth_pred", "normal_pred")


def make_inputs(
    batch=2,
    classes=13,
    height=7,
    width=5,
    *,
    ignore_index=None,
    ignore_fraction=0.25,
    depth_mask="bool",
    normal_mask="float3",
    logit_scale=3.0,
    dtype=torch.float32,
    device="cpu",
    channels_last=False,
    generator=None,
):
    """Random inputs; mask kinds: None, "zeros", "ones", "bool", "float", "uint8",
    and for normals also with a channel suffix: "bool1", "float1", "bool3", "float3", ..."""
    if generator is None:  # fresh inputs per case, reproducible run to run
        key = repr((batch, classes, height, width, ignore_index, depth_mask, normal_mask, dtype))
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    g = generator
    shape = (batch, classes, height, width)
    seg_logits = (torch.randn(shape, generator=g) * logit_scale).to(dtype)
    seg_target = torch.randint(0, classes, (batch, height, width), generator=g)
    if ignore_index is not None:
        drop = torch.rand(batch, height, width, generator=g) < ignore_fraction
        seg_target[drop] = ignore_index
    depth_pred = torch.randn(batch, 1, height, width, generator=g).to(dtype)
    depth_target = torch.randn(batch, 1, height, width, generator=g)
    depth_target.view(-1)[::7] = depth_pred.float().view(-1)[::7]  # exact ties: sign(0) = 0
    normal_pred = torch.randn(batch, 3, height, width, generator=g).to(dtype)
    normal_target = torch.rand(batch, 3, height, width, generator=g)

    def mask(kind, channels):
        if kind is None:
            return None
        c = 1 if kind.endswith("1") else channels
        base = kind.rstrip("13")
        size = (batch, c, height, width)
        if base == "zeros":
            return torch.zeros(size)
        if base == "ones":
            return torch.ones(size, dtype=torch.bool)
        if base == "bool":
            return torch.rand(size, generator=g) > 0.4
        if base == "uint8":
            return torch.randint(0, 3, size, generator=g, dtype=torch.uint8)  # weights 0, 1, 2
        if base == "int64":
            return torch.randint(0, 2, size, generator=g)
        if base == "float":
            return torch.rand(size, generator=g)
        raise ValueError(kind)

    inputs = dict(
        seg_logits=seg_logits,
        depth_pred=depth_pred,
        normal_pred=normal_pred,
        seg_target=seg_target,
        depth_target=depth_target.to(dtype),
        normal_target=normal_target.to(dtype),
        depth_mask=mask(depth_mask, 1),
        normal_mask=mask(normal_mask, 3),
        ignore_index=ignore_index,
    )
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            inputs[key] = value
    return inputs


def run(impl, inputs, reduction="all", weights=(1.0, 1.0, 1.0)):
    """Losses and the gradients of sum_k weights[k] * loss_k w.r.t. the three predictions."""
    # clone() keeps the memory format, so channels_last inputs stay channels_last
    leaves = {k: inputs[k].detach().clone().requires_grad_(True) for k in PREDS}
    args = {**inputs, **leaves}
    losses = mtl.multitask_loss(**args, reduction=reduction, impl=impl)
    total = sum(w * loss for w, loss in zip(weights, losses))
    grads = torch.autograd.grad(total, [leaves[k] for k in PREDS])
    return [loss.detach() for loss in losses], list(grads)


def assert_matches(got, want, *, rtol=1e-5, grad_atol=1e-6):
    (losses, grads), (ref_losses, ref_grads) = got, want
    for name, a, b in zip(("seg", "depth", "normal"), losses, ref_losses):
        assert a.dtype == torch.float32 and a.dim() == 0, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6, msg=lambda m, n=name: f"{n} loss: {m}")
    for name, a, b in zip(PREDS, grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = max(b.abs().max().item(), 1e-30)
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=grad_atol * scale, msg=lambda m, n=name: f"grad {n}: {m}"
        )


# ---------------------------------------------------------------------------------------------
# cpp vs reference


@needs_cpp
@pytest.mark.parametrize("classes", [13, 27, 40])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 5), (3, 5, 7), (3, 9, 70)])
@pytest.mark.parametrize("ignore_index", [None, -1, 255])
@pytest.mark.parametrize("reduction", ["all", "valid"])
def test_cpp_matches_reference(classes, shape, ignore_index, reduction):
    b, h, w = shape
    inputs = make_inputs(b, classes, h, w, ignore_index=ignore_index)
    assert_matches(run("cpp", inputs, reduction), run("reference", inputs, reduction))


DEPTH_MASKS = [None, "zeros", "ones", "bool", "float", "uint8", "int64"]
NORMAL_MASKS = [None, "zeros1", "ones3", "bool1", "float1", "bool3", "float3", "uint83"]


@needs_cpp
@pytest.mark.parametrize(
    ("depth_mask", "normal_mask"),
    list(itertools.zip_longest(DEPTH_MASKS, NORMAL_MASKS, fillvalue="float")),
)
@pytest.mark.parametrize("reduction", ["all", "valid"])
def test_cpp_masks(depth_mask, normal_mask, reduction):
    inputs = make_inputs(3, 27, 6, 9, depth_mask=depth_mask, normal_mask=normal_mask)
    assert_matches(run("cpp", inputs, reduction), run("reference", inputs, reduction))


@needs_cpp
@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_cpp_all_pixels_ignored_gives_zero(ignore_index):
    inputs = make_inputs(2, 13, 3, 5, ignore_index=ignore_index, ignore_fraction=1.0)
    got = run("cpp", inputs)
    assert got[0][0].item() == 0.0 and torch.count_nonzero(got[1][0]) == 0
    assert_matches(got, run("reference", inputs))


@needs_cpp
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_cpp_extreme_logits_stay_finite(ignore_index):
    inputs = make_inputs(2, 40, 5, 7, ignore_index=ignore_index)
    sign = torch.where(torch.rand(inputs["seg_logits"].shape) > 0.5, 1.0, -1.0)
    inputs["seg_logits"] = sign * 1e4
    losses, grads = run("cpp", inputs)
    assert all(torch.isfinite(x).all() for x in (*losses, *grads))
    assert_matches((losses, grads), run("reference", inputs))


@needs_cpp
@pytest.mark.parametrize("reduction", ["all", "valid"])
def test_cpp_channels_last(reduction):
    inputs = make_inputs(3, 27, 7, 5, ignore_index=255, channels_last=True)
    assert inputs["seg_logits"].is_contiguous(memory_format=torch.channels_last)
    assert not inputs["seg_logits"].is_contiguous()
    got = run("cpp", inputs, reduction)
    seg_grad = got[1][0]
    assert seg_grad.is_contiguous(memory_format=torch.channels_last), "gradient keeps the layout"
    assert_matches(got, run("reference", inputs, reduction))


@needs_cpp
def test_cpp_strided_views():
    inputs = make_inputs(2, 40, 6, 8)
    big = torch.randn(2, 45, 6, 16)
    inputs["seg_logits"] = big[:, 2:42, :, ::2]  # non-contiguous along W and C offset
    assert not inputs["seg_logits"].is_contiguous()
    assert_matches(run("cpp", inputs), run("reference", inputs))


@needs_cpp
@pytest.mark.parametrize("weights", [(0.3, 2.0, 5.0), (1.0, 1.0, 1.0), (0.0, -1.5, 1.0)])
def test_cpp_gradient_through_loss_weights(weights):
    inputs = make_inputs(2, 27, 7, 5, ignore_index=-1)
    assert_matches(run("cpp", inputs, "valid", weights), run("reference", inputs, "valid", weights))


@needs_cpp
def test_cpp_backward_of_one_loss_leaves_other_grads_unset():
    inputs = make_inputs(2, 13, 4, 3)
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in PREDS}
    seg, _, _ = mtl.multitask_loss(**{**inputs, **leaves}, impl="cpp")
    seg.backward()
    assert leaves["seg_logits"].grad is not None
    assert leaves["depth_pred"].grad is None and leaves["normal_pred"].grad is None


@needs_cpp
def test_cpp_retain_graph_backward_twice():
    inputs = make_inputs(2, 13, 4, 3)
    x = inputs["seg_logits"].clone().requires_grad_(True)
    seg, _, _ = mtl.multitask_loss(**{**inputs, "seg_logits": x}, impl="cpp")
    (g1,) = torch.autograd.grad(seg, x, retain_graph=True)
    (g2,) = torch.autograd.grad(3 * seg, x)
    torch.testing.assert_close(g2, 3 * g1)


@needs_cpp
def test_cpp_no_grad_and_partial_requires_grad():
    inputs = make_inputs(2, 13, 4, 3, ignore_index=255)
    ref = mtl.multitask_loss(**inputs, impl="reference")
    with torch.no_grad():
        got = mtl.multitask_loss(**inputs, impl="cpp")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    d = inputs["depth_pred"].clone().requires_grad_(True)
    losses = mtl.multitask_loss(**{**inputs, "depth_pred": d}, impl="cpp")
    assert not losses[0].requires_grad and losses[1].requires_grad
    (gd,) = torch.autograd.grad(losses[1], d)
    (gd_ref,) = torch.autograd.grad(mtl.multitask_loss(**{**inputs, "depth_pred": d}, impl="reference")[1], d)
    torch.testing.assert_close(gd, gd_ref)


@needs_cpp
def test_cpp_bit_reproducible_across_thread_counts():
    inputs = make_inputs(3, 40, 40, 70, ignore_index=255)  # several reduction chunks
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpp", inputs, "valid")
        torch.set_num_threads(2)
        two = run("cpp", inputs, "valid")
    finally:
        torch.set_num_threads(before)
    for a, b in zip([*one[0], *one[1]], [*two[0], *two[1]]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# errors and dispatch


@needs_cpp
@pytest.mark.parametrize(
    ("bad_label", "ignore_index"), [(13, None), (-1, None), (255, None), (255, -1), (-5, 255)]
)
def test_cpp_out_of_range_label_raises_naming_it(bad_label, ignore_index):
    inputs = make_inputs(2, 13, 4, 6, ignore_index=ignore_index)
    inputs["seg_target"][1, 2, 3] = bad_label
    with pytest.raises(ValueError, match=rf"label {bad_label} at \(b=1, h=2, w=3\).*\[0, 13\)"):
        mtl.multitask_loss(**inputs, impl="cpp")


@needs_cpp
@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_shape_errors_are_value_errors(impl):
    inputs = make_inputs(2, 13, 4, 6)
    with pytest.raises(ValueError, match=r"seg_target|seg_ce target"):
        mtl.multitask_loss(**{**inputs, "seg_target": inputs["seg_target"][:, :3]}, impl=impl)
    with pytest.raises(ValueError, match=r"normal_mask|normal_l1 mask"):
        mtl.multitask_loss(**{**inputs, "normal_mask": torch.ones(2, 2, 4, 6)}, impl=impl)
    with pytest.raises(ValueError, match="reduction"):
        mtl.multitask_loss(**inputs, reduction="mean", impl=impl)


def test_cuda_forced_on_cpu_raises_with_reason():
    inputs = make_inputs(1, 13, 2, 2)
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run") as info:
        mtl.multitask_loss(**inputs, impl="cuda")
    assert "device cpu not supported" in str(info.value)
    assert (_native.cuda_reason() or "") in str(info.value)


@needs_cpp
def test_auto_picks_cpp_for_cpu_float32():
    inputs = make_inputs(1, 13, 2, 2)
    assert OP.select("auto", **inputs).name == "cpp"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_auto_picks_reference_for_other_cpu_dtypes(dtype):
    inputs = make_inputs(1, 13, 2, 2, dtype=dtype)
    assert OP.select("auto", **inputs).name == "reference"
    if HAS_CPP:
        with pytest.raises(BackendUnavailable, match="dtype"):
            mtl.multitask_loss(**inputs, impl="cpp")


@needs_cpp
def test_auto_avoids_fused_backends_when_a_target_requires_grad():
    inputs = make_inputs(1, 13, 2, 2)
    inputs["depth_target"].requires_grad_(True)
    assert OP.select("auto", **inputs).name == "reference"
    with pytest.raises(BackendUnavailable, match="depth_target requires grad"):
        mtl.multitask_loss(**inputs, impl="cpp")


def test_unavailable_extension_is_reported_not_hidden(monkeypatch):
    cpp = OP.backends["cpp"]
    monkeypatch.setattr(cpp, "availability", lambda: "mgm_fast._C is not importable (test)")
    inputs = make_inputs(1, 13, 2, 2)
    assert OP.select("auto", **inputs).name == "reference"
    with pytest.raises(BackendUnavailable, match=r"not importable \(test\)"):
        mtl.multitask_loss(**inputs, impl="cpp")
    assert OP.status()["cpp"] == "mgm_fast._C is not importable (test)"


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the 2x-error rule against an fp64 ground truth


def _fp64_truth(inputs, reduction):
    """The formulas evaluated in float64 on the given (already rounded) inputs."""
    x = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items() if k in PREDS}
    t = inputs["seg_target"]
    logp = torch.log_softmax(x["seg_logits"], 1)
    ii = inputs["ignore_index"]
    valid = torch.ones_like(t, dtype=torch.bool) if ii is None else t != ii
    nll = -logp.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1) * valid
    seg = nll.sum() / (valid.numel() if ii is None else valid.sum().clamp_min(1))

    def l1(pred, target, mask):
        err = (pred - target.double()).abs()
        w = torch.ones_like(err) if mask is None else mask.double().expand_as(err)
        count = err.numel() if reduction == "all" else w.sum().clamp_min(1)
        return (err * w).sum() / count

    depth = l1(x["depth_pred"], inputs["depth_target"], inputs["depth_mask"])
    normal = l1(x["normal_pred"], inputs["normal_target"], inputs["normal_mask"])
    return [seg, depth, normal], x


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("classes", "ignore_index", "reduction"), [(13, None, "all"), (40, 255, "valid")])
def test_cuda_two_x_error_rule(dtype, channels_last, classes, ignore_index, reduction):
    inputs = make_inputs(
        3,
        classes,
        33,
        47,
        ignore_index=ignore_index,
        dtype=dtype,
        device="cuda",
        channels_last=channels_last,
    )
    weights = (0.3, 2.0, 5.0)
    fused = run("cuda", inputs, reduction, weights)
    plain = run("reference", inputs, reduction, weights)
    truth_losses, leaves = _fp64_truth(inputs, reduction)
    truth_grads = torch.autograd.grad(
        sum(w * v for w, v in zip(weights, truth_losses)), [leaves[k] for k in PREDS]
    )
    for k in range(3):
        want = truth_losses[k].detach()
        err_fused = (fused[0][k].double() - want).abs().item()
        err_plain = (plain[0][k].double() - want).abs().item()
        assert err_fused <= 2 * err_plain + 1e-6 * max(want.abs().item(), 1e-3), (k, err_fused, err_plain)
    for k, name in enumerate(PREDS):
        want = truth_grads[k]
        assert fused[1][k].dtype == dtype
        err_fused = (fused[1][k].double() - want).abs().max().item()
        err_plain = (plain[1][k].double() - want).abs().max().item()
        floor = 1e-6 * want.abs().max().item()
        assert err_fused <= 2 * err_plain + floor, (name, err_fused, err_plain)
    if channels_last:
        assert fused[1][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_cuda_matches_cpp_and_is_deterministic():
    inputs = make_inputs(2, 27, 40, 70, ignore_index=255, device="cuda")
    one = run("cuda", inputs, "valid", (0.3, 2.0, 5.0))
    two = run("cuda", inputs, "valid", (0.3, 2.0, 5.0))
    for a, b in zip([*one[0], *one[1]], [*two[0], *two[1]]):
        assert torch.equal(a, b)
    if HAS_CPP:
        cpu_inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        cpu = run("cpp", cpu_inputs, "valid", (0.3, 2.0, 5.0))
        assert_matches(([x.cpu() for x in one[0]], [g.cpu() for g in one[1]]), cpu, rtol=2e-5)


@pytest.mark.gpu
def test_cuda_auto_and_label_error_reported_without_sync():
    inputs = make_inputs(2, 13, 5, 6, device="cuda")
    assert OP.select("auto", **inputs).name == "cuda"
    inputs["seg_target"][1, 2, 3] = 13
    seg, _, _ = mtl.multitask_loss(**inputs, impl="cuda")
    assert torch.isnan(seg).item()
    with pytest.raises(ValueError, match=r"label 13 at \(b=1, h=2, w=3\)"):
        mtl.check_cuda_label_errors()
    mtl.check_cuda_label_errors()  # reported once


@needs_cpp
def test_cpp_empty_batch_matches_reference():
    inputs = make_inputs(0, 13, 4, 4, depth_mask=None, normal_mask=None)
    for ignore_index, reduction in [(None, "all"), (1, "valid")]:
        args = {**inputs, "ignore_index": ignore_index, "reduction": reduction}
        got = mtl.multitask_loss(**args, impl="cpp")
        want = mtl.multitask_loss(**args, impl="reference")
        torch.testing.assert_close(got, want, equal_nan=True)
