"""The ``torch.library`` custom ops behind the fused backends (mgm_fast.ops._library).

* ``torch.library.opcheck`` on every registered ``mgm_fast::`` op, on small CPU inputs (the
  Triton ops under the interpreter that tests/conftest.py turns on; the cuda ops on a GPU only):
  the schema (declared mutations, no aliasing outputs), the fake kernel (exact sizes, strides,
  dtypes and devices against the real kernel, also with dynamic shapes through AOTAutograd) and
  the autograd registration (forward ops with ``register_autograd``: gradients through
  AOTAutograd equal eager ones). Backward ops and ops that update buffers in place (their autograd
  is an ``autograd.Function`` calling them) are checked without the autograd utilities.
* Every registered op has cases here (a new op without them fails the coverage test).
* Each public op traced by ``torch.compile(fullgraph=True)`` through its ``impl="auto"`` dispatch
  (backend ``aot_eager``: dynamo + AOTAutograd, no inductor codegen, seconds) equals eager: values,
  gradients and the running statistics a GenBlock updates.
* The forced Triton backends (under the interpreter) traced the same way equal eager.
* The fused backwards are once-differentiable: a double backward raises.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from dataclasses import dataclass, field

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import mgm_fast.ops  # noqa: F401  (registers every op)
from mgm_fast import _native
from mgm_fast.ops import (
    attention,
    batch_norm,
    conv2d,
    gan_losses,
    genblock,
    multitask_loss,
    ntxent,
    simclr_views,
)
from mgm_fast.ops._dispatch import triton_reason
from mgm_fast.ops._library import registered_ops

HAS_CPP = _native.cpp_reason() is None
TRITON_REASON = triton_reason()
if TRITON_REASON is None:
    from mgm_fast.ops._triton import genblock as triton_genblock  # registers its custom ops
TRITON_DEVICE = "cpu" if TRITON_REASON is None and not torch.cuda.is_available() else "cuda"

ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NO_AUTOGRAD = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@dataclass
class Case:
    op: str  # name in the mgm_fast namespace
    label: str
    build: callable  # () -> (args, kwargs)
    utils: tuple[str, ...] = ALL_UTILS
    backend: str = "cpp"  # cpp | cuda | triton: what the case needs
    env: dict = field(default_factory=dict)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(gen, *shape, device="cpu", grad=False, scale=1.0, dtype=torch.float32):
    t = (torch.randn(*shape, generator=gen, dtype=dtype) * scale).to(device)
    return t.requires_grad_(grad)


def _op(name):
    return getattr(torch.ops.mgm_fast, name).default


# ---------------------------------------------------------------------------------------------
# sagan_attention


def _attention_inputs(device, grad, transposed=False):
    g = _gen("attention", transposed)
    theta = _randn(g, 2, 12, 4, device=device).transpose(1, 2) if transposed else _randn(g, 2, 4, 12, device=device)
    return theta.requires_grad_(grad), _randn(g, 2, 4, 3, device=device, grad=grad), _randn(g, 2, 5, 3, device=device,
                                                                                            grad=grad)


def _attention_backward(need):
    def build():
        theta, phi, values = _attention_inputs("cpu", False)
        out, lse = attention._cpp_forward_op(theta, phi, values)
        return (theta, phi, values, out, lse, torch.randn_like(out), need), {}

    return build


CASES = [
    Case("sagan_attention_cpp", "contiguous", lambda: (_attention_inputs("cpu", True), {})),
    Case("sagan_attention_cpp", "theta a transposed view", lambda: (_attention_inputs("cpu", True, True), {})),
    Case("sagan_attention_cpp_backward", "all", _attention_backward([True, True, True]), NO_AUTOGRAD),
    Case("sagan_attention_cpp_backward", "theta and g", _attention_backward([True, False, True]), NO_AUTOGRAD),
]


# ---------------------------------------------------------------------------------------------
# genblock: the whole block and the piece, cpp (CPU) and cuda (GPU), every up-conv algorithm


def _block_args(device, channels_last, training, dtype=torch.float32, nbt=True, momentum=0.001):
    g = _gen("block", channels_last, training, str(dtype))
    n, cin, cout, h, w, k = 2, 5, 7, 3, 4, 3
    x = _randn(g, n, cin, h, w, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, k, (n,), generator=g).to(device)

    def r(*shape, scale=0.3):
        return _randn(g, *shape, dtype=dtype, device=device, scale=scale)

    def stats(c):
        return [torch.zeros(c, dtype=dtype, device=device), torch.ones(c, dtype=dtype, device=device)]

    def counter():
        return torch.tensor(3, device=device) if nbt else None

    return (x, y, r(k, 2 * cin) + 1, r(cout, cin, 3, 3), r(cout), r(k, 2 * cout) + 1, r(cout, cout, 3, 3), r(cout),
            r(cout, cin, 1, 1), r(cout), *stats(cin), counter(), *stats(cout), counter(), training, momentum, 1e-5)


def _public_order(a):
    """The 16 tensors of :func:`_block_args` (the kernels' order) in genblock()'s order."""
    return (*a[:12], a[13], a[14], a[12], a[15])


def _block_backward(backend, channels_last, need_x, grad_channels_last):
    def build():
        args = _block_args(_DEVICE[backend], channels_last, True)
        out, xs, *saved = _op(f"genblock_{backend}_forward")(*args)
        x, y, embed1, weight1, _, embed2, weight2, _, weight0 = args[:9]
        xs = x if genblock._is_channels_last(x) else xs
        grad = torch.randn_like(out).contiguous(
            memory_format=torch.channels_last if grad_channels_last else torch.contiguous_format
        )
        return (grad, xs, y, saved, embed1, weight1, embed2, weight2, weight0, True, need_x, channels_last), {}

    return build


def _piece_args(device, channels_last, *, upsample=True, residual=None, bias=True, training=True, momentum=0.001,
                nbt=True, head=False):
    g = _gen("piece", channels_last, upsample, residual, bias, training)
    n, c, cout, h, w = 2, 5, 3, 4, 3
    ho, wo = (2 * h, 2 * w) if upsample else (h, w)
    x = _randn(g, n, c, h, w, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = _randn(g, n, c, device=device, scale=0.3) + 1
    beta = _randn(g, n, c, device=device, scale=0.3)
    if head:  # the output head: one BatchNorm2d's affine parameters expanded to (B, C)
        gamma, beta = gamma[:1].expand(n, c), beta[:1].expand(n, c)
    res = None
    if residual is not None:
        res = _randn(g, n, cout, *((ho, wo) if residual == "full" else (ho // 2, wo // 2)), device=device)
    return (x, gamma, beta, _randn(g, cout, c, 3, 3, device=device, scale=0.3),
            _randn(g, cout, device=device) if bias else None, res, torch.zeros(c, device=device),
            torch.ones(c, device=device), torch.tensor(5, device=device) if nbt else None, training, momentum, 1e-5,
            upsample)  # fmt: skip


def _piece_backward(backend, channels_last, grad_channels_last, need_x=True, need_gamma_beta=True, **opts):
    def build():
        args = _piece_args(_DEVICE[backend], channels_last, **opts)
        out, xs, act, mean, rstd, scale = _op(f"cbn_relu_conv3x3_{backend}_forward")(*args)
        x, gamma, _, weight, bias, residual = args[:6]
        xs = x if genblock._is_channels_last(x) else xs
        mode = 0 if residual is None else (1 if residual.shape[-2:] == out.shape[-2:] else 2)
        grad = torch.randn_like(out).contiguous(
            memory_format=torch.channels_last if grad_channels_last else torch.contiguous_format
        )
        return (grad, xs, act, weight, gamma, scale, mean, rstd, args[9], args[12], bias is not None, mode, need_x,
                need_gamma_beta, channels_last), {}  # fmt: skip

    return build


_DEVICE = {"cpp": "cpu", "cuda": "cuda"}
for _backend in ("cpp", "cuda"):
    _dev = _DEVICE[_backend]
    # the CPU binding's algorithms of the block's convolutions (conv1: nearest x2 + conv3x3, conv2:
    # conv3x3), forced through its environment variables (read per call); each saves its own layout
    for _algos in (("phase", "conv"), ("gemm", "gemm"), ("upsample", "conv")) if _backend == "cpp" else ((),):
        _env = dict(zip(("MGM_FAST_GENBLOCK_ALGO", "MGM_FAST_GENBLOCK_CONV2_ALGO"), _algos))
        _tag = f", {' + '.join(_algos)}" if _algos else ""
        CASES += [
            Case(f"genblock_{_backend}_forward", f"NCHW, training{_tag}",
                 lambda d=_dev: (_block_args(d, False, True), {}), NO_AUTOGRAD, _backend, _env),
            Case(f"genblock_{_backend}_forward", f"channels_last, eval{_tag}",
                 lambda d=_dev: (_block_args(d, True, False), {}), NO_AUTOGRAD, _backend, _env),
            Case(f"genblock_{_backend}_backward", f"NCHW x, NCHW grad{_tag}",
                 _block_backward(_backend, False, True, False), NO_AUTOGRAD, _backend, _env),
            Case(f"genblock_{_backend}_backward", f"channels_last x and grad, no dx{_tag}",
                 _block_backward(_backend, True, False, True), NO_AUTOGRAD, _backend, _env),
        ]  # fmt: skip
    CASES += [
        Case(f"genblock_{_backend}_forward", "channels_last, eval, float64 (the kernel returns the running mean)",
             lambda d=_dev: (_block_args(d, True, False, torch.float64), {}), NO_AUTOGRAD, _backend),
        Case(f"genblock_{_backend}_forward", "NCHW, training, momentum None (cumulative average)",
             lambda d=_dev: (_block_args(d, False, True, momentum=None), {}), NO_AUTOGRAD, _backend),
        Case(f"cbn_relu_conv3x3_{_backend}_forward", "up2, NCHW", lambda d=_dev: (_piece_args(d, False), {}),
             NO_AUTOGRAD, _backend),
        Case(f"cbn_relu_conv3x3_{_backend}_forward", "no up2, half residual, channels_last",
             lambda d=_dev: (_piece_args(d, True, upsample=False, residual="half"), {}), NO_AUTOGRAD, _backend),
        Case(f"cbn_relu_conv3x3_{_backend}_forward", "no up2, no residual, channels_last (the conv's own output)",
             lambda d=_dev: (_piece_args(d, True, upsample=False), {}), NO_AUTOGRAD, _backend),
        Case(f"cbn_relu_conv3x3_{_backend}_forward", "output head, eval, no counter",
             lambda d=_dev: (_piece_args(d, False, upsample=False, training=False, nbt=False, head=True), {}),
             NO_AUTOGRAD, _backend),
        Case(f"cbn_relu_conv3x3_{_backend}_backward", "up2, full residual, no bias",
             _piece_backward(_backend, False, False, residual="full", bias=False), NO_AUTOGRAD, _backend),
        Case(f"cbn_relu_conv3x3_{_backend}_backward", "no up2, half residual, channels_last grad",
             _piece_backward(_backend, True, True, upsample=False, residual="half"), NO_AUTOGRAD, _backend),
        Case(f"cbn_relu_conv3x3_{_backend}_backward", "half residual, NCHW grad of a channels_last x",
             _piece_backward(_backend, True, False, upsample=False, residual="half"), NO_AUTOGRAD, _backend),
        Case(f"cbn_relu_conv3x3_{_backend}_backward", "output head, weight gradient only",
             _piece_backward(_backend, False, False, need_x=False, need_gamma_beta=False, upsample=False,
                             head=True), NO_AUTOGRAD, _backend),
    ]  # fmt: skip
CASES = [c for c in CASES if not (c.backend == "cuda" and "float64" in c.label)]


# ---------------------------------------------------------------------------------------------
# multitask_loss


def _multitask_args(device, need=(True, True, True), *, ignore_index=None, reduction="all", masks=True,
                    channels_last=False):  # fmt: skip
    g = _gen("multitask", need, ignore_index, reduction, masks, channels_last)
    b, c, h, w = 2, 5, 4, 3
    preds = [_randn(g, b, ch, h, w) for ch in (c, 1, 3)]
    if channels_last:
        preds = [p.contiguous(memory_format=torch.channels_last) for p in preds]
    preds = [p.to(device).requires_grad_(n) for p, n in zip(preds, need)]
    target = torch.randint(0, c, (b, h, w), generator=g)
    if ignore_index is not None:
        target[0, 0] = ignore_index
    depth_mask = (torch.rand(b, 1, h, w, generator=g) > 0.3).to(device) if masks else None
    normal_mask = (torch.rand(b, 1, h, w, generator=g) > 0.3).to(device) if masks else None
    return (*preds, target.to(device), _randn(g, b, 1, h, w, device=device), _randn(g, b, 3, h, w, device=device),
            depth_mask, normal_mask, ignore_index, reduction, list(need))  # fmt: skip


def _scale_args(device, channels_last, backend):
    g = _gen("scale", channels_last)
    buffer = _randn(g, 2, 3, 4, 5, device=device)
    if channels_last:
        buffer = buffer.contiguous(memory_format=torch.channels_last)
    if backend == "cpp":  # the saved gradient (already divided by D) times grad_output
        return (buffer, torch.tensor(0.5, device=device)), {}
    return (buffer, torch.tensor(0.5, device=device), torch.tensor([0.1, 0.2, 0.3], device=device), 1,
            torch.float32), {}  # fmt: skip


for _backend, _dev in (("cpp", "cpu"), ("cuda", "cuda"), ("triton", TRITON_DEVICE)):
    CASES += [
        Case(f"multitask_loss_{_backend}", "released (no ignore index, all), masks",
             lambda d=_dev: (_multitask_args(d), {}), backend=_backend),
        Case(f"multitask_loss_{_backend}", "ignore -1, valid, channels_last, no depth gradient",
             lambda d=_dev: (_multitask_args(d, (True, False, True), ignore_index=-1, reduction="valid",
                                             channels_last=True), {}), backend=_backend),
        Case(f"multitask_loss_{_backend}", "no masks", lambda d=_dev: (_multitask_args(d, masks=False), {}),
             backend=_backend),
    ]  # fmt: skip
    CASES += [
        Case(f"multitask_loss_{_backend}_scale_grad", fmt, lambda d=_dev, cl=cl, b=_backend: _scale_args(d, cl, b),
             NO_AUTOGRAD, _backend)
        for fmt, cl in (("NCHW", False), ("channels_last", True))
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# ntxent_rows


def _ntxent_args(device, grad=True, dtype=torch.float32):
    g = _gen("ntxent", grad)
    cols = _randn(g, 8, 6, device=device, dtype=dtype)
    index = torch.tensor([1, 3, 6], device=device)
    return (cols[index].clone().requires_grad_(grad), cols.requires_grad_(grad), index, 0.3), {}


def _ntxent_backward(backend, device, need):
    def build():
        (rows, cols, index, tau), _ = _ntxent_args(device, grad=False)
        out = _op(f"ntxent_rows_{backend}")(rows, cols, index, tau)
        return (rows, cols, index, tau, *out[1:], torch.tensor(1.5, device=device), need), {}

    return build


for _backend, _dev in (("cpp", "cpu"), ("cuda", "cuda"), ("triton", TRITON_DEVICE)):
    CASES += [
        Case(f"ntxent_rows_{_backend}", "3 rows of 8 columns", lambda d=_dev: _ntxent_args(d), backend=_backend),
        Case(f"ntxent_rows_{_backend}_backward", "rows and cols", _ntxent_backward(_backend, _dev, [True, True]),
             NO_AUTOGRAD, _backend),
        Case(f"ntxent_rows_{_backend}_backward", "cols only", _ntxent_backward(_backend, _dev, [False, True]),
             NO_AUTOGRAD, _backend),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# gan losses: noisy (cpp, triton), hinge losses (triton)


def _noisy_args(device, layout, return_noise, tensor_seed):
    g = _gen("noisy", layout, return_noise, tensor_seed)
    x = _randn(g, 2, 3, 5, 4, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # not dense: made contiguous first
        x = _randn(g, 2, 3, 5, 8, device=device)[..., ::2]
    seed = torch.tensor([2**40 + 7], device=device) if tensor_seed else None
    return (x.requires_grad_(), 0.3, 12345, seed, return_noise), {}


def _hinge_backward(name, device):
    def build():
        g = _gen("hinge", name)
        scores = [_randn(g, 5, 1, device=device)] + ([_randn(g, 3, device=device)] if name == "hinge_d" else [])
        return (*scores, torch.tensor(0.7, device=device)), {}

    return build


for _backend, _dev in (("cpp", "cpu"), ("triton", TRITON_DEVICE)):
    CASES += [
        Case(f"noisy_{_backend}", f"{layout}{', with the draw' if rn else ''}{', tensor key' if ts else ''}",
             lambda d=_dev, layout=layout, rn=rn, ts=ts: _noisy_args(d, layout, rn, ts), backend=_backend)
        for layout, rn, ts in (("NCHW", True, False), ("channels_last", False, True), ("strided", True, True))
    ]
CASES += [
    Case("hinge_d_triton", "(5, 1) and (3,)", lambda: ((_randn(_gen("hd"), 5, 1, device=TRITON_DEVICE, grad=True),
                                                        _randn(_gen("hd2"), 3, device=TRITON_DEVICE, grad=True)), {}),
         backend="triton"),
    Case("hinge_d_triton_backward", "(5, 1) and (3,)", _hinge_backward("hinge_d", TRITON_DEVICE), NO_AUTOGRAD,
         "triton"),
    Case("hinge_g_triton", "(5, 1)", lambda: ((_randn(_gen("hg"), 5, 1, device=TRITON_DEVICE, grad=True),), {}),
         backend="triton"),
    Case("hinge_g_triton_backward", "(5, 1)", _hinge_backward("hinge_g", TRITON_DEVICE), NO_AUTOGRAD, "triton"),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# simclr_views (no autograd: views are network inputs)


def _views_args():
    from mgm_fast.data.augment import SimCLRAugment
    from mgm_fast.ops.simclr_views import PARAM_KEYS

    g = _gen("views")
    x = torch.rand(2, 3, 13, 11, generator=g) * 2 - 1
    aug = SimCLRAugment(jitter_p=1.0, gray_p=0.5, blur_p=0.7)
    p1, p2 = aug.sample_params(2, 13, 11, g), aug.sample_params(2, 13, 11, g)
    p = {k: torch.cat((p1[k], p2[k])) for k in PARAM_KEYS}
    types = dict(crop=torch.int64, flip=torch.bool, jitter=torch.bool, order=torch.int64, factors=torch.float32,
                 gray=torch.bool, blur=torch.bool, sigma=torch.float32)
    params = [p[k].to(types[k]) for k in ("crop", "flip", "jitter", "order", "factors", "gray", "blur", "sigma")]
    return (x, *params, torch.arange(2).repeat(2), 9, 7, 3), {}


CASES.append(Case("simclr_views_cpp", "b2 13x11 -> 9x7, two views each", _views_args, NO_AUTOGRAD))


# ---------------------------------------------------------------------------------------------
# spectral_norm


def _spectral_norm_group(g):
    """A conv weight stored channels_last, a linear and an embedding weight, with unit u, v."""
    weights = [_randn(g, 5, 3, 3, 3).contiguous(memory_format=torch.channels_last), _randn(g, 7, 4), _randn(g, 3, 6)]
    us = [torch.nn.functional.normalize(_randn(g, w.shape[0]), dim=0) for w in weights]
    vs = [torch.nn.functional.normalize(_randn(g, w.numel() // w.shape[0]), dim=0) for w in weights]
    return weights, us, vs


def _spectral_norm_iteration_args():
    weights, us, vs = _spectral_norm_group(_gen("spectral_norm iteration"))
    return (weights, us, vs, [1, 2, 0], [1e-12, 1e-12, 1e-12]), {}


def _spectral_norm_grad_args():
    g = _gen("spectral_norm grad")
    weights, us, vs = _spectral_norm_group(g)
    grads = [_randn(g, *w.shape) for w in weights]  # contiguous: the kernel lays them out like W
    sigmas = [torch.tensor(1.5), torch.tensor(0.7), torch.tensor(2.0)]
    return (grads, weights, sigmas, us, vs), {}


CASES += [
    Case("spectral_norm_power_iteration_cpp", "conv (channels_last) + linear + embedding, steps 1/2/0",
         _spectral_norm_iteration_args, NO_AUTOGRAD),
    Case("spectral_norm_weight_grad_cpp", "conv (channels_last) + linear + embedding", _spectral_norm_grad_args,
         NO_AUTOGRAD),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# batch_norm


def _batch_norm_forward_args(affine: bool, relu: bool, residual: bool = False):
    g = _gen("batch_norm forward", affine, relu, residual)
    x = _randn(g, 2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    weight, bias = (_randn(g, 5), _randn(g, 5)) if affine else (None, None)
    shortcut = _randn(g, 2, 5, 3, 4) if residual else None
    return (x, weight, bias, torch.zeros(5), torch.ones(5), 0.1, 1e-5, relu, shortcut), {}


def _batch_norm_backward_args(affine: bool, need: list[bool], relu: bool = False):
    g = _gen("batch_norm backward", affine, need, relu)
    x = _randn(g, 2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    grad_out = _randn(g, 2, 5, 3, 4)  # contiguous: the kernel reads it channels_last
    weight = _randn(g, 5) if affine else None
    mean, invstd = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    relu_out = torch.relu(x - 0.2) if relu else None  # any channels_last tensor: its positive entries count
    return (grad_out, x, weight, mean, invstd, relu_out, need), {}


CASES += [
    Case("batch_norm_cpp", "b2 c5 3x4 + relu", lambda: _batch_norm_forward_args(True, True), NO_AUTOGRAD),
    Case("batch_norm_cpp", "+ residual + relu", lambda: _batch_norm_forward_args(True, True, True), NO_AUTOGRAD),
    Case("batch_norm_cpp", "no affine transform", lambda: _batch_norm_forward_args(False, False), NO_AUTOGRAD),
    Case("batch_norm_backward_cpp", "b2 c5 3x4, all gradients",
         lambda: _batch_norm_backward_args(True, [True] * 3 + [False]), NO_AUTOGRAD),
    Case("batch_norm_backward_cpp", "through the relu, with the residual's",
         lambda: _batch_norm_backward_args(True, [True] * 4, True), NO_AUTOGRAD),
    Case("batch_norm_backward_cpp", "no affine weight, input gradient only",
         lambda: _batch_norm_backward_args(False, [True, False, False, False]), NO_AUTOGRAD),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# conv2d


def _conv2d_forward_args(bias: bool, stride: int, padding: int):
    g = _gen("conv2d forward", bias, stride, padding)
    x = _randn(g, 2, 5, 7, 6).contiguous(memory_format=torch.channels_last)
    weight = _randn(g, 4, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    return (x, weight, _randn(g, 4) if bias else None, [stride, stride], [padding, padding]), {}


# ---------------------------------------------------------------------------------------------
# genblock's Triton convolutions (mgm_fast.ops._triton.genblock)


def _triton_conv_args(kind, upsample):
    def build():
        g = _gen("triton conv", kind, upsample)
        d = TRITON_DEVICE
        x = _randn(g, 2, 4, 3, 5, device=d)
        scale, shift = _randn(g, 2, 4, device=d) + 1, _randn(g, 2, 4, device=d)
        wp = triton_genblock._phase_weights(_randn(g, 6, 4, 3, 3, device=d, scale=0.3), upsample).contiguous()
        ho, wo = (6, 10) if upsample else (3, 5)
        if kind == "conv":
            return (x, scale, shift, wp, _randn(g, 6, device=d), _randn(g, 2, 6, ho, wo, device=d), upsample), {}
        grad = _randn(g, 2, 6, ho, wo, device=d)
        if kind == "dinput":
            return (grad, x, scale, shift, wp, upsample), {}
        return (grad, x, scale, shift, upsample), {}

    return build


CASES += [
    Case(f"genblock_triton_conv{suffix}", f"{'up2' if up else 'same size'}", _triton_conv_args(kind, up), NO_AUTOGRAD,
         "triton")
    for kind, suffix in (("conv", ""), ("dinput", "_dinput"), ("dweight", "_dweight"))
    for up in (True, False)
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the checks


def _skip_reason(case: Case) -> str | None:
    if case.backend == "cpp" and not HAS_CPP:
        return f"C++ extension unavailable: {_native.cpp_reason()}"
    if case.backend == "cuda" and (not torch.cuda.is_available() or _native.cuda_reason() is not None):
        return f"cuda backend: {_native.cuda_reason()}"
    if case.backend == "triton" and TRITON_REASON is not None:
        return f"triton: {TRITON_REASON}"
    return None


def _params():
    out = []
    for case in CASES:
        marks = [pytest.mark.gpu] if case.backend == "cuda" else []
        out.append(pytest.param(case, id=f"{case.op}: {case.label}", marks=marks))
    return out


@pytest.mark.parametrize("case", _params())
def test_opcheck(case: Case, monkeypatch):
    reason = _skip_reason(case)
    if reason:
        pytest.skip(reason)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    args, kwargs = case.build()
    result = torch.library.opcheck(_op(case.op), args, kwargs, test_utils=case.utils, raise_exception=False)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_every_registered_op_has_cases():
    registered = {name.split("::", 1)[1] for name in registered_ops()}
    covered = {case.op for case in CASES}
    triton_kernels = {"genblock_triton_conv", "genblock_triton_conv_dinput", "genblock_triton_conv_dweight"}
    if TRITON_REASON is not None:  # mgm_fast.ops._triton.genblock (its ops) cannot be imported
        covered -= triton_kernels
    assert registered == covered, (sorted(registered - covered), sorted(covered - registered))


def test_every_backend_op_is_a_custom_op_of_the_namespace():
    """The names the ops register follow <op>_<backend>[...] for every non-reference backend."""
    names = {name.split("::", 1)[1] for name in registered_ops()}
    expected = {
        "sagan_attention_cpp", "genblock_cpp_forward", "genblock_cuda_forward", "cbn_relu_conv3x3_cpp_forward",
        "cbn_relu_conv3x3_cuda_forward", "multitask_loss_cpp", "multitask_loss_cuda", "multitask_loss_triton",
        "ntxent_rows_cpp", "ntxent_rows_cuda", "ntxent_rows_triton", "noisy_cpp", "noisy_triton", "hinge_d_triton",
        "hinge_g_triton", "simclr_views_cpp",
        "spectral_norm_power_iteration_cpp", "spectral_norm_weight_grad_cpp", "batch_norm_cpp", "batch_norm_backward_cpp",
    }  # fmt: skip
    assert expected <= names, sorted(expected - names)


# ---------------------------------------------------------------------------------------------
# the public ops traced by torch.compile(fullgraph=True) through impl="auto"


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


@contextlib.contextmanager
def _no_graph_breaks():
    torch._dynamo.reset()
    counters.clear()
    yield
    assert not counters["graph_break"], dict(counters["graph_break"])


needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_genblock_compiles_and_matches_eager(channels_last, training, monkeypatch):
    """The autograd.Function around the mutating custom ops, compiled: same output, gradients and
    running statistics (updated in place through the functionalized op) as eager; the choice made
    while tracing is recorded like an eager one."""
    monkeypatch.setattr(genblock.OP, "resolutions", {})
    args = list(_block_args("cpu", channels_last, training))
    names = ("x", "embed1", "weight1", "bias1", "embed2", "weight2", "bias2", "weight0", "bias0")
    index = (0, 2, 3, 4, 5, 6, 7, 8, 9)

    def run(fn):
        a = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        for i in index:
            a[i] = a[i].requires_grad_()
        out = fn(*a)
        grads = torch.autograd.grad((out * out).sum(), [a[i] for i in index])
        return out.detach(), dict(zip(names, grads)), [a[i] for i in (10, 11, 12, 13, 14, 15)]

    def block(*a):
        return genblock.genblock(*_public_order(a), training=a[16], momentum=a[17], eps=a[18])

    with _no_graph_breaks():
        out_c, grads_c, stats_c = run(_compiled(block))
    assert genblock.OP.resolutions["cpu float32"]["backend"] == "cpp"
    out_e, grads_e, stats_e = run(block)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for name in names:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=0, atol=0, msg=name)
    for a, b in zip(stats_c, stats_e):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert out_c.is_contiguous(memory_format=torch.channels_last) == channels_last


@needs_cpp
@pytest.mark.parametrize("residual", [None, "half", "full"])
def test_piece_compiles_and_matches_eager(residual):
    args = list(_piece_args("cpu", True, upsample=residual != "full", residual=residual, head=residual is None))
    grad_index = [i for i in (0, 1, 2, 3, 4, 5) if isinstance(args[i], torch.Tensor)]

    def run(fn):
        a = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        for i in grad_index:
            a[i] = a[i].detach().requires_grad_()
        out = fn(*a)
        return out.detach(), torch.autograd.grad((out * out).sum(), [a[i] for i in grad_index]), a[6:9]

    def piece(*a):  # the kernels' order -> cbn_relu_conv3x3()'s
        return genblock.cbn_relu_conv3x3(*a[:5], *a[6:9], a[5], training=a[9], momentum=a[10], eps=a[11],
                                         upsample=a[12])  # fmt: skip

    with _no_graph_breaks():
        compiled = run(_compiled(piece))
    eager = run(piece)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(compiled[2], eager[2]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpp
def test_attention_compiles_and_matches_eager(monkeypatch):
    monkeypatch.setattr(attention.OP, "resolutions", {})  # the first choice per input kind is kept
    tensors = _attention_inputs("cpu", False, transposed=True)

    def run(fn):
        leaves = _leaves(*tensors)
        out = fn(*leaves)
        return out.detach(), torch.autograd.grad(out.square().sum(), leaves)

    with _no_graph_breaks():
        compiled = run(_compiled(attention.sagan_attention))
    eager = run(attention.sagan_attention)
    assert attention.OP.resolutions["cpu float32"]["backend"] == "cpp"
    for a, b in zip((compiled[0], *compiled[1]), (eager[0], *eager[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_compiles_and_matches_eager(relu):
    """Traced, the cpp backend is a Python autograd.Function around the custom op; eagerly a C++
    autograd node: the same values, gradients and running statistics."""
    g = _gen("batch_norm compiled")
    x = _randn(g, 3, 8, 5, 6, scale=2.0).contiguous(memory_format=torch.channels_last)
    weight, bias = _randn(g, 8), _randn(g, 8)
    shortcut = _randn(g, 3, 8, 5, 6).contiguous(memory_format=torch.channels_last)

    def run(fn):
        running = [torch.zeros(8), torch.ones(8)]
        leaves = _leaves(x, weight, bias, shortcut)
        out = fn(*leaves[:3], *running, 0.1, 1e-5, relu, leaves[3], impl="cpp")
        return out.detach(), torch.autograd.grad(out.square().sum(), leaves), running

    with _no_graph_breaks():
        compiled = run(_compiled(batch_norm.batch_norm_train))
    eager = run(batch_norm.batch_norm_train)
    for a, b in zip((compiled[0], *compiled[1], *compiled[2]), (eager[0], *eager[1], *eager[2])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("algo", ["conv", "gemm", "auto"])
def test_conv2d_compiles_and_matches_eager(monkeypatch, algo):
    """Traced, the cpp backend puts the ATen op of the algorithm it picks for the shapes into the
    graph (no custom op): the same op as an eager call, so the same values and gradients."""
    monkeypatch.setenv("MGM_FAST_CONV2D_ALGO", "" if algo == "auto" else algo)
    (x, weight, bias, *_), _ = _conv2d_forward_args(True, 2, 1)
    graphs = []

    def backend(gm, example_inputs):  # the graph dynamo traced, then aot_eager
        graphs.append(str(gm.graph))
        return lookup_backend("aot_eager")(gm, example_inputs)

    def run(fn):
        leaves = _leaves(x, weight, bias)
        out = fn(*leaves, (2, 2), (1, 1), impl="cpp")
        return out.detach(), torch.autograd.grad(out.square().sum(), leaves), out.grad_fn

    with _no_graph_breaks():
        compiled = run(torch.compile(conv2d.conv2d, fullgraph=True, backend=backend, dynamic=False))
    eager = run(conv2d.conv2d)
    eager_gemm = type(eager[2]).__name__ == "SlowConv2DBackward0"
    if algo != "auto":  # a forced algorithm is the one the eager call ran
        assert eager_gemm == (algo == "gemm")
    assert len(graphs) == 1 and ("_slow_conv2d_forward" in graphs[0]) == eager_gemm, graphs
    assert "mgm_fast" not in graphs[0]
    for a, b in zip((compiled[0], *compiled[1]), (eager[0], *eager[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


_STRIDE_CHECK = re.compile(r"assert_size_stride\(\w+, \((\d+), (\d+), (\d+), (\d+)\), \((\d+), (\d+), (\d+), (\d+)\), "
                           r"'torch\.ops\.aten\._slow_conv2d_backward")


@needs_cpp
def test_conv2d_gemm_backward_keeps_channels_last_under_inductor(monkeypatch):
    """Inductor calls the GEMM convolution's backward with the traced (channels_last) strides, as
    eager does, instead of its default for an ATen op in a backward graph: copies of the gradient,
    input and weight to NCHW (and of the results back). Its code states the strides of the
    backward's results; NCHW ones mean the copies are back."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    monkeypatch.setenv("MGM_FAST_CONV2D_ALGO", "gemm")
    (x, weight, bias, *_), _ = _conv2d_forward_args(True, 1, 1)

    def net(x, weight, bias):
        return torch.relu(conv2d.conv2d(x, weight, bias, (1, 1), (1, 1), impl="cpp"))

    def run(fn):
        leaves = _leaves(x, weight, bias)
        out = fn(*leaves)
        return out.detach(), torch.autograd.grad(out.square().sum(), leaves)

    with fresh_cache(), _no_graph_breaks():  # a cached graph would not show its code
        compiled, code = run_and_get_code(run, torch.compile(net, fullgraph=True, dynamic=False))
    eager = run(net)
    checks = [tuple(map(int, m.groups())) for m in _STRIDE_CHECK.finditer("\n".join(code))]
    assert len(checks) == 2, code  # grad input (2, 5, 7, 6) and grad weight (4, 5, 3, 3)
    for check in checks:
        size, stride = check[:4], check[4:]
        expected = torch.empty(size).contiguous(memory_format=torch.channels_last).stride()
        assert stride == expected, (size, stride)
    for a, b in zip((compiled[0], *compiled[1]), (eager[0], *eager[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the compile caches key on the registration: graphs cached with the copies are not served
    assert conv2d.GEMM_BACKWARD_CACHE_TAG in torch.compiler.config.cache_key_tag.split(";")


@needs_cpp
@pytest.mark.parametrize("need", [(True, True, True), (True, False, True)])
def test_multitask_loss_compiles_and_matches_eager(need):
    args = _multitask_args("cpu", need, ignore_index=-1, reduction="valid", channels_last=True)

    def run(fn):
        preds = [t.detach().clone().requires_grad_(n) for t, n in zip(args[:3], need)]
        losses = fn(*preds, *args[3:10])
        total = sum(loss * (k + 1) for k, loss in enumerate(losses))
        grads = torch.autograd.grad(total, [p for p, n in zip(preds, need) if n])
        return [loss.detach() for loss in losses], grads, [loss.requires_grad for loss in losses]

    with _no_graph_breaks():
        compiled = run(_compiled(multitask_loss.multitask_loss))
    eager = run(multitask_loss.multitask_loss)
    assert compiled[2] == eager[2] == list(need)  # a loss of a constant prediction is constant
    for a, b in zip([*compiled[0], *compiled[1]], [*eager[0], *eager[1]]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpp
def test_ntxent_compiles_and_matches_eager():
    g = _gen("ntxent compile")
    z1, z2 = _randn(g, 6, 8), _randn(g, 6, 8)

    def run(fn):
        leaves = _leaves(z1, z2)
        loss = fn(*leaves, 0.2)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    with _no_graph_breaks():
        compiled = run(_compiled(ntxent.ntxent_loss))
    eager = run(ntxent.ntxent_loss)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpp
def test_noisy_compiles_and_matches_eager():
    x = _randn(_gen("noisy compile"), 2, 3, 6, 5).contiguous(memory_format=torch.channels_last)

    def draw(t):
        return gan_losses.noisy(t, 0.25, 987, return_noise=True, impl="cpp")

    def run(fn):
        (leaf,) = _leaves(x)
        out, noise = fn(leaf)
        return out.detach(), noise, torch.autograd.grad(out.square().sum(), leaf)[0]

    with _no_graph_breaks():
        compiled = run(_compiled(draw))
    eager = run(draw)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert compiled[0].stride() == x.stride()


@needs_cpp
def test_simclr_views_cpp_op_compiles_and_matches_eager():
    args, _ = _views_args()
    op = simclr_views._cpp_op
    with _no_graph_breaks():
        compiled = _compiled(lambda *a: op(*a))(*args)
    torch.testing.assert_close(compiled, op(*args), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# once-differentiable


@needs_cpp
@pytest.mark.parametrize("name", ["attention", "ntxent", "genblock", "multitask_loss", "batch_norm"])
def test_fused_backward_is_once_differentiable(name):
    if name == "batch_norm":  # eager: a C++ autograd node, which refuses to build a graph
        leaves = _leaves(_randn(_gen("bn once"), 2, 4, 3, 3).contiguous(memory_format=torch.channels_last))
        out = batch_norm.batch_norm_train(leaves[0], None, None, torch.zeros(4), torch.ones(4), 0.1, 1e-5, impl="cpp")
        with pytest.raises(RuntimeError, match="once differentiable"):
            torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
        return
    if name == "attention":
        leaves = _leaves(*_attention_inputs("cpu", False))
        out = attention.sagan_attention(*leaves, impl="cpp")
    elif name == "ntxent":
        (rows, cols, index, tau), _ = _ntxent_args("cpu", grad=False)
        leaves = _leaves(rows)
        out = ntxent.ntxent_rows(leaves[0], cols, index, tau, impl="cpp")
    elif name == "genblock":
        args = list(_block_args("cpu", True, True))
        leaves = _leaves(args[0])
        out = genblock.genblock(*_public_order([leaves[0], *args[1:]]), impl="cpp")
    else:
        args = _multitask_args("cpu", (False, False, False))
        leaves = _leaves(args[0])
        out = sum(multitask_loss.multitask_loss(leaves[0], *args[1:10], impl="cpp"))
    (g,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


needs_triton = pytest.mark.skipif(TRITON_REASON is not None or TRITON_DEVICE != "cpu",
                                  reason=f"triton interpreter: {TRITON_REASON or 'a GPU is present'}")  # fmt: skip


def _triton_calls():
    block = list(_block_args("cpu", True, True))
    (rows, cols, index, tau), _ = _ntxent_args("cpu", grad=False)
    dense = _multitask_args("cpu", (True, False, True))
    scores = _randn(_gen("triton scores"), 5)
    return {
        "genblock": ([block[0]], lambda x: _genblock_triton(x, block)),
        "ntxent_rows": ([rows, cols], lambda r, c: ntxent.ntxent_rows(r, c, index, tau, impl="triton")),
        "multitask_loss": (
            [dense[0], dense[2]],
            lambda s, n: sum(multitask_loss.multitask_loss(s, dense[1], n, *dense[3:10], impl="triton")),
        ),
        "hinge losses": ([scores], _hinge_losses),
        "noisy": ([block[0]], lambda t: gan_losses.noisy(t, 0.1, 7, impl="triton")),
    }


def _genblock_triton(x, block):
    return genblock.genblock(*_public_order([x, *block[1:]]), impl="triton")


def _hinge_losses(d):
    return gan_losses.hinge_d_loss(d, 2 * d, impl="triton") + gan_losses.hinge_g_loss(d, impl="triton")


@needs_triton
@pytest.mark.parametrize("name", list(_triton_calls()))
def test_triton_backends_compile_and_match_eager(name):
    """The forced triton backends (interpreter) traced with fullgraph: the custom ops, their fake
    kernels and autograd."""
    inputs, fn = _triton_calls()[name]

    def run(f):
        leaves = _leaves(*inputs)
        out = f(*leaves)
        return out.detach(), torch.autograd.grad(out.float().square().sum(), leaves)

    with _no_graph_breaks():
        compiled = run(_compiled(fn))
    eager = run(fn)
    for a, b in zip((compiled[0], *compiled[1]), (eager[0], *eager[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
