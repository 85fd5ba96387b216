"""Plain 2-d convolution (groups 1, dilation 1) with the algorithm chosen per shape on the CPU.

``conv2d(input, weight, bias, stride, padding, *, impl)`` is ``F.conv2d(input, weight, bias,
stride, padding)``.

Shapes and dtypes: ``input`` (N, C, H, W) floating; ``weight`` (Cout, C, kh, kw); ``bias`` (Cout,)
or None; ``stride`` and ``padding`` an int or a pair (height, width). The output is
(N, Cout, Ho, Wo) with ``Ho = (H + 2 ph - kh) // sh + 1`` (likewise Wo), in the input's dtype.

Backends (``impl=``):

* ``reference`` -- ``F.conv2d`` with torch's autograd (oneDNN for float32 on the CPU, cuDNN on
  CUDA): any device, dtype and layout.
* ``cpp`` -- float32 CPU input and weight, both channels_last (csrc/bindings/conv2d.cpp): the same
  convolution by one of two ATen algorithms, oneDNN (``conv``: torch's own choice) or im2col + GEMM
  (``gemm``: ``aten._slow_conv2d_forward`` / ``_slow_conv2d_backward``), picked per shape by a cost
  model fitted to timings of both (deterministic: every process, rank and machine picks the same).
  oneDNN pays about 200 us per forward + backward before any arithmetic, which on the tiny preset's
  small maps and narrow layers is more than the whole GEMM path; on large maps oneDNN is up to 5x
  faster. Both compute the same sums, so results differ by float32 rounding (the self-tests hold
  them to the 2x-error rule). ``MGM_FAST_CONV2D_ALGO=conv|gemm`` forces one algorithm;
  ``MGM_FAST_CONV2D_ALGO=timed`` times both once per shape instead (process-wide cache; what the
  model is fitted to). The extension names the algorithm of a call and the op runs it as ATen's
  own op, with ATen's autograd: no extra autograd node, nothing of the op in the backward. Traced
  by ``torch.compile``, the op asks the extension for the algorithm of stand-in tensors of the
  call's shapes while it traces (a constant of the graph: the same choice as an eager call of
  those shapes) and the graph holds that ATen op, which AOTAutograd differentiates and inductor
  calls like any other. (Custom ops around the extension, forward and backward, were slower: with
  them, and BatchNorm's, in the compiled networks a tiny MGM step took 499 instead of 436 ms on a
  2-core Xeon, in an ad-hoc interleaved A/B within one process (docs/ops.md), their Python
  dispatch costing more than the algorithms save.)

``auto`` takes ``cpp`` for the inputs it supports when the extension is built, ``reference``
otherwise (NCHW, other dtypes, GPUs, where cuDNN has its own per-shape choice:
``cudnn.benchmark``). The networks' convolutions call the op through
:class:`mgm_fast.models.layers.Conv2d` and :class:`~mgm_fast.models.layers.SNConv2d` with
``ModelConfig.conv_impl``. Checkpoints record the timed choices (:func:`chosen_algorithms`) and a
resumed run takes them back (:func:`restore_algorithms`), so a timed run computes with the
algorithms of the run it continues.

Argument errors are ``ValueError`` naming the tensor: a 4-d floating input, a (Cout, C, kh, kw)
weight matching the input's channels, a (Cout,) bias, a kernel no larger than the padded input.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from mgm_fast import _native
from mgm_fast.ops._dispatch import (
    ANY_DEVICE,
    Inputs,
    cpp_backend,
    define_op,
    native_function,
    reference_backend,
)
from mgm_fast.ops._selftest import Case
from mgm_fast.ops._selftest import Inputs as CaseInputs

__all__ = ["GEMM_BACKWARD_CACHE_TAG", "OP", "chosen_algorithms", "conv2d", "conv2d_reference", "restore_algorithms"]

_NAME = "conv2d"


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if type(v) is tuple and len(v) == 2:  # a layer's stride and padding: nothing to convert
        return v
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ValueError(f"conv2d: stride and padding must be an int or a pair, got {v!r}")
    return (int(v[0]), int(v[1]))


def conv2d_reference(input: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int] = (1, 1),
                     padding: tuple[int, int] = (0, 0)) -> Tensor:  # fmt: skip
    """The op's plain-PyTorch twin: ``F.conv2d`` with torch's autograd."""
    return F.conv2d(input, weight, bias, stride, padding)


# ---------------------------------------------------------------------------------------------
# cpp: the algorithm from the extension, run as ATen's op (eagerly and in traced graphs)

_GEMM = 1
"""The extension's number of the im2col + GEMM algorithm (0 is oneDNN's, ATen's convolution)."""
_SLOW_CONV2D = torch.ops.aten._slow_conv2d_forward.default


@functools.cache
def _algo_of_call():
    """The extension's ``conv2d_algo_cpu``, looked up once (an op called hundreds of times a step)."""
    return native_function("conv2d_algo_{device}", "cpu")


@torch.compiler.assume_constant_result
def _traced_algo(input_shape: tuple[int, ...], weight_shape: tuple[int, ...], bias: bool, stride: tuple[int, int],
                 padding: tuple[int, int]) -> int:  # fmt: skip
    """The algorithm the extension picks for a call of these shapes, asked with zero-filled
    channels_last float32 stand-ins (what the cpp backend takes; the cost model reads shapes only,
    and ``MGM_FAST_CONV2D_ALGO=timed`` times the shape once per process, as an eager call would).
    Run eagerly while dynamo traces: its result is a constant of the graph."""
    input = torch.zeros(input_shape).contiguous(memory_format=torch.channels_last)
    weight = torch.zeros(weight_shape).contiguous(memory_format=torch.channels_last)
    algo = int(_algo_of_call()(input, weight, torch.zeros(weight_shape[0]) if bias else None, stride, padding))
    if algo == _GEMM:
        _keep_gemm_backward_layout_in_inductor()
    return algo


@functools.cache
def _keep_gemm_backward_layout_in_inductor() -> None:
    """Lets inductor call ``aten._slow_conv2d_backward`` with the strides its arguments have in the
    traced graph (channels_last here), as an eager backward does. Without a lowering of its own,
    an ATen op in a backward graph gets inductor's conservative implicit fallback, which copies
    every argument to NCHW first (and the gradients back): on the tiny MGM step that made the
    compiled GEMM backward about 1.5-2x slower than the eager one, 10 ms of a 265 ms step (2-core
    Xeon, interleaved A/B within one process; docs/ops.md). The kernel takes any strides -- the
    eager op gives it channels_last tensors -- so the registered fallback keeps the traced ones.
    Runs once, while the first graph holding a GEMM convolution is traced, before inductor lowers
    its backward. Torch's compile caches do not key on lowerings, so the registration also adds
    :data:`GEMM_BACKWARD_CACHE_TAG` to ``torch.compiler.config.cache_key_tag`` (keeping any tag
    already set): a graph cached with the copies, by an earlier version or a process without this
    registration, is not served."""
    from torch._inductor import lowering

    op = torch.ops.aten._slow_conv2d_backward.output_mask
    if op not in lowering.lowerings:
        lowering.make_fallback(op, layout_constraint=lowering.constrain_to_fx_strides)
    tag = torch.compiler.config.cache_key_tag
    if GEMM_BACKWARD_CACHE_TAG not in tag.split(";"):
        torch.compiler.config.cache_key_tag = f"{tag};{GEMM_BACKWARD_CACHE_TAG}" if tag else GEMM_BACKWARD_CACHE_TAG


GEMM_BACKWARD_CACHE_TAG = "mgm_fast:slow_conv2d_backward-traced-strides"
"""Part of torch's compile-cache keys once a compiled graph holds a GEMM convolution."""


def _cpp(input, weight, bias, stride=(1, 1), padding=(0, 0)):
    stride, padding = _pair(stride), _pair(padding)
    if torch.compiler.is_compiling():
        algo = _traced_algo(tuple(input.shape), tuple(weight.shape), bias is not None, stride, padding)
    else:
        algo = _algo_of_call()(input, weight, bias, stride, padding)
    if algo == _GEMM:
        return _SLOW_CONV2D(input, weight, weight.shape[2:], bias, stride, padding)
    return F.conv2d(input, weight, bias, stride, padding)


def _cpp_reasons(inputs: Inputs) -> list[str]:
    if not inputs["input"].is_contiguous(memory_format=torch.channels_last):
        return ["input must be channels_last (the algorithms are timed for that layout)"]
    if not inputs["weight"].is_contiguous(memory_format=torch.channels_last):
        return ["weight must be channels_last like the input (ATen's im2col + GEMM backward needs one layout)"]
    return []


# ---------------------------------------------------------------------------------------------
# dispatch


def _check(input: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
           padding: tuple[int, int]) -> None:  # fmt: skip
    """Argument errors naming the tensor (shapes and dtypes only: nothing is read on the host)."""
    if input.dim() != 4 or not input.is_floating_point():
        raise ValueError(f"conv2d: input must be a floating (N, C, H, W) tensor, got {input.dtype} "
                         f"{tuple(input.shape)}")  # fmt: skip
    if weight.dim() != 4 or weight.shape[1] != input.shape[1]:
        raise ValueError(f"conv2d: weight must be (Cout, {input.shape[1]}, kh, kw) for an input of "
                         f"{input.shape[1]} channels, got {tuple(weight.shape)}")  # fmt: skip
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv2d: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"conv2d: stride must be positive and padding non-negative, got {stride} and {padding}")
    for d in range(2):
        if input.shape[2 + d] + 2 * padding[d] < weight.shape[2 + d]:
            raise ValueError(f"conv2d: the padded input {tuple(input.shape)} (padding {padding}) is smaller than "
                             f"the kernel {tuple(weight.shape)}")  # fmt: skip


def _selection_key(input, weight, bias, stride=(1, 1), padding=(0, 0)):
    """What the argument check and the backends' checks read from a call: shapes, stride,
    padding, devices, dtypes and the layouts."""
    return (input.shape, weight.shape, None if bias is None else (bias.shape, bias.dtype), stride, padding,
            input.device, weight.device, input.dtype, weight.dtype,
            input.is_contiguous(memory_format=torch.channels_last),
            weight.is_contiguous(memory_format=torch.channels_last))  # fmt: skip


OP = define_op(_NAME, "2-d convolution; CPU: oneDNN or im2col + GEMM per shape", [
    reference_backend(conv2d_reference, devices=ANY_DEVICE),
    cpp_backend(_cpp, extra_check=_cpp_reasons),
], priority=("cpp", "reference"), selection_key=_selection_key, check=_check)  # fmt: skip


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None, stride: int | tuple[int, int] = 1,
           padding: int | tuple[int, int] = 0, *, impl: str = "auto") -> Tensor:  # fmt: skip
    """``F.conv2d(input, weight, bias, stride, padding)`` (groups 1, dilation 1; see the module
    docstring).

    Args:
        input: (N, C, H, W) floating; gradients flow into it.
        weight: (Cout, C, kh, kw); bias: (Cout,) or None.
        stride, padding: an int or a (height, width) pair.
        impl: "auto" | "reference" | "cpp".
    """
    return OP(input, weight, bias, _pair(stride), _pair(padding), impl=impl)  # OP runs _check


# ---------------------------------------------------------------------------------------------
# the cpp backend's algorithms per shape, on record


def chosen_algorithms() -> list[list]:
    """The algorithms the cpp backend timed (``MGM_FAST_CONV2D_ALGO=timed``) or was given so far in
    this process, one row ``[n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, chosen]`` per shape (what a
    checkpoint records, so that a resumed run computes with the same algorithms; the cost model's
    picks are a function of the shape and need no record); [] without the extension."""
    if _native.cpp_reason() is not None:
        return []
    return [[*row[:11], row[12]] for row in _native.extension().conv2d_algos_cpu()]


def restore_algorithms(rows: list) -> None:
    """Take the rows of :func:`chosen_algorithms` (e.g. from a checkpoint) as the choices for
    their shapes, instead of the cost model's or a new timing. A forced ``MGM_FAST_CONV2D_ALGO``
    still wins.
    Nothing to do without rows or without the extension (no cpp convolution runs then)."""
    if rows and _native.cpp_reason() is None:
        _native.extension().conv2d_algos_set_cpu([tuple(row) for row in rows])


# ---------------------------------------------------------------------------------------------
# self-test cases (mgm_fast.ops._selftest)


def _case(name: str, size: str, shape: tuple[int, int, int, int], cout: int, kernel: int, stride: int,
          padding: int, bias: bool) -> Case:  # fmt: skip
    def build(gen: torch.Generator) -> CaseInputs:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        w = torch.randn(cout, shape[1], kernel, kernel, generator=gen, dtype=torch.float64) / (shape[1] * kernel)
        b = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
        return CaseInputs(args=(x, w, b, (stride, stride), (padding, padding)), grad=(0, 1, 2) if bias else (0, 1),
                          channels_last=(0, 1))  # fmt: skip

    return Case(_NAME, name, size, build)


def _selftest_cases() -> list[Case]:
    return [
        _case("b3 c5->7 9x11 3x3 s1 p1 + bias", "small", (3, 5, 9, 11), 7, 3, 1, 1, True),
        _case("b2 c8->3 10x10 5x5 s2 p2", "small", (2, 8, 10, 10), 3, 5, 2, 2, False),
        _case("b2 c6->4 7x7 1x1 s2 p0 + bias", "small", (2, 6, 7, 7), 4, 1, 2, 0, True),
        _case("tiny encoder b8 c24->24 8x8 3x3", "small", (8, 24, 8, 8), 24, 3, 1, 1, False),
        _case("paper encoder b32 c64->64 32x32 3x3", "paper", (32, 64, 32, 32), 64, 3, 1, 1, False),
    ]


OP.selftest_cases = _selftest_cases
