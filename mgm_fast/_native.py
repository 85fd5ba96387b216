"""Access to the compiled extension ``mgm_fast._C``.

The extension is optional at import time: the package works (on the reference backends) when it
was not built, and ``python -m mgm_fast.info`` reports why. Nothing here falls back silently:
callers that need the extension get the recorded reason in their error.

The C++ CPU kernels run their hot loops at one instruction-set level -- ``"baseline"``
(x86-64, SSE2), ``"x86-64-v3"`` (AVX2, FMA) or ``"x86-64-v4"`` (AVX-512) -- by default the best
this CPU supports. The environment variable ``MGM_FAST_CPU_ISA`` (``auto`` | ``baseline`` |
``x86-64-v3`` | ``x86-64-v4``), read when the extension loads, or :func:`forced_cpu_isa` choose
another, e.g. to test the AVX2 or SSE2 code on an AVX-512 machine. An unknown or unsupported
value is an error at the first use of the extension, not a fallback. Results at one level are
bit-identical for any thread count; levels may differ in the last bits (FMA contraction, vector
widths).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from mgm_fast import _C  # type: ignore[attr-defined]
    except ImportError as err:  # not built, or built against another torch
        return None, (
            f"mgm_fast._C is not importable ({err}); build it with "
            "`pip install -e . --no-build-isolation`"
        )
    # Resolves MGM_FAST_CPU_ISA before any kernel runs: a bad value raises RuntimeError (naming
    # the variable and the supported levels) here, at every use since an exception is not
    # cached, instead of letting ``impl="auto"`` quietly pick another backend.
    _C.cpu_isa()
    return _C, None


def _require() -> ModuleType:
    ext, reason = _load()
    if ext is None:
        raise RuntimeError(reason)
    return ext


def extension() -> ModuleType | None:
    """The loaded extension module, or None when it is not built."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it loaded."""
    return _load()[1]


def cpp_reason() -> str | None:
    """Why the C++ (CPU) kernels cannot run, or None."""
    return unavailable_reason()


def cuda_reason() -> str | None:
    """Why the CUDA kernels cannot run, or None."""
    ext, reason = _load()
    if ext is None:
        return reason
    if not getattr(ext, "built_with_cuda", False):
        return "mgm_fast._C was built without CUDA sources (the installed torch has no CUDA)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return _cuda_launch_reason(torch.cuda.current_device())


@functools.cache
def _cuda_launch_reason(index: int) -> str | None:
    """A launch probe: one tiny kernel of the extension on device ``index``. An import succeeds
    even when the build holds no machine code for this GPU; the first launch would then crash a
    run, so this turns it into a reason."""
    import torch

    ext = _load()[0]
    try:
        with torch.cuda.device(index):
            cols = torch.ones(2, 2, device="cuda")
            index_t = torch.arange(2, device="cuda")
            ext.ntxent_rows_cuda_forward(cols, cols, index_t, 1.0)
            torch.cuda.synchronize()
    except Exception as err:  # no kernel image, driver too old, ...
        props = torch.cuda.get_device_properties(index)
        return (f"the CUDA kernels of mgm_fast._C do not launch on {props.name} (sm_{props.major}{props.minor}): "
                f"{err}; rebuild with TORCH_CUDA_ARCH_LIST={props.major}.{props.minor}")
    return None


def build_info() -> dict:
    """What the extension reports about its own build (empty when not built)."""
    ext = extension()
    if ext is None:
        return {}
    return dict(ext.build_info())


def cpu_isa() -> str:
    """The ISA level the C++ CPU kernels run at: ``"baseline"``, ``"x86-64-v3"`` or
    ``"x86-64-v4"``. RuntimeError when the extension is not built or ``MGM_FAST_CPU_ISA`` holds
    an unknown or unsupported value."""
    return _require().cpu_isa()


def supported_cpu_isas() -> list[str]:
    """The ISA levels this CPU (and build) can run the C++ kernels at, baseline first, e.g.
    ``["baseline", "x86-64-v3", "x86-64-v4"]`` on an AVX-512 machine."""
    return list(_require().supported_cpu_isas())


@contextlib.contextmanager
def forced_cpu_isa(name: str) -> Iterator[str]:
    """Runs the C++ CPU kernels at level ``name`` (``"auto"``, ``"baseline"``, ``"x86-64-v3"`` or
    ``"x86-64-v4"``) inside the block, and restores the previous level on exit; yields the
    level. The level is process-wide: do not change it while kernels run in other threads.
    ValueError for an unknown name or a level this CPU lacks."""
    ext = _require()
    previous = ext.cpu_isa()
    ext.set_cpu_isa(name)
    try:
        yield ext.cpu_isa()
    finally:
        ext.set_cpu_isa(previous)
