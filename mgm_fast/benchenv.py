"""The environment a benchmark or a step-cost report ran in (``collect_env``): versions, CPU,
GPU, driver and commit, in the keys benchmarks/README.md documents. A module of its own so that
the report writers (``mgm_fast.bench``, ``mgm_fast.stepcost``) share it without importing each
other."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    out = _run(["git", "-C", str(root), "rev-parse", "HEAD"])  # read-only
    return out.strip() if out else None


def collect_env() -> dict:
    """The environment a benchmark ran in (keys documented in benchmarks/README.md)."""
    import torch

    from mgm_fast import info

    versions = info.versions()
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": versions["python"],
        "mgm_fast": versions["mgm_fast"],
        "torch": versions["torch"],
        "cuda": versions["torch CUDA"],
        "cudnn": versions["cuDNN"],
        "nvcc": versions["nvcc"],
        "triton": versions["triton"],
        "dali": versions["DALI"],
        "numpy": versions["numpy"],
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "commit": _git_commit(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_name": None,
        "gpu_capability": None,
        "gpu_memory_gib": None,
        "driver": None,
        "driver_cuda": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=props.name, gpu_capability=f"sm_{props.major}{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    if smi and smi.strip():
        name, _, driver = smi.strip().splitlines()[0].partition(",")
        env["driver"] = driver.strip() or None
        env["gpu_name"] = env["gpu_name"] or name.strip()
        header = _run(["nvidia-smi"]) or ""
        match = re.search(r"CUDA Version:\s*([0-9.]+)", header)
        env["driver_cuda"] = match.group(1) if match else None
    env["device"] = "cuda:0" if env["gpu_count"] else "cpu"
    env["device_name"] = env["gpu_name"] if env["gpu_count"] else env["cpu_model"]
    return env
