"""The fused SAGAN GenBlock and its building piece, with reference / cpp / cuda / triton backends.

A GenBlock (docs/method.md 1.4) maps x (B, Cin, H, W) and scene labels y (B,) int64 to
(B, Cout, 2H, 2W)::

    main     = conv3x3_2( relu( CBN2( conv3x3_1( up2( relu( CBN1(x, y) ) ) ), y ) ) )
    shortcut = conv1x1_0( up2(x) )
    out      = main + shortcut

CBN(t, y) = gamma[y] * BN(t) + beta[y]: BatchNorm2d without affine (batch statistics in training,
running statistics in eval), then per-sample rows gamma = embed[y, :C], beta = embed[y, C:] of a
plain Embedding(num_classes, 2C). up2 is nearest-neighbour upsampling x2. The ops take the
*effective* weights: spectral normalisation (W / sigma and its power iteration) stays in the
modules (:mod:`mgm_fast.models.layers`); gradients reach ``weight_orig`` through autograd.

Public functions:

* :func:`genblock` -- the whole block (op ``genblock``).
* :func:`cbn_relu_conv3x3` -- one piece, ``conv3x3(up2_if(relu(gamma * BN(x) + beta))) (+ residual)``
  with per-sample gamma/beta (B, C) (op ``cbn_relu_conv3x3``); a GenBlock is two pieces, and the
  generator's output head (BatchNorm2d, ReLU, conv3x3) is one (gamma/beta = the BN affine
  parameters expanded to (B, C)).
* :func:`phase_weights`, :func:`up2_conv3x3`, :func:`up2_conv1x1` -- the exact rewrites below in
  plain torch (the fused backends implement them in their kernels; tests check the identities).

Exact rewrites used by the fused backends (docs/design.md principle 4):

1. **Nearest-2x then 3x3 conv = four phase-wise 2x2 convs on the low-resolution input.** With
   u = up2(a), u[Y, X] = a[Y // 2, X // 2], and zero padding 1, output pixel (2i+p, 2j+q) reads
   u rows 2i+p-1 .. 2i+p+1, i.e. low-resolution rows i-1+p+r for r in {0, 1}, where the 3x3 row
   taps group as ``G(p=0) = [{0}, {1, 2}]`` and ``G(p=1) = [{0, 1}, {2}]`` (columns alike, with q).
   So ``out[2i+p, 2j+q] = sum_{r,s} Wpq[r, s] . a[i-1+p+r, j-1+q+s]`` with
   ``Wpq[r, s] = sum_{ky in G(p)[r], kx in G(q)[s]} W[ky, kx]`` (zero padding of a stays exact:
   padded rows of u are exactly the rows -1 and H of a). One 2x2 conv with padding 1 and
   4*Cout output channels ``Wp[(2p+q)*Cout + o]`` gives P (B, 4*Cout, H+1, W+1), and
   ``out[:, o, 2i+p, 2j+q] = P[:, (2p+q)*Cout + o, i+p, j+q]``. That is 16 instead of 36 taps
   per output pixel (2.25x fewer FLOPs), and the upsampled tensor is never written.
2. **A 1x1 conv commutes with nearest upsampling**: ``conv1x1(up2(x)) = up2(conv1x1(x))``, 4x
   fewer FLOPs; the fused backends add the low-resolution shortcut in the epilogue of the second
   conv, reading each value for its 2x2 output block.
3. **Prologue fusion**: ``relu(gamma * (x - mean) * rstd + beta) = relu(x * scale + shift)`` with
   ``scale = gamma * rstd``, ``shift = beta - mean * scale`` (B, C), applied while the conv input
   is loaded; batch statistics come from one fused reduction (the statistics of h are computed
   in the epilogue that writes h).

Semantics kept exactly (all backends): training mode uses batch statistics (biased variance) in
the forward and differentiates through them; the running statistics are updated as
``torch.nn.BatchNorm2d`` does -- ``num_batches_tracked += 1``, ``r = (1 - m) r + m * stat`` with
the unbiased variance, m = ``momentum`` (released: 0.001 for CBN, 1e-4 for the output BN) or
1 / num_batches_tracked when ``momentum`` is None. Eval mode normalises with the running
statistics, which are constants. Training needs more than one value per channel (B*H*W > 1).

Backward (cpp / cuda / triton): dx through the batch statistics, dW, dbias of every conv,
dgamma/dbeta -- for :func:`genblock` scattered into the embedding rows of y -- using
``dz = dact * [act > 0]``, ``xhat = (x - mean) * rstd``, ``dbeta = sum_hw dz``,
``dgamma = sum_hw dz * xhat``, ``dx = rstd * (gamma dz - mean_bhw(gamma dz) - xhat * mean_bhw(gamma dz xhat))``
(eval: ``dx = scale * dz``). The fused backends are once-differentiable (no double backward).

Backends (``impl=``; ``"auto"`` takes cuda, triton, cpp, reference in that order, the first that
supports the inputs; ``auto`` never takes the Triton interpreter):

* ``reference`` -- plain PyTorch, exactly the released computation (upsample, then convs), any
  device and float dtype: :func:`genblock_reference`, which the model's ``GenBlock`` also runs on
  its own modules (``model.genblock_impl="reference"``).
* ``cpp`` -- CPU, float32/float64: oneDNN convs on channels_last buffers with rewrites 1 and 2
  (the shortcut is one GEMM over the low-resolution pixels), and the C++ kernels of
  csrc/kernels/cpu/genblock.* for statistics, prologue, epilogues (bias, interleave, residual,
  fused statistics of h) and the backward reductions. The kernels are bit-identical for any
  thread count; oneDNN is deterministic for a fixed thread count (its weight gradients may
  round differently for another count). Under CPU autocast it computes in float32 (x and the
  conv tensors are cast to float32; the output is float32, which the next autocast op casts as
  it needs): its kernels have no bfloat16 path, and against float64 this is the more accurate
  result. Saves for backward x (channels_last), the two
  prologue activations and h, instead of the reference's upsampled and normalised copies.
* ``cuda`` -- CUDA, float32/float16/bfloat16 (fp32 statistics and accumulation): cuDNN convs
  on channels_last buffers with the same rewrites, and CUDA kernels (csrc/kernels/cuda/genblock.*)
  for the same pieces, composed by the same C++ code as ``cpp`` (csrc/bindings/genblock_impl.h).
  The kernels reduce deterministically (no atomics; the embedding gradient is a one-hot GEMM);
  cuDNN follows torch's determinism settings. Under CUDA autocast, x and the conv
  weights/biases are cast to the autocast dtype (gamma/beta and the statistics stay float32).
* ``triton`` -- batch statistics in torch (differentiable), then
  ``mgm_fast.ops._triton.genblock.fused_cbn_relu_conv`` (prologue + phase conv + residual
  epilogue in one kernel) twice. Under ``TRITON_INTERPRET=1`` it also runs CPU tensors (tests).

Layouts: inputs may be NCHW or channels_last; outputs and gradients keep x's memory format.

``torch.compile``: the cpp and cuda kernels run behind the custom ops
``mgm_fast::genblock_<backend>_forward`` / ``_backward`` and ``mgm_fast::cbn_relu_conv3x3_<backend>_forward``
/ ``_backward`` (:mod:`mgm_fast.ops._library`); the forwards declare the running statistics they
update in ``mutates_args``, so their autograd is an ``autograd.Function`` calling the ops (traced
by dynamo). The Triton kernels are custom ops of :mod:`mgm_fast.ops._triton.genblock`. ``auto``'s
choice is trace-safe: a compiled generator is one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mgm_fast import _native
from mgm_fast.ops._dispatch import (
    ANY_FLOAT,
    NATIVE_DEVICE,
    FusedOp,
    argument_list,
    cpp_backend,
    cuda_backend,
    define_op,
    device_constant,
    native_function,
    reference_backend,
    triton_backend,
    triton_reason,
    value_checks_enabled,
)
from mgm_fast.ops._library import (
    autocast_off,
    fresh,
    once_differentiable,
    or_placeholder,
    placeholder,
    qualname,
)
from mgm_fast.ops._phase_taps import PHASE_TAPS

__all__ = [
    "OP",
    "PHASE_TAPS",
    "PIECE_OP",
    "cbn_relu_conv3x3",
    "chosen_algorithms",
    "genblock",
    "genblock_reference",
    "phase_weights",
    "restore_algorithms",
    "up2_conv1x1",
    "up2_conv3x3",
]


# ---------------------------------------------------------------------------------------------
# exact rewrites in plain torch

def phase_weights(weight: Tensor) -> Tensor:
    """The 2x2 phase kernels of a 3x3 kernel for nearest-2x input (rewrite 1 above).

    weight (Cout, Cin, 3, 3) -> (4 * Cout, Cin, 2, 2), phase (p, q) in rows
    ``(2p + q) * Cout : (2p + q + 1) * Cout``. Differentiable (a fixed linear map).
    """
    g = device_constant(PHASE_TAPS, weight.dtype, weight.device)  # (p, r, ky)
    # wp[p, q, o, c, r, s] = sum_{ky, kx} g[p, r, ky] g[q, s, kx] w[o, c, ky, kx]
    wp = torch.einsum("prk,qsl,ockl->pqocrs", g, g, weight)
    cout, cin = weight.shape[:2]
    return wp.reshape(4 * cout, cin, 2, 2)


def up2_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``conv2d(up2(x), weight, bias, padding=1)`` computed as one 2x2 conv with 4*Cout outputs
    on the low-resolution x, then interleaved (rewrite 1). x (B, Cin, H, W) -> (B, Cout, 2H, 2W)."""
    b, _, h, w = x.shape
    cout = weight.shape[0]
    p = F.conv2d(x, phase_weights(weight), None, padding=1)  # (B, 4*Cout, H+1, W+1)
    p = p.view(b, 2, 2, cout, h + 1, w + 1)
    rows = []
    for pr in range(2):
        cols = [p[:, pr, q, :, pr : pr + h, q : q + w] for q in range(2)]
        rows.append(torch.stack(cols, dim=-1))  # (B, Cout, H, W, 2): column phase last
    out = torch.stack(rows, dim=3).reshape(b, cout, 2 * h, 2 * w)  # (B, Cout, H, 2, W, 2)
    return out if bias is None else out + bias[:, None, None]


def up2_conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``conv2d(up2(x), weight, bias)`` for a 1x1 weight, computed before upsampling (rewrite 2)."""
    return _up2(F.conv2d(x, weight, bias))


# ---------------------------------------------------------------------------------------------
# reference (plain torch, the released computation)


def _up2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _batch_norm(x, running_mean, running_var, num_batches_tracked, training, momentum, eps):
    """``nn.BatchNorm2d(affine=False).forward`` on explicit buffers (same update, same kernel)."""
    factor = 0.0
    if training:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            if num_batches_tracked is None:
                raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
            factor = 1.0 / float(num_batches_tracked)
        else:
            factor = momentum
    return F.batch_norm(x, running_mean, running_var, None, None, training, factor, eps)


def _cbn(x, gamma, beta, running_mean, running_var, num_batches_tracked, training, momentum, eps):
    """Conditional BN: gamma * BN(x) + beta with per-sample rows gamma, beta (B, C)."""
    a = _batch_norm(x, running_mean, running_var, num_batches_tracked, training, momentum, eps)
    return gamma[:, :, None, None] * a + beta[:, :, None, None]


def _reference_piece(
    x,
    gamma,
    beta,
    weight,
    bias,
    running_mean,
    running_var,
    num_batches_tracked=None,
    residual=None,
    *,
    training=True,
    momentum=0.001,
    eps=1e-5,
    upsample=True,
):
    a = F.relu(_cbn(x, gamma, beta, running_mean, running_var, num_batches_tracked, training, momentum, eps))
    if upsample:
        a = _up2(a)
    out = F.conv2d(a, weight, bias, padding=1)
    if residual is not None:
        out = out + (residual if residual.shape[-2:] == out.shape[-2:] else _up2(residual))
    return out


def genblock_reference(x: Tensor, y: Tensor, block) -> Tensor:
    """The GenBlock in the released order, layer for layer: the reference every fused backend is
    tested against.

    main = snconv2d2(relu(cond_bn2(snconv2d1(up2(relu(cond_bn1(x, y)))), y)))
    shortcut = snconv2d0(up2(x)); returns main + shortcut.

    ``block`` supplies the layers as callables: ``cond_bn1(t, y)``, ``cond_bn2(t, y)`` (conditional
    BN) and ``snconv2d1``, ``snconv2d2`` (3x3, padding 1), ``snconv2d0`` (1x1) -- a
    :class:`mgm_fast.models.gan.GenBlock` (its modules, so SyncBatchNorm and spectral norm act as
    in the model), or the explicit tensors of the op (:func:`genblock` with ``impl="reference"``).
    x (B, C_in, H, W), y (B,) int64 -> (B, C_out, 2H, 2W).
    """
    h = _up2(F.relu(block.cond_bn1(x, y)))
    h = F.relu(block.cond_bn2(block.snconv2d1(h), y))
    h = block.snconv2d2(h)
    # The released order (upsample, then 1x1 conv); a 1x1 conv commutes with nearest
    # upsampling, which the fused backends exploit (rewrite 2).
    return h + block.snconv2d0(_up2(x))


class _TensorBlock:
    """The layers of :func:`genblock_reference` made of the op's explicit tensors (the effective
    weights, the embeddings and the BN buffers, updated in place like ``BatchNorm2d``)."""

    def __init__(self, a: dict) -> None:
        self.a = a

    def _cbn(self, t: Tensor, y: Tensor, k: str) -> Tensor:
        a = self.a
        gamma, beta = F.embedding(y, a[f"embed{k}"]).chunk(2, dim=1)
        return _cbn(t, gamma, beta, a[f"running_mean{k}"], a[f"running_var{k}"], a[f"num_batches_tracked{k}"],
                    a["training"], a["momentum"], a["eps"])  # fmt: skip

    def cond_bn1(self, t: Tensor, y: Tensor) -> Tensor:
        return self._cbn(t, y, "1")

    def cond_bn2(self, t: Tensor, y: Tensor) -> Tensor:
        return self._cbn(t, y, "2")

    def snconv2d1(self, t: Tensor) -> Tensor:
        return F.conv2d(t, self.a["weight1"], self.a["bias1"], padding=1)

    def snconv2d2(self, t: Tensor) -> Tensor:
        return F.conv2d(t, self.a["weight2"], self.a["bias2"], padding=1)

    def snconv2d0(self, t: Tensor) -> Tensor:
        return F.conv2d(t, self.a["weight0"], self.a["bias0"])


def _reference_genblock(
    x,
    y,
    embed1,
    weight1,
    bias1,
    embed2,
    weight2,
    bias2,
    weight0,
    bias0,
    running_mean1,
    running_var1,
    running_mean2,
    running_var2,
    num_batches_tracked1=None,
    num_batches_tracked2=None,
    *,
    training=True,
    momentum=0.001,
    eps=1e-5,
):
    block = _TensorBlock(dict(
        embed1=embed1, weight1=weight1, bias1=bias1, embed2=embed2, weight2=weight2, bias2=bias2,
        weight0=weight0, bias0=bias0, running_mean1=running_mean1, running_var1=running_var1,
        running_mean2=running_mean2, running_var2=running_var2, num_batches_tracked1=num_batches_tracked1,
        num_batches_tracked2=num_batches_tracked2, training=training, momentum=momentum, eps=eps,
    ))  # fmt: skip
    return genblock_reference(x, y, block)


# ---------------------------------------------------------------------------------------------
# cpp / cuda: the C++ composition (csrc/bindings/genblock_impl.h) behind custom ops
#
# Per backend (cpp: the CPU kernels, cuda: the CUDA ones; one C++ composition) four custom ops:
# mgm_fast::genblock_<backend>_forward / _backward and mgm_fast::cbn_relu_conv3x3_<backend>_forward /
# _backward. A forward updates the BatchNorm running statistics in place (declared in
# mutates_args), so autograd is an autograd.Function whose forward and backward call the ops.
# Outputs follow mgm_fast.ops._library: no aliases, placeholders for absent tensors. The x saved
# for backward is x itself when x is channels_last (the kernels' layout) and the channels_last
# copy the forward wrote otherwise; the forward returns a placeholder in the first case.

_BlockForward = tuple[(Tensor,) * 14]  # out, xs, 11 saved tensors, the algorithm record
_ALGO_RECORD_SHAPE = (2,)
"""Shape of the int64 CPU tensor genblock_forward_cpu returns last: the algorithms it chose for the
block's two convolutions (csrc/bindings/genblock.cpp, algo_tensor), passed back to the backward.
The fake kernel must follow the binding here (tests/ops/test_library_ops.py compares them)."""
_PieceForward = tuple[(Tensor,) * 6]  # out, xs, act, mean, rstd, scale
"""Mutating custom ops return tuples (auto-functionalization does not take a list return)."""
_STATS_MUTATED = ("running_mean1", "running_var1", "num_batches_tracked1", "running_mean2", "running_var2",
                  "num_batches_tracked2")  # fmt: skip


def _is_channels_last(t: Tensor) -> bool:
    """The memory format the C++ side gives outputs and gradients of t (genblock_impl.h)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _param_dtype(x: Tensor, backend: str) -> torch.dtype:
    """dtype of the per-sample scale and the gathered embedding rows: x's on the CPU, float32 on
    CUDA (genblock_impl.h's K::param_dtype)."""
    return x.dtype if backend == "cpp" else torch.float32


def _empty4(like: Tensor, n, c, h, w, channels_last: bool, dtype=None) -> Tensor:
    return torch.empty((n, c, h, w), dtype=dtype or like.dtype, device=like.device,
                       memory_format=_format(channels_last))  # fmt: skip


def _block_forward_meta(backend, x, y, embed1, weight1, *rest) -> tuple:
    """Outputs of genblock_<backend>_forward: (out, xs, act1, h, act2, mean1, rstd1, scale1, gb1,
    mean2, rstd2, scale2, gb2, algo): the CPU binding's record of the algorithms it chose (CUDA
    has one algorithm: a placeholder)."""
    n, cin, h, w = x.shape
    cout = weight1.shape[0]
    pt = _param_dtype(x, backend)

    def vectors(c):  # mean, rstd (c,) float64; scale (n, c) and the embedding rows (n, 2c)
        f64 = dict(dtype=torch.float64, device=x.device)
        return [torch.empty(c, **f64), torch.empty(c, **f64), x.new_empty((n, c), dtype=pt),
                x.new_empty((n, 2 * c), dtype=pt)]  # fmt: skip

    out = _empty4(x, n, cout, 2 * h, 2 * w, _is_channels_last(x))
    xs = placeholder(x) if _is_channels_last(x) else _empty4(x, n, cin, h, w, True)
    act1, hh, act2 = (_empty4(x, n, c, k * h, k * w, True) for c, k in ((cin, 1), (cout, 2), (cout, 2)))
    algo = placeholder(x) if backend == "cuda" else torch.empty(_ALGO_RECORD_SHAPE, dtype=torch.int64, device=x.device)
    return (out, xs, act1, hh, act2, *vectors(cin), *vectors(cout), algo)


def _block_backward_meta(grad, x, saved, embed1, weight1, embed2, weight2, weight0, need_x, x_channels_last):
    """Outputs of genblock_<backend>_backward: [dx, dembed1, dw1, db1, dembed2, dw2, db2, dw0, db0]."""
    n, cin, h, w = x.shape
    dx = _empty4(x, n, cin, h, w, x_channels_last) if need_x else placeholder(x)
    grads = [dx]
    for embed, weight in ((embed1, weight1), (embed2, weight2)):
        grads += [torch.empty_like(embed, memory_format=torch.contiguous_format),
                  torch.empty_like(weight, memory_format=torch.contiguous_format),
                  weight.new_empty(weight.shape[:1])]  # fmt: skip
    return [*grads, torch.empty_like(weight0, memory_format=torch.contiguous_format),
            weight0.new_empty(weight0.shape[:1])]  # fmt: skip


def _piece_forward_meta(backend, x, gamma, beta, weight, bias, residual, running_mean, running_var,
                        num_batches_tracked, training, momentum, eps, upsample) -> tuple:  # fmt: skip
    """Outputs of cbn_relu_conv3x3_<backend>_forward: (out, xs, act, mean, rstd, scale)."""
    n, c, h, w = x.shape
    factor = 2 if upsample else 1
    f64 = dict(dtype=torch.float64, device=x.device)
    xs = placeholder(x) if _is_channels_last(x) else _empty4(x, n, c, h, w, True)
    return (_empty4(x, n, weight.shape[0], factor * h, factor * w, _is_channels_last(x)), xs,
            _empty4(x, n, c, h, w, True), torch.empty(c, **f64), torch.empty(c, **f64),
            x.new_empty((n, c), dtype=_param_dtype(x, backend)))  # fmt: skip


def _piece_backward_meta(grad, x, act, weight, gamma, scale, mean, rstd, training, upsample, has_bias,
                         residual_mode, need_x, need_gamma_beta, x_channels_last) -> list[Tensor]:  # fmt: skip
    """Outputs of cbn_relu_conv3x3_<backend>_backward: [dx, dgamma, dbeta, dweight, dbias, dresidual];
    dresidual is a placeholder unless the residual was half-size (a full-size residual's gradient is
    grad itself, which the caller uses)."""
    n, c, h, w = x.shape
    gb = torch.empty_like(gamma, memory_format=torch.contiguous_format) if need_x or need_gamma_beta else None
    dres = placeholder(grad)
    if residual_mode == 2:
        gn, gc, gh, gw = grad.shape
        dres = _empty4(grad, gn, gc, gh // 2, gw // 2, _is_channels_last(grad))
    return [
        _empty4(x, n, c, h, w, x_channels_last) if need_x else placeholder(x),
        or_placeholder(gb, gamma), or_placeholder(None if gb is None else torch.empty_like(gb), gamma),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty(weight.shape[:1]) if has_bias else placeholder(weight),
        dres,
    ]


def _register_native(backend: str) -> dict:
    """The four custom ops of one native backend (cpp or cuda)."""
    device = NATIVE_DEVICE[backend]

    @torch.library.custom_op(qualname(f"genblock_{backend}_forward"), mutates_args=_STATS_MUTATED)
    def block_forward(
        x: Tensor, y: Tensor, embed1: Tensor, weight1: Tensor, bias1: Tensor, embed2: Tensor, weight2: Tensor,
        bias2: Tensor, weight0: Tensor, bias0: Tensor, running_mean1: Tensor, running_var1: Tensor,
        num_batches_tracked1: Tensor | None, running_mean2: Tensor, running_var2: Tensor,
        num_batches_tracked2: Tensor | None, training: bool, momentum: float | None, eps: float,
    ) -> _BlockForward:  # fmt: skip
        inputs = (x, y, embed1, weight1, bias1, embed2, weight2, bias2, weight0, bias0, running_mean1,
                  running_var1, num_batches_tracked1, running_mean2, running_var2, num_batches_tracked2)  # fmt: skip
        with autocast_off(x):
            out, xs, *saved = native_function("genblock_forward_{device}", device)(*inputs, training, momentum, eps)
        if _is_channels_last(x):  # xs is x itself
            xs = placeholder(x)
        if backend == "cuda":  # no algorithm choice
            saved.append(placeholder(x))
        return tuple(fresh([out, xs, *saved], inputs))

    @block_forward.register_fake
    def _(x, y, embed1, weight1, *rest):
        return _block_forward_meta(backend, x, y, embed1, weight1, *rest)

    @torch.library.custom_op(qualname(f"genblock_{backend}_backward"), mutates_args=())
    def block_backward(
        grad: Tensor, x: Tensor, y: Tensor, saved: list[Tensor], embed1: Tensor, weight1: Tensor,
        embed2: Tensor, weight2: Tensor, weight0: Tensor, training: bool, need_x: bool, x_channels_last: bool,
    ) -> list[Tensor]:  # fmt: skip
        if backend == "cuda":
            saved = saved[:-1]
        with autocast_off(x):
            grads = native_function("genblock_backward_{device}", device)(
                grad, x, y, *saved, embed1, weight1, embed2, weight2, weight0, training, need_x, x_channels_last
            )
        grads[0] = or_placeholder(grads[0], x)
        return fresh(grads, (grad, x, y, *saved, embed1, weight1, embed2, weight2, weight0))

    @block_backward.register_fake
    def _(grad, x, y, saved, embed1, weight1, embed2, weight2, weight0, training, need_x, x_channels_last):
        return _block_backward_meta(grad, x, saved, embed1, weight1, embed2, weight2, weight0, need_x,
                                    x_channels_last)  # fmt: skip

    @torch.library.custom_op(qualname(f"cbn_relu_conv3x3_{backend}_forward"),
                             mutates_args=("running_mean", "running_var", "num_batches_tracked"))  # fmt: skip
    def piece_forward(
        x: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
        running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None, training: bool,
        momentum: float | None, eps: float, upsample: bool,
    ) -> _PieceForward:  # fmt: skip
        inputs = (x, gamma, beta, weight, bias, residual, running_mean, running_var, num_batches_tracked)
        with autocast_off(x):
            out, xs, *saved = native_function("cbn_relu_conv_forward_{device}", device)(*inputs, training, momentum, eps, upsample)
        if _is_channels_last(x):
            xs = placeholder(x)
        return tuple(fresh([out, xs, *saved], inputs))

    @piece_forward.register_fake
    def _(*args):
        return _piece_forward_meta(backend, *args)

    @torch.library.custom_op(qualname(f"cbn_relu_conv3x3_{backend}_backward"), mutates_args=())
    def piece_backward(
        grad: Tensor, x: Tensor, act: Tensor, weight: Tensor, gamma: Tensor, scale: Tensor, mean: Tensor,
        rstd: Tensor, training: bool, upsample: bool, has_bias: bool, residual_mode: int, need_x: bool,
        need_gamma_beta: bool, x_channels_last: bool,
    ) -> list[Tensor]:  # fmt: skip
        inputs = (grad, x, act, weight, gamma, scale, mean, rstd)
        with autocast_off(x):
            dx, dgamma, dbeta, dweight, dbias, dres = native_function("cbn_relu_conv_backward_{device}", device)(
                *inputs, training, upsample, has_bias, residual_mode, need_x, need_gamma_beta, x_channels_last
            )
        if residual_mode == 1:  # grad itself
            dres = None
        if dgamma is not None:  # (B, C) halves of one (B, 2C) buffer: one tensor each
            dgamma, dbeta = dgamma.contiguous(), dbeta.clone(memory_format=torch.contiguous_format)
        grads = [or_placeholder(dx, x), or_placeholder(dgamma, gamma), or_placeholder(dbeta, gamma), dweight,
                 or_placeholder(dbias, weight), or_placeholder(dres, grad)]  # fmt: skip
        return fresh(grads, inputs)

    @piece_backward.register_fake
    def _(*args):
        return _piece_backward_meta(*args)

    for op, what in ((block_backward, "genblock"), (piece_backward, "cbn_relu_conv3x3")):
        once_differentiable(op, f"{what} ({backend} backend)")
    return {"genblock_forward": block_forward, "genblock_backward": block_backward,
            "piece_forward": piece_forward, "piece_backward": piece_backward}  # fmt: skip


_NATIVE_OPS = {backend: _register_native(backend) for backend in NATIVE_DEVICE}
"""backend -> {"genblock_forward", "genblock_backward", "piece_forward", "piece_backward"} custom ops."""


class _NativePiece(torch.autograd.Function):
    """One piece on the C++ kernels; saves x (channels_last), the prologue activation and
    per-channel vectors."""

    @staticmethod
    def forward(
        ctx, backend, x, gamma, beta, weight, bias, residual, running_mean, running_var,
        num_batches_tracked, training, momentum, eps, upsample,
    ):  # fmt: skip
        out, xs, act, mean, rstd, scale = _NATIVE_OPS[backend]["piece_forward"](
            x, gamma, beta, weight, bias, residual, running_mean, running_var, num_batches_tracked,
            training, momentum, eps, upsample,
        )  # fmt: skip
        ctx.backend, ctx.training, ctx.upsample = backend, training, upsample
        ctx.x_channels_last = _is_channels_last(x)
        ctx.has_bias = bias is not None
        if residual is None:
            ctx.residual_mode = 0
        else:
            ctx.residual_mode = 1 if residual.shape[-2:] == out.shape[-2:] else 2
        ctx.save_for_backward(x if ctx.x_channels_last else xs, act, weight, gamma, scale, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, act, weight, gamma, scale, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dgamma, dbeta, dweight, dbias, dres = _NATIVE_OPS[ctx.backend]["piece_backward"](
            grad, x, act, weight, gamma, scale, mean, rstd, ctx.training, ctx.upsample, ctx.has_bias,
            ctx.residual_mode, need[1], need[2] or need[3], ctx.x_channels_last,
        )  # fmt: skip
        if ctx.residual_mode == 1:
            dres = grad
        return (None, dx if need[1] else None, dgamma if need[2] else None, dbeta if need[3] else None,
                dweight, dbias if ctx.has_bias else None, dres if ctx.residual_mode else None,
                None, None, None, None, None, None, None)  # fmt: skip


class _NativeGenBlock(torch.autograd.Function):
    """A whole GenBlock on the C++ kernels: one forward and one backward call, one graph node."""

    @staticmethod
    def forward(
        ctx, backend, x, y, embed1, weight1, bias1, embed2, weight2, bias2, weight0, bias0,
        running_mean1, running_var1, running_mean2, running_var2, num_batches_tracked1,
        num_batches_tracked2, training, momentum, eps,
    ):  # fmt: skip
        out, xs, *saved = _NATIVE_OPS[backend]["genblock_forward"](
            x, y, embed1, weight1, bias1, embed2, weight2, bias2, weight0, bias0,
            running_mean1, running_var1, num_batches_tracked1, running_mean2, running_var2,
            num_batches_tracked2, training, momentum, eps,
        )  # fmt: skip
        ctx.backend, ctx.training = backend, training
        ctx.x_channels_last = _is_channels_last(x)
        xs = x if ctx.x_channels_last else xs
        ctx.save_for_backward(xs, y, embed1, weight1, embed2, weight2, weight0, *saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        xs, y, embed1, weight1, embed2, weight2, weight0, *saved = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        dx, de1, dw1, db1, de2, dw2, db2, dw0, db0 = _NATIVE_OPS[ctx.backend]["genblock_backward"](
            grad, xs, y, saved, embed1, weight1, embed2, weight2, weight0, ctx.training, need_x,
            ctx.x_channels_last,
        )  # fmt: skip
        return (None, dx if need_x else None, None, de1, dw1, db1, de2, dw2, db2, dw0, db0, *([None] * 9))


_CONV_TENSORS = ("weight1", "bias1", "weight2", "bias2", "weight0", "bias0")


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype for x's device when autocast is on there, else None."""
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _native_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the native backends compute in under autocast (None: not under autocast): the
    autocast dtype on CUDA; float32 on the CPU, whose kernels have no half-precision path."""
    dt = _autocast_dtype(x)
    return torch.float32 if dt is not None and x.device.type == "cpu" else dt


def _native_genblock(backend: str, a: dict) -> Tensor:
    dt = _native_dtype(a["x"])
    if dt is not None:  # like custom_fwd(cast_inputs=...): activations and conv params in dt
        a = {**a, "x": a["x"].to(dt), **{k: a[k].to(dt) for k in _CONV_TENSORS}}
    return _NativeGenBlock.apply(backend, *a.values())  # bound in the reference's order, forward's order


def _native_piece(backend: str, a: dict) -> Tensor:
    dt = _native_dtype(a["x"])
    if dt is not None:
        a = {**a, **{k: a[k].to(dt) for k in ("x", "weight", "bias", "residual") if a[k] is not None}}
    return _NativePiece.apply(
        backend, a["x"], a["gamma"], a["beta"], a["weight"], a["bias"], a["residual"], a["running_mean"],
        a["running_var"], a["num_batches_tracked"], a["training"], a["momentum"], a["eps"], a["upsample"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# triton: statistics in torch, prologue + conv + epilogue in mgm_fast.ops._triton.genblock


def _triton_module():
    """mgm_fast.ops._triton.genblock, imported on first use (Triton is optional)."""
    from mgm_fast.ops._triton import genblock as tg

    return tg


def _triton_reason() -> str | None:
    reason = triton_reason()
    if reason:
        return reason
    try:
        tg = _triton_module()
    except ImportError as err:
        return f"not implemented yet (mgm_fast.ops._triton.genblock: {err})"
    missing = [n for n in ("fused_cbn_relu_conv", "triton_supported_reasons") if not hasattr(tg, n)]
    if missing:
        return f"not implemented yet (mgm_fast.ops._triton.genblock lacks {', '.join(missing)})"
    return None


def _torch_scale_shift(x, gamma, beta, running_mean, running_var, num_batches_tracked, training,
                       momentum, eps):
    """float32 (B, C) scale/shift of the prologue; batch statistics differentiable in training,
    running statistics updated like BatchNorm2d."""
    if training:
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if count <= 1:
            raise ValueError(f"genblock: expected more than 1 value per channel when training, got x of size {tuple(x.shape)}")
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
        with torch.no_grad():
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            unbiased = var.detach() * (count / (count - 1))
            if momentum is not None:
                running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
            else:  # cumulative average: the factor as a device tensor (no host read of the counter)
                m = 1.0 / num_batches_tracked.to(torch.float64)
                running_mean.mul_(1 - m).add_(mean.detach().to(running_mean.dtype) * m)
                running_var.mul_(1 - m).add_(unbiased.to(running_var.dtype) * m)
    else:
        mean, var = running_mean.float(), running_var.float()
    scale = gamma.float() * torch.rsqrt(var + eps)
    shift = beta.float() - mean * scale
    return scale, shift


def _triton_piece(x, gamma, beta, weight, bias, running_mean, running_var, num_batches_tracked=None,
                  residual=None, *, training=True, momentum=0.001, eps=1e-5, upsample=True):
    tg = _triton_module()
    dt = _autocast_dtype(x)
    if dt is not None:
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
        residual = None if residual is None else residual.to(dt)
    with torch.autocast(x.device.type, enabled=False):
        scale, shift = _torch_scale_shift(x, gamma, beta, running_mean, running_var,
                                          num_batches_tracked, training, momentum, eps)
        return tg.fused_cbn_relu_conv(x, scale, shift, weight, bias, upsample=upsample, residual=residual)


def _triton_genblock(x, y, embed1, weight1, bias1, embed2, weight2, bias2, weight0, bias0,
                     running_mean1, running_var1, running_mean2, running_var2,
                     num_batches_tracked1=None, num_batches_tracked2=None, *, training=True,
                     momentum=0.001, eps=1e-5):
    tg = _triton_module()
    dt = _autocast_dtype(x)
    if dt is not None:
        x, weight1, bias1, weight2, bias2, weight0, bias0 = (
            t.to(dt) for t in (x, weight1, bias1, weight2, bias2, weight0, bias0)
        )
    with torch.autocast(x.device.type, enabled=False):
        gamma1, beta1 = F.embedding(y, embed1).chunk(2, dim=1)
        scale1, shift1 = _torch_scale_shift(x, gamma1, beta1, running_mean1, running_var1,
                                            num_batches_tracked1, training, momentum, eps)
        h = tg.fused_cbn_relu_conv(x, scale1, shift1, weight1, bias1, upsample=True)
        gamma2, beta2 = F.embedding(y, embed2).chunk(2, dim=1)
        scale2, shift2 = _torch_scale_shift(h, gamma2, beta2, running_mean2, running_var2,
                                            num_batches_tracked2, training, momentum, eps)
        shortcut = F.conv2d(x, weight0, bias0)  # 1x1 at low resolution; upsampled in the epilogue
        return tg.fused_cbn_relu_conv(h, scale2, shift2, weight2, bias2, upsample=False, residual=shortcut)


# ---------------------------------------------------------------------------------------------
# argument handling and validation

def _shape_error(op, name, t, want) -> ValueError:
    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
    return ValueError(f"{op}: {name} must have shape {want}, got {got}")


def _expect(op, name, t, shape) -> None:
    """t is a floating tensor of this shape (None entries: any size)."""
    if (
        isinstance(t, Tensor)
        and t.dim() == len(shape)
        and all(s is None or s == d for s, d in zip(shape, t.shape))
        and t.is_floating_point()
    ):
        return
    if isinstance(t, Tensor) and t.dim() == len(shape) and not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
    raise _shape_error(op, name, t, want)


def _check_x(op, x, training) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a 4-d (B, C, H, W) floating tensor, got {got}")
    b, _, h, w = x.shape
    if min(b, h, w) < 1:
        raise ValueError(f"{op}: x must have B, H, W >= 1, got {tuple(x.shape)}")
    if training and b * h * w < 2:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, got x of size {tuple(x.shape)}"
        )


def _check_stats(op, a, suffix, channels) -> None:
    for name in (f"running_mean{suffix}", f"running_var{suffix}"):
        _expect(op, name, a[name], (channels,))
    nbt = a[f"num_batches_tracked{suffix}"]
    if nbt is not None and (not isinstance(nbt, Tensor) or nbt.numel() != 1):
        raise ValueError(f"{op}: num_batches_tracked{suffix} must be a one-element tensor or None")
    if a["momentum"] is None and nbt is None:
        raise ValueError(f"{op}: momentum=None (cumulative average) needs num_batches_tracked{suffix}")


def _validate_genblock(a: dict) -> None:
    op = "genblock"
    x, y = a["x"], a["y"]
    _check_x(op, x, a["training"])
    b, cin = x.shape[:2]
    w1 = a["weight1"]
    _expect(op, "weight1", w1, (None, cin, 3, 3))
    cout = w1.shape[0]
    _expect(op, "bias1", a["bias1"], (cout,))
    _expect(op, "weight2", a["weight2"], (cout, cout, 3, 3))
    _expect(op, "bias2", a["bias2"], (cout,))
    _expect(op, "weight0", a["weight0"], (cout, cin, 1, 1))
    _expect(op, "bias0", a["bias0"], (cout,))
    _expect(op, "embed1", a["embed1"], (None, 2 * cin))
    classes = a["embed1"].shape[0]
    _expect(op, "embed2", a["embed2"], (classes, 2 * cout))
    _check_stats(op, a, "1", cin)
    _check_stats(op, a, "2", cout)
    if not isinstance(y, Tensor) or y.shape != (b,) or y.dtype != torch.int64:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{op}: y must be a (B,) = ({b},) int64 tensor of labels, got {got}")
    if value_checks_enabled(y.device):  # a host read of the labels
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= classes:
            raise ValueError(f"{op}: y holds label {lo if lo < 0 else hi}, outside [0, {classes}) (embed1 has {classes} rows)")


def _validate_piece(a: dict) -> None:
    op = "cbn_relu_conv3x3"
    x = a["x"]
    _check_x(op, x, a["training"])
    b, c, h, w = x.shape
    _expect(op, "gamma", a["gamma"], (b, c))
    _expect(op, "beta", a["beta"], (b, c))
    _expect(op, "weight", a["weight"], (None, c, 3, 3))
    cout = a["weight"].shape[0]
    if a["bias"] is not None:
        _expect(op, "bias", a["bias"], (cout,))
    _check_stats(op, a, "", c)
    res = a["residual"]
    if res is not None:
        ho, wo = (2 * h, 2 * w) if a["upsample"] else (h, w)
        full, half = (b, cout, ho, wo), (b, cout, ho // 2, wo // 2)
        if not isinstance(res, Tensor) or tuple(res.shape) not in (full, half) or (
            tuple(res.shape) == half and (ho % 2 or wo % 2)
        ):
            raise _shape_error(op, "residual", res, f"{full} or {half}")


# ---------------------------------------------------------------------------------------------
# backend conditions

_NATIVE_SAME_DTYPE = {
    "genblock": ("weight1", "bias1", "weight2", "bias2", "weight0", "bias0"),
    "cbn_relu_conv3x3": ("weight", "bias", "residual"),
}


def _dtype_reasons(op: str, a: dict) -> list[str]:
    x = a["x"]
    if _autocast_dtype(x) is not None:
        return []  # the conv tensors are cast to the autocast dtype first
    return [
        f"{name} is {a[name].dtype} but x is {x.dtype}"
        for name in _NATIVE_SAME_DTYPE[op]
        if isinstance(a.get(name), Tensor) and a[name].dtype != x.dtype
    ]


def _cpp_reasons(op: str, a: dict) -> list[str]:
    reasons = []
    x = a["x"]
    if x.dtype in (torch.float16, torch.bfloat16) and _autocast_dtype(x) is None:
        reasons.append(f"x is {x.dtype}: the cpp backend computes in float32/float64 (in float32 "
                       "under CPU autocast)")
    return reasons + _dtype_reasons(op, a)


def _cuda_availability() -> str | None:
    reason = _native.cuda_reason()
    if reason is None and not hasattr(_native.extension(), "genblock_forward_cuda"):
        return "mgm_fast._C has no CUDA genblock kernels (rebuild the extension)"
    return reason


def _triton_reasons(op: str, a: dict) -> list[str]:
    tg = _triton_module()
    x = a["x"]
    if op != "genblock":
        return tg.triton_supported_reasons(x, a["weight"])
    # The second conv reads h (B, Cout, 2H, 2W): a storage-free stand-in carries its metadata.
    b, _, h, w = x.shape
    hh = x.new_empty(1).as_strided((b, a["weight1"].shape[0], 2 * h, 2 * w), (0, 0, 0, 0))
    reasons = [f"weight1: {r}" for r in tg.triton_supported_reasons(x, a["weight1"])]
    return reasons + [f"weight2: {r}" for r in tg.triton_supported_reasons(hh, a["weight2"])]


def _make_op(name: str, summary: str, reference, native, triton) -> FusedOp:
    """The op ``name`` with its four backends; the native ones take the arguments bound to the
    reference's list (a dict), and every backend's extra check takes the op's name too."""
    arguments = argument_list(reference, name)

    def bound(backend):
        def call(*args, **kwargs):
            return native(backend, arguments.bind(args, kwargs))

        call.__name__ = call.__qualname__ = f"_{backend}_{name}"
        return call

    def check(extra):
        return lambda inputs: extra(name, inputs)

    return define_op(name, summary, [
        reference_backend(reference),
        cpp_backend(bound("cpp"), dtypes=ANY_FLOAT, extra_check=check(_cpp_reasons)),  # half: autocast only
        cuda_backend(bound("cuda"), extra_check=check(_dtype_reasons), availability=_cuda_availability),
        triton_backend(triton, extra_check=check(_triton_reasons), availability=_triton_reason),
    ])  # fmt: skip


OP = _make_op(
    "genblock",
    "SAGAN GenBlock: CBN-ReLU-up2-conv3x3, CBN-ReLU-conv3x3, + conv1x1 shortcut (phase convs)",
    _reference_genblock,
    _native_genblock,
    _triton_genblock,
)
PIECE_OP = _make_op(
    "cbn_relu_conv3x3",
    "conditional BN + ReLU (+ nearest x2) + conv3x3 (+ residual), prologue/epilogue fused",
    _reference_piece,
    _native_piece,
    _triton_piece,
)


# ---------------------------------------------------------------------------------------------
# public functions


def genblock(
    x: Tensor,
    y: Tensor,
    embed1: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    embed2: Tensor,
    weight2: Tensor,
    bias2: Tensor,
    weight0: Tensor,
    bias0: Tensor,
    running_mean1: Tensor,
    running_var1: Tensor,
    running_mean2: Tensor,
    running_var2: Tensor,
    num_batches_tracked1: Tensor | None = None,
    num_batches_tracked2: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | None = 0.001,
    eps: float = 1e-5,
    impl: str = "auto",
) -> Tensor:
    """A GenBlock forward (see the module docstring), differentiable w.r.t. x, the embeddings,
    the weights and the biases; updates the running statistics in place when ``training``.

    Shapes: x (B, Cin, H, W); y (B,) int64 in [0, K); embed1 (K, 2*Cin) = [gamma | beta] rows of
    CBN1, embed2 (K, 2*Cout) of CBN2; weight1 (Cout, Cin, 3, 3), weight2 (Cout, Cout, 3, 3),
    weight0 (Cout, Cin, 1, 1) -- the effective (spectrally normalised) weights -- and their
    biases (Cout,); running_mean1/var1 (Cin,), running_mean2/var2 (Cout,), num_batches_tracked
    one-element int64 tensors (or None). Returns (B, Cout, 2H, 2W) in x's dtype and memory format.
    ``impl``: "auto" | "reference" | "cpp" | "cuda" | "triton"; a forced backend that cannot run
    the inputs raises :class:`~mgm_fast.ops.BackendUnavailable` with the reasons.
    """
    a = dict(
        x=x, y=y, embed1=embed1, weight1=weight1, bias1=bias1, embed2=embed2, weight2=weight2,
        bias2=bias2, weight0=weight0, bias0=bias0, running_mean1=running_mean1,
        running_var1=running_var1, running_mean2=running_mean2, running_var2=running_var2,
        num_batches_tracked1=num_batches_tracked1, num_batches_tracked2=num_batches_tracked2,
        training=training, momentum=momentum, eps=eps,
    )
    _validate_genblock(a)
    return OP(**a, impl=impl)


def cbn_relu_conv3x3(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | None = 0.001,
    eps: float = 1e-5,
    upsample: bool = True,
    impl: str = "auto",
) -> Tensor:
    """``conv2d(up2_if(relu(gamma * BN(x) + beta)), weight, bias, padding=1) (+ residual)``.

    x (B, C, H, W); gamma, beta (B, C) per-sample affine rows (e.g. ``embed[y]`` halves, or a
    BatchNorm2d's weight/bias expanded to (B, C)); weight (Cout, C, 3, 3); bias (Cout,) or None;
    running_mean/var (C,); residual None, (B, Cout, Ho, Wo) or half of that (nearest-upsampled x2
    in the epilogue), with (Ho, Wo) = (2H, 2W) if ``upsample`` else (H, W). BN semantics as
    :func:`genblock`. Differentiable w.r.t. x, gamma, beta, weight, bias and residual.
    """
    a = dict(
        x=x, gamma=gamma, beta=beta, weight=weight, bias=bias, running_mean=running_mean,
        running_var=running_var, num_batches_tracked=num_batches_tracked, residual=residual,
        training=training, momentum=momentum, eps=eps, upsample=upsample,
    )
    _validate_piece(a)
    return PIECE_OP(**a, impl=impl)


# ---------------------------------------------------------------------------------------------
# the cpp backend's convolution algorithms per shape, on record


def chosen_algorithms() -> list[list]:
    """The convolution algorithms the cpp backend timed (``MGM_FAST_GENBLOCK_ALGO`` /
    ``MGM_FAST_GENBLOCK_CONV2_ALGO=timed``) or was given so far in this process, one row
    ``[conv, n, cin, cout, h, w, dtype, chosen]`` per shape (what a checkpoint records, so that
    a resumed run computes with the same algorithms; the default cost model's picks are a
    function of the shape and need no record); [] without the extension."""
    if _native.cpp_reason() is not None:
        return []
    return [[*row[:7], row[8]] for row in _native.extension().genblock_algos_cpu()]


def restore_algorithms(rows: list) -> None:
    """Take the rows of :func:`chosen_algorithms` (e.g. from a checkpoint) as the choices for
    their shapes, instead of the cost model's or a new timing. A forced ``MGM_FAST_GENBLOCK_ALGO``
    still wins. Nothing to do without rows or without the extension (no cpp GenBlock runs then)."""
    if rows and _native.cpp_reason() is None:
        _native.extension().genblock_algos_set_cpu([tuple(row) for row in rows])


# ---------------------------------------------------------------------------------------------
# self-test cases (mgm_fast.ops._selftest). The reference backend computes in the inputs' dtype,
# so it is its own float64 truth. The running statistics (updated in place) are not compared.
#
# ReLU margins. d relu(t) / dt jumps at t = 0: where a pre-activation lies within rounding
# error of 0, the float64 truth and a low-precision evaluation may take opposite sides, and that
# one element's gradient is then off by the whole incoming gradient (the max-error rule's worst
# entry becomes a coin flip: at the paper shapes, millions of pre-activations put a few within
# float32 rounding of 0). The cases therefore place each ReLU's kink in a gap of the data: the
# beta of every (class or sample, channel) row puts the zero of gamma * (xhat - t) at t, the
# middle of the widest gap between consecutive values of xhat near a random quantile of that
# row's values. About half the pixels stay active, every mask pattern is still exercised, and no
# pre-activation lies closer to 0 than half that gap (>> float32 error at the paper shapes;
# typically >> bfloat16 error at the small ones).

_MARGIN = 0.02
"""Where x itself is an input of the ReLU's batch norm (a GenBlock's CBN1, the piece), the values
of x within this distance (in xhat units) of the kink are moved to the edge of that band, which
keeps the gap open for bfloat16 too (~1.6% of the values at the paper shapes). CBN2 normalises h,
a conv output: there only the natural gap of the data is used."""

_BLOCK_GRADS = ("x", "embed1", "weight1", "bias1", "embed2", "weight2", "bias2", "weight0", "bias0")
_BLOCK_STATS = ("running_mean1", "running_var1", "running_mean2", "running_var2")


def _paper_blocks() -> list[tuple[int, int, int]]:
    """(Cin, Cout, input resolution) of every GenBlock of the paper preset's generator."""
    from mgm_fast.config import preset

    model = preset("paper").model
    ch = [m * model.g_conv_dim for m in model.g_mults]
    return [(ch[k - 1], ch[k], 4 * 2 ** (k - 1)) for k in range(1, len(ch))]


def _xhat(x: Tensor, running_mean: Tensor, running_var: Tensor, training: bool, eps: float) -> Tensor:
    """BatchNorm2d's normalised x (batch statistics, biased variance, in training)."""
    if training:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    else:
        mean, var = running_mean, running_var
    return (x - mean[:, None, None]) * torch.rsqrt(var + eps)[:, None, None]


def _kinks(xhat: Tensor, rows: Tensor, n_rows: int, quantile: Tensor) -> Tensor:
    """(n_rows, C) thresholds t: for the samples b with rows[b] == k, t[k, c] is the middle of
    the widest gap between consecutive values of xhat[b, c] within +-0.1 of quantile[k, c] of
    them (rows without samples: 0). Above 4096 values per row the band's ends are quantiles of
    an evenly strided subsample, and only the values between them are sorted."""
    channels = xhat.shape[1]
    t = torch.zeros(n_rows, channels, dtype=xhat.dtype)
    for k in range(n_rows):
        sel = (rows == k).nonzero().flatten()
        if sel.numel() == 0:
            continue
        v = xhat.index_select(0, sel).transpose(0, 1).reshape(channels, -1)
        n = v.shape[1]
        if n == 1:
            t[k] = v[:, 0] + torch.where(quantile[k] > 0.5, -0.5, 0.5)
            continue
        step = max(1, n // 2048)
        sub = v[:, ::step].sort(dim=1).values
        m = sub.shape[1]
        lo = ((quantile[k] - 0.1).clamp(0, 1) * (m - 1)).long().clamp(max=m - 2)
        hi = torch.maximum(((quantile[k] + 0.1).clamp(0, 1) * (m - 1)).long(), lo + 1)
        if step == 1:  # every value: the gaps between ranks lo .. hi
            gaps = sub[:, 1:] - sub[:, :-1]  # gap i lies between sub[i] and sub[i + 1]
            index = torch.arange(m - 1)
            inside = (index >= lo[:, None]) & (index < hi[:, None])
            best = torch.where(inside, gaps, -1.0).argmax(dim=1, keepdim=True)
            t[k] = 0.5 * (sub.gather(1, best) + sub.gather(1, best + 1)).squeeze(1)
            continue
        lo_v, hi_v = sub.gather(1, lo[:, None])[:, 0], sub.gather(1, hi[:, None])[:, 0]
        for c in range(channels):
            w = v[c][(v[c] >= lo_v[c]) & (v[c] <= hi_v[c])].sort().values
            i = int((w[1:] - w[:-1]).argmax())
            t[k, c] = 0.5 * (w[i] + w[i + 1])
    return t


def _clear(x: Tensor, xhat: Tensor, kinks: Tensor, rows: Tensor, std: Tensor, margin: float) -> Tensor:
    """x with the values whose xhat lies within ``margin`` of their row's kink moved to the
    nearer edge of that band (std: x units per xhat unit, per channel)."""
    d = xhat - kinks[rows][:, :, None, None]
    edge = torch.where(d < 0, -margin, margin)
    return torch.where(d.abs() < margin, x + (edge - d) * std[:, None, None], x)


def _std(x: Tensor, running_var: Tensor, training: bool, eps: float) -> Tensor:
    var = torch.var(x, dim=(0, 2, 3), correction=0) if training else running_var
    return torch.sqrt(var + eps)


def _genblock_cases():
    from mgm_fast.config import preset
    from mgm_fast.ops._selftest import Case, Inputs

    def make(b, cin, cout, h, w, classes, training=True):
        def build(gen):
            def r(*shape, scale=1.0, shift=0.0):
                return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

            def gamma(*shape):  # kept away from 0, so the gap around each kink stays open
                return 1.0 + 0.3 * torch.randn(*shape, generator=gen, dtype=torch.float64).clamp(-2, 2)

            eps = 1e-5
            x = r(b, cin, h, w, scale=1.5, shift=0.3)
            y = torch.randint(0, classes, (b,), generator=gen)
            gamma1, gamma2 = gamma(classes, cin), gamma(classes, cout)
            weight1, bias1 = r(cout, cin, 3, 3, scale=(9 * cin) ** -0.5), r(cout, scale=0.1)
            weight2, bias2 = r(cout, cout, 3, 3, scale=(9 * cout) ** -0.5), r(cout, scale=0.1)
            weight0, bias0 = r(cout, cin, 1, 1, scale=cin**-0.5), r(cout, scale=0.1)
            mean1, var1 = r(cin, scale=0.1), torch.rand(cin, generator=gen, dtype=torch.float64) + 0.5
            mean2, var2 = r(cout, scale=0.1), torch.rand(cout, generator=gen, dtype=torch.float64) + 0.5
            q1 = 0.2 + 0.6 * torch.rand(classes, cin, generator=gen, dtype=torch.float64)
            q2 = 0.2 + 0.6 * torch.rand(classes, cout, generator=gen, dtype=torch.float64)
            kinks1 = _kinks(_xhat(x, mean1, var1, training, eps), y, classes, q1)
            x = _clear(x, _xhat(x, mean1, var1, training, eps), kinks1, y, _std(x, var1, training, eps), _MARGIN)
            xhat1 = _xhat(x, mean1, var1, training, eps)
            beta1 = -gamma1 * kinks1
            act1 = torch.relu(gamma1[y][:, :, None, None] * (xhat1 + (beta1 / gamma1)[y][:, :, None, None]))
            hidden = up2_conv3x3(act1, weight1, bias1)  # the block's h, in float64
            beta2 = -gamma2 * _kinks(_xhat(hidden, mean2, var2, training, eps), y, classes, q2)
            kwargs = dict(
                x=x, y=y, embed1=torch.cat([gamma1, beta1], 1), weight1=weight1, bias1=bias1,
                embed2=torch.cat([gamma2, beta2], 1), weight2=weight2, bias2=bias2, weight0=weight0,
                bias0=bias0, running_mean1=mean1, running_var1=var1, running_mean2=mean2, running_var2=var2,
                num_batches_tracked1=torch.tensor(7), num_batches_tracked2=torch.tensor(7), training=training,
                momentum=0.001, eps=eps,
            )  # fmt: skip
            # In training, CBN2's batch statistics remove any per-channel constant, so d bias1 is
            # identically 0 and its computed value is rounding noise of the size of its summands,
            # which the rule's per-tensor floor (relative to the tensor's own, zero, scale) cannot
            # judge: it is compared in eval mode only. Channels_last models convert x and the conv
            # weights; the BN buffers stay float32.
            grad = _BLOCK_GRADS if not training else tuple(k for k in _BLOCK_GRADS if k != "bias1")
            return Inputs(kwargs=kwargs, grad=grad, channels_last=("x", "weight1", "weight2", "weight0"),
                          keep_float32=_BLOCK_STATS)  # fmt: skip

        return build

    classes = preset("paper").model.num_scenes
    specs = [
        ("b3 5->7 3x5, training", "small", (3, 5, 7, 3, 5, 4)),
        ("b1 6->3 4x7, training, one class", "small", (1, 6, 3, 4, 7, 1)),
        ("b2 17->9 5x3, eval (running statistics)", "small", (2, 17, 9, 5, 3, 5), False),
    ]
    specs += [(f"paper block{k}: b32 {cin}->{cout} {res}x{res}, training", "paper", (32, cin, cout, res, res, classes))
              for k, (cin, cout, res) in enumerate(_paper_blocks(), start=1)]  # fmt: skip
    return [Case("genblock", name, size, make(*dims, *rest)) for name, size, dims, *rest in specs]


def _piece_cases():
    from mgm_fast.config import preset
    from mgm_fast.ops._selftest import Case, Inputs

    def make(b, c, cout, h, w, *, upsample=True, residual=None, bias=True, training=True, momentum=0.001,
             bn_affine=False):  # fmt: skip
        def build(gen):
            def r(*shape, scale=1.0, shift=0.0):
                return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

            eps = 1e-5
            ho, wo = (2 * h, 2 * w) if upsample else (h, w)
            x = r(b, c, h, w, scale=1.2, shift=-0.2)
            rows = 1 if bn_affine else b  # the output head: one BatchNorm2d's affine row for the batch
            gamma = 1.0 + 0.3 * torch.randn(rows, c, generator=gen, dtype=torch.float64).clamp(-2, 2)
            q = 0.2 + 0.6 * torch.rand(rows, c, generator=gen, dtype=torch.float64)
            mean, var = r(c, scale=0.1), torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
            row_of = torch.zeros(b, dtype=torch.int64) if bn_affine else torch.arange(b)
            kinks = _kinks(_xhat(x, mean, var, training, eps), row_of, rows, q)
            x = _clear(x, _xhat(x, mean, var, training, eps), kinks, row_of, _std(x, var, training, eps), _MARGIN)
            beta = -gamma * kinks
            kwargs = dict(
                x=x,
                gamma=gamma.expand(b, c).clone(),
                beta=beta.expand(b, c).clone(),
                weight=r(cout, c, 3, 3, scale=(9 * c) ** -0.5),
                bias=r(cout, scale=0.1) if bias else None,
                running_mean=mean,
                running_var=var,
                num_batches_tracked=torch.tensor(3),
                residual=None if residual is None else r(b, cout, *((ho, wo) if residual == "full" else (ho // 2, wo // 2))),
                training=training,
                momentum=momentum,
                eps=eps,
                upsample=upsample,
            )  # fmt: skip
            grad = tuple(k for k in ("x", "gamma", "beta", "weight", "bias", "residual") if kwargs[k] is not None)
            return Inputs(kwargs=kwargs, grad=grad, channels_last=("x", "weight", "residual"),
                          keep_float32=("running_mean", "running_var"))  # fmt: skip

        return build

    cfg = preset("paper").model
    head = cfg.g_mults[-1] * cfg.g_conv_dim
    specs = [
        ("b3 5->7 3x5, up2, no residual (a GenBlock's first conv)", "small", (3, 5, 7, 3, 5), {}),
        ("b2 7->5 6x4, no up2, half-resolution residual (a GenBlock's second conv)", "small", (2, 7, 5, 6, 4),
         dict(upsample=False, residual="half")),
        ("b1 6->3 4x7, up2, full residual, no bias", "small", (1, 6, 3, 4, 7),
         dict(residual="full", bias=False)),
        ("b2 9->3 6x5, output head (BN affine rows, momentum 1e-4), eval", "small", (2, 9, 3, 6, 5),
         dict(upsample=False, training=False, momentum=1e-4, bn_affine=True)),
        (f"paper output head: b32 {head}->3 {cfg.image_size}x{cfg.image_size}, BN affine rows, momentum 1e-4, "
         "training", "paper", (32, head, 3, cfg.image_size, cfg.image_size),
         dict(upsample=False, momentum=1e-4, bn_affine=True)),
    ]  # fmt: skip
    return [Case("cbn_relu_conv3x3", name, size, make(*dims, **opts)) for name, size, dims, opts in specs]


OP.selftest_cases = _genblock_cases
PIECE_OP.selftest_cases = _piece_cases
