"""Self-tests of the fused backends: the tests' 2x-error rule, run on the user's own device.

Each op module lists its cases (:class:`Case`) with ``FusedOp.selftest_cases``: small odd
shapes and the shapes of the paper preset, built as float64 CPU tensors. :func:`run_case` runs
one case through one backend at one dtype and memory layout, forward and backward, and compares
every output and every input gradient with three evaluations of the same inputs:

* ``truth`` -- the case's float64 twin (by default the op's ``reference`` backend in float64);
* ``plain`` -- the plain-PyTorch path in the test dtype (the ``reference`` backend, or the
  case's ``plain`` twin), the error a user accepts by not fusing;
* ``fused`` -- the backend under test in the test dtype and layout.

The verdict is ``pass`` when, for every compared tensor, ``|fused - truth|_max <= 2 |plain -
truth|_max + slack(dtype) * |truth|_max`` (flash-attention's rule, as in the tests), ``fail``
otherwise (naming the tensor), ``error`` when the backend raised (e.g. no kernel image for this
GPU), and ``n/a`` when the backend does not take these inputs (its ``not_supported_reasons``).

:mod:`mgm_fast.selftest` is the command line over every op; :mod:`mgm_fast.ops._verify` runs the
small cases of a backend the first time the fast engine selects it on a device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

SIZES = ("small", "paper")
LAYOUTS = ("contiguous", "channels_last")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SLACK = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
"""The rule's floor, relative to the largest true entry: for results that both paths get ~exact
(float32: 8 ulps), and in 16-bit dtypes one ulp at that entry, so that a result rounded twice
(once more than the plain path does) is not a failure."""

VERDICTS = ("pass", "fail", "error", "n/a")


@dataclass
class Inputs:
    """The arguments of one case, as float64 (floating) and integer CPU tensors.

    Attributes:
        args, kwargs: the op's arguments (without ``impl``).
        grad: the arguments that get gradients: positions in ``args`` or names in ``kwargs``.
        channels_last: the 4-d arguments put in channels_last under that layout.
        keep_float32: floating arguments that stay float32 whatever the test dtype (e.g. the
            running statistics of a BatchNorm, which are float32 buffers in a model).
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    grad: tuple[int | str, ...] = ()
    channels_last: tuple[int | str, ...] = ()
    keep_float32: tuple[int | str, ...] = ()


@dataclass(frozen=True)
class Case:
    """One self-test input of an op.

    Attributes:
        op: the op's registry name.
        name: the shape, e.g. ``"b3 c13 9x11"``.
        size: ``"small"`` (odd shapes, milliseconds) or ``"paper"`` (the paper preset's shapes).
        build: ``build(generator) -> Inputs``, deterministic for a seeded CPU generator.
        truth: a float64 twin with the op's signature (default: the ``reference`` backend).
        plain: the plain-PyTorch path for the test dtype (default: the ``reference`` backend).
        backends: the backends this case applies to (default: every non-reference one).
    """

    op: str
    name: str
    size: str
    build: Callable[[torch.Generator], Inputs]
    truth: Callable | None = None
    plain: Callable | None = None
    backends: tuple[str, ...] | None = None


@dataclass
class Result:
    """The outcome of one case on one backend, dtype and layout."""

    op: str
    backend: str
    case: str
    size: str
    dtype: str
    layout: str
    verdict: str
    error: float = math.nan  # the worst compared tensor's fused error ...
    bound: float = math.nan  # ... and its bound
    detail: str = ""  # which tensor failed, the exception, or why n/a
    seconds: float = 0.0  # the fused forward + backward

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# evaluation


def _select(inputs: Inputs, keys: Sequence[int | str]) -> list[tuple[str, int | str]]:
    return [("kwargs" if isinstance(k, str) else "args", k) for k in keys]


def _materialize(inputs: Inputs, dtype: torch.dtype, layout: str, device: torch.device):
    """(args, kwargs, leaves): the inputs on ``device`` (tensors inside dict, list and tuple
    arguments too), floating ones cast to ``dtype`` (but the ``keep_float32`` ones),
    channels_last where asked, gradients required where asked."""
    args, kwargs = list(inputs.args), dict(inputs.kwargs)

    def convert(key, value):
        if isinstance(value, dict):  # e.g. a parameter dict: its tensors are converted too
            return {k: convert(key, v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(convert(key, v) for v in value)  # a group of tensors (one per layer)
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(device)
        if value.is_floating_point():
            want = torch.float32 if (key in inputs.keep_float32 and dtype != torch.float64) else dtype
            value = value.to(want)
        if layout == "channels_last" and key in inputs.channels_last and value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        return value.detach().clone()

    args = [convert(i, v) for i, v in enumerate(args)]
    kwargs = {k: convert(k, v) for k, v in kwargs.items()}
    leaves = []
    for where, key in _select(inputs, inputs.grad):
        value = args[key] if where == "args" else kwargs[key]
        name = f"d{key}" if isinstance(key, str) else f"d(arg {key})"
        if isinstance(value, (list, tuple)):  # every tensor of a group gets its gradient
            for j, tensor in enumerate(value):
                leaves.append((f"{name}[{j}]", tensor.requires_grad_(True)))
        else:
            leaves.append((name, value.requires_grad_(True)))
    return args, kwargs, leaves


def _flatten(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _flatten(item)]
    if isinstance(result, dict):
        return [t for item in result.values() for t in _flatten(item)]
    return []


def evaluate(fn: Callable, inputs: Inputs, dtype: torch.dtype, layout: str, device: torch.device,
             seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """``fn`` on the inputs, then backward with fixed random output gradients: the named
    results (``out0``, ``out1``, ..., ``d<argument>``), detached."""
    args, kwargs, leaves = _materialize(inputs, dtype, layout, device)
    outputs = [t for t in _flatten(fn(*args, **kwargs)) if t.is_floating_point()]
    named = [(f"out{i}", t.detach()) for i, t in enumerate(outputs)]
    differentiable = [t for t in outputs if t.requires_grad]
    if leaves and differentiable:
        gen = torch.Generator().manual_seed(seed + 1)
        cotangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
                      for t in differentiable]  # fmt: skip
        grads = torch.autograd.grad(differentiable, [t for _, t in leaves], cotangents, allow_unused=True)
        named += [(name, g.detach()) for (name, _), g in zip(leaves, grads, strict=True) if g is not None]
    return named


def _compare(fused, plain, truth, dtype: torch.dtype) -> tuple[bool, float, float, str]:
    """The 2x-error rule over every named tensor: (passed, worst error, its bound, detail)."""
    names = [n for n, _ in truth]
    if [n for n, _ in fused] != names or [n for n, _ in plain] != names:
        return False, math.inf, 0.0, f"results {[n for n, _ in fused]} differ from the reference's {names}"
    worst = (-math.inf, math.nan, math.nan, "")
    for (name, f), (_, p), (_, t) in zip(fused, plain, truth, strict=True):
        if f.shape != t.shape:
            return False, math.inf, 0.0, f"{name}: shape {tuple(f.shape)}, expected {tuple(t.shape)}"
        t = t.double().cpu()
        scale = t.abs().max().item() if t.numel() else 0.0
        err = (f.double().cpu() - t).abs().max().item() if t.numel() else 0.0
        err_plain = (p.double().cpu() - t).abs().max().item() if t.numel() else 0.0
        bound = 2 * err_plain + SLACK[dtype] * scale
        if not math.isfinite(err) or err > bound:
            return False, err, bound, f"{name}: error {err:.3g} > bound {bound:.3g} (plain error {err_plain:.3g})"
        ratio = err / bound if bound > 0 else 0.0
        if ratio > worst[0]:
            worst = (ratio, err, bound, "")
    return True, worst[1], worst[2], ""


def run_case(op, backend: str, case: Case, device: torch.device | str, dtype: torch.dtype,
             layout: str = "contiguous", seed: int = 0, memo: dict | None = None) -> Result:
    """One case of ``op`` (a :class:`~mgm_fast.ops.FusedOp`) through ``backend``; see the module
    docstring for the rule and the verdicts. ``memo`` (one dict per case and seed) keeps the
    inputs, the truth per layout and the plain path per dtype and layout between calls: they do
    not depend on the backend."""
    device = torch.device(device)
    memo = {} if memo is None else memo
    result = Result(op.name, backend, case.name, case.size, str(dtype).replace("torch.", ""), layout, "n/a")
    impl = op.backends.get(backend)
    if impl is None:
        result.detail = "not implemented for this op"
        return result
    if "inputs" not in memo:
        memo["inputs"] = case.build(torch.Generator().manual_seed(seed))
    inputs = memo["inputs"]
    if layout == "channels_last" and not inputs.channels_last:
        result.detail = "no 4-d input"
        return result
    args, kwargs, _ = _materialize(inputs, dtype, layout, device)
    reasons = impl.not_supported_reasons(op.bind(*args, **kwargs))
    del args, kwargs
    if reasons:
        result.detail = "; ".join(reasons)
        return result
    reference = op.backends["reference"].fn
    try:  # the truth in the test layout too: a result may depend on it (a stream in memory order)
        if ("truth", layout) not in memo:
            memo["truth", layout] = evaluate(case.truth or reference, inputs, torch.float64, layout, device, seed)
        if ("plain", dtype, layout) not in memo:
            memo["plain", dtype, layout] = evaluate(case.plain or reference, inputs, dtype, layout, device, seed)
    except Exception as err:  # the twins themselves cannot run this dtype here
        result.detail = f"the reference cannot run {result.dtype} on {device.type}: {err}"
        return result
    start = time.perf_counter()
    try:
        fused = evaluate(impl.fn, inputs, dtype, layout, device, seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:
        result.verdict, result.detail = "error", f"{type(err).__name__}: {err}"
        return result
    result.seconds = time.perf_counter() - start
    passed, result.error, result.bound, result.detail = _compare(
        fused, memo["plain", dtype, layout], memo["truth", layout], dtype)
    result.verdict = "pass" if passed else "fail"
    return result


def cases_of(op, sizes: Sequence[str] = SIZES) -> list[Case]:
    """The op's cases of the given sizes ([] when it lists none)."""
    make = getattr(op, "selftest_cases", None)
    return [c for c in (make() if make is not None else []) if c.size in sizes]


def run_op(op, device: torch.device | str, backends: Sequence[str] | None = None,
           dtypes: Sequence[torch.dtype] = (torch.float32,), layouts: Sequence[str] = LAYOUTS,
           sizes: Sequence[str] = SIZES) -> list[Result]:
    """Every case x backend x dtype x layout of one op (the reference itself is not tested)."""
    from mgm_fast.ops._dispatch import triton_interpreting

    names = [b for b in op.backends if b != "reference"] if backends is None else list(backends)
    results = []
    for case in cases_of(op, sizes):
        memo = {"inputs": case.build(torch.Generator().manual_seed(0))}
        has_4d = bool(memo["inputs"].channels_last)
        for backend in names:
            if case.backends is not None and backend not in case.backends:
                continue
            for dtype in dtypes:
                for layout in layouts:
                    if layout == "channels_last" and not has_4d:
                        continue  # the same run as contiguous
                    if backend == "triton" and triton_interpreting() and case.size != "small":
                        results.append(Result(op.name, backend, case.name, case.size, str(dtype)[6:], layout,
                                              "n/a", detail="Triton interpreter: small cases only"))
                        continue
                    results.append(run_case(op, backend, case, device, dtype, layout, memo=memo))
    return results
