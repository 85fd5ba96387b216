"""Verification of fused backends on first use, and the record of what ran.

A fused backend that was never run on a device must not be trusted with a multi-day run: the
first time a run may use a non-reference backend on a device, :func:`verify_for_run` runs that
op's small self-test cases (:mod:`mgm_fast.ops._selftest`, seconds) through it and caches the
verdict under the user's cache directory, keyed by everything that could change it: the device
(name, compute capability or CPU ISA level), the torch / Triton / extension versions and the
backend's source (a hash of the op's module, the Triton kernels and the compiled extension). A
backend that fails (or cannot even launch: no kernel image for this GPU) is excluded -- ``auto``
skips it and forcing it raises -- with a loud warning naming the op, the backend and the error;
with ``strict=True`` (``--strict-backends``) the run stops instead.

Environment:

* ``MGM_FAST_CACHE_DIR`` -- where verdicts are kept (default ``$XDG_CACHE_HOME/mgm_fast`` or
  ``~/.cache/mgm_fast``);
* ``MGM_FAST_IMPL=reference`` / ``MGM_FAST_IMPL_<OP>=<backend>`` -- force backends (read by
  :class:`~mgm_fast.ops._dispatch.FusedOp`, see :func:`mgm_fast.ops._dispatch.forced_impl`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mgm_fast.atomic_io import atomic_write_text
from mgm_fast.ops._dispatch import REGISTRY, FusedOp

CACHE_ENV = "MGM_FAST_CACHE_DIR"
VERIFY_DTYPES = (torch.float32,)


class BackendVerificationError(RuntimeError):
    """A fused backend failed its self-test under ``strict`` verification."""


@dataclass
class Verdict:
    """The outcome of verifying one backend of one op on one device."""

    op: str
    backend: str
    device: str
    passed: bool
    detail: str  # the first failure or error, or how many cases passed
    cached: bool  # read from the cache instead of run
    key: str  # the cache key (sha256 of key_fields)
    seconds: float = 0.0


def cache_dir() -> Path:
    """Where verdicts are kept: $MGM_FAST_CACHE_DIR, else $XDG_CACHE_HOME/mgm_fast, else
    ~/.cache/mgm_fast."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mgm_fast"


def device_description(device: torch.device) -> dict:
    """What identifies a device for the cache: type, name, and the compute capability (CUDA) or
    the CPU kernels' ISA level (CPU)."""
    from mgm_fast import _native

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"sm_{major}{minor}"}
    desc = {"type": device.type, "name": platform.processor() or platform.machine()}
    if device.type == "cpu" and _native.extension() is not None:
        desc["cpu_isa"] = _native.cpu_isa()
    return desc


@functools.cache
def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_hash(op: FusedOp, backend: str) -> str:
    """A hash of the code a backend runs: the op's module, the dispatch and self-test modules,
    the Triton kernels (triton) or the compiled extension (cpp, cuda)."""
    from mgm_fast import _native

    ops_dir = Path(__file__).resolve().parent
    fn = op.backends[backend].fn
    files = {str(ops_dir / "_dispatch.py"), str(ops_dir / "_selftest.py")}
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    if module is not None and getattr(module, "__file__", None):
        files.add(str(Path(module.__file__).resolve()))
    if backend == "triton":
        files.update(str(p) for p in sorted((ops_dir / "_triton").glob("*.py")))
    elif backend in ("cpp", "cuda"):
        ext = _native.extension()
        if ext is not None and getattr(ext, "__file__", None):
            files.add(str(Path(ext.__file__).resolve()))
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode())
        digest.update(_file_digest(path).encode())
    return digest.hexdigest()


def key_fields(op: FusedOp, backend: str, device: torch.device, dtypes=VERIFY_DTYPES) -> dict:
    """Everything a verdict depends on."""
    from mgm_fast import __version__, _native

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    build = _native.build_info()
    return {
        "op": op.name,
        "backend": backend,
        "device": device_description(device),
        "dtypes": [str(d).replace("torch.", "") for d in dtypes],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "mgm_fast": __version__,
        "extension": {k: build[k] for k in sorted(build) if k != "cpu_isa"} if build else None,
        "source": source_hash(op, backend),
    }


def _key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def verify(op: FusedOp, backend: str, device: torch.device | str, dtypes=VERIFY_DTYPES,
           use_cache: bool = True) -> Verdict:
    """Run (or read from the cache) the small self-test cases of one backend on ``device``."""
    from mgm_fast.ops._selftest import LAYOUTS, run_op

    device = torch.device(device)
    fields = key_fields(op, backend, device, dtypes)
    key = _key(fields)
    path = cache_dir() / "verified" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            saved = json.loads(path.read_text())
            return Verdict(**{**saved["verdict"], "cached": True})
        except (ValueError, KeyError, TypeError):
            pass  # a damaged entry is simply redone
    start = time.perf_counter()
    # The global random streams are left as they were: a run's numbers must not depend on
    # whether its backends were verified now or read from the cache.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        results = run_op(op, device, backends=[backend], dtypes=dtypes, layouts=LAYOUTS, sizes=("small",))
    bad = [r for r in results if r.verdict in ("fail", "error")]
    ran = [r for r in results if r.verdict == "pass"]
    if bad:
        r = bad[0]
        detail = f"{r.verdict} on case '{r.case}' ({r.dtype}, {r.layout}): {r.detail}"
    else:
        detail = f"{len(ran)} cases passed" if ran else "no self-test case applies on this device"
    verdict = Verdict(op.name, backend, str(device), not bad, detail, False, key, time.perf_counter() - start)
    atomic_write_text(path, json.dumps({"verdict": asdict(verdict), "fields": fields,
                                    "results": [r.to_dict() for r in results]}, indent=1, default=str))
    return verdict


def candidates(op: FusedOp, device: torch.device) -> list[str]:
    """The non-reference backends ``auto`` may pick on this device, in priority order."""
    names = []
    for name in op.priority:
        backend = op.backends.get(name)
        if name == "reference" or backend is None or device.type not in backend.devices:
            continue
        if backend.unavailable_reason() is None and backend.auto_exclusion() is None:
            names.append(name)
    return names


def verify_for_run(device: torch.device | str, dtypes=VERIFY_DTYPES, strict: bool = False,
                   ops: list[str] | None = None, log=print) -> dict[str, dict[str, Verdict]]:
    """Verify every backend a run on ``device`` may pick (cached after the first time); exclude
    the failing ones from ``auto`` with a warning, or raise :class:`BackendVerificationError`
    under ``strict``. Returns {op: {backend: verdict}}."""
    import mgm_fast.ops  # noqa: F401  (registers every op)

    device = torch.device(device)
    verdicts: dict[str, dict[str, Verdict]] = {}
    for name in sorted(REGISTRY) if ops is None else ops:
        op = REGISTRY[name]
        for backend in candidates(op, device):
            try:
                verdict = verify(op, backend, device, dtypes)
            except Exception as err:  # the self-test machinery itself broke: treat as a failure
                verdict = Verdict(name, backend, str(device), False, f"self-test raised {type(err).__name__}: {err}",
                                  False, "", 0.0)  # fmt: skip
            verdicts.setdefault(name, {})[backend] = verdict
            if not verdict.passed:
                message = (f"backend {backend!r} of op {name!r} failed its self-test on {device} "
                           f"({verdict.detail})")  # fmt: skip
                if strict:
                    raise BackendVerificationError(f"{message}; --strict-backends stops the run")
                op.exclude(backend, f"failed its self-test on this device: {verdict.detail}")
                log(f"WARNING: {message}; it is excluded and '{name}' runs on the next backend "
                    f"(--strict-backends makes this an error)")
    return verdicts


def backends_record(device: torch.device | str, verdicts: dict[str, dict[str, Verdict]]) -> dict:
    """What ran and why: per op, the verification verdicts, the backend ``auto`` picks first on
    this device (and why not the ones before it), and every resolution the op has made so far."""
    import mgm_fast.ops  # noqa: F401

    device = torch.device(device)
    ops = {}
    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        why_not, first = {}, None
        for backend_name in op.priority:
            backend = op.backends.get(backend_name)
            if backend is None:
                continue
            reason = op.exclusions.get(backend_name) or backend.unavailable_reason()
            if reason is None and device.type not in backend.devices:
                reason = f"does not run on {device.type}"
            if reason is None:
                reason = backend.auto_exclusion()
            if reason is None:
                first = backend_name
                break
            why_not[backend_name] = reason
        ops[name] = {
            "auto_picks": first,
            "not_picked": why_not,
            "verification": {b: asdict(v) for b, v in verdicts.get(name, {}).items()},
            "resolved": {k: dict(v) for k, v in op.resolutions.items()},
        }
    return {"device": device_description(device), "forced": _forced_env(), "ops": ops}


def _forced_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k == "MGM_FAST_IMPL" or k.startswith("MGM_FAST_IMPL_")}
