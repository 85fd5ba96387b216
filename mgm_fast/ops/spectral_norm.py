"""Spectral normalisation of a group of weights: one power iteration and one ``W / sigma`` for every
spectrally normalised layer of a network, in one call.

``normalize_weights(weights, us, vs, steps, eps)`` returns ``(weights / sigma, new us, new vs)``
with, per layer i (torch.nn.utils.spectral_norm with ``dim=0``; W_i viewed as the matrix
``weight.reshape(out, -1)``):

* ``steps[i] > 0`` (training): ``steps[i]`` power-iteration steps ``v = normalize(W^T u)``,
  ``u = normalize(W v)`` (``normalize(x) = x / max(|x|, eps[i])``), and
  ``sigma = |W v|^2 / max(|W v|, eps)``, which is ``u . (W v)`` without a third product;
* ``steps[i] == 0`` (evaluation): the stored u, v and ``sigma = u . (W v)``.

Gradients reach each weight through the numerator and sigma, with u and v constants (as torch
treats them): ``dW = g / sigma - (<g, W> / sigma^2) u v^T``. No value is read on the host.

Shapes and dtypes: ``weights[i]`` (out, ...) of any dense layout (channels_last included),
``us[i]`` (out,), ``vs[i]`` (numel / out,), all of one floating dtype per layer; the iteration
runs with autocast off, in the weights' dtype. Outputs: one tensor per layer shaped and strided
like its weight; new u, v shaped like the old ones (in evaluation mode the old tensors).

Backends: ``reference`` (foreach ops over the group: per layer only the two products ``W^T u``,
``W v`` and, in backward, ``<g, W>``) and ``cpp`` (float32 CPU: the whole group's iteration in one
kernel call and the whole group's weight gradients in another, reading channels_last weights in
place; csrc/kernels/cpu/spectral_norm.*). The networks call it once per forward
(:func:`mgm_fast.models.layers.refresh_spectral_norm`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from mgm_fast import _native
from mgm_fast.ops._dispatch import ANY_DEVICE, ANY_FLOAT, cpp_backend, define_op, reference_backend
from mgm_fast.ops._library import once_differentiable, qualname
from mgm_fast.ops._selftest import Case, Inputs

__all__ = ["OP", "normalize_weights", "spectral_norm_reference"]

_NAME = "spectral_norm"



def _autocast_off(device: torch.device):
    """Autocast disabled on ``device`` (a plain ``torch.autocast`` context, which dynamo traces)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# reference


def _matrix(weight: Tensor) -> Tensor:
    """The (out, in*kh*kw) matrix view of a weight (itself for a matrix)."""
    return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)


def _normalize(xs: list[Tensor], eps: list[float]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``F.normalize(x, dim=0, eps=eps)`` of 1-D tensors, batched: (x / max(|x|, eps), |x|,
    max(|x|, eps)), the last two 0-dim tensors."""
    norms = torch._foreach_norm(xs)
    clamped = torch._foreach_clamp_min(norms, eps)
    return torch._foreach_div(xs, clamped), norms, clamped


def _iterate_reference(weights: list[Tensor], us: list[Tensor], vs: list[Tensor], steps: list[int],
                       eps: list[float]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(sigmas, us, vs) after ``steps[i] >= 1`` steps of every layer; per step only the two
    products are per layer, the normalisations are foreach ops over the group."""
    mats = [_matrix(w) for w in weights]
    us, vs = list(us), list(vs)
    norms: list[Tensor] = list(us)  # placeholders, every entry is overwritten below
    clamped: list[Tensor] = list(us)
    for step in range(max(steps)):
        active = [i for i, s in enumerate(steps) if s > step]
        active_eps = [eps[i] for i in active]
        new_v, _, _ = _normalize([torch.mv(mats[i].t(), us[i]) for i in active], active_eps)
        for i, v in zip(active, new_v):
            vs[i] = v
        new_u, wv_norm, wv_clamped = _normalize([torch.mv(mats[i], vs[i]) for i in active], active_eps)
        for j, i in enumerate(active):
            us[i], norms[i], clamped[i] = new_u[j], wv_norm[j], wv_clamped[j]
    sigmas = torch._foreach_div(torch._foreach_mul(norms, norms), clamped)
    return list(sigmas), us, vs


def _power_iteration_reference(weights, us, vs, steps, eps):
    """(sigmas, us', vs') of the group: training layers iterate, evaluation layers (steps 0) keep
    their vectors and take ``sigma = u . (W v)``."""
    sigmas: list[Tensor | None] = [None] * len(weights)
    new_us, new_vs = list(us), list(vs)
    training = [i for i, s in enumerate(steps) if s > 0]
    if training:
        got = _iterate_reference([weights[i] for i in training], [us[i] for i in training],
                                 [vs[i] for i in training], [steps[i] for i in training],
                                 [eps[i] for i in training])  # fmt: skip
        for j, i in enumerate(training):
            sigmas[i], new_us[i], new_vs[i] = got[0][j], got[1][j], got[2][j]
    for i, s in enumerate(steps):
        if s == 0:
            sigmas[i] = torch.dot(us[i], torch.mv(_matrix(weights[i]), vs[i]))
    return sigmas, new_us, new_vs


def _weight_grads_reference(grads, weights, sigmas, us, vs) -> list[Tensor]:
    """``g / sigma - (<g, W> / sigma^2) u v^T`` for the group, batched with foreach ops; per
    layer only the reduction ``<g, W>`` and the views that shape u and v."""
    grads = list(grads)
    inner = [p.sum() for p in torch._foreach_mul(grads, list(weights))]  # <g, W>
    coef = torch._foreach_div(inner, torch._foreach_mul(list(sigmas), list(sigmas)))
    # u as a column (out, 1, ...) and v shaped like one output row: u v^T by broadcasting
    cols = [u.view(-1, *[1] * (w.dim() - 1)) for u, w in zip(us, weights)]
    rows = [v if w.dim() == 2 else v.view(w.shape[1:]) for v, w in zip(vs, weights)]
    grad_w = torch._foreach_div(grads, list(sigmas))
    torch._foreach_addcmul_(grad_w, torch._foreach_mul(cols, coef), rows, value=-1.0)
    return list(grad_w)


# ---------------------------------------------------------------------------------------------
# cpp: custom ops mgm_fast::spectral_norm_power_iteration_cpp / spectral_norm_weight_grad_cpp


@torch.library.custom_op(qualname("spectral_norm_power_iteration_cpp"), mutates_args=())
def _cpp_iteration_op(weights: list[Tensor], us: list[Tensor], vs: list[Tensor], steps: list[int],
                      eps: list[float]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:  # fmt: skip
    """(sigmas, new us, new vs) of the group (CPU kernel); the inputs are not written."""
    sigmas, new_us, new_vs = _native.extension().spectral_norm_power_iteration_cpu(weights, us, vs, steps, eps)
    return sigmas, new_us, new_vs


@_cpp_iteration_op.register_fake
def _(weights, us, vs, steps, eps):
    return ([w.new_empty(()) for w in weights], [torch.empty_like(u, memory_format=torch.contiguous_format) for u in us],
            [torch.empty_like(v, memory_format=torch.contiguous_format) for v in vs])  # fmt: skip


@torch.library.custom_op(qualname("spectral_norm_weight_grad_cpp"), mutates_args=())
def _cpp_weight_grad_op(grads: list[Tensor], weights: list[Tensor], sigmas: list[Tensor], us: list[Tensor],
                        vs: list[Tensor]) -> list[Tensor]:  # fmt: skip
    """The gradients of ``W / sigma`` of the group (CPU kernel), laid out like the weights."""
    return _native.extension().spectral_norm_weight_grad_cpu(grads, weights, sigmas, us, vs)


@_cpp_weight_grad_op.register_fake
def _(grads, weights, sigmas, us, vs):
    return [torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device) for w in weights]


once_differentiable(_cpp_weight_grad_op, "the spectral-norm weight gradient (cpp backend)")


# ---------------------------------------------------------------------------------------------
# W / sigma with the backend's gradient


class _DivideBySigma(torch.autograd.Function):
    """``W_i / sigma_i`` for a group, u_i, v_i constants and sigma_i = u_i . (W_i v_i).

    apply(backend, n, W_1..W_n, sigma_1..sigma_n, u_1..u_n, v_1..v_n) -> (W_1/sigma_1, ...).
    The forward is one foreach division; the backward is the backend's weight gradient.
    """

    @staticmethod
    def forward(ctx, backend: str, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.backend, ctx.n = backend, n
        ctx.save_for_backward(*tensors)
        return tuple(torch._foreach_div(list(tensors[:n]), list(tensors[n : 2 * n])))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        n = ctx.n
        saved = ctx.saved_tensors
        weights, sigmas, us, vs = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n], saved[3 * n :]
        with _autocast_off(weights[0].device):
            if ctx.backend == "cpp":
                grad_w = _cpp_weight_grad_op(list(grads), list(weights), list(sigmas), list(us), list(vs))
            else:
                grad_w = _weight_grads_reference(grads, weights, sigmas, us, vs)
        return (None, None, *grad_w, *[None] * (3 * n))


def _run(backend: str, weights: list[Tensor], us: list[Tensor], vs: list[Tensor], steps: Sequence[int],
         eps: Sequence[float]) -> tuple[list[Tensor], ...]:  # fmt: skip
    steps, eps = [int(s) for s in steps], [float(e) for e in eps]
    with torch.no_grad(), _autocast_off(weights[0].device):
        if backend == "cpp":
            sigmas, new_us, new_vs = _cpp_iteration_op(list(weights), list(us), list(vs), steps, eps)
            # evaluation layers keep their own vectors (the kernel returns copies of them)
            new_us = [u if s else old for u, old, s in zip(new_us, us, steps)]
            new_vs = [v if s else old for v, old, s in zip(new_vs, vs, steps)]
        else:
            sigmas, new_us, new_vs = _power_iteration_reference(list(weights), list(us), list(vs), steps, eps)
    with _autocast_off(weights[0].device):
        normalised = _DivideBySigma.apply(backend, len(weights), *weights, *sigmas, *new_us, *new_vs)
    return list(normalised), list(sigmas), list(new_us), list(new_vs)


def spectral_norm_reference(weights: Sequence[Tensor], us: Sequence[Tensor], vs: Sequence[Tensor],
                            steps: Sequence[int], eps: Sequence[float]) -> tuple[list[Tensor], ...]:  # fmt: skip
    """The op's plain-PyTorch twin: (W_i / sigma_i, sigma_i, u_i', v_i') per layer, lists."""
    return _run("reference", weights, us, vs, steps, eps)


def _cpp(weights, us, vs, steps, eps):
    return _run("cpp", weights, us, vs, steps, eps)


def _check(weights, us, vs, steps, eps) -> None:
    """Argument errors that name the layer (shapes only: nothing is read on the host)."""
    n = len(weights)
    if not (len(us) == len(vs) == len(steps) == len(eps) == n):
        raise ValueError(f"spectral_norm: {n} weights, {len(us)} u, {len(vs)} v, {len(steps)} step counts and "
                         f"{len(eps)} eps values (need one of each per layer)")  # fmt: skip
    for i, (w, u, v) in enumerate(zip(weights, us, vs)):
        if w.dim() < 1 or u.shape != (w.shape[0],) or v.shape != (w.numel() // max(w.shape[0], 1),):
            raise ValueError(f"spectral_norm: layer {i}: weight {tuple(w.shape)} needs u ({w.shape[0]},) and v "
                             f"({w.numel() // max(w.shape[0], 1)},), got u {tuple(u.shape)}, v {tuple(v.shape)}")
        if not (w.dtype == u.dtype == v.dtype):
            raise ValueError(f"spectral_norm: layer {i}: weight, u and v dtypes differ ({w.dtype}, {u.dtype}, "
                             f"{v.dtype})")  # fmt: skip
    for i, (s, e) in enumerate(zip(steps, eps)):
        if int(s) < 0 or not float(e) > 0:
            raise ValueError(f"spectral_norm: layer {i}: steps must be >= 0 and eps > 0, got {s} and {e}")


OP = define_op(_NAME, "spectral norm of a group of weights: power iteration + W/sigma", [
    reference_backend(spectral_norm_reference, devices=(*ANY_DEVICE, "meta"), dtypes=ANY_FLOAT),
    cpp_backend(_cpp),
], priority=("cpp", "reference"))  # fmt: skip


def normalize_weights(weights: Sequence[Tensor], us: Sequence[Tensor], vs: Sequence[Tensor], steps: Sequence[int],
                      eps: Sequence[float], *, impl: str = "auto") -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``(weights[i] / sigma_i, u_i', v_i')`` of every layer of a group (see the module docstring).

    Args:
        weights: per layer (out, ...) floating, any dense layout; gradients flow into them.
        us, vs: per layer (out,) and (numel / out,), the layer's stored vectors (not written).
        steps: per layer the power-iteration steps (0: evaluation mode, the stored vectors).
        eps: per layer the norms' clamp (> 0).
        impl: "auto" | "reference" | "cpp".
    """
    if len(weights) == 0:
        return [], [], []
    _check(weights, us, vs, steps, eps)
    normalised, _, new_us, new_vs = OP(list(weights), list(us), list(vs), tuple(int(s) for s in steps),
                                       tuple(float(e) for e in eps), impl=impl)  # fmt: skip
    return normalised, new_us, new_vs


# ---------------------------------------------------------------------------------------------
# self-test cases (mgm_fast.ops._selftest): groups of conv, linear and embedding weights


def _case(name: str, size: str, shapes: list[tuple[int, ...]], steps: tuple[int, ...]) -> Case:
    eps = tuple(1e-12 for _ in shapes)

    def build(gen: torch.Generator) -> Inputs:
        weights = [torch.randn(s, generator=gen, dtype=torch.float64) / s[0] ** 0.5 for s in shapes]
        us = [torch.nn.functional.normalize(torch.randn(s[0], generator=gen, dtype=torch.float64), dim=0)
              for s in shapes]  # fmt: skip
        vs = [torch.nn.functional.normalize(torch.randn(w.numel() // s[0], generator=gen, dtype=torch.float64), dim=0)
              for w, s in zip(weights, shapes)]  # fmt: skip
        return Inputs(args=(weights, us, vs, steps, eps), grad=(0,), channels_last=(0,))

    return Case(_NAME, name, size, build)


def _selftest_cases() -> list[Case]:
    return [
        _case("conv 5x3x3x3 + linear 7x4 + embedding 3x6", "small", [(5, 3, 3, 3), (7, 4), (3, 6)], (1, 1, 1)),
        _case("two steps and evaluation mode", "small", [(6, 5, 3, 3), (9, 13), (4, 2, 1, 1)], (2, 0, 1)),
        _case("paper D block 1024x1024x3x3 + linear 1x1024 + G input 16384x128", "paper",
              [(1024, 1024, 3, 3), (1, 1024), (16384, 128)], (1, 1, 1)),
    ]


OP.selftest_cases = _selftest_cases
