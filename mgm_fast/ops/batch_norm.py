"""Training-mode batch normalisation of (N, C, H, W) activations, optionally plus a residual and
followed by ReLU, with fused CPU kernels for channels_last inputs.

``batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps, relu=False,
residual=None, *, impl)`` returns ``(input - mean) / sqrt(var + eps) * weight + bias`` with the
batch's per-channel mean and biased variance (plus ``residual``, then ``max(., 0)`` with
``relu``: a ResNet block's ``relu(bn(x) + shortcut)``), and updates
``running_mean`` / ``running_var`` in place with the unbiased variance and ``momentum``
(``nn.BatchNorm2d`` in training mode, then ``F.relu``).

Shapes and dtypes: ``input`` (N, C, H, W) floating, any dense layout; ``weight``, ``bias`` (C,)
or None (no affine transform); ``running_mean``, ``running_var`` (C,) buffers; ``residual`` shaped
like ``input`` or None. The output has the input's shape, dtype and memory format.

Backends (``impl=``):

* ``reference`` -- ``aten._batch_norm_with_update`` (the op ``F.batch_norm`` runs in training),
  ``+ residual`` and ``F.relu``, with torch's autograd: any device, dtype and layout.
* ``cpp`` -- float32 channels_last CPU inputs: csrc/kernels/cpu/batch_norm.*, forward (mean, then
  the sum of squared deviations, then the normalisation with the residual and the ReLU in the
  same pass; the running statistics updated in the kernel) and backward (ReLU's mask applied
  while reading the gradient, which is also the residual's). Eagerly, forward and backward are
  one C++ autograd node of the extension: no Python and no dispatched ATen op in the backward, and
  no separate add or ReLU op either way. Traced by ``torch.compile``, an ``autograd.Function``
  around the custom ops ``mgm_fast::batch_norm_cpp`` and ``mgm_fast::batch_norm_backward_cpp``.
  Torch's channels_last CPU backward walks one row of C floats at a time, which is slow at few
  channels that are not a multiple of a vector (C = 8 or 24 at the tiny preset; measured in
  benchmarks/test_bench_batch_norm.py). The kernels walk the (N*H*W, C) matrix in tiles of
  lcm(C, 16) floats whose lanes have a fixed channel, and their sums do not depend on the thread
  count. Results differ from torch's by float32 rounding (the self-tests hold them to the
  2x-error rule). Once differentiable.

``auto`` takes ``cpp`` for the inputs it supports when the extension is built, ``reference``
otherwise (NCHW, other dtypes, GPUs: their kernels have no such problem). The networks'
BatchNorm layers call the op in eager training steps (:class:`mgm_fast.models.layers.BatchNorm2d`
with ``ModelConfig.batch_norm_impl``; ``relu=True`` where the network applies a ReLU next, and
the shortcut as ``residual`` at a BasicBlock's end); compiled networks keep ``nn.BatchNorm2d``,
the add and ``F.relu``, which inductor fuses itself.

Argument errors are ``ValueError`` naming the tensor: a 4-d floating input, (C,) weight, bias and
running statistics, a residual shaped like the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mgm_fast.ops._dispatch import (
    ANY_DEVICE,
    Inputs,
    cpp_backend,
    define_op,
    native_function,
    reference_backend,
)
from mgm_fast.ops._library import once_differentiable, or_placeholder, placeholder, qualname
from mgm_fast.ops._selftest import Case
from mgm_fast.ops._selftest import Inputs as CaseInputs

__all__ = ["OP", "batch_norm_reference", "batch_norm_train"]

_NAME = "batch_norm"
_WITH_UPDATE = torch.ops.aten._batch_norm_with_update.default


def batch_norm_reference(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
                         running_var: Tensor, momentum: float, eps: float, relu: bool = False,
                         residual: Tensor | None = None) -> Tensor:  # fmt: skip
    """The op's plain-PyTorch twin: ``aten._batch_norm_with_update`` (what ``F.batch_norm`` runs
    in training mode), ``+ residual``, then ``F.relu`` with ``relu``, differentiable by torch's
    autograd. Without an affine transform it passes a weight of ones and a bias of zeros (the same
    values): torch 2.13's CPU backward of the op raises without a weight."""
    if weight is None:
        weight = torch.ones(input.shape[1], dtype=input.dtype, device=input.device)
    if bias is None:
        bias = torch.zeros(input.shape[1], dtype=input.dtype, device=input.device)
    out = _WITH_UPDATE(input, weight, bias, running_mean, running_var, momentum, eps)[0]
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


# ---------------------------------------------------------------------------------------------
# cpp: one C++ autograd node eagerly; traced, the custom ops mgm_fast::batch_norm_cpp (forward,
# updates the running statistics) and mgm_fast::batch_norm_backward_cpp in an autograd.Function


@torch.library.custom_op(qualname("batch_norm_cpp"), mutates_args=("running_mean", "running_var"))
def _cpp_forward_op(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
                    running_var: Tensor, momentum: float, eps: float, relu: bool,
                    residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(out (channels_last), batch mean, invstd); the running statistics are updated in place."""
    return native_function("batch_norm_forward_channels_last_{device}", "cpu")(
        input, weight, bias, running_mean, running_var, momentum, eps, relu, residual)


@_cpp_forward_op.register_fake
def _(input, weight, bias, running_mean, running_var, momentum, eps, relu, residual):
    c = input.shape[1]
    return torch.empty_like(input, memory_format=torch.channels_last), input.new_empty(c), input.new_empty(c)


@torch.library.custom_op(qualname("batch_norm_backward_cpp"), mutates_args=())
def _cpp_backward_op(grad_out: Tensor, input: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
                     relu_out: Tensor | None, need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(grad input (channels_last), grad weight, grad bias, grad residual (channels_last)); a
    placeholder where ``need`` is false. With ``relu_out`` (the forward's output) the gradient
    passes the ReLU first."""
    grads = native_function("batch_norm_backward_channels_last_{device}", "cpu")(
        grad_out, input, weight, mean, invstd, relu_out, list(need))
    return tuple(or_placeholder(d, like) for d, like in zip(grads, (input, mean, mean, input)))


@_cpp_backward_op.register_fake
def _(grad_out, input, weight, mean, invstd, relu_out, need):
    def like_input(n):
        return torch.empty_like(input, memory_format=torch.channels_last) if n else placeholder(input)

    return (like_input(need[0]), *(mean.new_empty(mean.shape) if n else placeholder(mean) for n in need[1:3]),
            like_input(need[3]))


once_differentiable(_cpp_backward_op, "batch_norm (cpp backend)")


class _BatchNormCpp(torch.autograd.Function):
    """The traced form of the cpp backend: the custom ops with Python autograd."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, relu, residual):
        out, mean, invstd = _cpp_forward_op(input, weight, bias, running_mean, running_var, momentum, eps, relu,
                                            residual)  # fmt: skip
        ctx.save_for_backward(input, weight, mean, invstd, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mean, invstd, relu_out = ctx.saved_tensors
        need = [bool(n) for n in ctx.needs_input_grad[:3]] + [bool(ctx.needs_input_grad[8])]
        if weight is None:
            need[1] = False
        grads = _cpp_backward_op(grad_out, input, weight, mean, invstd, relu_out, need)
        grad_input, grad_weight, grad_bias, grad_residual = (d if n else None for d, n in zip(grads, need))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, grad_residual


def _cpp(input, weight, bias, running_mean, running_var, momentum, eps, relu=False, residual=None):
    momentum, eps, relu = float(momentum), float(eps), bool(relu)
    if torch.compiler.is_compiling():
        return _BatchNormCpp.apply(input, weight, bias, running_mean, running_var, momentum, eps, relu, residual)
    # eager: one C++ autograd node (no Python in the backward; ~20-40 us less per call)
    return native_function("batch_norm_channels_last_{device}", "cpu")(
        input, weight, bias, running_mean, running_var, momentum, eps, relu, residual)


def _cpp_reasons(inputs: Inputs) -> list[str]:
    x = inputs["input"]
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return ["input must be a channels_last (N, C, H, W) tensor (torch's NCHW backward is fast)"]
    return []


# ---------------------------------------------------------------------------------------------
# dispatch


def _check(input, weight, bias, running_mean, running_var, momentum, eps, relu=False, residual=None) -> None:
    """Argument errors naming the tensor (shapes and dtypes only: nothing is read on the host)."""
    if input.dim() != 4 or not input.is_floating_point():
        raise ValueError(f"batch_norm: input must be a floating (N, C, H, W) tensor, got {input.dtype} "
                         f"{tuple(input.shape)}")  # fmt: skip
    c = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):  # fmt: skip
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"batch_norm: {name} must be ({c},) for an input of {c} channels, got {tuple(t.shape)}")
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: running_mean and running_var are required (training mode updates them)")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"batch_norm: residual must be shaped like the input {tuple(input.shape)}, got "
                         f"{tuple(residual.shape)}")  # fmt: skip


def _tensor_key(t: Tensor | None):
    return None if t is None else (t.shape, t.dtype, t.device)


def _selection_key(input, weight, bias, running_mean, running_var, momentum, eps, relu=False, residual=None):
    """What the argument check and the backends' checks read from a call: every tensor's shape,
    dtype and device, and the input's layout (FusedOp.selection_key)."""
    return (_tensor_key(input), input.is_contiguous(memory_format=torch.channels_last), _tensor_key(weight),
            _tensor_key(bias), _tensor_key(running_mean), _tensor_key(running_var), _tensor_key(residual))  # fmt: skip


OP = define_op(_NAME, "training-mode batch norm (+ residual, ReLU); channels_last CPU kernels", [
    reference_backend(batch_norm_reference, devices=ANY_DEVICE),
    cpp_backend(_cpp, extra_check=_cpp_reasons),
], priority=("cpp", "reference"), selection_key=_selection_key, check=_check)  # fmt: skip


def batch_norm_train(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
                     running_var: Tensor, momentum: float, eps: float, relu: bool = False,
                     residual: Tensor | None = None, *, impl: str = "auto") -> Tensor:  # fmt: skip
    """Training-mode batch norm of ``input``, plus ``residual``, then ReLU with ``relu`` (see the
    module docstring).

    Args:
        input: (N, C, H, W) floating, any dense layout; gradients flow into it.
        weight, bias: (C,) or None.
        running_mean, running_var: (C,) buffers, updated in place.
        momentum: the running averages' factor; eps: added to the variance.
        relu: apply ``max(., 0)`` to the result (fused into the cpp kernels).
        residual: a tensor shaped like ``input`` added before the ReLU, or None; gradients flow
            into it.
        impl: "auto" | "reference" | "cpp".
    """
    return OP(input, weight, bias, running_mean, running_var, momentum, eps, relu, residual, impl=impl)  # OP checks


# ---------------------------------------------------------------------------------------------
# self-test cases (mgm_fast.ops._selftest)


def _case(name: str, size: str, shape: tuple[int, int, int, int], affine: bool = True, relu: bool = False,
          residual: bool = False) -> Case:
    c = shape[1]

    def build(gen: torch.Generator) -> CaseInputs:
        shift = 3.0 * torch.randn(1, c, 1, 1, generator=gen, dtype=torch.float64)
        x = shift + (0.5 + torch.rand(1, c, 1, 1, generator=gen, dtype=torch.float64)) * torch.randn(
            shape, generator=gen, dtype=torch.float64)
        weight = torch.randn(c, generator=gen, dtype=torch.float64) if affine else None
        bias = torch.randn(c, generator=gen, dtype=torch.float64) if affine else None
        running = (torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64))
        shortcut = torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None
        grad = ((0, 1, 2) if affine else (0,)) + ((8,) if residual else ())
        return CaseInputs(args=(x, weight, bias, *running, 0.1, 1e-5, relu, shortcut), grad=grad,
                          channels_last=(0, 8) if residual else (0,))  # fmt: skip

    return Case(_NAME, name, size, build)


def _selftest_cases() -> list[Case]:
    return [
        _case("b3 c8 9x11 + relu", "small", (3, 8, 9, 11), relu=True),
        _case("b2 c24 5x7 + residual + relu", "small", (2, 24, 5, 7), relu=True, residual=True),
        _case("b2 c5 6x6 no affine, no relu", "small", (2, 5, 6, 6), affine=False),
        _case("tiny decoder b8 c8 64x64 + relu", "small", (8, 8, 64, 64), relu=True),
        _case("paper encoder b32 c64 64x64 + relu", "paper", (32, 64, 64, 64), relu=True),
    ]


OP.selftest_cases = _selftest_cases
