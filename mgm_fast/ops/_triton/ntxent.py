"""Triton kernels of the fused NT-Xent loss (the ``triton`` backend of :mod:`mgm_fast.ops.ntxent`;
formulas in that module's docstring).

``rows`` (R, D) against ``cols`` (2N, D), flash-attention style: the (R, 2N) similarity matrix
is never stored.

* ``_inv_norm`` -- 1 / max(||x||, eps) per row, float32 (rows and cols).
* ``_ntxent_fwd`` -- grid over blocks of BLOCK_M rows. Each program keeps its row tile and
  walks the columns in tiles of BLOCK_N: s = (x_r . x_c) / (||x_r|| ||x_c|| tau) from one
  ``tl.dot`` per tile, the self column masked to -inf, an online logsumexp (running max and
  rescaled sum), and the positive logit picked out on the way. It writes the per-row loss
  ``lse - s_pos`` and the per-row LSE (saved for backward).
* ``_ntxent_bwd_rows`` / ``_ntxent_bwd_cols`` -- recompute each tile of s from the saved LSE
  (P = exp(s - lse), dS = grad_output (P - [j = pos(i)]), 0 on the self column), then
  accumulate dS @ U_c (rows) or dS^T @ U_r (columns) in float32 registers, and finish with
  the backward of the normalisation, (g - u (u . g)) / ||x||, in the same program. Two kernels
  instead of one with atomics: every gradient is written once, in a fixed order
  (deterministic).

Precision: float32 inputs use IEEE float32 dots (no TF32: torch's default matmul precision);
float16 / bfloat16 inputs use their native dot with float32 accumulation (the products are
exact in float32). The backward dots multiply float32 dS and float32 normalised tiles (IEEE).
Under the interpreter, bfloat16 tiles are widened to float32 before the dot (its bfloat16
``tl.dot`` is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mgm_fast.ops._dispatch import triton_interpreting

__all__ = ["MAX_DIM", "ntxent_rows_backward", "ntxent_rows_forward"]

EPS = 1e-12  # torch.nn.functional.normalize's eps
MAX_DIM = 512  # widest projection (the whole D axis of a tile lives in registers)


@triton.jit
def _inv_norm(x_ptr, out_ptr, M, D, s_m, s_d, EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    keep = (rows < M)[:, None] & (dims < D)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_m + dims[None, :] * s_d, mask=keep, other=0.0)
    x = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    tl.store(out_ptr + rows, 1.0 / tl.maximum(norm, EPS_), mask=rows < M)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b in float32: IEEE float32 for float32 (or widened) tiles, else the native dot."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def _ntxent_fwd(
    rows_ptr, cols_ptr, index_ptr, inv_r_ptr, inv_c_ptr, loss_ptr, lse_ptr,
    R, N2, D, r_m, r_d, c_m, c_d, inv_temp,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = i < R
    a = tl.load(rows_ptr + i[:, None].to(tl.int64) * r_m + dims[None, :] * r_d,
                mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)  # fmt: skip
    scale_r = tl.load(inv_r_ptr + i, mask=row_ok, other=0.0) * inv_temp
    idx = tl.load(index_ptr + i, mask=row_ok, other=0)
    half = N2 // 2
    pos = tl.where(idx < half, idx + half, idx - half)
    m = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    s_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, N2, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_ok = j < N2
        b = tl.load(cols_ptr + j[:, None].to(tl.int64) * c_m + dims[None, :] * c_d,
                    mask=col_ok[:, None] & (dims < D)[None, :], other=0.0)  # fmt: skip
        inv_c = tl.load(inv_c_ptr + j, mask=col_ok, other=0.0)
        s = _dot(a, tl.trans(b), DOT_FP32) * scale_r[:, None] * inv_c[None, :]
        s_pos += tl.sum(tl.where(j[None, :] == pos[:, None], s, 0.0), axis=1)
        s = tl.where(col_ok[None, :] & (j[None, :] != idx[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_sum = s_sum * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s_sum)
    idx_ok = (idx >= 0) & (idx < N2)
    loss = tl.where(idx_ok, lse - s_pos, float("nan"))  # a bad index must not pass silently
    tl.store(loss_ptr + i, loss, mask=row_ok)
    tl.store(lse_ptr + i, lse, mask=row_ok)


@triton.jit
def _finish_normalize(g, x, inv):
    """Backward of u = x / max(||x||, eps) for a tile of rows: (g - u (u . g)) * inv. A zero
    row has u = 0 and gets g / eps, as torch's normalize (rows with 0 < ||x|| < eps = 1e-12
    keep the projection term)."""
    u = x * inv[:, None]
    proj = tl.sum(u * g, axis=1)
    return (g - u * proj[:, None]) * inv[:, None]


@triton.jit
def _ntxent_bwd_rows(
    rows_ptr, cols_ptr, index_ptr, inv_r_ptr, inv_c_ptr, lse_ptr, grad_output_ptr, grad_ptr,
    R, N2, D, r_m, r_d, c_m, c_d, g_m, g_d, inv_temp,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = i < R
    rmask = row_ok[:, None] & (dims < D)[None, :]
    a = tl.load(rows_ptr + i[:, None].to(tl.int64) * r_m + dims[None, :] * r_d, mask=rmask, other=0.0)
    inv_r = tl.load(inv_r_ptr + i, mask=row_ok, other=0.0)
    scale_r = inv_r * inv_temp
    idx = tl.load(index_ptr + i, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + i, mask=row_ok, other=0.0)
    go = tl.load(grad_output_ptr).to(tl.float32)
    half = N2 // 2
    pos = tl.where(idx < half, idx + half, idx - half)
    idx_ok = (idx >= 0) & (idx < N2)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, N2, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_ok = j < N2
        b = tl.load(cols_ptr + j[:, None].to(tl.int64) * c_m + dims[None, :] * c_d,
                    mask=col_ok[:, None] & (dims < D)[None, :], other=0.0)  # fmt: skip
        inv_c = tl.load(inv_c_ptr + j, mask=col_ok, other=0.0)
        s = _dot(a, tl.trans(b), DOT_FP32) * scale_r[:, None] * inv_c[None, :]
        p = tl.exp(s - lse[:, None])
        ds = go * (p - (j[None, :] == pos[:, None]).to(tl.float32))
        ds = tl.where(col_ok[None, :] & (j[None, :] != idx[:, None]) & row_ok[:, None], ds, 0.0)
        ds = tl.where(idx_ok[:, None], ds, float("nan"))
        u_c = b.to(tl.float32) * inv_c[:, None]
        acc += tl.dot(ds, u_c, input_precision="ieee")
    g = _finish_normalize(acc * inv_temp, a.to(tl.float32), inv_r)
    tl.store(grad_ptr + i[:, None].to(tl.int64) * g_m + dims[None, :] * g_d,
             g.to(grad_ptr.dtype.element_ty), mask=rmask)  # fmt: skip


@triton.jit
def _ntxent_bwd_cols(
    rows_ptr, cols_ptr, index_ptr, inv_r_ptr, inv_c_ptr, lse_ptr, grad_output_ptr, grad_ptr,
    R, N2, D, r_m, r_d, c_m, c_d, g_m, g_d, inv_temp,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # this program owns BLOCK_N columns and walks the rows in tiles of BLOCK_M
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = j < N2
    cmask = col_ok[:, None] & (dims < D)[None, :]
    b = tl.load(cols_ptr + j[:, None].to(tl.int64) * c_m + dims[None, :] * c_d, mask=cmask, other=0.0)
    inv_c = tl.load(inv_c_ptr + j, mask=col_ok, other=0.0)
    go = tl.load(grad_output_ptr).to(tl.float32)
    half = N2 // 2
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i0 in range(0, R, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        row_ok = i < R
        a = tl.load(rows_ptr + i[:, None].to(tl.int64) * r_m + dims[None, :] * r_d,
                    mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)  # fmt: skip
        inv_r = tl.load(inv_r_ptr + i, mask=row_ok, other=0.0)
        idx = tl.load(index_ptr + i, mask=row_ok, other=0)
        lse = tl.load(lse_ptr + i, mask=row_ok, other=0.0)
        pos = tl.where(idx < half, idx + half, idx - half)
        idx_ok = (idx >= 0) & (idx < N2)
        s = _dot(a, tl.trans(b), DOT_FP32) * (inv_r * inv_temp)[:, None] * inv_c[None, :]
        p = tl.exp(s - lse[:, None])
        ds = go * (p - (j[None, :] == pos[:, None]).to(tl.float32))
        ds = tl.where(col_ok[None, :] & (j[None, :] != idx[:, None]) & row_ok[:, None], ds, 0.0)
        ds = tl.where(idx_ok[:, None] | ~row_ok[:, None], ds, float("nan"))
        u_r = a.to(tl.float32) * inv_r[:, None]
        acc += tl.dot(tl.trans(ds), u_r, input_precision="ieee")
    g = _finish_normalize(acc * inv_temp, b.to(tl.float32), inv_c)
    tl.store(grad_ptr + j[:, None].to(tl.int64) * g_m + dims[None, :] * g_d,
             g.to(grad_ptr.dtype.element_ty), mask=cmask)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# launchers


def _config(d: int) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    if triton_interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d)
    block = 64 if block_d <= 128 else 32  # keep the (BLOCK, D) tiles in registers
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=4)


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreting())


def _inv_norms(x: torch.Tensor, block_d: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    if x.shape[0]:
        block_m = 16
        _inv_norm[(triton.cdiv(x.shape[0], block_m),)](
            x, out, x.shape[0], x.shape[1], x.stride(0), x.stride(1), EPS_=EPS, BLOCK_M=block_m, BLOCK_D=block_d
        )
    return out


def ntxent_rows_forward(rows, cols, row_index, temperature):
    """(loss, lse, inv_r, inv_c): the 0-dim float32 SUM of the per-row losses, the per-row LSE
    (R,) float32 and the inverse norms, on the inputs' device, no host synchronisation."""
    cfg = _config(rows.shape[1])
    inv_r = _inv_norms(rows, cfg["BLOCK_D"])
    inv_c = _inv_norms(cols, cfg["BLOCK_D"])
    R = rows.shape[0]
    loss_rows = torch.empty(R, device=rows.device, dtype=torch.float32)
    lse = torch.empty(R, device=rows.device, dtype=torch.float32)
    if R:
        _ntxent_fwd[(triton.cdiv(R, cfg["BLOCK_M"]),)](
            rows, cols, row_index, inv_r, inv_c, loss_rows, lse,
            R, cols.shape[0], rows.shape[1], *rows.stride(), *cols.stride(), 1.0 / temperature,
            DOT_FP32=_dot_fp32(rows.dtype), **cfg,
        )  # fmt: skip
    return loss_rows.sum(), lse, inv_r, inv_c  # a device reduction in a fixed order


def ntxent_rows_backward(rows, cols, row_index, temperature, lse, inv_r, inv_c, grad_output, need):
    """(grad_rows, grad_cols) in the inputs' dtypes (None where ``need`` is false)."""
    cfg = _config(rows.shape[1])
    go = grad_output.to(device=rows.device, dtype=torch.float32).reshape(1)
    args = (row_index, inv_r, inv_c, lse, go)
    R, N2, D = rows.shape[0], cols.shape[0], rows.shape[1]
    common = dict(DOT_FP32=_dot_fp32(rows.dtype), **cfg)
    grad_rows = grad_cols = None
    if need[0]:
        grad_rows = torch.empty_like(rows, memory_format=torch.contiguous_format)
        if R:
            _ntxent_bwd_rows[(triton.cdiv(R, cfg["BLOCK_M"]),)](
                rows, cols, *args, grad_rows, R, N2, D, *rows.stride(), *cols.stride(),
                *grad_rows.stride(), 1.0 / temperature, **common,
            )  # fmt: skip
    if need[1]:
        grad_cols = torch.empty_like(cols, memory_format=torch.contiguous_format)
        if N2:
            if R:
                _ntxent_bwd_cols[(triton.cdiv(N2, cfg["BLOCK_N"]),)](
                    rows, cols, *args, grad_cols, R, N2, D, *rows.stride(), *cols.stride(),
                    *grad_cols.stride(), 1.0 / temperature, **common,
                )  # fmt: skip
            else:
                grad_cols.zero_()
    return grad_rows, grad_cols


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specialisations (mgm_fast.ops._triton.aot)


def aot_specs() -> list[tuple]:
    """float32 (IEEE dots) and bfloat16 / float16 (native dots) at D = 64, the paper's head."""
    i32, i64 = "i32", "i64"
    specs = [(
        "inv_norm[bf16]", _inv_norm,
        dict(x_ptr="*bf16", out_ptr="*fp32", M=i32, D=i32, s_m=i64, s_d=i64),
        dict(EPS_=EPS, BLOCK_M=16, BLOCK_D=64),
    )]  # fmt: skip
    for dtype in ("fp32", "bf16", "fp16"):
        common = dict(rows_ptr=f"*{dtype}", cols_ptr=f"*{dtype}", index_ptr="*i64", inv_r_ptr="*fp32",
                      inv_c_ptr="*fp32", R=i32, N2=i32, D=i32, r_m=i64, r_d=i64, c_m=i64, c_d=i64,
                      inv_temp="fp32")  # fmt: skip
        blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64)
        specs.append((f"ntxent_fwd[{dtype}]", _ntxent_fwd, {**common, "loss_ptr": "*fp32", "lse_ptr": "*fp32"},
                      dict(DOT_FP32=dtype == "fp32", **blocks)))  # fmt: skip
        bwd = {**common, "lse_ptr": "*fp32", "grad_output_ptr": "*fp32", "grad_ptr": f"*{dtype}",
               "g_m": i64, "g_d": i64}  # fmt: skip
        for name, kernel in (("ntxent_bwd_rows", _ntxent_bwd_rows), ("ntxent_bwd_cols", _ntxent_bwd_cols)):
            specs.append((f"{name}[{dtype}]", kernel, bwd, dict(DOT_FP32=dtype == "fp32", **blocks)))
    return specs
