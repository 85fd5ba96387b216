"""Backend selection for fused ops.

Each public op (``mgm_fast.ops.<name>``) owns a :class:`FusedOp` with one :class:`Backend` per
implementation: ``reference`` (plain PyTorch, always present), and where written ``triton``,
``cpp`` and ``cuda``. A backend states what it supports and, when it cannot run an input, why
(the xformers ``not_supported_reasons`` pattern):

* ``impl="auto"`` takes the first backend in priority order that supports the inputs;
* a forced ``impl`` that cannot run raises :class:`BackendUnavailable` listing the reasons --
  there is never a silent fall back to a slower backend.

``python -m mgm_fast.info`` prints the table of every registered op x backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

BACKEND_NAMES = ("reference", "triton", "cpp", "cuda")
"""Every backend kind the project knows, in the column order of the info table."""


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs (the message lists why)."""


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
        extra_check: optional per-input check returning further reasons.
        auto_exclusion: why ``impl="auto"`` must not pick this backend although it can run
            (e.g. Triton kernels on the CPU interpreter, a correctness tool), or None.
    """

    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    availability: Callable[[], str | None] = lambda: None
    extra_check: Callable[..., list[str]] | None = None
    auto_exclusion: Callable[[], str | None] = lambda: None

    def unavailable_reason(self) -> str | None:
        return self.availability()

    def not_supported_reasons(self, *args, **kwargs) -> list[str]:
        """Human-readable reasons why this backend cannot run these inputs ([] if it can)."""
        reasons: list[str] = []
        reason = self.availability()
        if reason:
            reasons.append(reason)
        for tensor in _tensors(args, kwargs):
            if tensor.device.type not in self.devices:
                reasons.append(
                    f"device {tensor.device.type} not supported (supports {list(self.devices)})"
                )
                break
        for tensor in _tensors(args, kwargs):
            if tensor.is_floating_point() and tensor.dtype not in self.dtypes:
                reasons.append(f"dtype {tensor.dtype} not supported")
                break
        if self.extra_check is not None and not reasons:
            reasons.extend(self.extra_check(*args, **kwargs))
        return reasons


@dataclass
class FusedOp:
    """An op with several backends; call it like a function with ``impl=``."""

    name: str
    summary: str
    priority: tuple[str, ...] = ("cuda", "triton", "cpp", "reference")
    backends: dict[str, Backend] = field(default_factory=dict)

    def register(self, backend: Backend) -> Backend:
        if backend.name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend kind {backend.name!r}")
        self.backends[backend.name] = backend
        return backend

    def select(self, impl: str, *args, **kwargs) -> Backend:
        """The backend that will run these inputs for ``impl`` (see module docstring)."""
        if impl == "auto":
            reasons = {}
            for name in self.priority:
                backend = self.backends.get(name)
                if backend is None:
                    continue
                why = backend.not_supported_reasons(*args, **kwargs)
                excluded = backend.auto_exclusion()
                if excluded:
                    why = [*why, excluded]
                if not why:
                    return backend
                reasons[name] = why
            raise BackendUnavailable(f"{self.name}: no backend supports these inputs: {reasons}")
        backend = self.backends.get(impl)
        if backend is None:
            raise BackendUnavailable(
                f"{self.name}: backend {impl!r} is not implemented; "
                f"implemented: {sorted(self.backends)} (or 'auto')"
            )
        why = backend.not_supported_reasons(*args, **kwargs)
        if why:
            raise BackendUnavailable(f"{self.name}: backend {impl!r} cannot run: " + "; ".join(why))
        return backend

    def __call__(self, *args, impl: str = "auto", **kwargs):
        return self.select(impl, *args, **kwargs).fn(*args, **kwargs)

    def status(self) -> dict[str, str | None]:
        """backend name -> None (available) or the reason it is not, for every known kind."""
        out: dict[str, str | None] = {}
        for name in BACKEND_NAMES:
            backend = self.backends.get(name)
            out[name] = "not implemented for this op" if backend is None else backend.unavailable_reason()
        return out


REGISTRY: dict[str, FusedOp] = {}


def register_op(op: FusedOp) -> FusedOp:
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} registered twice")
    REGISTRY[op.name] = op
    return op


def _tensors(args: Sequence, kwargs: dict) -> list[torch.Tensor]:
    found = [a for a in args if isinstance(a, torch.Tensor)]
    found += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return found


def triton_reason() -> str | None:
    """Why Triton kernels cannot run here, or None."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)"
    return None


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    import os

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
