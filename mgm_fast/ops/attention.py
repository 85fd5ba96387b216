"""Fused SAGAN/BigGAN self-attention core: scores, softmax and the weighted sum of the values,
forward and backward, without storing the attention map.

``sagan_attention(theta, phi, g, *, impl="auto")`` with, for batch size B, N query positions
(H*W), M key positions (N/4 in the model: 2x2 max-pooled) and channel counts dq, dv:

* ``theta`` (B, dq, N) -- the queries (one column per position),
* ``phi`` (B, dq, M) -- the keys,
* ``g`` (B, dv, M) -- the values,

returns ``out`` (B, dv, N), the core of :class:`mgm_fast.models.layers.SelfAttention`::

    attn = softmax(theta^T phi, dim=-1)      # (B, N, M), NO 1/sqrt(dq) scaling
    out  = g @ attn^T                          # (B, dv, N)

Backends (``impl=``):

* ``reference`` -- exactly the two lines of ``SelfAttention.forward``
  (:func:`sagan_attention_reference`), differentiable by autograd, any device and float dtype;
  it materialises the (B, N, M) map, its softmax and (in backward) their gradients.
* ``cpp`` -- CPU (csrc/kernels/cpu/sagan_attention.*), flash-attention style: OpenMP over
  blocks of 16 queries (one AVX-512 vector of lanes); a block's scores against all M keys live
  in a per-thread buffer (M x 16 floats), then max, exponentials, the weighted sum of the values
  and the normalisation. Saves for backward only the inputs, the output and the per-query
  logsumexp (B, N) float32, never a (B, N, M) tensor. Backward recomputes the scores in two
  passes (query blocks for grad theta; key blocks against all queries for grad phi and grad g),
  so every gradient element is written by one thread in a fixed order: bit-identical results
  for any ``torch.set_num_threads``. float32; once differentiable (no double backward).
  Non-contiguous inputs (e.g. the (B, dq, H*W) view of a channels_last conv output) are copied
  to contiguous ones.

``auto`` takes ``cpp`` for CPU tensors when the extension is built (``cpp`` supports the
inputs) and ``reference`` otherwise: float64 / float16 / bfloat16 CPU inputs outside autocast,
and every CUDA tensor (there is no fused CUDA kernel yet; ``scaled_dot_product_attention`` with
``scale=1.0`` would compute the same function but its fused GPU kernels were not verified here,
so it is not wired in).

CPU autocast (``torch.is_autocast_enabled("cpu")``): the reference runs both bmm and the softmax
in the autocast dtype and returns that dtype (bfloat16 / float16). The ``cpp`` backend instead
casts theta, phi, g (whatever their float dtype) to float32, computes in float32 and returns
**float32** (like ``torch.amp.custom_fwd(cast_inputs=torch.float32)``); gradients flow back to
the inputs in their own dtypes. ``auto`` takes ``cpp`` under CPU autocast too: against float64
its output error is ~1e-6 where the bfloat16 reference's is ~4e-2 (tiny-preset sizes), it is
~3x faster than the bfloat16 reference at the tiny preset's size and on par at B=32, dq=16,
dv=64 (2-core AMD EPYC, bfloat16 autocast), and the model's next op (a 1x1 conv under autocast)
casts its input to the autocast dtype anyway. Force ``impl="reference"`` to get the released
bfloat16 behaviour.

``torch.compile``: the cpp kernels run behind the custom ops ``mgm_fast::sagan_attention_cpp``
(forward, with its autograd formula) and ``mgm_fast::sagan_attention_cpp_backward``
(:mod:`mgm_fast.ops._library`), and ``auto``'s choice is trace-safe, so a compiled network traces
through the op without a graph break.

Argument errors (every backend) are ``ValueError`` naming the tensor: 3-d floating tensors,
theta / phi / g agreeing in B, theta / phi in dq, phi / g in M, M >= 1, one device, one dtype
(outside autocast). A forced backend that cannot run raises
:class:`~mgm_fast.ops.BackendUnavailable` with the reasons (never a silent fall back).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mgm_fast.ops._dispatch import (
    ANY_DEVICE,
    Inputs,
    cpp_backend,
    define_op,
    native_function,
    reference_backend,
)
from mgm_fast.ops._library import autocast_off, once_differentiable, or_placeholder, placeholder, qualname

__all__ = ["OP", "sagan_attention", "sagan_attention_reference"]

_NAME = "sagan_attention"
_LAYOUTS = {"theta": "(B, dq, N)", "phi": "(B, dq, M)", "g": "(B, dv, M)"}


# ---------------------------------------------------------------------------------------------
# argument checks (every backend)


def _autocast_on(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def _check(theta, phi, g) -> None:
    tensors = {"theta": theta, "phi": phi, "g": g}
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{_NAME}: {name} must be a 3-d {_LAYOUTS[name]} floating tensor, got {got}")
    for name in ("phi", "g"):
        if tensors[name].device != theta.device:
            raise ValueError(f"{_NAME}: {name} is on {tensors[name].device} but theta on {theta.device}")
    b, dq, _ = theta.shape
    if phi.shape[0] != b or g.shape[0] != b:
        raise ValueError(f"{_NAME}: theta {tuple(theta.shape)}, phi {tuple(phi.shape)} and g "
                         f"{tuple(g.shape)} differ in the batch size (dim 0)")  # fmt: skip
    if phi.shape[1] != dq:
        raise ValueError(f"{_NAME}: theta {tuple(theta.shape)} and phi {tuple(phi.shape)} differ in dq (dim 1)")
    if g.shape[2] != phi.shape[2]:
        raise ValueError(f"{_NAME}: phi {tuple(phi.shape)} and g {tuple(g.shape)} differ in M (dim 2)")
    if phi.shape[2] < 1:
        raise ValueError(f"{_NAME}: phi must have at least one key position (M >= 1), got {tuple(phi.shape)}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1 and not _autocast_on(theta.device):
        raise ValueError(f"{_NAME}: theta, phi and g must share one dtype (outside autocast), got "
                         f"{theta.dtype}, {phi.dtype}, {g.dtype}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# reference


def sagan_attention_reference(theta: Tensor, phi: Tensor, g: Tensor) -> Tensor:
    """The plain-PyTorch twin: theta (B, dq, N), phi (B, dq, M), g (B, dv, M) -> (B, dv, N),
    exactly ``SelfAttention.forward``'s two lines (input dtype; under autocast its dtype)."""
    _check(theta, phi, g)
    attn = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)
    return torch.bmm(g, attn.transpose(1, 2))


# ---------------------------------------------------------------------------------------------
# cpp: custom ops mgm_fast::sagan_attention_cpp (forward, with its autograd formula) and
# mgm_fast::sagan_attention_cpp_backward, around the extension's kernels (mgm_fast.ops._library)


@torch.library.custom_op(qualname("sagan_attention_cpp"), mutates_args=())
def _cpp_forward_op(theta: Tensor, phi: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(out (B, dv, N), per-query logsumexp (B, N)), float32 and contiguous."""
    with autocast_off(theta):
        out, lse = native_function("sagan_attention_{device}_forward", "cpu")(theta, phi, g)
    return out, lse


@_cpp_forward_op.register_fake
def _(theta, phi, g):
    b, _, n = theta.shape
    return theta.new_empty((b, g.shape[1], n)), theta.new_empty((b, n))


@torch.library.custom_op(qualname("sagan_attention_cpp_backward"), mutates_args=())
def _cpp_backward_op(
    theta: Tensor, phi: Tensor, g: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, need: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad theta, grad phi, grad g), contiguous; a placeholder where ``need`` is false."""
    with autocast_off(theta):
        kernel = native_function("sagan_attention_{device}_backward", "cpu")
        grads = kernel(theta, phi, g, out, lse, grad_out, list(need))
    return tuple(or_placeholder(d, like) for d, like in zip(grads, (theta, phi, g)))


@_cpp_backward_op.register_fake
def _(theta, phi, g, out, lse, grad_out, need):
    return tuple(like.new_empty(like.shape) if n else placeholder(like) for like, n in zip((theta, phi, g), need))


def _cpp_setup_context(ctx, inputs, output):
    out, lse = output
    ctx.save_for_backward(*inputs, out, lse)
    ctx.mark_non_differentiable(lse)


def _cpp_backward(ctx, grad_out, _grad_lse):
    theta, phi, g, out, lse = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = _cpp_backward_op(theta, phi, g, out, lse, grad_out, need)
    return tuple(d if n else None for d, n in zip(grads, need))


_cpp_forward_op.register_autograd(_cpp_backward, setup_context=_cpp_setup_context)
once_differentiable(_cpp_backward_op, "sagan_attention (cpp backend)")


def _cpp(theta: Tensor, phi: Tensor, g: Tensor) -> Tensor:
    _check(theta, phi, g)
    if torch.is_autocast_enabled("cpu"):  # documented: float32 compute and result under autocast
        theta, phi, g = theta.float(), phi.float(), g.float()
    return _cpp_forward_op(theta, phi, g)[0]


# ---------------------------------------------------------------------------------------------
# dispatch


def _cpp_reasons(inputs: Inputs) -> list[str]:
    """Input conditions of the cpp backend beyond device and the dtypes it may see: float32,
    or any of float32 / bfloat16 / float16 under CPU autocast (cast to float32 first)."""
    if torch.is_autocast_enabled("cpu"):
        return []
    other = [t.dtype for t in inputs.tensors if t.is_floating_point() and t.dtype != torch.float32]
    return [f"dtype {other[0]} not supported outside CPU autocast (float32 only)"] if other else []


OP = define_op(
    _NAME,
    "SAGAN self-attention core g softmax(theta^T phi)^T, fused forward and backward",
    [
        reference_backend(sagan_attention_reference, devices=(*ANY_DEVICE, "meta")),
        cpp_backend(_cpp, dtypes=(torch.float32, torch.bfloat16, torch.float16), extra_check=_cpp_reasons),
    ],
    priority=("cpp", "reference"),
)


def sagan_attention(theta: Tensor, phi: Tensor, g: Tensor, *, impl: str = "auto") -> Tensor:
    """SAGAN self-attention core: theta (B, dq, N), phi (B, dq, M), g (B, dv, M), one float
    dtype -> (B, dv, N) = ``g @ softmax(theta^T phi, -1)^T``, differentiable w.r.t. all three.

    The result has the inputs' dtype, except under CPU autocast: the reference returns the
    autocast dtype and ``cpp`` (auto's choice there) float32. See the module docstring for the
    backends and ``auto``'s choice.
    """
    return OP(theta, phi, g, impl=impl)


# ---------------------------------------------------------------------------------------------
# self-test cases (mgm_fast.ops._selftest)


def _selftest_cases():
    from mgm_fast.ops._selftest import Case, Inputs

    def make(b, dq, dv, n, m, scale):
        def build(gen):
            theta = torch.randn(b, dq, n, generator=gen, dtype=torch.float64) * scale
            phi = torch.randn(b, dq, m, generator=gen, dtype=torch.float64) * scale
            g = torch.randn(b, dv, m, generator=gen, dtype=torch.float64)
            return Inputs(args=(theta, phi, g), grad=(0, 1, 2))

        return build

    shapes = [  # name, size, (B, dq, dv, N, M), score scale
        ("b3 dq1 dv5 N37 M9", "small", (3, 1, 5, 37, 9), 1.0),
        ("b1 dq3 dv7 N20 M5, scores ~ +-30", "small", (1, 3, 7, 20, 5), 3.0),
        ("generator: b32 dq16 dv64 N1024 M256", "paper", (32, 16, 64, 1024, 256), 1.0),
        ("discriminator: b32 dq32 dv128 N1024 M256", "paper", (32, 32, 128, 1024, 256), 1.0),
    ]
    return [Case(_NAME, name, size, make(*dims, scale)) for name, size, dims, scale in shapes]


OP.selftest_cases = _selftest_cases
