"""mgm_fast.ops._triton.genblock: the fused CBN-affine + ReLU + (nearest-2x) conv3x3 (+ residual)
Triton kernels against the plain-PyTorch formula.

On the CPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on small odd shapes. Every case applies the 2x-error rule to the output
and to the gradients w.r.t. x, scale, shift, weight, bias and residual: the fused error
against an fp64 evaluation of the formula (on the same rounded inputs) is at most twice the
error of the plain-PyTorch path in the same precision, plus a small slack. Every buffer the
kernels write is poisoned with NaN first. A subprocess compiles every kernel ahead of time for
sm_90 (PTX and cubin, no GPU needed); gpu-marked cases run the real kernels, bf16 included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F

from mgm_fast.ops import BackendUnavailable
from mgm_fast.ops._triton import genblock as gb

pytest.importorskip("triton")

# Under the interpreter the kernels take CPU tensors; with TRITON_INTERPRET=0 (the GPU suite)
# the same tests run the compiled kernels on CUDA tensors.
DEVICE = "cpu" if gb._INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="TRITON_INTERPRET is off and there is no CUDA device",
)
interpreter_only = pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU interpreter setup")
compiled_only = pytest.mark.skipif(
    DEVICE != "cuda", reason="TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test the compiled kernels"
)

NAMES = ("out", "x", "scale", "shift", "weight", "bias", "residual")
# slack of the 2x rule, relative to the largest magnitude of the fp64 truth
SLACK = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def _poison_and_no_tf32(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element left unwritten shows. On a
    GPU, TF32 is off (for cuDNN, hence also for the kernels) unless a test turns it on."""
    alloc = gb._alloc

    def poisoned(*args, **kwargs):
        return alloc(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(gb, "_alloc", poisoned)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def make_inputs(
    batch, cin, cout, height, width, *, upsample, residual, dtype, channels_last=False,
    bias=True, weight_dtype=None, device=DEVICE,
):  # fmt: skip
    """Random inputs, reproducible per case; residual None | "full" | "half"."""
    key = repr((batch, cin, cout, height, width, upsample, residual, dtype, channels_last, bias))
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    ho, wo = (2 * height, 2 * width) if upsample else (height, width)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = {
        "x": torch.randn(batch, cin, height, width, generator=g).to(dtype),
        "scale": torch.randn(batch, cin, generator=g),
        "shift": 0.5 * torch.randn(batch, cin, generator=g),
        "weight": (torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5)).to(weight_dtype or dtype),
        "bias": (0.1 * torch.randn(cout, generator=g)).to(weight_dtype or dtype) if bias else None,
        "residual": None,
    }
    if residual is not None:
        rh, rw = (ho, wo) if residual == "full" else (ho // 2, wo // 2)
        t["residual"] = torch.randn(batch, cout, rh, rw, generator=g).to(dtype)
    for k, v in t.items():
        if v is not None:
            v = v.to(device)
            t[k] = v.contiguous(memory_format=fmt) if v.dim() == 4 else v
    grad = torch.randn(batch, cout, ho, wo, generator=g).to(dtype).to(device)
    return t, grad


def torch_formula(x, scale, shift, weight, bias, residual, *, upsample):
    """The plain-PyTorch twin in x's dtype (the affine is float32 by type promotion, then
    rounded to x's dtype, as in the kernels; weight and bias cast to x's dtype as autocast)."""
    a = torch.relu(x * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)
    if upsample:
        a = F.interpolate(a, scale_factor=2.0, mode="nearest")
    out = F.conv2d(a, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=1)
    if residual is not None:
        if residual.shape[-1] != out.shape[-1]:
            residual = F.interpolate(residual, scale_factor=2.0, mode="nearest")
        out = out + residual
    return out


def evaluate(fn, inputs, grad, *, upsample, cast=None):
    """Output and gradients of <fn(...), grad> w.r.t. every tensor input (None where absent)."""
    leaves = {}
    for k, v in inputs.items():
        if v is not None:
            v = v.detach().clone()
            v = v.to(cast) if cast is not None else v
            leaves[k] = v.requires_grad_(True)
    args = {k: leaves.get(k) for k in inputs}
    out = fn(**args, upsample=upsample)
    g = grad.to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), g)
    found = dict(zip(leaves, grads))
    return {"out": out.detach(), **{k: found.get(k) for k in NAMES[1:]}}


def fused(x, scale, shift, weight, bias, residual, *, upsample):
    return gb.fused_cbn_relu_conv(x, scale, shift, weight, bias, upsample=upsample, residual=residual)


def check_2x_rule(inputs, grad, *, upsample, dtype, slack=None):
    """Fused vs the torch path vs fp64 truth, for the output and every gradient."""
    got = evaluate(fused, inputs, grad, upsample=upsample)
    ref = evaluate(torch_formula, inputs, grad, upsample=upsample)
    truth = evaluate(torch_formula, inputs, grad, upsample=upsample, cast=torch.float64)
    report = {}
    for name in NAMES:
        if truth[name] is None:
            assert got[name] is None, name
            continue
        a, r, t = got[name], ref[name], truth[name]
        assert a.shape == t.shape and a.dtype == r.dtype, (name, a.shape, a.dtype, r.dtype)
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten elements?)"
        err = (a.double() - t).abs().max().item()
        err_ref = (r.double() - t).abs().max().item()
        floor = (SLACK[dtype] if slack is None else slack) * t.abs().max().item()
        report[name] = (err, err_ref)
        assert err <= 2 * err_ref + floor, (
            f"{name}: fused error {err:.3g} > 2 x torch error {err_ref:.3g} + {floor:.3g}"
        )
    return got, report


# ---------------------------------------------------------------------------------------------
# values and gradients under the interpreter

# (batch, cin, cout, height, width, upsample, residual, channels_last)
CASES = [
    (1, 5, 7, 3, 5, True, None, False),
    (3, 7, 5, 4, 4, True, "half", False),
    (3, 12, 5, 3, 5, True, "full", True),
    (1, 5, 12, 4, 4, False, None, True),
    (3, 7, 5, 4, 6, False, "half", False),
    (2, 5, 7, 3, 5, False, "full", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_ci{}_co{}_{}x{}_up{}_res{}_cl{}".format(*c))
def test_matches_torch_formula(case, dtype):
    batch, cin, cout, height, width, upsample, residual, channels_last = case
    inputs, grad = make_inputs(
        batch, cin, cout, height, width,
        upsample=upsample, residual=residual, dtype=dtype, channels_last=channels_last,
    )  # fmt: skip
    got, _ = check_2x_rule(inputs, grad, upsample=upsample, dtype=dtype)
    assert got["out"].dtype == dtype
    assert got["out"].is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


@pytest.mark.parametrize(
    "case",
    [
        # several tiles on every axis: Cin 20 and Cout 18 > 16-wide tiles, 10x8 = 80 > 64 pixels
        (2, 20, 18, 10, 8, False, "half", torch.float32, False),
        (1, 20, 18, 5, 7, True, "full", torch.float16, True),
        # no bias; bfloat16 (the interpreter multiplies bf16 in float32)
        (2, 5, 7, 4, 3, True, "half", torch.bfloat16, False),
    ],
    ids=["tiles_fp32", "tiles_up_fp16", "bf16_nobias"],
)
def test_tiles_bias_and_bf16(case):
    batch, cin, cout, height, width, upsample, residual, dtype, channels_last = case
    inputs, grad = make_inputs(
        batch, cin, cout, height, width, upsample=upsample, residual=residual, dtype=dtype,
        channels_last=channels_last, bias=dtype != torch.bfloat16,
    )  # fmt: skip
    check_2x_rule(inputs, grad, upsample=upsample, dtype=dtype)


@interpreter_only
@pytest.mark.parametrize("index", range(4), ids=lambda i: f"gpu_tile{i}")
def test_every_gpu_tile_candidate_under_the_interpreter(monkeypatch, index):
    """The tiles the GPU autotuner picks from (and, first of each list, the only ones with
    MGM_FAST_TRITON_AUTOTUNE=0) compute the same as the interpreter's small tiles: several
    tiles on the channel axes, partial tiles, both layouts."""
    import triton

    kernels = {"fwd": gb._fwd_kernel, "dinput": gb._dinput_kernel, "dweight": gb._dweight_kernel}
    assert set(gb.GPU_TILES) == set(kernels) and all(len(t) > index for t in gb.GPU_TILES.values())
    for name, kernel in kernels.items():
        monkeypatch.setattr(kernel, "configs", [triton.Config(gb.GPU_TILES[name][index], num_warps=4, num_stages=1)])
    for case in [(2, 5, 70, 3, 5, True, "half", False), (1, 70, 9, 4, 6, False, "full", True)]:
        batch, cin, cout, height, width, upsample, residual, channels_last = case
        inputs, grad = make_inputs(
            batch, cin, cout, height, width, upsample=upsample, residual=residual, dtype=torch.float32,
            channels_last=channels_last,
        )  # fmt: skip
        check_2x_rule(inputs, grad, upsample=upsample, dtype=torch.float32)


def test_weight_split_k(monkeypatch):
    """dW split over pixel ranges (uneven last range) gives the same gradients as one range."""
    inputs, grad = make_inputs(2, 5, 6, 3, 5, upsample=True, residual=None, dtype=torch.float32)
    one = evaluate(fused, inputs, grad, upsample=True)
    monkeypatch.setattr(gb, "_DW_PIXELS_PER_SPLIT", 7)  # 30 pixels -> 4 ranges of 8, 8, 8, 6
    assert gb._dw_splits(30) == 4
    split = evaluate(fused, inputs, grad, upsample=True)
    torch.testing.assert_close(split["weight"], one["weight"], rtol=1e-5, atol=1e-6)


def test_mixed_precision_weight_and_partial_grads():
    """float16 x with float32 weight and bias (autocast style): gradients keep each input's
    dtype; inputs that do not require grad get none; no-grad mode runs forward only."""
    inputs, grad = make_inputs(
        2, 5, 7, 3, 4, upsample=False, residual="full", dtype=torch.float16, weight_dtype=torch.float32
    )
    x, scale, shift, weight, bias, residual = (inputs[k] for k in NAMES[1:])
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    out = gb.fused_cbn_relu_conv(x, scale, shift, w, b, upsample=False, residual=residual)
    dw, db = torch.autograd.grad(out, [w, b], grad)
    assert out.dtype == torch.float16 and dw.dtype == db.dtype == torch.float32
    ref = evaluate(torch_formula, inputs, grad, upsample=False, cast=torch.float64)
    torch.testing.assert_close(
        dw.double(), ref["weight"], rtol=2e-2, atol=2e-2 * ref["weight"].abs().max().item()
    )
    torch.testing.assert_close(db.double(), ref["bias"], rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        again = gb.fused_cbn_relu_conv(x, scale, shift, weight, bias, upsample=False, residual=residual)
    assert not again.requires_grad
    torch.testing.assert_close(again, out.detach(), rtol=0, atol=0)


def test_expanded_and_strided_gradient():
    """A stride-0 output gradient (from .sum()) and a sliced, non-contiguous x are read as they
    are, without copies."""
    inputs, _ = make_inputs(2, 5, 7, 3, 8, upsample=True, residual=None, dtype=torch.float32)
    leaves = [inputs["x"].clone().requires_grad_(True) for _ in range(2)]
    args = (inputs["scale"], inputs["shift"], inputs["weight"], inputs["bias"])
    x = leaves[0][..., ::2]  # a non-contiguous (B, 5, 3, 4) view
    assert not x.is_contiguous()
    gb.fused_cbn_relu_conv(x, *args, upsample=True).sum().backward()
    torch_formula(leaves[1][..., ::2], *args, None, upsample=True).sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad, rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_custom_ops():
    """torch.compile (fullgraph) traces the autograd.Function around the custom ops."""
    inputs, grad = make_inputs(1, 5, 7, 3, 4, upsample=True, residual="half", dtype=torch.float32)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    a = evaluate(compiled, inputs, grad, upsample=True)
    b = evaluate(fused, inputs, grad, upsample=True)
    for name in NAMES:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# exact rewrites, in plain torch


def test_phase_weights_equal_upsampled_conv_and_fold_is_transpose():
    """Four 2x2 phase convolutions reproduce conv3x3(up2(a)) (fp64), and the fold of dW is the
    transpose of the tap-summing map: <fold(G), W> == <G, phase(W)>."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    w = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
    want = F.conv2d(F.interpolate(a, scale_factor=2.0, mode="nearest"), w, padding=1)
    wp = gb._phase_weights(w.float(), True).double()  # (4 phases, 4 taps, Cin, Cout)
    pad = F.pad(a, (1, 1, 1, 1))
    got = torch.empty_like(want)
    for pa in range(2):
        for pb in range(2):
            k = wp[pa * 2 + pb].reshape(2, 2, 3, 6).permute(3, 2, 0, 1)  # (Cout, Cin, 2, 2)
            window = pad[:, :, pa : pa + 5, pb : pb + 6]  # rows i-1+pa .. i+pa for i in [0, 4)
            got[:, :, pa::2, pb::2] = F.conv2d(window, k)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for upsample in (True, False):
        grad_p = torch.randn(gb._phase_weights(w.float(), upsample).shape, generator=g)
        lhs = (gb._fold_phase_grad(grad_p, upsample).double() * w).sum()
        rhs = (grad_p.double() * gb._phase_weights(w.float(), upsample).double()).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# support reasons and bad input


@interpreter_only
def test_supported_reasons(monkeypatch):
    x = torch.randn(2, 5, 3, 3)
    w = torch.randn(7, 5, 3, 3)
    assert gb.triton_supported_reasons(x, w) == []
    assert any("float64" in r for r in gb.triton_supported_reasons(x.double(), w))
    assert any("3x3" in r for r in gb.triton_supported_reasons(x, torch.randn(7, 5, 1, 1)))
    assert any("input channels" in r for r in gb.triton_supported_reasons(x, torch.randn(7, 4, 3, 3)))
    assert any("4-d" in r for r in gb.triton_supported_reasons(x[0], w))
    monkeypatch.setattr(gb, "_INTERPRET", False)
    assert any("TRITON_INTERPRET=1" in r for r in gb.triton_supported_reasons(x, w))
    monkeypatch.setattr(gb, "_TRITON_IMPORT_ERROR", "triton is not installed (test)")
    reasons = gb.triton_supported_reasons(x, w)
    assert "triton is not installed (test)" in reasons
    with pytest.raises(BackendUnavailable, match="not installed"):
        gb.fused_cbn_relu_conv(x, torch.ones(2, 5), torch.zeros(2, 5), w, None, upsample=True)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"scale": torch.ones(2, 4)}, ValueError, r"scale must have shape \(B, Cin\) = \(2, 5\)"),
        ({"shift": torch.zeros(2, 5, dtype=torch.float16)}, TypeError, "shift must be float32"),
        ({"bias": torch.zeros(6)}, ValueError, r"bias must have shape \(Cout,\) = \(7,\)"),
        (
            {"residual": torch.zeros(2, 7, 5, 5)},
            ValueError,
            r"residual must have shape \(2, 7, 6, 6\) or \(2, 7, 3, 3\)",
        ),
        ({"x": torch.zeros(2, 5, 3, 3, dtype=torch.float64)}, BackendUnavailable, "dtype torch.float64"),
        ({"weight": torch.zeros(7, 5, 1, 1)}, BackendUnavailable, "3x3"),
        ({"upsample": 1}, TypeError, "upsample must be a bool"),
    ],
)
def test_bad_input_names_the_tensor(change, error, match):
    args = {
        "x": torch.randn(2, 5, 3, 3),
        "scale": torch.ones(2, 5),
        "shift": torch.zeros(2, 5),
        "weight": torch.randn(7, 5, 3, 3),
        "bias": None,
        "upsample": True,
        "residual": None,
    }
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        gb.fused_cbn_relu_conv(
            args["x"], args["scale"], args["shift"], args["weight"], args["bias"],
            upsample=args["upsample"], residual=args["residual"],
        )  # fmt: skip


def test_half_residual_needs_even_output():
    x, w, r = (torch.randn(s, device=DEVICE) for s in ((1, 5, 3, 5), (7, 5, 3, 3), (1, 7, 1, 2)))
    scale, shift = torch.ones(1, 5, device=DEVICE), torch.zeros(1, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"residual must have shape \(1, 7, 3, 5\), got \(1, 7, 1, 2\)"):
        gb.fused_cbn_relu_conv(x, scale, shift, w, None, upsample=False, residual=r)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90 (no GPU needed)

_AOT_SCRIPT = textwrap.dedent(
    """
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mgm_fast.ops._triton import genblock

    results = []
    for fn, signature, constexprs in genblock.triton_kernels():
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32))
        results.append({"name": fn.__name__, "asm": sorted(k.asm), "ptx": len(k.asm.get("ptx", "")),
                        "cubin": len(k.asm.get("cubin", b"")),
                        "sm90": ".target sm_90" in k.asm.get("ptx", ""),
                        "constexprs": {n: str(v) for n, v in constexprs.items()}})
    labels = [label for label, *_ in genblock.aot_specs()]
    print(json.dumps({"kernels": results, "aot_labels": labels}))
    """
)


def test_aot_compile_every_kernel_for_sm90(tmp_path):
    """A fresh process without the interpreter (triton.language's own jit helpers are
    interpreter objects in this one) and an empty Triton cache, so every kernel really lowers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["kernels"]
    assert len(set(report["aot_labels"])) == len(results)  # aot_specs(): the same list, unique labels
    names = {r["name"] for r in results}
    assert names == {"_fwd_kernel", "_dinput_kernel", "_dweight_kernel"}
    for r in results:
        assert r["ptx"] > 0 and r["cubin"] > 0 and r["sm90"], r
    assert {r["constexprs"]["UPSAMPLE"] for r in results} == {"True", "False"}


@interpreter_only
def test_triton_kernels_refuses_under_interpreter():
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"):
        gb.triton_kernels()


# ---------------------------------------------------------------------------------------------
# compiled kernels on a real GPU (TRITON_INTERPRET=0; skipped without CUDA)


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize(
    "case",
    [
        (4, 64, 48, 16, 16, True, "half", True),
        (3, 33, 65, 9, 13, True, "full", False),
        (2, 96, 80, 17, 12, False, "half", True),
        (8, 256, 128, 32, 32, True, "half", True),  # a SAGAN 128x128 generator block's size
    ],
    ids=lambda c: "b{}_ci{}_co{}_{}x{}_up{}_res{}_cl{}".format(*c),
)
def test_gpu_matches_torch_formula(case, dtype):
    batch, cin, cout, height, width, upsample, residual, channels_last = case
    inputs, grad = make_inputs(
        batch, cin, cout, height, width, upsample=upsample, residual=residual, dtype=dtype,
        channels_last=channels_last,
    )  # fmt: skip
    check_2x_rule(inputs, grad, upsample=upsample, dtype=dtype)


@pytest.mark.gpu
@compiled_only
def test_gpu_fp32_tf32_follows_cudnn_flag(monkeypatch):
    """With TF32 on (torch's default for cuDNN) the kernels use TF32 products too: the 2x rule
    against torch's TF32 convolutions, with a TF32-sized slack (cuDNN may pick exact kernels)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    inputs, grad = make_inputs(2, 64, 48, 12, 12, upsample=True, residual="half", dtype=torch.float32)
    check_2x_rule(inputs, grad, upsample=True, dtype=torch.float32, slack=2.0**-9)
