"""Triton kernels for the GenBlock convolutions: CBN-affine + ReLU prologue, optional nearest-2x
upsampling by phase decomposition, bias + residual epilogue; forward and backward.

``fused_cbn_relu_conv(x, scale, shift, weight, bias, upsample=..., residual=None)`` equals::

    a   = relu(x * scale[:, :, None, None] + shift[:, :, None, None])     (float32, then x.dtype)
    out = conv2d(up(a), weight, bias, padding=1) (+ residual, or + up(residual) when half-size)

with ``up`` = nearest 2x when ``upsample`` else the identity. Shapes and dtypes:

* ``x`` (B, Cin, H, W) float32 / float16 / bfloat16, any strides (NCHW, channels_last, ...);
* ``scale``, ``shift`` (B, Cin) float32 -- conditional BN folded into one affine per sample
  (``scale = gamma[y] * rstd``, ``shift = beta[y] - mean * scale``);
* ``weight`` (Cout, Cin, 3, 3), any float dtype (rounded to ``x.dtype`` for the products, as
  autocast does); ``bias`` (Cout,) or None;
* ``residual`` None, (B, Cout, Ho, Wo), or (B, Cout, Ho / 2, Wo / 2) which is nearest-upsampled
  2x on the fly (the GenBlock shortcut ``conv1x1(up2(x)) = up2(conv1x1(x))``);
* returns (B, Cout, Ho, Wo) of ``x.dtype``, channels_last when ``x`` is; (Ho, Wo) = (2H, 2W)
  with ``upsample``, else (H, W). Products and sums are accumulated in float32.

Differentiable w.r.t. x, scale, shift, weight, bias and residual (not twice).

How (all exact rewrites, no approximation beyond float32 summation order):

* Implicit GEMM: neither the activated map nor im2col columns are ever stored; each tile loads
  x, applies the affine and ReLU in registers and feeds ``tl.dot``. Padding is applied AFTER
  the activation (a padded position contributes 0, like conv2d's zero padding of ``up(a)``).
* Phase decomposition of up2 + conv3x3: output pixel (2i+a, 2j+b) only ever reads low-res rows
  {i-1+a, i+a} and columns {j-1+b, j+b}; the 3x3 taps that land on the same low-res pixel are
  summed into 2x2 "phase weights" W_ab (rows: a=0 -> taps {0}, {1,2}; a=1 -> {0,1}, {2}; the
  same for columns). Four 2x2 convolutions on the low-res input: 16 instead of 36 multiply-adds
  per low-res pixel and channel pair (2.25x fewer), no upsampled tensor.
* Backward, input side: the transposed phase-wise convolution gives d(up(a)) folded to low
  resolution; its epilogue applies the ReLU mask and the affine's chain rule
  (dx = g * scale, per-tile partial sums of g * x and g for dscale / dshift, reduced in torch
  -- deterministic, no atomics).
* Backward, weight side: an implicit GEMM over the B*H*W pixels per (phase, tap), split over
  pixel ranges into float32 partials (deterministic), then folded back to the 3x3 taps with
  the transpose of the tap-summing map. dbias and dresidual are plain torch reductions of the
  output gradient.

fp32 inputs use TF32 products exactly when torch's own cuDNN convolutions do
(``torch.backends.cudnn.allow_tf32``). Tiles are autotuned on GPU: the first call per shape
and dtype compiles and benchmarks the candidate tiles (warm up before capturing a CUDA graph).
``MGM_FAST_TRITON_AUTOTUNE=0`` in the environment when this module is imported turns that off:
each kernel then has only its first GPU tile configuration, so nothing is benchmarked and every
shape compiles one variant (the GPU suite's selftest and tests stages set it). Under
``TRITON_INTERPRET=1`` (the CPU interpreter used by the tests) a single tile configuration is
used and bf16 products are carried out in float32, because the interpreter's bf16 ``tl.dot``
is wrong. Backward scratch: float32 dW partials of (splits <= 64, 16, Cin, Cout) and dscale /
dshift partials of (B, ceil(H*W / 64), Cin).

The kernels are wrapped in ``torch.library`` custom ops (``mgm_fast::genblock_triton_conv``,
``..._dinput``, ``..._dweight``, with fake implementations) called from a
``torch.autograd.Function``, so ``torch.compile`` traces the forward and backward as opaque
nodes (fullgraph) instead of breaking the graph. ``torch.library.triton_op`` is not used:
under the interpreter torch.compile cannot fake-trace it (the interpreted kernel is not
recognised as a Triton kernel, so the op body runs on FakeTensors and fails with "Cannot access
data pointer"), which would leave the compile path untestable on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from mgm_fast.ops._dispatch import BackendUnavailable, device_constant
from mgm_fast.ops._phase_taps import PHASE_TAPS

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except ImportError as _err:  # optional dependency: the reasons below report it
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"triton is not installed ({_err})"

__all__ = ["aot_specs", "fused_cbn_relu_conv", "triton_kernels", "triton_supported_reasons"]

_INTERPRET = (
    bool(triton.knobs.runtime.interpret) if triton is not None else os.environ.get("TRITON_INTERPRET") == "1"
)
"""Read once at import, as Triton does: ``@triton.jit`` picks GPU or interpreter when it decorates
(Triton's own reading of TRITON_INTERPRET, which also accepts "true" and "on")."""

_AUTOTUNE = os.environ.get("MGM_FAST_TRITON_AUTOTUNE", "1").strip() != "0"
"""Read once at import, like TRITON_INTERPRET: ``MGM_FAST_TRITON_AUTOTUNE=0`` gives each kernel
its first GPU tile configuration only, so the autotuner neither prunes nor benchmarks (whatever
the Triton version) -- for short GPU test runs, where tuning would cost more than the tests."""

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ELEMENTS = 2**31 - 1  # the kernels use 32-bit element offsets
_DX_BLOCK_M = 64  # fixed (not tuned): it sets the dscale/dshift partials' size
_DW_PIXELS_PER_SPLIT = 4096  # dW split-K: about this many phase-grid pixels per program
_DW_MAX_SPLITS = 64

GPU_TILES: dict[str, list[dict]] = {}
"""Each kernel's candidate GPU tiles (the autotuner's list, first = the untuned choice)."""


# ---------------------------------------------------------------------------------------------
# kernels

if triton is not None:

    def _configs(kernel: str, interpret: dict, gpu: list[tuple[dict, int, int]]) -> list:
        """One config under the interpreter (its autotuner cannot benchmark); on the GPU the
        list, or only its first entry with MGM_FAST_TRITON_AUTOTUNE=0 (a single config is
        never benchmarked). The GPU candidates are kept in ``GPU_TILES[kernel]`` (tests run
        each of them under the interpreter)."""
        GPU_TILES[kernel] = [dict(meta) for meta, _, _ in gpu]
        if _INTERPRET:
            return [triton.Config(interpret, num_warps=4, num_stages=1)]
        configs = [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu]
        return configs if _AUTOTUNE else configs[:1]

    def _pruner(sizes: dict[str, str]) -> dict:
        """Autotuner pruning: drop tiles far wider than the problem (``sizes`` maps a tile
        parameter to the argument it tiles)."""

        def prune(configs, named_args, **kwargs):
            def fits(config):
                return all(
                    config.kwargs[tile] <= max(16, triton.next_power_of_2(int(named_args[arg])))
                    for tile, arg in sizes.items()
                )

            return [c for c in configs if fits(c)] or configs[:1]

        return {"early_config_prune": prune}

    @triton.jit
    def _tap_offset(phase, tap, UPSAMPLE: tl.constexpr):
        """(dy, dx): phase-grid pixel (i, j) reads low-res input pixel (i + dy, j + dx)."""
        if UPSAMPLE:
            return phase // 2 - 1 + tap // 2, phase % 2 - 1 + tap % 2
        else:
            return tap // 3 - 1, tap % 3 - 1

    @triton.jit
    def _output_pos(i, j, phase, UPSAMPLE: tl.constexpr):
        """Output pixel of phase-grid pixel (i, j)."""
        if UPSAMPLE:
            return 2 * i + phase // 2, 2 * j + phase % 2
        else:
            return i, j

    @triton.jit
    def _activate(x_ptr, scale_ptr, shift_ptr, x_off, ss_off, mask):
        """relu(x * scale + shift) in float32; 0 where masked (padding stays 0 after the affine)."""
        xv = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + ss_off, mask=mask, other=0.0)
        sh = tl.load(shift_ptr + ss_off, mask=mask, other=0.0)
        return tl.maximum(xv * sc + sh, 0.0, propagate_nan=tl.PropagateNan.ALL)

    @triton.autotune(
        configs=_configs(
            "fwd",
            {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16},
            [
                ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
                ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 3),
                ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
                ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 4),
            ],
        ),
        key=["NPIX", "C_in", "C_out", "UPSAMPLE"],
        prune_configs_by=_pruner({"BLOCK_N": "C_out", "BLOCK_K": "C_in"}),
    )
    @triton.jit
    def _fwd_kernel(
        x_ptr, scale_ptr, shift_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
        NPIX, C_in, H, W, C_out,
        sxb, sxc, sxh, sxw,
        sob, soc, soh, sow,
        srb, src, srh, srw,
        UPSAMPLE: tl.constexpr, NTAPS: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RES_HALF: tl.constexpr,
        DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One (pixel tile, Cout tile, phase) of the output.

        The M axis runs over the B*H*W phase-grid pixels (low-res pixels with ``UPSAMPLE``,
        where program axis 2 is the phase a*2+b; output pixels otherwise). K runs over
        (tap, Cin); w is the (phases, NTAPS, Cin, Cout) phase weight tensor.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        phase = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < NPIX
        n_ok = offs_n < C_out
        j = offs_m % W
        i = (offs_m // W) % H
        b = offs_m // (W * H)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # one flat K loop over (tap, Cin chunk): a single software-pipelined loop, compact code
        k_chunks = tl.cdiv(C_in, BLOCK_K)
        for step in range(0, NTAPS * k_chunks):
            tap = step // k_chunks
            offs_k = (step - tap * k_chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            dy, dx = _tap_offset(phase, tap, UPSAMPLE)
            ih = i + dy
            iw = j + dx
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            k_ok = offs_k < C_in
            mask = pix_ok[:, None] & k_ok[None, :]
            a = _activate(
                x_ptr, scale_ptr, shift_ptr,
                (b * sxb + ih * sxh + iw * sxw)[:, None] + offs_k[None, :] * sxc,
                b[:, None] * C_in + offs_k[None, :], mask,
            )  # fmt: skip
            wv = tl.load(
                w_ptr + ((phase * NTAPS + tap) * C_in + offs_k[:, None]) * C_out + offs_n[None, :],
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a.to(DOT_DTYPE), wv.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        oh, ow = _output_pos(i, j, phase, UPSAMPLE)
        out_mask = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            if RES_HALF:
                rh = oh // 2
                rw = ow // 2
            else:
                rh = oh
                rw = ow
            r_off = (b * srb + rh * srh + rw * srw)[:, None] + offs_n[None, :] * src
            acc += tl.load(res_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
        o_off = (b * sob + oh * soh + ow * sow)[:, None] + offs_n[None, :] * soc
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.autotune(
        configs=_configs(
            "dinput",
            {"BLOCK_N": 16, "BLOCK_K": 16},
            [
                ({"BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
                ({"BLOCK_N": 128, "BLOCK_K": 32}, 4, 3),
                ({"BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
                ({"BLOCK_N": 32, "BLOCK_K": 32}, 4, 4),
            ],
        ),
        key=["C_in", "C_out", "H", "W", "UPSAMPLE"],
        prune_configs_by=_pruner({"BLOCK_N": "C_in", "BLOCK_K": "C_out"}),
    )
    @triton.jit
    def _dinput_kernel(
        g_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, dx_ptr, pscale_ptr, pshift_ptr,
        C_in, H, W, C_out,
        sgb, sgc, sgh, sgw,
        sxb, sxc, sxh, sxw,
        sdb, sdc, sdh, sdw,
        UPSAMPLE: tl.constexpr, NPHASES: tl.constexpr, NTAPS: tl.constexpr,
        DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One (pixel tile of one sample, Cin tile) of dx, plus its dscale / dshift partials.

        d(up(a)) folded to low resolution is the transposed phase-wise convolution of g:
        input pixel (r, c) feeds phase-grid pixel (r - dy, c - dx) of every (phase, tap). The
        epilogue recomputes u = x * scale + shift and applies ReLU' and the affine's chain rule.
        Partials are (B, tiles, Cin): pscale = sum over the tile's pixels of du * x, pshift of du.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < H * W
        n_ok = offs_n < C_in
        r = offs_m // W
        c = offs_m % W
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # one flat K loop over (phase, tap, Cout chunk), as in the forward kernel
        k_chunks = tl.cdiv(C_out, BLOCK_K)
        for step in range(0, NPHASES * NTAPS * k_chunks):
            phase_tap = step // k_chunks
            offs_k = (step - phase_tap * k_chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            phase = phase_tap // NTAPS
            tap = phase_tap - phase * NTAPS
            dy, dx = _tap_offset(phase, tap, UPSAMPLE)
            i = r - dy
            j = c - dx
            pix_ok = m_ok & (i >= 0) & (i < H) & (j >= 0) & (j < W)
            oh, ow = _output_pos(i, j, phase, UPSAMPLE)
            k_ok = offs_k < C_out
            gv = tl.load(
                g_ptr + (b * sgb + oh * sgh + ow * sgw)[:, None] + offs_k[None, :] * sgc,
                mask=pix_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            wv = tl.load(
                w_ptr + (phase_tap * C_in + offs_n[None, :]) * C_out + offs_k[:, None],
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(gv.to(DOT_DTYPE), wv.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        mask = m_ok[:, None] & n_ok[None, :]
        x_off = (b * sxb + r * sxh + c * sxw)[:, None] + offs_n[None, :] * sxc
        xv = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + b * C_in + offs_n, mask=n_ok, other=0.0)
        sh = tl.load(shift_ptr + b * C_in + offs_n, mask=n_ok, other=0.0)
        u = xv * sc[None, :] + sh[None, :]
        du = tl.where(mask & (u > 0), acc, 0.0)  # relu'(u) = [u > 0], as torch's threshold_backward
        d_off = (b * sdb + r * sdh + c * sdw)[:, None] + offs_n[None, :] * sdc
        tl.store(dx_ptr + d_off, (du * sc[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        p_off = (b * tl.num_programs(0) + pid_m) * C_in + offs_n
        tl.store(pscale_ptr + p_off, tl.sum(du * xv, axis=0), mask=n_ok)
        tl.store(pshift_ptr + p_off, tl.sum(du, axis=0), mask=n_ok)

    @triton.autotune(
        configs=_configs(
            "dweight",
            {"BLOCK_CI": 16, "BLOCK_CO": 16, "BLOCK_K": 64},
            [
                ({"BLOCK_CI": 64, "BLOCK_CO": 64, "BLOCK_K": 32}, 4, 3),
                ({"BLOCK_CI": 128, "BLOCK_CO": 64, "BLOCK_K": 32}, 4, 3),
                ({"BLOCK_CI": 128, "BLOCK_CO": 128, "BLOCK_K": 32}, 8, 3),
                ({"BLOCK_CI": 64, "BLOCK_CO": 64, "BLOCK_K": 64}, 4, 4),
            ],
        ),
        key=["NPIX", "C_in", "C_out", "CHUNK", "UPSAMPLE"],
        prune_configs_by=_pruner({"BLOCK_CI": "C_in", "BLOCK_CO": "C_out", "BLOCK_K": "CHUNK"}),
    )
    @triton.jit
    def _dweight_kernel(
        g_ptr, x_ptr, scale_ptr, shift_ptr, part_ptr,
        NPIX, C_in, H, W, C_out, CHUNK,
        sgb, sgc, sgh, sgw,
        sxb, sxc, sxh, sxw,
        UPSAMPLE: tl.constexpr, NPHASES: tl.constexpr, NTAPS: tl.constexpr,
        DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One (Cin tile, Cout tile, split * phase-taps + phase * NTAPS + tap) of the dW partials.

        part[split, phase * NTAPS + tap, ci, co] = sum over the split's phase-grid pixels p of
        a(input pixel of p for this tap)[ci] * g(output pixel of p for this phase)[co], with the
        activation a recomputed from x; the split covers pixels [split * CHUNK, +CHUNK).
        """
        pid_ci = tl.program_id(0)
        pid_co = tl.program_id(1)
        pid_z = tl.program_id(2)
        split = pid_z // (NPHASES * NTAPS)
        phase_tap = pid_z % (NPHASES * NTAPS)
        phase = phase_tap // NTAPS
        tap = phase_tap % NTAPS
        dy, dx = _tap_offset(phase, tap, UPSAMPLE)
        offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
        offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        ci_ok = offs_ci < C_in
        co_ok = offs_co < C_out
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, NPIX)
        acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < end
            j = offs_k % W
            i = (offs_k // W) % H
            b = offs_k // (W * H)
            ih = i + dy
            iw = j + dx
            pix_ok = k_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            mask = ci_ok[:, None] & pix_ok[None, :]
            a = _activate(
                x_ptr, scale_ptr, shift_ptr,
                (b * sxb + ih * sxh + iw * sxw)[None, :] + offs_ci[:, None] * sxc,
                b[None, :] * C_in + offs_ci[:, None], mask,
            )  # fmt: skip
            oh, ow = _output_pos(i, j, phase, UPSAMPLE)
            gv = tl.load(
                g_ptr + (b * sgb + oh * sgh + ow * sgw)[:, None] + offs_co[None, :] * sgc,
                mask=k_ok[:, None] & co_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a.to(DOT_DTYPE), gv.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        p_off = ((split * NPHASES * NTAPS + phase_tap) * C_in + offs_ci)[:, None] * C_out + offs_co[None, :]
        tl.store(part_ptr + p_off, acc, mask=ci_ok[:, None] & co_ok[None, :])


# ---------------------------------------------------------------------------------------------
# support and input checks


def triton_supported_reasons(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """Why :func:`fused_cbn_relu_conv` cannot run on ``x`` (B, Cin, H, W) and ``weight``
    (Cout, Cin, 3, 3) here; [] when it can. The remaining arguments are checked (with errors
    naming the tensor) by the call itself."""
    reasons: list[str] = []
    if _TRITON_IMPORT_ERROR is not None:
        reasons.append(_TRITON_IMPORT_ERROR)
    if not _INTERPRET and x.device.type != "cuda":
        reasons.append(
            f"x is on {x.device.type}: Triton kernels run on CUDA devices, or on the CPU "
            "interpreter when TRITON_INTERPRET=1 is set before mgm_fast is imported"
        )
    if weight.device != x.device:
        reasons.append(f"weight is on {weight.device}, x on {x.device}")
    if x.dtype not in _DTYPES:
        reasons.append(f"x dtype {x.dtype} not supported (float32, float16, bfloat16)")
    if weight.dtype not in _DTYPES:
        reasons.append(f"weight dtype {weight.dtype} not supported (float32, float16, bfloat16)")
    if x.dim() != 4:
        reasons.append(f"x must be 4-d (B, Cin, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        reasons.append(f"kernel size must be 3x3: weight has shape {tuple(weight.shape)}")
    elif x.dim() == 4 and weight.shape[1] != x.shape[1]:
        reasons.append(
            f"weight has {weight.shape[1]} input channels, x has {x.shape[1]} (groups are not supported)"
        )
    if x.dim() == 4 and weight.dim() == 4:
        batch, _, height, width = x.shape
        out_elements = 4 * batch * weight.shape[0] * height * width  # the upsampled output's bound
        if max(x.numel(), out_elements) > _MAX_ELEMENTS:
            reasons.append("tensors with 2**31 elements or more are not supported (32-bit offsets)")
    if (
        x.dtype == torch.bfloat16
        and x.device.type == "cuda"
        and not _INTERPRET
        and torch.cuda.get_device_capability(x.device) < (8, 0)
    ):
        reasons.append("bfloat16 needs a GPU of compute capability 8.0 or newer")
    return reasons


def _check_inputs(x, scale, shift, weight, bias, residual, upsample) -> bool:
    """Validates every argument; returns whether the residual is half-size."""
    name = "fused_cbn_relu_conv"
    if not isinstance(upsample, bool):
        raise TypeError(f"{name}: upsample must be a bool, got {type(upsample).__name__}")
    for label, t in (("x", x), ("scale", scale), ("shift", shift), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a tensor, got {type(t).__name__}")
    reasons = triton_supported_reasons(x, weight)
    if reasons:
        raise BackendUnavailable(f"{name} (triton) cannot run: " + "; ".join(reasons))
    batch, cin, height, width = x.shape
    cout = weight.shape[0]
    for label, t in (("scale", scale), ("shift", shift)):
        if tuple(t.shape) != (batch, cin):
            raise ValueError(
                f"{name}: {label} must have shape (B, Cin) = {(batch, cin)}, got {tuple(t.shape)}"
            )
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: {label} must be float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {label} is on {t.device}, x on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (cout,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{name}: bias must have shape (Cout,) = ({cout},), got {got}")
        if not bias.is_floating_point() or bias.device != x.device:
            raise ValueError(
                f"{name}: bias must be a floating tensor on {x.device}, got {bias.dtype} on {bias.device}"
            )
    if batch == 0 or cin == 0 or cout == 0 or height == 0 or width == 0:
        raise ValueError(f"{name}: empty input: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if residual is None:
        return False
    ho, wo = (2 * height, 2 * width) if upsample else (height, width)
    full, half = (batch, cout, ho, wo), (batch, cout, ho // 2, wo // 2)
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{name}: residual must be a tensor or None, got {type(residual).__name__}")
    shape = tuple(residual.shape)
    if shape != full and (shape != half or ho % 2 or wo % 2):
        allowed = f"{full} or {half}" if ho % 2 == 0 and wo % 2 == 0 else f"{full}"
        raise ValueError(f"{name}: residual must have shape {allowed}, got {shape}")
    if not residual.is_floating_point() or residual.device != x.device:
        raise ValueError(
            f"{name}: residual must be a floating tensor on {x.device}, got {residual.dtype} on {residual.device}"
        )
    return shape != full


# ---------------------------------------------------------------------------------------------
# weights: phase decomposition and its transpose


def _phase_weights(weight: torch.Tensor, upsample: bool) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> float32 (phases, taps, Cin, Cout): (4, 4, ...) summed 2x2 phase
    weights (phase a*2+b, tap dr*2+dc) with ``upsample``, else (1, 9, ...) the taps kh*3+kw."""
    cout, cin = weight.shape[:2]
    w = weight.float()
    if not upsample:
        return w.permute(2, 3, 1, 0).reshape(1, 9, cin, cout)
    # PHASE_TAPS[a][d][k] = 1 when 3x3 tap k of an output row (or column) of parity a reads the
    # same low-res row as the 2x2 phase tap d
    m = device_constant(PHASE_TAPS, torch.float32, weight.device)
    return torch.einsum("ark,bsl,oikl->abrsio", m, m, w).reshape(4, 4, cin, cout)


def _fold_phase_grad(dwp: torch.Tensor, upsample: bool) -> torch.Tensor:
    """The transpose of :func:`_phase_weights`: float32 (phases, taps, Cin, Cout) -> (Cout, Cin, 3, 3)."""
    cin, cout = dwp.shape[2:]
    if not upsample:
        return dwp.reshape(3, 3, cin, cout).permute(3, 2, 0, 1)
    m = device_constant(PHASE_TAPS, torch.float32, dwp.device)
    return torch.einsum("ark,bsl,abrsio->oikl", m, m, dwp.reshape(2, 2, 2, 2, cin, cout))


# ---------------------------------------------------------------------------------------------
# launches (custom ops, so torch.compile sees opaque nodes with known output metadata)


def _dot_dtype(dtype: torch.dtype):
    """Triton dtype of the tl.dot operands for inputs of ``dtype``."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.float32 if _INTERPRET else tl.bfloat16  # the interpreter's bf16 dot is wrong
    return tl.float32


def _input_precision() -> str:
    return "tf32" if (torch.backends.cudnn.allow_tf32 and not _INTERPRET) else "ieee"


def _geometry(upsample: bool) -> tuple[int, int]:
    """(phases, taps per phase)."""
    return (4, 4) if upsample else (1, 9)


def _alloc(shape, dtype: torch.dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _new_like(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Empty (B, C, H, W) tensor in x's memory format (channels_last stays channels_last)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return _alloc(shape, dtype, x.device, fmt)


def _output_shape(x: torch.Tensor, cout: int, upsample: bool) -> tuple[int, int, int, int]:
    batch, _, height, width = x.shape
    factor = 2 if upsample else 1
    return batch, cout, factor * height, factor * width


@torch.library.custom_op("mgm_fast::genblock_triton_conv", mutates_args=())
def _conv_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    wp: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    upsample: bool,
) -> torch.Tensor:
    """Forward launch; ``wp`` from :func:`_phase_weights` in x's dtype, contiguous."""
    batch, cin, height, width = x.shape
    cout = wp.shape[3]
    phases, taps = _geometry(upsample)
    out = _new_like(x, _output_shape(x, cout, upsample), x.dtype)
    npix = batch * height * width
    res_half = residual is not None and residual.shape[2] != out.shape[2]
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)

    def grid(meta):
        return triton.cdiv(npix, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]), phases

    _fwd_kernel[grid](
        x, scale, shift, wp,
        bias if bias is not None else out, residual if residual is not None else out, out,
        npix, cin, height, width, cout,
        *x.stride(), *out.stride(), *res_strides,
        UPSAMPLE=upsample, NTAPS=taps,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, RES_HALF=res_half,
        DOT_DTYPE=_dot_dtype(x.dtype), INPUT_PRECISION=_input_precision(),
    )  # fmt: skip
    return out


@_conv_op.register_fake
def _(x, scale, shift, wp, bias, residual, upsample):
    return _new_like(x, _output_shape(x, wp.shape[3], upsample), x.dtype)


@torch.library.custom_op("mgm_fast::genblock_triton_conv_dinput", mutates_args=())
def _dinput_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    wp: torch.Tensor,
    upsample: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx of x's dtype and layout, dscale, dshift float32 (B, Cin))."""
    batch, cin, height, width = x.shape
    cout = wp.shape[3]
    phases, taps = _geometry(upsample)
    dx = _new_like(x, tuple(x.shape), x.dtype)
    tiles = triton.cdiv(height * width, _DX_BLOCK_M)
    pscale = _alloc((batch, tiles, cin), torch.float32, x.device)
    pshift = _alloc((batch, tiles, cin), torch.float32, x.device)

    def grid(meta):
        return tiles, triton.cdiv(cin, meta["BLOCK_N"]), batch

    _dinput_kernel[grid](
        grad, wp, x, scale, shift, dx, pscale, pshift,
        cin, height, width, cout,
        *grad.stride(), *x.stride(), *dx.stride(),
        UPSAMPLE=upsample, NPHASES=phases, NTAPS=taps,
        DOT_DTYPE=_dot_dtype(x.dtype), INPUT_PRECISION=_input_precision(), BLOCK_M=_DX_BLOCK_M,
    )  # fmt: skip
    return dx, pscale.sum(1), pshift.sum(1)


@_dinput_op.register_fake
def _(grad, x, scale, shift, wp, upsample):
    batch, cin = x.shape[:2]
    stats = x.new_empty((batch, cin), dtype=torch.float32)
    return _new_like(x, tuple(x.shape), x.dtype), stats, torch.empty_like(stats)


def _dw_splits(npix: int) -> int:
    return max(1, min(_DW_MAX_SPLITS, npix // _DW_PIXELS_PER_SPLIT))


@torch.library.custom_op("mgm_fast::genblock_triton_conv_dweight", mutates_args=())
def _dweight_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    upsample: bool,
) -> torch.Tensor:
    """float32 (phases, taps, Cin, Cout) gradient of the phase weights."""
    batch, cin, height, width = x.shape
    cout = grad.shape[1]
    phases, taps = _geometry(upsample)
    npix = batch * height * width
    splits = _dw_splits(npix)
    chunk = triton.cdiv(npix, splits)
    part = _alloc((splits, phases * taps, cin, cout), torch.float32, x.device)

    def grid(meta):
        return triton.cdiv(cin, meta["BLOCK_CI"]), triton.cdiv(cout, meta["BLOCK_CO"]), splits * phases * taps

    _dweight_kernel[grid](
        grad, x, scale, shift, part,
        npix, cin, height, width, cout, chunk,
        *grad.stride(), *x.stride(),
        UPSAMPLE=upsample, NPHASES=phases, NTAPS=taps,
        DOT_DTYPE=_dot_dtype(x.dtype), INPUT_PRECISION=_input_precision(),
    )  # fmt: skip
    return part.sum(0).reshape(phases, taps, cin, cout)


@_dweight_op.register_fake
def _(grad, x, scale, shift, upsample):
    phases, taps = _geometry(upsample)
    return x.new_empty((phases, taps, x.shape[1], grad.shape[1]), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# autograd


class _FusedCbnReluConv(torch.autograd.Function):
    """Forward and backward through the Triton kernels (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, scale, shift, weight, bias, residual, upsample, res_half):
        scale, shift = scale.contiguous(), shift.contiguous()
        wp = _phase_weights(weight, upsample).to(x.dtype).contiguous()
        out = _conv_op(x, scale, shift, wp, bias, residual, upsample)
        ctx.save_for_backward(x, scale, shift, wp)
        ctx.upsample = upsample
        ctx.res_half = res_half
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.res_dtype = residual.dtype if residual is not None else None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, shift, wp = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dscale = dshift = dweight = dbias = dres = None
        if need[0] or need[1] or need[2]:
            dx, dscale, dshift = _dinput_op(grad, x, scale, shift, wp, ctx.upsample)
        if need[3]:
            dwp = _dweight_op(grad, x, scale, shift, ctx.upsample)
            dweight = _fold_phase_grad(dwp, ctx.upsample).to(ctx.weight_dtype)
        if need[4]:
            dbias = grad.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        if need[5]:
            if ctx.res_half:  # the 2x2 block of output pixels that read each residual pixel
                blocks = grad.unflatten(3, (grad.shape[3] // 2, 2)).unflatten(2, (grad.shape[2] // 2, 2))
                dres = blocks.sum((3, 5), dtype=torch.float32).to(ctx.res_dtype)
            else:
                dres = grad.to(ctx.res_dtype)
        return dx, dscale, dshift, dweight, dbias, dres, None, None


def fused_cbn_relu_conv(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    upsample: bool,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``conv2d(up(relu(x * scale + shift)), weight, bias, padding=1) (+ residual)``, fused.

    Args and result: see the module docstring. Raises BackendUnavailable (with the reasons of
    :func:`triton_supported_reasons`) when the kernels cannot run these inputs here, and
    ValueError / TypeError naming the offending tensor for malformed arguments.
    """
    res_half = _check_inputs(x, scale, shift, weight, bias, residual, upsample)
    return _FusedCbnReluConv.apply(x, scale, shift, weight, bias, residual, upsample, res_half)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation (lowering checks without a GPU)


def triton_kernels() -> list[tuple[Callable, dict[str, str], dict[str, object]]]:
    """(jit function, signature, constexprs) for each kernel variant worth compiling ahead of
    time: forward with and without upsampling (half and full residual), both backward kernels,
    in float16, bfloat16 and float32 (TF32), with a GPU tile configuration of each kernel.
    Compile one with ``triton.compile(ASTSource(fn, signature, constexprs), target=...)``.

    Needs a process without TRITON_INTERPRET=1: there ``@triton.jit`` (triton.language's own
    jit helpers such as ``tl.cdiv`` and ``tl.sum`` included) yields interpreter objects, which
    cannot be lowered.
    """
    if triton is None:
        raise BackendUnavailable(_TRITON_IMPORT_ERROR)
    if _INTERPRET:
        raise RuntimeError(
            "triton_kernels(): ahead-of-time compilation needs a process without TRITON_INTERPRET=1"
        )
    fwd, dinput, dweight = _fwd_kernel.fn, _dinput_kernel.fn, _dweight_kernel.fn

    def gpu_meta(kernel) -> dict:
        return {
            fwd: {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32},
            dinput: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
            dweight: {"BLOCK_CI": 64, "BLOCK_CO": 64, "BLOCK_K": 32},
        }[kernel]

    def signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = pointers[name]
            else:
                sig[name] = "i32"
        return sig

    def ptr(dtype: torch.dtype) -> str:
        return {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]

    def constexprs(kernel, dtype: torch.dtype, upsample: bool, **flags) -> dict:
        phases, taps = _geometry(upsample)
        dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
        out = {"UPSAMPLE": upsample, "NTAPS": taps, "DOT_DTYPE": dot, "INPUT_PRECISION": "tf32"}
        if kernel is not fwd:
            out["NPHASES"] = phases
        return {**out, **flags, **gpu_meta(kernel)}

    def pointers(kernel, dtype: torch.dtype) -> dict[str, str]:
        p = ptr(dtype)
        if kernel is fwd:
            names = {"x_ptr": p, "w_ptr": p, "bias_ptr": "*fp32", "res_ptr": p, "out_ptr": p}
        elif kernel is dinput:
            names = {
                "g_ptr": p,
                "w_ptr": p,
                "x_ptr": p,
                "dx_ptr": p,
                "pscale_ptr": "*fp32",
                "pshift_ptr": "*fp32",
            }
        else:
            names = {"g_ptr": p, "x_ptr": p, "part_ptr": "*fp32"}
        return {"scale_ptr": "*fp32", "shift_ptr": "*fp32", **names}

    # each kernel in both modes (2x upsampling or not), each dot dtype at least twice
    variants = [
        (fwd, torch.float16, True, {"HAS_BIAS": True, "HAS_RES": True, "RES_HALF": True}),
        (fwd, torch.float32, False, {"HAS_BIAS": False, "HAS_RES": True, "RES_HALF": False}),
        (dinput, torch.bfloat16, True, {}),
        (dinput, torch.float32, False, {}),
        (dweight, torch.float16, True, {}),
        (dweight, torch.bfloat16, False, {}),
    ]
    out = []
    for kernel, dtype, upsample, flags in variants:
        cx = constexprs(kernel, dtype, upsample, **flags)
        out.append((kernel, signature(kernel, pointers(kernel, dtype), cx), cx))
    return out


def aot_specs() -> list[tuple[str, Callable, dict[str, str], dict[str, object]]]:
    """:func:`triton_kernels` as ``(label, kernel, types, constexprs)`` entries for
    ``python -m mgm_fast.ops._triton.aot mgm_fast.ops._triton.genblock``."""
    specs = []
    for fn, signature, constexprs in triton_kernels():
        types = {name: kind for name, kind in signature.items() if kind != "constexpr"}
        mode = "up2" if constexprs["UPSAMPLE"] else "same"
        specs.append((f"{fn.__name__}[{constexprs['DOT_DTYPE']},{mode}]", fn, types, constexprs))
    return specs
