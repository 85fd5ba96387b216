"""Fused NT-Xent (SimCLR) loss: normalisation, cosine similarities, temperature, logsumexp over
the negatives and the positive logit, forward and backward, without storing the similarity
matrix.

Two public functions, both differentiable, each a :class:`~mgm_fast.ops.FusedOp`:

* ``ntxent_loss(z1, z2, temperature=0.5, *, impl="auto")`` -- z1, z2 (B, D) projections of the
  two views of B images; returns the 0-dim float32 loss of :func:`ntxent_loss_reference`
  (its ``reference`` backend), the mean over the 2B rows.
* ``ntxent_rows(rows, cols, row_index, temperature=0.5, *, impl="auto")`` -- the form that knows
  about all-gathers: ``cols`` (2N, D) are the projections of all 2N views in the order
  [view 1 of the N images; view 2 of the N images] (e.g. the all-gathered global batch),
  ``rows`` (R, D) a subset of them (e.g. this rank's views) and ``row_index`` (R,) int64 their
  indices into ``cols``. Returns the 0-dim float32 SUM over the R rows of::

      loss_i = -s(i, pos(i)) + logsumexp_{k != self(i)} s(i, k)
      s(i, k) = cos(rows_i, cols_k) / temperature,  self(i) = row_index[i],
      pos(i) = (row_index[i] + N) mod 2N

  with gradients w.r.t. ``rows`` AND ``cols`` (cols usually come from an autograd-aware
  all-gather, which returns each rank its share of the column gradient).

Identity (tested): with u = cat(z1, z2),
``ntxent_loss(z1, z2) == ntxent_rows(u, u, arange(2B)) / (2B)``.

Multi-GPU (world size W, b images per rank, N = W b, rank r)::

    from torch.distributed.nn.functional import all_gather   # autograd-aware
    cols = torch.cat([torch.cat(all_gather(z1)), torch.cat(all_gather(z2))])   # (2N, D)
    rows = torch.cat([z1, z2])                                                 # (2b, D)
    local = r * b + torch.arange(b, device=z1.device)
    loss = ntxent_rows(rows, cols, torch.cat([local, local + N]), tau) / (2 * N)

The sum of ``loss`` over the ranks is the single-process ``ntxent_loss`` of the global batch
(each rank's local views against all 2N columns); with gradients averaged over ranks (DDP)
multiply ``loss`` by W to get the global loss's gradient.

Normalisation is torch's ``F.normalize`` (x / max(||x||, 1e-12)). Backends:

* ``reference`` -- plain PyTorch (:func:`ntxent_loss_reference`, :func:`ntxent_rows_reference`),
  any device and float dtype; it materialises the (R, 2N) matrix and its softmax.
* ``triton`` -- mgm_fast/ops/_triton/ntxent.py: flash-attention style blocks (one ``tl.dot`` per
  tile, online logsumexp over column tiles; forward saves the per-row LSE, backward recomputes
  each tile and writes the row and column gradients in two passes without atomics).
  float32/float16/bfloat16, D <= 512, CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``,
  then only when forced).
* ``cpp`` -- CPU, float32 (csrc/kernels/cpu/ntxent.*): OpenMP over blocks of rows (and of
  columns in backward), one row block's similarities at a time in cache; bit-reproducible for
  any thread count.
* ``cuda`` -- CUDA, float32/float16/bfloat16, D <= 256 (csrc/kernels/cuda/ntxent.*): one warp per
  row (or column), shared-memory tiles of 32 columns (rows), float32 arithmetic.

``torch.compile``: each fused backend is a custom op ``mgm_fast::ntxent_rows_<backend>`` with its
autograd formula and a ``..._backward`` op (:mod:`mgm_fast.ops._library`); ``ntxent_loss``
traces through it.

Every fused backend saves the inputs, the inverse norms where it needs them and the per-row LSE
(R floats), never an (R, 2N) tensor. The loss is NaN when a ``row_index`` entry lies outside
[0, 2N) on a device where checking would synchronise the host (on the CPU it raises).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mgm_fast.ops._dispatch import (
    NATIVE_DEVICE,
    Inputs,
    cpp_backend,
    cuda_backend,
    define_op,
    native_function,
    reference_backend,
    triton_backend,
    value_checks_enabled,
)
from mgm_fast.ops._library import autocast_off, once_differentiable, or_placeholder, placeholder, qualname

__all__ = ["LOSS_OP", "ROWS_OP", "ntxent_loss", "ntxent_loss_reference", "ntxent_rows", "ntxent_rows_reference"]

TRITON_MAX_DIM = 512
CUDA_MAX_DIM = 256


# ---------------------------------------------------------------------------------------------
# argument checks (every backend)


def _check_temperature(temperature) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"ntxent: temperature must be a positive finite number, got {temperature!r}")
    return t


def _check_pair(z1, z2) -> None:
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"ntxent_loss: {name} must be a (B, D) floating tensor, got {got}")
    if z1.shape != z2.shape or z1.shape[0] < 1:
        raise ValueError(f"ntxent_loss: expected z1 and z2 of the same (B, D) shape, B >= 1, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")  # fmt: skip
    if z1.device != z2.device:
        raise ValueError(f"ntxent_loss: z1 is on {z1.device} but z2 on {z2.device}")


def _check_rows(rows, cols, row_index, check_values: bool = True) -> None:
    for name, t in (("rows", rows), ("cols", cols)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"ntxent_rows: {name} must be a 2-d floating tensor, got {got}")
    n2, d = cols.shape
    if n2 < 2 or n2 % 2:
        raise ValueError(f"ntxent_rows: cols must hold the 2N views [view 1; view 2] (an even number >= 2 "
                         f"of rows), got shape {tuple(cols.shape)}")  # fmt: skip
    if rows.shape[1] != d:
        raise ValueError(f"ntxent_rows: rows {tuple(rows.shape)} and cols {tuple(cols.shape)} differ in D")
    if (not isinstance(row_index, torch.Tensor) or row_index.dtype != torch.int64
            or tuple(row_index.shape) != (rows.shape[0],)):  # fmt: skip
        got = f"{tuple(row_index.shape)} {row_index.dtype}" if isinstance(row_index, torch.Tensor) else row_index
        raise ValueError(f"ntxent_rows: row_index must be an int64 tensor of shape ({rows.shape[0]},), got {got}")
    for name, t in (("cols", cols), ("row_index", row_index)):
        if t.device != rows.device:
            raise ValueError(f"ntxent_rows: {name} is on {t.device} but rows on {rows.device}")
    if check_values and value_checks_enabled(row_index.device) and row_index.numel():  # a host read
        lo, hi = int(row_index.min()), int(row_index.max())
        if lo < 0 or hi >= n2:
            bad = lo if lo < 0 else hi
            raise ValueError(f"ntxent_rows: row_index holds {bad}, not a column index in [0, {n2})")


# ---------------------------------------------------------------------------------------------
# references


def ntxent_rows_reference(
    rows: torch.Tensor, cols: torch.Tensor, row_index: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`ntxent_rows` (float32 arithmetic, the (R, 2N) matrix kept).

    rows (R, D), cols (2N, D) = [view 1 of N images; view 2 of the same N images], row_index
    (R,) int64 each row's own column. Returns the 0-dim float32 SUM over rows of
    -s(i, pos(i)) + log sum_{k != self(i)} exp(s(i, k)), with s the cosine similarity over tau
    and pos(i) = (row_index[i] + N) mod 2N; so ``ntxent_loss_reference(z1, z2) ==
    ntxent_rows_reference(u, u, arange(2B)) / 2B`` with u = cat(z1, z2).
    """
    _check_rows(rows, cols, row_index)
    tau = _check_temperature(temperature)
    n2 = cols.shape[0]
    q = F.normalize(rows.float(), dim=1)
    k = F.normalize(cols.float(), dim=1)
    sim = q @ k.t() / tau
    ar = torch.arange(rows.shape[0], device=rows.device)
    sim = sim.index_put((ar, row_index), sim.new_full((), float("-inf")))  # no upload: a fill
    pos = (row_index + n2 // 2) % n2
    return (torch.logsumexp(sim, dim=1) - sim[ar, pos]).sum()


def ntxent_loss_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR) of two views in plain PyTorch, any batch size (the released loss was
    fixed to 32): the twin of :func:`ntxent_loss`.

    z1, z2 (B, D) projections of view 1 and view 2 of the same B images; temperature tau
    (released 0.5). With u = cat(z1, z2) (2B rows) and s_ij = cos(u_i, u_j) / tau,
    loss_i = -s_{i,pos(i)} + log sum_{k != i} exp(s_ik), pos(i) = i +- B; returns the 0-dim
    float32 mean over the 2B rows (the released CE with sum reduction divided by 2B).
    """
    _check_pair(z1, z2)
    tau = _check_temperature(temperature)
    b = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2], 0).float(), dim=1)
    sim = u @ u.t() / tau
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=u.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    pos = torch.arange(2 * b, device=u.device).roll(b)
    return (torch.logsumexp(sim, dim=1) - sim[torch.arange(2 * b, device=u.device), pos]).mean()


def _via_rows(rows_fn):
    """ntxent_loss on a fused backend: ntxent_rows(u, u, arange(2B)) / 2B with u = cat(z1, z2)."""

    def loss(z1, z2, temperature=0.5):
        _check_pair(z1, z2)
        u = torch.cat([z1, z2])
        index = torch.arange(u.shape[0], device=u.device)  # valid by construction
        return rows_fn(u, u, index, _check_temperature(temperature), check_values=False) / u.shape[0]

    return loss


# ---------------------------------------------------------------------------------------------
# cpp / cuda: custom ops mgm_fast::ntxent_rows_<backend> (forward, with its autograd formula) and
# mgm_fast::ntxent_rows_<backend>_backward around the extension's kernels (mgm_fast.ops._library)


def _register_native(backend: str):
    """The forward and backward custom ops of one native backend (cpp: CPU, cuda: CUDA), and
    the ntxent_rows function that calls them."""
    device = NATIVE_DEVICE[backend]

    @torch.library.custom_op(qualname(f"ntxent_rows_{backend}"), mutates_args=())
    def forward(rows: torch.Tensor, cols: torch.Tensor, row_index: torch.Tensor,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(0-dim float32 sum of the row losses, per-row logsumexp (R,) float32)."""
        with autocast_off(rows):
            loss, lse = native_function("ntxent_rows_{device}_forward", device)(rows, cols, row_index, temperature)
        return loss, lse

    @forward.register_fake
    def _(rows, cols, row_index, temperature):
        f32 = dict(dtype=torch.float32, device=rows.device)
        return torch.empty((), **f32), torch.empty(rows.shape[0], **f32)

    @torch.library.custom_op(qualname(f"ntxent_rows_{backend}_backward"), mutates_args=())
    def backward(
        rows: torch.Tensor, cols: torch.Tensor, row_index: torch.Tensor, temperature: float, lse: torch.Tensor,
        grad_output: torch.Tensor, need: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(grad rows, grad cols), contiguous, in the inputs' dtypes; placeholders where not needed."""
        with autocast_off(rows):
            grads = native_function("ntxent_rows_{device}_backward", device)(
                rows, cols, row_index, temperature, lse, grad_output, list(need)
            )
        return tuple(or_placeholder(g, like) for g, like in zip(grads, (rows, cols)))

    @backward.register_fake
    def _(rows, cols, row_index, temperature, lse, grad_output, need):
        return tuple(torch.empty(like.shape, dtype=like.dtype, device=like.device) if n else placeholder(like)
                     for like, n in zip((rows, cols), need))  # fmt: skip

    def setup_context(ctx, inputs, output):
        rows, cols, row_index, temperature = inputs
        ctx.save_for_backward(rows, cols, row_index, output[1])
        ctx.temperature = temperature
        ctx.mark_non_differentiable(output[1])

    def grad(ctx, grad_output, _grad_lse):
        rows, cols, row_index, lse = ctx.saved_tensors
        need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
        go = grad_output.float() if backend == "cpp" else grad_output
        grad_rows, grad_cols = backward(rows, cols, row_index, ctx.temperature, lse, go, need)
        return grad_rows if need[0] else None, grad_cols if need[1] else None, None, None

    forward.register_autograd(grad, setup_context=setup_context)
    once_differentiable(backward, f"ntxent_rows ({backend} backend)")

    def rows_loss(rows, cols, row_index, temperature=0.5, check_values=True):
        _check_rows(rows, cols, row_index, check_values)
        return forward(rows, cols, row_index, _check_temperature(temperature))[0]

    rows_loss.__name__ = rows_loss.__qualname__ = f"_{backend}_rows"
    return rows_loss


_cpp_rows = _register_native("cpp")
_cuda_rows = _register_native("cuda")


# ---------------------------------------------------------------------------------------------
# triton


# custom ops mgm_fast::ntxent_rows_triton (forward, with its autograd formula) and
# mgm_fast::ntxent_rows_triton_backward (the kernels: mgm_fast.ops._triton.ntxent)


@torch.library.custom_op(qualname("ntxent_rows_triton"), mutates_args=())
def _triton_op(rows: torch.Tensor, cols: torch.Tensor, row_index: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(0-dim float32 sum of the row losses, per-row logsumexp (R,), inverse norms of rows (R,)
    and of cols (2N,)), all float32."""
    from mgm_fast.ops._triton import ntxent as tn

    return tuple(tn.ntxent_rows_forward(rows, cols, row_index, temperature))


@_triton_op.register_fake
def _(rows, cols, row_index, temperature):
    f32 = dict(dtype=torch.float32, device=rows.device)
    r = rows.shape[0]
    return torch.empty((), **f32), torch.empty(r, **f32), torch.empty(r, **f32), torch.empty(cols.shape[0], **f32)


@torch.library.custom_op(qualname("ntxent_rows_triton_backward"), mutates_args=())
def _triton_backward_op(rows: torch.Tensor, cols: torch.Tensor, row_index: torch.Tensor, temperature: float,
                        lse: torch.Tensor, inv_r: torch.Tensor, inv_c: torch.Tensor, grad_output: torch.Tensor,
                        need: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(grad rows, grad cols), contiguous, in the inputs' dtypes; placeholders where not needed."""
    from mgm_fast.ops._triton import ntxent as tn

    grads = tn.ntxent_rows_backward(rows, cols, row_index, temperature, lse, inv_r, inv_c, grad_output, need)
    return tuple(or_placeholder(g, like) for g, like in zip(grads, (rows, cols)))


@_triton_backward_op.register_fake
def _(rows, cols, row_index, temperature, lse, inv_r, inv_c, grad_output, need):
    return tuple(torch.empty(like.shape, dtype=like.dtype, device=like.device) if n else placeholder(like)
                 for like, n in zip((rows, cols), need))  # fmt: skip


def _triton_setup_context(ctx, inputs, output):
    rows, cols, row_index, temperature = inputs
    ctx.save_for_backward(rows, cols, row_index, *output[1:])
    ctx.temperature = temperature
    ctx.mark_non_differentiable(*output[1:])


def _triton_backward(ctx, grad_output, *_):
    rows, cols, row_index, lse, inv_r, inv_c = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    grad_rows, grad_cols = _triton_backward_op(rows, cols, row_index, ctx.temperature, lse, inv_r, inv_c,
                                               grad_output, need)  # fmt: skip
    return grad_rows if need[0] else None, grad_cols if need[1] else None, None, None


_triton_op.register_autograd(_triton_backward, setup_context=_triton_setup_context)
once_differentiable(_triton_backward_op, "ntxent_rows (triton backend)")


def _triton_rows(rows, cols, row_index, temperature=0.5, check_values=True):
    _check_rows(rows, cols, row_index, check_values)
    return _triton_op(rows, cols, row_index, _check_temperature(temperature))[0]


# ---------------------------------------------------------------------------------------------
# dispatch


def _fused_reasons(max_dim: int | None):
    """Input conditions of a fused backend beyond device and dtype."""

    def reasons(inputs: Inputs) -> list[str]:
        a = [t for t in inputs.tensors if t.is_floating_point()]
        why = []
        if len({t.dtype for t in a}) > 1:
            why.append("the projections differ in dtype (" + ", ".join(str(t.dtype) for t in a) + ")")
        if max_dim is not None and any(t.dim() == 2 and t.shape[1] > max_dim for t in a):
            why.append(f"projection dim above {max_dim}")
        return why

    return reasons


def _backends(reference, wrap) -> list:
    """The backends of one of the two ops: ``wrap`` turns an ntxent_rows backend into it."""
    return [
        reference_backend(reference),
        cpp_backend(wrap(_cpp_rows), extra_check=_fused_reasons(None)),
        cuda_backend(wrap(_cuda_rows), extra_check=_fused_reasons(CUDA_MAX_DIM)),
        triton_backend(wrap(_triton_rows), extra_check=_fused_reasons(TRITON_MAX_DIM)),
    ]


# Triton before CUDA under auto: its tiles go through tl.dot (tensor cores for 16-bit inputs),
# while the CUDA kernel is the plain warp-per-row design.
_PRIORITY = ("triton", "cuda", "cpp", "reference")
ROWS_OP = define_op("ntxent_rows", "NT-Xent of rows against all-gathered columns, sum over rows",
                    _backends(ntxent_rows_reference, lambda fn: fn), priority=_PRIORITY)  # fmt: skip
LOSS_OP = define_op("ntxent_loss", "NT-Xent (SimCLR) loss of two views, fused forward and backward",
                    _backends(ntxent_loss_reference, _via_rows), priority=_PRIORITY)  # fmt: skip


def ntxent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, impl: str = "auto") -> torch.Tensor:
    """NT-Xent of two views: z1, z2 (B, D) -> 0-dim float32, equal to
    :func:`ntxent_loss_reference` (mean over the 2B rows); see the module docstring."""
    return LOSS_OP(z1, z2, temperature, impl=impl)


def ntxent_rows(
    rows: torch.Tensor,
    cols: torch.Tensor,
    row_index: torch.Tensor,
    temperature: float = 0.5,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """SUM over rows (R, D) of the NT-Xent row losses against cols (2N, D) = [view 1; view 2];
    row_index (R,) int64 gives each row's own column. 0-dim float32; see the module docstring."""
    return ROWS_OP(rows, cols, row_index, temperature, impl=impl)


# ---------------------------------------------------------------------------------------------
# self-test cases (mgm_fast.ops._selftest)


def _rows_truth(rows, cols, row_index, temperature=0.5):
    """ntxent_rows in the inputs' dtype (the reference computes in float32): the float64 truth."""
    sim = torch.nn.functional.normalize(rows, dim=1) @ torch.nn.functional.normalize(cols, dim=1).t() / temperature
    ar = torch.arange(rows.shape[0], device=rows.device)
    sim = sim.index_put((ar, row_index), sim.new_full((), float("-inf")))
    pos = (row_index + cols.shape[0] // 2) % cols.shape[0]
    return (torch.logsumexp(sim, dim=1) - sim[ar, pos]).sum()


def _loss_truth(z1, z2, temperature=0.5):
    u = torch.cat([z1, z2])
    return _rows_truth(u, u, torch.arange(u.shape[0], device=u.device), temperature) / u.shape[0]


def _views(gen, b, d, scale=1.0):
    z1 = torch.randn(b, d, generator=gen, dtype=torch.float64) * scale
    return z1, z1 + 0.5 * torch.randn(b, d, generator=gen, dtype=torch.float64) * scale


def _loss_cases():
    from mgm_fast.ops._selftest import Case, Inputs

    def make(b, d, tau):
        def build(gen):
            z1, z2 = _views(gen, b, d)
            return Inputs(args=(z1, z2, tau), grad=(0, 1))

        return build

    shapes = [("b1 d3", "small", 1, 3, 0.5), ("b13 d37 tau 0.1", "small", 13, 37, 0.1),
              ("paper: b32 d64", "paper", 32, 64, 0.5)]
    return [Case("ntxent_loss", name, size, make(b, d, tau), truth=_loss_truth) for name, size, b, d, tau in shapes]


def _rows_cases():
    from mgm_fast.ops._selftest import Case, Inputs

    def make(n, rows_of, d, tau):
        def build(gen):
            z1, z2 = _views(gen, n, d)
            cols = torch.cat([z1, z2])
            index = torch.tensor(rows_of, dtype=torch.int64)
            return Inputs(args=(cols[index].clone(), cols, index, tau), grad=(0, 1))

        return build

    shapes = [  # a rank's rows of an all-gathered batch
        ("N7 d5, rows 1,3,8,10", "small", 7, [1, 3, 8, 10], 5, 0.5),
        ("N9 d33, 5 rows", "small", 9, [0, 4, 9, 13, 17], 33, 0.2),
        ("paper, 2 ranks: N64 d64, rank 1's 64 rows", "paper", 64, [*range(32, 64), *range(96, 128)], 64, 0.5),
    ]
    return [Case("ntxent_rows", name, size, make(n, rows, d, tau), truth=_rows_truth)
            for name, size, n, rows, d, tau in shapes]  # fmt: skip


LOSS_OP.selftest_cases = _loss_cases
ROWS_OP.selftest_cases = _rows_cases
