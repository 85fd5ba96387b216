"""``torch.library`` plumbing shared by the fused ops.

Every fused backend other than ``reference`` runs its kernels behind ``torch.library`` custom ops
of the namespace ``mgm_fast`` (``torch.ops.mgm_fast.<op>_<backend>`` and, where it has one, its
``..._backward``). (The conv2d op's cpp backend runs no kernel of its own: it picks one of two
ATen convolutions per shape, and a traced graph holds that ATen op; :mod:`mgm_fast.ops.conv2d`.)
Each op registers its own custom ops in its module, next to the backend that calls them (the
Triton ones in ``mgm_fast.ops._triton.<op>``, next to their kernels). Every
custom op has a fake (meta) kernel giving the exact shapes, dtypes, strides and devices of its
outputs, so that ``torch.compile`` (dynamo, AOTAutograd, inductor) traces through a fused op as
one opaque graph node instead of breaking the graph, and ``torch.library.opcheck`` can test the
registration (tests/ops/test_library_ops.py). Autograd is either ``register_autograd`` on the
forward op (functional ops) or an ``autograd.Function`` whose forward and backward call the
custom ops (ops that update buffers in place, declared in ``mutates_args``: BatchNorm running
statistics); both trace under ``torch.compile``.

Rules the ops follow (torch enforces them at every call of a custom op):

* an output never aliases an input or another output (:func:`fresh`);
* an output that is absent (a gradient that was not requested, a noise draw not asked for) is a
  0-element placeholder of the related tensor's dtype and device (:func:`placeholder`): a custom
  op cannot return None. The Python side knows statically which outputs are placeholders.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

NAMESPACE = "mgm_fast"


def qualname(name: str) -> str:
    """``mgm_fast::<name>``, the qualified name of a custom op of this package."""
    return f"{NAMESPACE}::{name}"


def placeholder(like: Tensor) -> Tensor:
    """The stand-in for an absent output: an empty (0,) tensor of ``like``'s dtype and device."""
    return like.new_empty(0)


def or_placeholder(t: Tensor | None, like: Tensor) -> Tensor:
    """``t``, or a :func:`placeholder` of ``like`` where ``t`` is None."""
    return placeholder(like) if t is None else t


def fresh(outputs: Sequence[Tensor], inputs: Iterable) -> list[Tensor]:
    """``outputs`` with every tensor that shares storage with a tensor of ``inputs`` or with an
    earlier output replaced by a clone (a custom op must not return aliases). A clone keeps the
    strides of a dense tensor, so the outputs' metadata does not depend on whether a kernel
    happened to return one of its inputs (e.g. ``running_mean.to(float64)`` of a float64 buffer)."""
    seen = {t.untyped_storage()._cdata for t in inputs if isinstance(t, Tensor)}
    out = []
    for t in outputs:
        key = t.untyped_storage()._cdata
        if key in seen:
            t = t.clone()
            key = t.untyped_storage()._cdata
        seen.add(key)
        out.append(t)
    return out


def registered_ops() -> list[str]:
    """The qualified names of every custom op of the namespace registered in this process."""
    prefix = f"{NAMESPACE}::"
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix))


def once_differentiable(op, what: str) -> None:
    """Gives the backward custom op ``op`` an autograd formula that raises: the fused backward
    is differentiable once (like ``torch.autograd.function.once_differentiable``); differentiating
    its result (double backward, ``create_graph=True`` then ``backward``) is an error naming
    ``what`` instead of a silently wrong or missing gradient."""
    name = op._qualname if hasattr(op, "_qualname") else str(op)

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{what} is once_differentiable: its backward ({name}) cannot be differentiated again "
            "(no double backward)"
        )

    op.register_autograd(backward)


def autocast_off(*tensors):
    """Context without autocast on the devices of ``tensors``, for a custom op's kernel call: a
    custom op is called as it is under autocast (it has no autocast kernel), so the ATen ops
    inside a native kernel would otherwise be autocast too."""
    import contextlib

    stack = contextlib.ExitStack()
    for device_type in sorted({t.device.type for t in tensors if isinstance(t, Tensor)}):
        if device_type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack
