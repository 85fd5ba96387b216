"""``python -m mgm_fast.info``: versions, devices, the native build, and ops x backends.

In a checkout it also compares the installed packages with ``requirements/lock.txt`` (the
versions the test suite last passed with) and warns about every difference.

Options:
  --models [--preset NAME]   also print the parameter counts of every network of a preset
  --json                     machine-readable output
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
"""The lock of a checkout; absent when mgm_fast was installed from a wheel."""


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # an optional dependency that is absent or broken
        return None
    return getattr(mod, "__version__", "unknown")


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    release = [line for line in out.splitlines() if "release" in line]
    return release[-1].split("release")[-1].strip() if release else "unknown"


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "mgm_fast": importlib.import_module("mgm_fast").__version__,
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "nvcc": _nvcc_version(),
        "triton": _version("triton"),
        "DALI": _version("nvidia.dali"),
        "numpy": _version("numpy"),
        "Pillow": _version("PIL"),
        "PyYAML": _version("yaml"),
        "tqdm": _version("tqdm"),
        "h5py": _version("h5py"),
    }


def read_lock(path: Path) -> dict[str, str]:
    """``name==version`` lines of a pip constraints file -> {name: version} (comments skipped).

    Raises ValueError naming the file and line for anything else, so a hand-edited lock with a
    range or a typo is caught rather than half-read.
    """
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[name.strip()] = version.strip()
    return pins


def lock_differences(path: Path | None = None) -> list[str] | None:
    """How the installed packages differ from the lock (default :data:`LOCK_FILE`), one line
    each (empty: they match); None when there is no lock file."""
    path = LOCK_FILE if path is None else path
    if not path.is_file():
        return None
    differences = []
    for name, locked in read_lock(path).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            differences.append(f"{name} is not installed (locked {locked})")
            continue
        if installed != locked:
            differences.append(f"{name} {installed} is installed, the lock has {locked}")
    return differences


def devices() -> list[dict]:
    found = [{"device": "cpu", "name": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append({
                "device": f"cuda:{i}",
                "name": props.name,
                "capability": f"sm_{props.major}{props.minor}",
                "memory_GiB": round(props.total_memory / 2**30, 1),
            })
    return found


def ops_table() -> dict[str, dict[str, str | None]]:
    """op name -> backend -> None if available, else the reason it is not."""
    import mgm_fast.ops  # noqa: F401  (registers every op)
    from mgm_fast.ops import REGISTRY

    return {name: op.status() for name, op in sorted(REGISTRY.items())}


def collect(models_preset: str | None = None) -> dict:
    from mgm_fast import _native

    report = {
        "versions": versions(),
        "lock": {"file": str(LOCK_FILE) if LOCK_FILE.is_file() else None, "differences": lock_differences()},
        "devices": devices(),
        "native": {
            "extension": "built" if _native.extension() is not None else "not built",
            "reason": _native.unavailable_reason(),
            "build": _native.build_info(),
        },
        "ops": ops_table(),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k in ("TRITON_INTERPRET", "TORCH_CUDA_ARCH_LIST", "OMP_NUM_THREADS") or k.startswith("MGM_FAST_")},
    }
    if models_preset is not None:
        from mgm_fast.config import preset
        from mgm_fast.models import parameter_report

        report["models"] = {"preset": models_preset, "parameters": parameter_report(preset(models_preset).model)}
    return report


def _print(report: dict) -> None:
    print("mgm_fast environment")
    for key, value in report["versions"].items():
        print(f"  {key:<11} {value if value is not None else '-'}")
    lock = report["lock"]
    if lock["file"] is None:
        print("  (no requirements/lock.txt: not a checkout, versions not compared)")
    elif not lock["differences"]:
        print(f"  every package matches {lock['file']}")
    else:
        print(f"WARNING: this environment differs from {lock['file']}, the versions the tests "
              f"passed with (`make setup` installs them):", file=sys.stderr)
        for line in lock["differences"]:
            print(f"  {line}", file=sys.stderr)
    if report["env"]:
        print("set in the environment: " + " ".join(f"{k}={v}" for k, v in report["env"].items()))
    print("devices")
    for dev in report["devices"]:
        extra = ", ".join(f"{k} {v}" for k, v in dev.items() if k not in ("device", "name"))
        print(f"  {dev['device']:<7} {dev['name']} ({extra})")
    native = report["native"]
    print(f"native extension mgm_fast._C: {native['extension']}")
    if native["reason"]:
        print(f"  reason: {native['reason']}")
    for key, value in native["build"].items():
        print(f"  {key}: {value}")
    print("ops x backends (yes = available here; otherwise why not)")
    from mgm_fast.ops._dispatch import BACKEND_NAMES

    rows = report["ops"]
    width = max([len(n) for n in rows] + [4])
    print(f"  {'op':<{width}}  " + "  ".join(f"{b:<9}" for b in BACKEND_NAMES))
    notes: list[str] = []
    for name, status in rows.items():
        cells = []
        for backend in BACKEND_NAMES:
            why = status[backend]
            if why is None:
                cells.append("yes")
            elif why == "not implemented for this op":
                cells.append("-")
            else:
                if why not in notes:
                    notes.append(why)
                cells.append(f"no [{notes.index(why) + 1}]")
        print(f"  {name:<{width}}  " + "  ".join(f"{c:<9}" for c in cells))
    for i, why in enumerate(notes, 1):
        print(f"  [{i}] {why}")
    print("  (- = not implemented for this op)")
    if "models" in report:
        print(f"parameters, preset {report['models']['preset']!r}")
        for name, count in report["models"]["parameters"].items():
            print(f"  {name:<20} {count / 1e6:8.3f} M  ({count:,})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgm_fast.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", action="store_true", help="print parameter counts of the networks")
    parser.add_argument("--preset", default="paper", help="preset for --models (paper or tiny)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    report = collect(args.preset if args.models else None)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        _print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
