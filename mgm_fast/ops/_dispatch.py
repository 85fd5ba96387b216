"""Backend selection for fused ops.

Each public op (``mgm_fast.ops.<name>``) owns a :class:`FusedOp` with one :class:`Backend` per
implementation: ``reference`` (plain PyTorch, always present), and where written ``triton``,
``cpp`` and ``cuda``. An op module declares them (:func:`define_op` with
:func:`reference_backend`, :func:`cpp_backend`, :func:`cuda_backend`, :func:`triton_backend`,
which fill in each kind's devices, dtypes and availability probe) and reaches the extension's
kernels through :func:`native_function`. Each call is bound once to the op's argument list
(that of its reference twin) into an :class:`Inputs` object, and every backend states from it
what it supports and, when it cannot run the inputs, why (the xformers
``not_supported_reasons`` pattern):

* ``impl="auto"`` takes the first backend in priority order that supports the inputs;
* a forced ``impl`` that cannot run raises :class:`BackendUnavailable` listing the reasons --
  there is never a silent fall back to a slower backend;
* a backend that failed its self-test on this device (:mod:`mgm_fast.ops._verify`) is excluded:
  ``auto`` skips it, forcing it raises;
* the environment wins over ``impl``: ``MGM_FAST_IMPL=reference`` runs every op on its reference
  twin, ``MGM_FAST_IMPL_<OP>=<backend>`` (e.g. ``MGM_FAST_IMPL_GENBLOCK=cpp``) forces one op.

Under ``torch.compile`` the choice is made while the graph is traced, outside it, from static
properties of the inputs (see ``_traced_choice`` below): a compiled call graph-breaks on none of
this host-side logic, and the fused backends themselves are ``torch.library`` custom ops
(:mod:`mgm_fast.ops._library`).

Every op remembers which backend ``auto`` picked for each kind of input (device, dtype) and why
not the ones before it (``FusedOp.resolutions``), so a run can record what computed its numbers.
``python -m mgm_fast.info`` prints the table of every registered op x backend.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mgm_fast import _native

BACKEND_NAMES = ("reference", "triton", "cpp", "cuda")
"""Every backend kind the project knows, in the column order of the info table."""

ANY_DEVICE = ("cpu", "cuda", "mps", "xpu")
"""Tensor devices a plain-PyTorch reference runs on."""
ANY_FLOAT = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
"""Floating dtypes a plain-PyTorch reference runs in."""
FUSED_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
"""Floating dtypes the GPU kernels (cuda, triton) take."""


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs (the message lists why)."""


# ---------------------------------------------------------------------------------------------
# argument binding: once per call, to the op's argument list


class ArgumentList:
    """An op's argument list -- names in order, how many may be passed by position, the
    defaults -- read once (with ``inspect``) from a function that has it, usually the op's
    reference twin. :meth:`bind` is plain Python, so ``torch.compile`` traces it where a fused
    backend binds its own arguments (``inspect.Signature.bind`` it would not)."""

    def __init__(self, fn: Callable, op_name: str | None = None) -> None:
        kinds = inspect.Parameter
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]  # fmt: skip
        self.op_name = op_name or getattr(fn, "__name__", "op")
        self.names = tuple(p.name for p in params)
        self.positional = sum(p.kind != kinds.KEYWORD_ONLY for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """name -> value for every argument, defaults filled in, in the list's order; TypeError
        naming the op for a call the list does not accept."""
        if len(args) > self.positional:
            raise TypeError(f"{self.op_name}: takes {self.positional} positional arguments, got {len(args)}")
        given = dict(zip(self.names, args))
        for name, value in kwargs.items():
            if name not in self.names:
                raise TypeError(f"{self.op_name}: unexpected argument {name!r}")
            if name in given:
                raise TypeError(f"{self.op_name}: argument {name!r} given twice")
            given[name] = value
        bound = {}
        for name in self.names:
            if name in given:
                bound[name] = given[name]
            elif name in self.defaults:
                bound[name] = self.defaults[name]
            else:
                raise TypeError(f"{self.op_name}: missing argument {name!r}")
        return bound


@functools.cache
def argument_list(fn: Callable, op_name: str | None = None) -> ArgumentList:
    """The :class:`ArgumentList` of ``fn``, read once per function."""
    return ArgumentList(fn, op_name)


class Inputs(Mapping[str, Any]):
    """The arguments of one op call bound to the op's argument list (the xformers ``Inputs``
    pattern): argument name -> value, defaults included. Every backend's
    :meth:`Backend.not_supported_reasons` receives the same object, so a call is bound once
    however many backends look at it."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        self.arguments = arguments

    def __getitem__(self, name: str) -> Any:
        return self.arguments[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.arguments)

    def __len__(self) -> int:
        return len(self.arguments)

    @functools.cached_property
    def tensors(self) -> list[torch.Tensor]:
        """The tensor arguments, in argument order, with the tensors of list and tuple arguments
        (an op over a group of layers); tensors inside other containers are not included.
        Computed once per call: every backend's check reads it."""
        out: list[torch.Tensor] = []
        for value in self.arguments.values():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif isinstance(value, (list, tuple)):
                out.extend(v for v in value if isinstance(v, torch.Tensor))
        return out


# ---------------------------------------------------------------------------------------------
# backends and ops


@dataclass
class Backend:
    """One implementation of an op.

    Attributes:
        name: one of :data:`BACKEND_NAMES`.
        fn: the callable, with the op's public signature minus ``impl``.
        devices: tensor device types it accepts (``"cpu"``, ``"cuda"``).
        dtypes: floating dtypes it accepts for the op's floating inputs.
        availability: returns why the backend cannot run at all in this process (extension not
            built, no GPU, Triton missing), or None when it can.
        extra_check: optional per-input check ``extra_check(inputs: Inputs) -> list[str]``
            returning further reasons.
        auto_exclusion: why ``impl="auto"`` must not pick this backend although it can run
            (e.g. Triton kernels on the CPU interpreter, a correctness tool), or None.

    The constructors :func:`reference_backend`, :func:`cpp_backend`, :func:`cuda_backend` and
    :func:`triton_backend` fill in what every backend of a kind shares.
    """

    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FUSED_FLOATS
    availability: Callable[[], str | None] = lambda: None
    extra_check: Callable[[Inputs], list[str]] | None = None
    auto_exclusion: Callable[[], str | None] = lambda: None

    def unavailable_reason(self) -> str | None:
        return self.availability()

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Human-readable reasons why this backend cannot run these inputs ([] if it can)."""
        reasons: list[str] = []
        reason = self.availability()
        if reason:
            reasons.append(reason)
        tensors = inputs.tensors
        for tensor in tensors:
            if tensor.device.type not in self.devices:
                reasons.append(
                    f"device {tensor.device.type} not supported (supports {list(self.devices)})"
                )
                break
        for tensor in tensors:
            if tensor.is_floating_point() and tensor.dtype not in self.dtypes:
                reasons.append(f"dtype {tensor.dtype} not supported")
                break
        if self.extra_check is not None and not reasons:
            reasons.extend(self.extra_check(inputs))
        return reasons


def reference_backend(fn: Callable, devices: tuple[str, ...] = ANY_DEVICE,
                      dtypes: tuple[torch.dtype, ...] = ANY_FLOAT) -> Backend:  # fmt: skip
    """The plain-PyTorch twin: any device and float dtype, always available. Its signature is
    the op's argument list (:meth:`FusedOp.bind`)."""
    return Backend(name="reference", fn=fn, devices=devices, dtypes=dtypes)


def cpp_backend(fn: Callable, dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                extra_check: Callable[[Inputs], list[str]] | None = None,
                availability: Callable[[], str | None] = _native.cpp_reason) -> Backend:  # fmt: skip
    """The CPU kernels of the extension (``csrc/kernels/cpu``): CPU tensors, available when the
    extension is built."""
    return Backend(name="cpp", fn=fn, devices=("cpu",), dtypes=dtypes, availability=availability,
                   extra_check=extra_check)  # fmt: skip


def cuda_backend(fn: Callable, dtypes: tuple[torch.dtype, ...] = FUSED_FLOATS,
                 extra_check: Callable[[Inputs], list[str]] | None = None,
                 availability: Callable[[], str | None] = _native.cuda_reason) -> Backend:  # fmt: skip
    """The CUDA kernels of the extension (``csrc/kernels/cuda``): CUDA tensors, available when
    the extension was built with them and a GPU runs them."""
    return Backend(name="cuda", fn=fn, devices=("cuda",), dtypes=dtypes, availability=availability,
                   extra_check=extra_check)  # fmt: skip


def triton_backend(fn: Callable, dtypes: tuple[torch.dtype, ...] = FUSED_FLOATS,
                   extra_check: Callable[[Inputs], list[str]] | None = None,
                   availability: Callable[[], str | None] | None = None) -> Backend:  # fmt: skip
    """The Triton kernels (``mgm_fast/ops/_triton``): CUDA tensors, or CPU tensors under the
    interpreter (then only when forced); available where a probe kernel compiles and runs."""
    return Backend(name="triton", fn=fn, devices=triton_devices(), dtypes=dtypes,
                   availability=availability or triton_reason, extra_check=extra_check,
                   auto_exclusion=triton_auto_exclusion)  # fmt: skip


@dataclass
class FusedOp:
    """An op with several backends; call it like a function with ``impl=``.

    Its argument list is that of its ``reference`` backend (the plain-PyTorch twin): every call
    is bound to it once (:meth:`bind`) and the resulting :class:`Inputs` go to every backend's
    ``not_supported_reasons``.

    ``selftest_cases`` returns the op's self-test inputs (:class:`mgm_fast.ops._selftest.Case`:
    small odd shapes and the paper preset's), which ``python -m mgm_fast.selftest`` and the
    first-use verification run through every fused backend.
    """

    name: str
    summary: str
    priority: tuple[str, ...] = ("cuda", "triton", "cpp", "reference")
    backends: dict[str, Backend] = field(default_factory=dict)
    selftest_cases: Callable[[], list] | None = None
    exclusions: dict[str, str] = field(default_factory=dict)
    """backend -> why it must not run in this process (it failed its self-test here)."""
    resolutions: dict[str, dict] = field(default_factory=dict)
    """"<device> <dtype>" of the inputs -> {"backend": what auto picked, "skipped": {name: why}}."""
    _kind_names: dict = field(default_factory=dict, repr=False)
    """(device type, dtype) -> its key in ``resolutions``."""
    selection_key: Callable[..., Hashable] | None = None
    """Optional ``selection_key(*args, **kwargs) -> hashable``: everything the backends' checks and
    the op's ``check`` read from a call (devices, dtypes, layouts, shapes), so that calls with equal
    keys pass the same checks and select the same backend. With it, eager calls remember their
    selection per key (with ``impl``, the environment's forced backend, the exclusions and the
    backends) instead of checking and selecting each time: that costs tens of microseconds a call,
    which matters for an op called hundreds of times a step (a network's convolutions)."""
    check: Callable[..., None] | None = None
    """Optional ``check(*args, **kwargs)``, raising ``ValueError`` for bad arguments; run before the
    selection (with a ``selection_key``: once per key)."""
    _selected: dict = field(default_factory=dict, repr=False)
    """The remembered selections (see ``selection_key``)."""

    def register(self, backend: Backend) -> Backend:
        if backend.name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend kind {backend.name!r}")
        self.backends[backend.name] = backend
        self._selected.clear()
        return backend

    def reset_run_record(self) -> None:
        """Forget what this process recorded for a run: the exclusions, the resolutions and the
        remembered selections (a new run in the same process verifies and records afresh; a
        remembered selection would otherwise skip recording its resolution)."""
        self.exclusions.clear()
        self.resolutions.clear()
        self._selected.clear()

    def exclude(self, backend: str, reason: str) -> None:
        """Never run ``backend`` again in this process (auto skips it, forcing it raises)."""
        self.exclusions[backend] = reason

    def bind(self, *args, **kwargs) -> Inputs:
        """The call's arguments bound to the op's argument list (its reference's signature)."""
        reference = self.backends.get("reference")
        if reference is None:
            raise TypeError(f"{self.name}: no reference backend, so no argument list to bind to")
        return Inputs(argument_list(reference.fn, self.name).bind(args, kwargs))

    def select(self, impl: str, *args, **kwargs) -> Backend:
        """The backend that will run these inputs for ``impl`` (see module docstring)."""
        impl = forced_impl(self.name) or impl
        inputs = self.bind(*args, **kwargs)
        if impl == "auto":
            reasons = {}
            for name in self.priority:
                backend = self.backends.get(name)
                if backend is None:
                    continue
                why = backend.not_supported_reasons(inputs)
                excluded = self.exclusions.get(name) or backend.auto_exclusion()
                if excluded:
                    why = [*why, excluded]
                if not why:
                    self._remember(backend.name, reasons, inputs)
                    return backend
                reasons[name] = why
            raise BackendUnavailable(f"{self.name}: no backend supports these inputs: {reasons}")
        backend = self.backends.get(impl)
        if backend is None:
            raise BackendUnavailable(
                f"{self.name}: backend {impl!r} is not implemented; "
                f"implemented: {sorted(self.backends)} (or 'auto')"
            )
        why = backend.not_supported_reasons(inputs)
        if impl in self.exclusions:
            why = [*why, self.exclusions[impl]]
        if why:
            raise BackendUnavailable(f"{self.name}: backend {impl!r} cannot run: " + "; ".join(why))
        self._remember(backend.name, {}, inputs)
        return backend

    def _remember(self, chosen: str, skipped: dict, inputs: Inputs) -> None:
        tensors = inputs.tensors
        first = next((t for t in tensors if t.is_floating_point()), tensors[0] if tensors else None)
        key = None if first is None else (first.device.type, first.dtype)
        kind = self._kind_names.get(key)
        if kind is None:  # formatted once per kind
            kind = "-" if first is None else f"{key[0]} {str(key[1]).replace('torch.', '')}"
            self._kind_names[key] = kind
        if kind not in self.resolutions:
            self.resolutions[kind] = {"backend": chosen, "skipped": {k: "; ".join(v) for k, v in skipped.items()}}

    def __call__(self, *args, impl: str = "auto", **kwargs):
        if torch.compiler.is_compiling():
            # Traced by torch.compile: the choice is made once per traced graph, in plain Python
            # outside the graph, from what the graph is specialised on anyway (devices, dtypes,
            # shapes, strides, requires_grad, grad mode, autocast); see _traced_choice.
            name = _traced_choice(self.name, impl, _spec(args), _spec(kwargs), _global_state())
            return self.backends[name].fn(*args, **kwargs)
        if self.selection_key is None:
            if self.check is not None:
                self.check(*args, **kwargs)
            return self.select(impl, *args, **kwargs).fn(*args, **kwargs)
        key = (impl, forced_impl(self.name), tuple(self.exclusions), id(self.backends),
               self.selection_key(*args, **kwargs))  # fmt: skip
        backend = self._selected.get(key)
        if backend is None:
            if self.check is not None:
                self.check(*args, **kwargs)
            backend = self._selected[key] = self.select(impl, *args, **kwargs)
        return backend.fn(*args, **kwargs)

    def status(self) -> dict[str, str | None]:
        """backend name -> None (available) or the reason it is not, for every known kind."""
        out: dict[str, str | None] = {}
        for name in BACKEND_NAMES:
            backend = self.backends.get(name)
            out[name] = "not implemented for this op" if backend is None else backend.unavailable_reason()
        return out


REGISTRY: dict[str, FusedOp] = {}


# ---------------------------------------------------------------------------------------------
# backend choice under torch.compile
#
# ``FusedOp.select`` is host-side Python (environment variables, availability probes that load the
# extension or launch a Triton kernel, self-test exclusions, the binding of the arguments to
# :class:`Inputs`): dynamo cannot trace it. Under ``torch.compile`` the traced code instead
# describes the call by static properties only -- per tensor its device, dtype, shape, strides and
# requires_grad, plus grad mode and the autocast state -- and ``_traced_choice`` (a constant for
# dynamo: it runs once, eagerly, while the graph is traced) rebuilds stand-in tensors of that
# description and runs ``select`` on them. The graph is specialised on every one of these
# properties (dynamo guards them), so the choice holds for every call the graph serves; like
# ``select`` it records the resolution. The environment (``MGM_FAST_IMPL*``) and self-test
# exclusions are read when the graph is traced.

_TENSOR, _GENERATOR, _MAPPING, _SEQUENCE, _VALUE = "tensor", "generator", "mapping", "sequence", "value"


def _spec(value):
    """A hashable description of ``value`` (an op argument) by static properties only: no
    tensor value is read. Traced by dynamo; a dynamic size or stride is specialised
    (``operator.index``: the graph guards it), as a backend's conditions may depend on it."""
    if isinstance(value, torch.Tensor):
        return (_TENSOR, value.device.type, value.device.index, value.dtype,
                tuple(operator.index(s) for s in value.shape), tuple(operator.index(s) for s in value.stride()),
                value.requires_grad)  # fmt: skip
    if isinstance(value, torch.Generator):
        return (_GENERATOR, value.device.type, value.device.index)
    if isinstance(value, dict):
        return (_MAPPING, tuple((k, _spec(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (_SEQUENCE, isinstance(value, list), tuple(_spec(v) for v in value))
    return (_VALUE, value)


def _global_state() -> tuple:
    """Grad mode and the autocast state of the CPU and CUDA, which backends' conditions read."""
    return (
        torch.is_grad_enabled(),
        torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
        torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
    )  # fmt: skip


def _stand_in(spec):
    """The inverse of :func:`_spec`: an argument with the described properties (tensors are
    uninitialised memory of the same device, dtype, shape and strides)."""
    kind = spec[0]
    if kind == _TENSOR:
        _, device_type, index, dtype, shape, stride, requires_grad = spec
        device = torch.device(device_type, index) if index is not None else torch.device(device_type)
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return t.requires_grad_() if requires_grad else t
    if kind == _GENERATOR:
        _, device_type, index = spec
        return torch.Generator(torch.device(device_type, index) if index is not None else device_type)
    if kind == _MAPPING:
        return {k: _stand_in(v) for k, v in spec[1]}
    if kind == _SEQUENCE:
        items = [_stand_in(v) for v in spec[2]]
        return items if spec[1] else tuple(items)
    return spec[1]


@torch.compiler.assume_constant_result
def _traced_choice(op_name: str, impl: str, args_spec, kwargs_spec, state) -> str:
    """The name of the backend ``REGISTRY[op_name].select(impl, ...)`` picks for arguments
    described by ``args_spec`` / ``kwargs_spec`` (see :func:`_spec`) under ``state`` (see
    :func:`_global_state`). Run eagerly while dynamo traces; its result is a constant of the graph."""
    grad, cpu_on, cpu_dtype, cuda_on, cuda_dtype = state
    args = _stand_in(args_spec)
    kwargs = _stand_in(kwargs_spec)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.set_grad_enabled(grad))
        stack.enter_context(torch.autocast("cpu", dtype=cpu_dtype, enabled=cpu_on))
        if cuda_on:
            stack.enter_context(torch.autocast("cuda", dtype=cuda_dtype))
        return REGISTRY[op_name].select(impl, *args, **kwargs).name


_VALUE_CHECKS: list[bool | None] = [None]


def value_checks_enabled(device: torch.device) -> bool:
    """Whether ops check input *values* (label ranges, index bounds) of tensors on ``device``, on
    top of their shapes and dtypes.

    Such a check reads tensor values on the host: on a GPU it drains the stream, on the CPU it
    is a host read per call. By default ops check CPU tensors only, so that a direct call with a
    bad label gets a clear error where that costs no device synchronisation. The training engine
    turns checks off inside its steps (``value_checks(False)``) because its data is validated once
    at the data boundary (the loaders); ``python -m mgm_fast.train --check-values`` turns them on
    for every device (``value_checks(True)``), a debugging aid.

    Inside code traced by ``torch.compile`` (the compiled networks) no op checks values: a host
    read would break the graph (and fail ``fullgraph=True``); the data there was checked at the
    data boundary, and the fused kernels check label and index ranges themselves where they can
    (e.g. the C++ kernels raise on an out-of-range label)."""
    if torch.compiler.is_compiling():
        return False
    mode = _VALUE_CHECKS[-1]
    return device.type == "cpu" if mode is None else mode


@contextlib.contextmanager
def value_checks(enabled: bool | None):
    """Context in which value checks are on for every device (True), off (False), or as by
    default (None: CPU tensors only). Nests; restores on exit."""
    _VALUE_CHECKS.append(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS.pop()


def device_constant(values: tuple, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, made once per (values, dtype, device)
    and shared by every later call: read it, never modify it in place.

    A tensor made from host numbers on a GPU is a blocking upload, which waits for every kernel
    queued before it (a stream synchronisation, like a read-back); inside a training step that
    stalls the host once per call. A constant used in a step (jitter ranges, grayscale weights,
    phase taps) therefore comes from here: it is uploaded the first time only.
    ``python -m mgm_fast.bench step-cost`` counts the ``aten.lift_fresh`` of a
    ``torch.tensor``/``new_tensor`` among a step's host synchronisations. Traced by
    ``torch.compile``, it is the plain ``torch.tensor`` call, which the compiled graph holds as a
    constant made once. ``values`` are (nested) tuples of numbers."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _device_constant(values, dtype, torch.device(device))


@functools.lru_cache(maxsize=256)
def _device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # made outside inference mode: a first use under torch.inference_mode() must not cache an
    # inference tensor that autograd could not save later
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(values, dtype=dtype, device=device)


IMPL_ENV = "MGM_FAST_IMPL"


@functools.cache
def _per_op_env(op_name: str) -> str:
    return f"{IMPL_ENV}_{op_name.upper()}"


def forced_impl(op_name: str) -> str | None:
    """The backend the environment forces for an op, or None: ``MGM_FAST_IMPL_<OP>`` (any
    backend name or ``auto``), else ``MGM_FAST_IMPL`` (``reference`` or ``auto``)."""
    per_op = _per_op_env(op_name)
    value = os.environ.get(per_op)
    if value:
        if value != "auto" and value not in BACKEND_NAMES:
            raise ValueError(f"{per_op}={value!r}: expected one of {list(BACKEND_NAMES)} or 'auto'")
        return None if value == "auto" else value
    value = os.environ.get(IMPL_ENV)
    if value:
        if value not in ("reference", "auto"):
            raise ValueError(f"{IMPL_ENV}={value!r}: expected 'reference' or 'auto' (force one op's backend "
                             f"with {IMPL_ENV}_<OP>, e.g. {IMPL_ENV}_GENBLOCK=cpp)")
        return None if value == "auto" else value
    return None


def register_op(op: FusedOp) -> FusedOp:
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} registered twice")
    REGISTRY[op.name] = op
    return op


def define_op(name: str, summary: str, backends: list[Backend], priority: tuple[str, ...] | None = None,
              selection_key: Callable[..., Hashable] | None = None,
              check: Callable[..., None] | None = None) -> FusedOp:  # fmt: skip
    """A :class:`FusedOp` with these backends (one :func:`reference_backend` among them),
    registered in :data:`REGISTRY`; ``priority`` reorders ``auto``'s default choice;
    ``selection_key`` lets eager calls remember their checks and selection
    (:attr:`FusedOp.selection_key`); ``check`` validates the arguments (:attr:`FusedOp.check`)."""
    op = FusedOp(name=name, summary=summary) if priority is None else FusedOp(name, summary, priority)
    op.selection_key, op.check = selection_key, check
    for backend in backends:
        op.register(backend)
    if "reference" not in op.backends:
        raise ValueError(f"op {name!r} needs a reference backend (its argument list and plain twin)")
    return register_op(op)


NATIVE_DEVICE = {"cpp": "cpu", "cuda": "cuda"}
"""The device name the extension's functions carry for each native backend."""


def native_function(pattern: str, device: str):
    """The extension's function for one device: ``pattern`` with ``{device}`` replaced by
    ``device`` ("cpu" or "cuda"), e.g. ``native_function("genblock_forward_{device}", "cuda")``
    is ``mgm_fast._C.genblock_forward_cuda``. Looked up at each call: the extension loads on
    first use."""
    return getattr(_native.extension(), pattern.format(device=device))


def triton_reason() -> str | None:
    """Why Triton kernels cannot run here, or None (on CUDA after a launch probe)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)"
    return _triton_launch_reason(torch.cuda.current_device())


@functools.cache
def _triton_launch_reason(index: int) -> str | None:
    """A launch probe: compile and run a one-line Triton kernel on device ``index`` (an import
    succeeds even where Triton cannot compile for this GPU or find its toolchain)."""
    try:
        from mgm_fast.ops._triton import probe

        with torch.cuda.device(index):
            x = torch.arange(8, dtype=torch.float32, device="cuda")
            if not torch.equal(probe.add_one(x).cpu(), torch.arange(1, 9, dtype=torch.float32)):
                return "the Triton probe kernel ran but computed a wrong result"
    except Exception as err:
        return f"Triton kernels do not compile or launch on {torch.cuda.get_device_name(index)}: {err}"
    return None


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_devices() -> tuple[str, ...]:
    """Tensor devices Triton kernels accept in this process: CPU tensors under the
    interpreter, CUDA tensors otherwise."""
    return ("cpu",) if triton_interpreting() else ("cuda",)


def triton_auto_exclusion() -> str | None:
    """Under the interpreter a Triton backend runs only when forced: ``auto`` never picks it."""
    if triton_interpreting():
        return "Triton runs on the CPU interpreter here (TRITON_INTERPRET=1): only when forced"
    return None
