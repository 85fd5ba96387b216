"""Access to the compiled extension ``mgm_fast._C``.

The extension is optional at import time: the package works (on the reference backends) when it
was not built, and ``python -m mgm_fast.info`` reports why. Nothing here falls back silently:
callers that need the extension get the recorded reason in their error.
"""

from __future__ import annotations

import functools
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
    return _C, None


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
    return None


def build_info() -> dict:
    """What the extension reports about its own build (empty when not built)."""
    ext = extension()
    if ext is None:
        return {}
    return dict(ext.build_info())
