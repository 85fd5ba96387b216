"""mgm_fast.ops.multitask_loss, triton backend, against the plain-PyTorch reference.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py) on small shapes; they are also lowered ahead of time for sm_90 (PTX and
cubin, no GPU needed). GPU cases (marker ``gpu``) apply the 2x-error rule on CUDA tensors.
Helpers (random inputs, the run/compare functions, the fp64 ground truth) are shared with
tests/ops/test_multitask_loss.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mgm_fast.ops import REGISTRY, BackendUnavailable
from mgm_fast.ops import multitask_loss as mtl
from mgm_fast.ops._dispatch import triton_reason
from tests.ops.test_multitask_loss import PREDS, _fp64_truth, assert_matches, make_inputs, run

OP = REGISTRY["multitask_loss"]
needs_triton = pytest.mark.skipif(triton_reason() is not None, reason=f"Triton unavailable: {triton_reason()}")
pytestmark = needs_triton
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _triton_module():
    from mgm_fast.ops._triton import multitask_loss as tmod

    return tmod


def _two_x_error_rule(fused, plain, truth_losses, truth_grads, dtype):
    # The interpreter rounds float32 -> bfloat16 toward zero (the GPU rounds to nearest), so on
    # the CPU a bfloat16 gradient may be off by one unit in the last place: allow that there.
    ulp_slack = 2.0**-7 if (dtype == torch.bfloat16 and DEVICE == "cpu") else 0.0
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
        floor = (1e-6 + ulp_slack) * want.abs().max().item()
        assert err_fused <= 2 * err_plain + floor, (name, err_fused, err_plain)


# ---------------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize("classes", [13, 27, 40])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 5), (3, 5, 7)])
@pytest.mark.parametrize(("ignore_index", "reduction"), [(None, "all"), (255, "valid"), (-1, "all")])
def test_triton_matches_reference(classes, shape, ignore_index, reduction):
    b, h, w = shape
    inputs = make_inputs(b, classes, h, w, ignore_index=ignore_index, device=DEVICE)
    assert_matches(run("triton", inputs, reduction), run("reference", inputs, reduction))


@pytest.mark.parametrize(("classes", "block_c"), [(40, 16), (27, 8), (13, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_class_chunk_loop(monkeypatch, classes, block_c, channels_last):
    """C above the class tile: online logsumexp over chunks, then a second pass for the gradient."""
    tmod = _triton_module()
    monkeypatch.setattr(tmod, "_blocks", lambda c, bp, bc: (16, block_c))
    inputs = make_inputs(2, classes, 5, 7, ignore_index=255, channels_last=channels_last, device=DEVICE)
    inputs["seg_logits"][0, :, 1, 2] = -1e4  # one pixel far below ...
    inputs["seg_logits"][1, -1, 3, 4] = 1e4  # ... and one class far above the rest
    assert_matches(run("triton", inputs, "valid"), run("reference", inputs, "valid"))


DEPTH_MASKS = [None, "zeros", "ones", "bool", "float", "uint8", "int64"]
NORMAL_MASKS = [None, "zeros1", "ones3", "bool1", "float1", "bool3", "float3"]


@pytest.mark.parametrize(("depth_mask", "normal_mask"), list(zip(DEPTH_MASKS, NORMAL_MASKS)))
@pytest.mark.parametrize("reduction", ["all", "valid"])
def test_triton_masks(depth_mask, normal_mask, reduction):
    inputs = make_inputs(2, 13, 5, 7, depth_mask=depth_mask, normal_mask=normal_mask, device=DEVICE)
    assert_matches(run("triton", inputs, reduction), run("reference", inputs, reduction))


def test_triton_all_pixels_ignored_gives_zero():
    inputs = make_inputs(2, 13, 3, 5, ignore_index=255, ignore_fraction=1.0, device=DEVICE)
    got = run("triton", inputs, "valid")
    assert got[0][0].item() == 0.0 and torch.count_nonzero(got[1][0]) == 0
    assert_matches(got, run("reference", inputs, "valid"))


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_triton_extreme_logits_stay_finite(ignore_index):
    inputs = make_inputs(2, 40, 5, 7, ignore_index=ignore_index, device=DEVICE)
    sign = torch.where(torch.rand(inputs["seg_logits"].shape) > 0.5, 1.0, -1.0).to(DEVICE)
    inputs["seg_logits"] = sign * 1e4
    losses, grads = run("triton", inputs)
    assert all(torch.isfinite(x).all() for x in (*losses, *grads))
    assert_matches((losses, grads), run("reference", inputs))


@pytest.mark.parametrize("reduction", ["all", "valid"])
def test_triton_channels_last_keeps_layout(reduction):
    inputs = make_inputs(3, 27, 7, 5, ignore_index=255, channels_last=True, device=DEVICE)
    assert not inputs["seg_logits"].is_contiguous()
    got = run("triton", inputs, reduction)
    for grad in got[1]:
        assert grad.is_contiguous(memory_format=torch.channels_last), "gradient keeps the layout"
    assert_matches(got, run("reference", inputs, reduction))


def test_triton_strided_views_take_the_general_path():
    inputs = make_inputs(2, 40, 6, 8, device=DEVICE)
    inputs["seg_logits"] = torch.randn(2, 45, 6, 16, device=DEVICE)[:, 2:42, :, ::2]
    inputs["normal_pred"] = torch.randn(2, 3, 12, 8, device=DEVICE)[:, :, ::2]
    inputs["seg_target"] = inputs["seg_target"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not inputs["seg_logits"].is_contiguous()
    assert not _triton_module()._collapses(inputs["normal_pred"])
    assert_matches(run("triton", inputs), run("reference", inputs))


@pytest.mark.parametrize("weights", [(0.3, 2.0, 5.0), (0.0, -1.5, 1.0)])
def test_triton_gradient_through_loss_weights(weights):
    inputs = make_inputs(2, 27, 7, 5, ignore_index=-1, device=DEVICE)
    assert_matches(run("triton", inputs, "valid", weights), run("reference", inputs, "valid", weights))


def test_triton_partial_grads_retain_graph_and_no_grad():
    inputs = make_inputs(2, 13, 4, 3, ignore_index=255, device=DEVICE)
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in PREDS}
    seg, _, _ = mtl.multitask_loss(**{**inputs, **leaves}, impl="triton")
    (g1,) = torch.autograd.grad(seg, leaves["seg_logits"], retain_graph=True)
    (g2,) = torch.autograd.grad(3 * seg, leaves["seg_logits"])
    torch.testing.assert_close(g2, 3 * g1)
    seg, _, _ = mtl.multitask_loss(**{**inputs, **leaves}, impl="triton")
    seg.backward()  # one loss alone: the other predictions get no gradient
    assert leaves["depth_pred"].grad is None and leaves["normal_pred"].grad is None
    d = inputs["depth_pred"].clone().requires_grad_(True)
    losses = mtl.multitask_loss(**{**inputs, "depth_pred": d}, impl="triton")
    assert not losses[0].requires_grad and losses[1].requires_grad
    with torch.no_grad():
        got = mtl.multitask_loss(**inputs, impl="triton")
    torch.testing.assert_close(got, mtl.multitask_loss(**inputs, impl="reference"), rtol=1e-5, atol=1e-6)


def test_triton_is_deterministic():
    inputs = make_inputs(2, 27, 9, 11, ignore_index=255, device=DEVICE)
    one, two = run("triton", inputs, "valid"), run("triton", inputs, "valid")
    for a, b in zip([*one[0], *one[1]], [*two[0], *two[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_low_precision_two_x_error_rule(dtype, channels_last):
    inputs = make_inputs(2, 40, 5, 9, ignore_index=255, dtype=dtype, channels_last=channels_last, device=DEVICE)
    weights = (0.3, 2.0, 5.0)
    fused = run("triton", inputs, "valid", weights)
    plain = run("reference", inputs, "valid", weights)
    truth_losses, leaves = _fp64_truth(inputs, "valid")
    total = sum(w * v for w, v in zip(weights, truth_losses))
    truth_grads = torch.autograd.grad(total, [leaves[k] for k in PREDS])
    _two_x_error_rule(fused, plain, truth_losses, truth_grads, dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 / 0 = NaN, as in the reference
def test_triton_empty_batch_matches_reference():
    inputs = make_inputs(0, 13, 4, 4, depth_mask=None, normal_mask=None, device=DEVICE)
    for ignore_index, reduction in [(None, "all"), (1, "valid")]:
        args = {**inputs, "ignore_index": ignore_index, "reduction": reduction}
        got = mtl.multitask_loss(**args, impl="triton")
        want = mtl.multitask_loss(**args, impl="reference")
        torch.testing.assert_close(got, want, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# errors and dispatch


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA the error is reported later (see the gpu test)")
@pytest.mark.parametrize(("bad_label", "ignore_index"), [(13, None), (-1, None), (255, -1), (-5, 255)])
def test_triton_out_of_range_label_raises_naming_it(bad_label, ignore_index):
    inputs = make_inputs(2, 13, 4, 6, ignore_index=ignore_index, device=DEVICE)
    inputs["seg_target"][1, 2, 3] = bad_label
    with pytest.raises(ValueError, match=rf"triton backend.*label {bad_label} at \(b=1, h=2, w=3\).*\[0, 13\)"):
        mtl.multitask_loss(**inputs, impl="triton")


def test_triton_shape_errors_name_the_tensor():
    inputs = make_inputs(2, 13, 4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="seg_target must have shape"):
        mtl.multitask_loss(**{**inputs, "seg_target": inputs["seg_target"][:, :3]}, impl="triton")
    with pytest.raises(ValueError, match="normal_mask must have shape"):
        mtl.multitask_loss(**{**inputs, "normal_mask": torch.ones(2, 2, 4, 6, device=DEVICE)}, impl="triton")
    with pytest.raises(ValueError, match="depth_target must have the shape"):
        mtl.multitask_loss(**{**inputs, "depth_target": inputs["depth_target"][:, :, :3]}, impl="triton")
    with pytest.raises(ValueError, match="reduction"):
        mtl.multitask_loss(**inputs, reduction="mean", impl="triton")


def test_triton_dispatch_rules():
    inputs = make_inputs(1, 13, 2, 2, device=DEVICE)
    if DEVICE == "cpu":  # the interpreter is a correctness tool: never chosen by auto
        assert OP.select("auto", **inputs).name != "triton"
    with pytest.raises(BackendUnavailable, match=r"dtype torch\.float64"):
        mtl.multitask_loss(**make_inputs(1, 13, 2, 2, dtype=torch.float64, device=DEVICE), impl="triton")
    inputs["depth_target"].requires_grad_(True)
    with pytest.raises(BackendUnavailable, match="depth_target requires grad"):
        mtl.multitask_loss(**inputs, impl="triton")


def test_triton_forced_without_interpreter_or_gpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        mtl.multitask_loss(**make_inputs(1, 13, 2, 2), impl="triton")


# ---------------------------------------------------------------------------------------------
# ahead-of-time lowering for sm_90 (no GPU needed)


def test_every_triton_kernel_lowers_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "mgm_fast.ops._triton.aot", "mgm_fast.ops._triton.multitask_loss", "--arch", "90"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    kernels = {label.split(":")[1].split("[")[0] for label in report}
    assert kernels == {"seg_ce_fwd", "masked_l1_fwd", "finalize", "scale_grad"}
    for label, sizes in report.items():
        assert sizes["ptx"] > 1000 and sizes["cubin"] > 1000, label


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("classes", "ignore_index", "reduction"), [(13, None, "all"), (40, 255, "valid")])
def test_triton_cuda_two_x_error_rule(dtype, channels_last, classes, ignore_index, reduction):
    if DEVICE != "cuda":
        pytest.skip("TRITON_INTERPRET=1: Triton runs on CPU tensors in this process")
    inputs = make_inputs(3, classes, 33, 47, ignore_index=ignore_index, dtype=dtype, device="cuda",
                         channels_last=channels_last)  # fmt: skip
    weights = (0.3, 2.0, 5.0)
    fused = run("triton", inputs, reduction, weights)
    plain = run("reference", inputs, reduction, weights)
    truth_losses, leaves = _fp64_truth(inputs, reduction)
    total = sum(w * v for w, v in zip(weights, truth_losses))
    truth_grads = torch.autograd.grad(total, [leaves[k] for k in PREDS])
    _two_x_error_rule(fused, plain, truth_losses, truth_grads, dtype)
    if channels_last:
        assert fused[1][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_triton_cuda_label_error_reported_without_sync():
    if DEVICE != "cuda":
        pytest.skip("TRITON_INTERPRET=1: Triton runs on CPU tensors in this process")
    inputs = make_inputs(2, 13, 5, 6, device="cuda")
    inputs["seg_target"][1, 2, 3] = 13
    seg, _, _ = mtl.multitask_loss(**inputs, impl="triton")
    assert torch.isnan(seg).item()
    with pytest.raises(ValueError, match=r"triton backend.*label 13 at \(b=1, h=2, w=3\)"):
        mtl.check_cuda_label_errors()
