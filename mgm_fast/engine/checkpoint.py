"""Training checkpoints: atomic single-file saves, safe loading, bit-exact resume.

One checkpoint is one file written by :func:`save_checkpoint`::

    {
        "format": "mgm_fast.checkpoint", "version": 1,
        "mgm_fast_version": str, "torch_version": str, "time": float (seconds since the epoch),
        "config": dict,            # plain nested dict, e.g. mgm_fast.config.to_dict(cfg)
        "step": int, "epoch": int, "phase": str,
        "modules": {name: state_dict},
        "optimizers": {name: state_dict},
        "scaler": GradScaler state_dict | None,
        "rng": dict,               # capture_rng(...)
        "data_state": dict,        # sampler / data-order state, owned by the data pipeline
        "metrics": dict | None,
        "extra": dict | None,
    }

Everything in it is a plain container (dict, list, tuple), a number, a string, bytes, ``None``,
a tensor, a ``torch.Size``, ``torch.dtype`` or ``torch.device``, so :func:`load_checkpoint`
reads it with ``torch.load(weights_only=True)``: loading a checkpoint never runs code from the
file. :func:`save_checkpoint` checks this before writing and names the offending entry.

Files are written atomically (:func:`mgm_fast.atomic_io.atomic_torch_save`, re-exported here:
temp file in the same folder, flush, fsync, rename, fsync the folder), so a process killed at
any moment leaves either the previous file or the new one, never a torn one.

Public API:

* :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`verify_checkpoint`
* :func:`restore` -- load modules, optimizers, scaler and RNG states in place, all-or-nothing,
  after checking that every name matches.
* :func:`capture_rng` / :func:`restore_rng` -- global torch (CPU and every CUDA device), numpy,
  python ``random`` and named generators (``torch.Generator``, ``numpy.random.Generator``,
  ``numpy.random.RandomState``, ``random.Random``), bit-exact.
* :class:`CheckpointManager` -- ``ckpt-<step:08d>.pt`` files in a run folder, a ``latest``
  pointer (JSON, never a symlink), ``best.pt`` by a metric, rotation, and
  :meth:`~CheckpointManager.latest_path` that skips corrupt files.
* :func:`check_finite` -- the non-finite loss guard, called at logging time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from mgm_fast import __version__
from mgm_fast.atomic_io import atomic_torch_save, atomic_write, atomic_write_text, fsync_dir
from mgm_fast.config import to_dict

FORMAT = "mgm_fast.checkpoint"
"""Value of the ``format`` entry of every checkpoint this module writes."""
VERSION = 1
"""Newest checkpoint layout this module reads and the one it writes."""
POINTER_FORMAT = "mgm_fast.checkpoint_pointer"

REQUIRED_KEYS: tuple[str, ...] = (
    "config",
    "step",
    "epoch",
    "phase",
    "modules",
    "optimizers",
    "scaler",
    "rng",
    "data_state",
    "metrics",
    "extra",
)

_MAX_LISTED = 20
# Released-code checkpoints are flat state dicts whose names start with these containers.
_RELEASED_PREFIXES = ("multi_model.", "post_model.", "middle_net.", "G.", "D.")
_COMPAT_HINT = (
    "to load weights of the released MGM code use mgm_fast.compat "
    "(load_released_state_dict / import_released / build_from_released)"
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, is not an mgm_fast checkpoint, or does not fit the objects
    it is restored into. The message names the file and what was expected."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite.

    Attributes: ``step`` (int), ``names`` (list of loss names that are not finite), ``values``
    (``{name: float}`` of every loss checked) and ``last_checkpoint`` (str or None).
    """

    def __init__(self, message: str, step: int, names: list[str], values: dict, last_checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.names = names
        self.values = values
        self.last_checkpoint = last_checkpoint




# -------------------------------------------------------------------------------------------
# weights_only safety.

_SAFE_SCALARS = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)
_SAFE_KEYS = (type(None), bool, int, float, str, bytes)


def _where(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def _check_safe(obj: Any, path: str) -> None:
    """Raise ``TypeError`` naming the first entry that ``torch.load(weights_only=True)`` would
    refuse (numpy scalars and arrays, sets, dataclasses, arbitrary objects, tensor subclasses).

    Stricter than the newest torch on purpose (no sets, no complex numbers): the file must load
    with every torch this package supports.
    """
    # Exact types: subclasses (torch.__version__'s TorchVersion, IntEnum, ...) pickle by class.
    if type(obj) in _SAFE_SCALARS:
        return
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"{path} is a {type(obj).__name__}; store a plain tensor instead")
        return
    if isinstance(obj, (dict, OrderedDict)):
        if type(obj) not in (dict, OrderedDict):
            raise TypeError(f"{path} is a {type(obj).__name__}; convert it to a dict")
        for key, value in obj.items():
            if type(key) not in _SAFE_KEYS and not (
                type(key) is tuple and all(type(k) in _SAFE_KEYS for k in key)
            ):
                raise TypeError(f"{path} has a key of type {type(key).__name__}: {key!r}")
            _check_safe(value, _where(path, key))
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_safe(value, f"{path}[{i}]")
        return
    hint = ""
    if isinstance(obj, np.generic):
        hint = " (convert numpy scalars with .item())"
    elif isinstance(obj, np.ndarray):
        hint = " (convert numpy arrays with torch.from_numpy)"
    elif isinstance(obj, (set, frozenset)):
        hint = " (store a sorted list)"
    elif dataclasses.is_dataclass(obj):
        hint = " (convert dataclasses with mgm_fast.config.to_dict)"
    raise TypeError(
        f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load"
        f"(weights_only=True) refuses{hint}"
    )


# -------------------------------------------------------------------------------------------
# RNG states.


def _np_to_safe(obj: Any) -> Any:
    """Numpy RNG state (nested dicts / tuples with uint32 arrays) -> weights_only-safe types."""
    if isinstance(obj, np.ndarray):
        # int64 holds every uint32 / int64 key exactly; the dtype is restored from "dtype".
        return {"__ndarray__": torch.from_numpy(obj.astype(np.int64)), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _np_to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_np_to_safe(v) for v in obj]
    return obj


def _np_from_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"].cpu().numpy(), dtype=np.dtype(obj["dtype"]))
        return {k: _np_from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_np_from_safe(v) for v in obj]
    return obj


def _python_random_to_safe(state: tuple) -> dict:
    version, internal, gauss_next = state
    return {
        "version": version,
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": gauss_next,
    }


def _python_random_from_safe(state: Mapping) -> tuple:
    return (state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss_next"])


_RNG_KEYS = ("torch", "cuda", "numpy", "python", "generators")


def _capture_one(gen: Any) -> dict:
    if isinstance(gen, torch.Generator):
        return {"type": "torch", "device": str(gen.device), "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        return {"type": "numpy.Generator", "state": _np_to_safe(gen.bit_generator.state)}
    if isinstance(gen, np.random.RandomState):
        return {"type": "numpy.RandomState", "state": _np_to_safe(gen.get_state(legacy=False))}
    if isinstance(gen, random.Random):
        return {"type": "python", "state": _python_random_to_safe(gen.getstate())}
    raise TypeError(
        f"cannot capture the state of a {type(gen).__name__}; expected torch.Generator, "
        "numpy.random.Generator, numpy.random.RandomState or random.Random"
    )


def capture_rng(generators: Mapping[str, Any] | None = None) -> dict:
    """Snapshot every random number source, in weights_only-safe types.

    Args:
        generators: named generators of the run, e.g. ``{"augment": aug_gen}``; each a
            ``torch.Generator`` (any device), ``numpy.random.Generator``,
            ``numpy.random.RandomState`` or ``random.Random``.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device] (empty without CUDA),
        "numpy": dict, "python": dict, "generators": {name: dict}}`` -- all tensors on the CPU.

    Captures the state only; it draws nothing, so calling it does not change any stream.
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        # The legacy global state is what np.random.* functions draw from, so it is captured as is.
        "numpy": _np_to_safe(np.random.get_state(legacy=False)),  # noqa: NPY002
        "python": _python_random_to_safe(random.getstate()),
        "generators": {str(name): _capture_one(gen) for name, gen in (generators or {}).items()},
    }


def _byte_state(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise CheckpointError(f"rng state {what}: expected a uint8 tensor, got {type(value).__name__}")
    # set_rng_state wants a CPU tensor; a checkpoint loaded with map_location="cuda" moved it.
    return value.detach().to("cpu")


def restore_rng(state: Mapping, generators: Mapping[str, Any] | None = None, strict: bool = True) -> None:
    """Put every random source back to a :func:`capture_rng` snapshot, bit-exactly.

    Args:
        state: the dict :func:`capture_rng` returned (possibly after a save / load round trip).
        generators: the run's named generators, same names as at capture time; restored in place.
        strict: with True (default) a name present on one side only raises
            :class:`CheckpointError`; with False it is skipped with a warning.

    Everything is checked before anything is set, so an error leaves all sources untouched.
    If the checkpoint holds states for more CUDA devices than are visible now, the visible ones
    are restored and a warning names the rest.
    """
    generators = dict(generators or {})
    if not isinstance(state, Mapping):
        raise CheckpointError(f"rng state: expected a dict from capture_rng, got {type(state).__name__}")
    missing_keys = [k for k in _RNG_KEYS if k not in state]
    if missing_keys:
        raise CheckpointError(f"rng state: missing entries {missing_keys}; expected a dict from capture_rng")
    saved = dict(state["generators"])
    unknown = sorted(set(saved) - set(generators))
    missing = sorted(set(generators) - set(saved))
    if unknown or missing:
        text = (
            f"named generators differ from the checkpoint: in the checkpoint only {unknown}, "
            f"given but not in the checkpoint {missing}"
        )
        if strict:
            raise CheckpointError(text)
        warnings.warn(text + "; restoring the common ones", stacklevel=2)

    # Validate and convert everything first.
    actions: list[Callable[[], None]] = []
    cpu_state = _byte_state(state["torch"], "'torch'")
    actions.append(lambda: torch.set_rng_state(cpu_state))
    cuda_states = [_byte_state(s, f"'cuda'[{i}]") for i, s in enumerate(state["cuda"])]
    if cuda_states:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < len(cuda_states):
            warnings.warn(
                f"checkpoint holds RNG states of {len(cuda_states)} CUDA devices, {visible} visible; "
                "the others are not restored",
                stacklevel=2,
            )
        for i, s in enumerate(cuda_states[:visible]):
            actions.append(lambda i=i, s=s: torch.cuda.set_rng_state(s, i))
    np_state = _np_from_safe(state["numpy"])
    actions.append(lambda: np.random.set_state(np_state))  # noqa: NPY002
    py_state = _python_random_from_safe(state["python"])
    actions.append(lambda: random.setstate(py_state))

    for name in sorted(set(saved) & set(generators)):
        entry, gen = saved[name], generators[name]
        kind = entry.get("type")
        expected = _capture_one(gen)["type"]
        if kind != expected:
            raise CheckpointError(f"generator {name!r}: checkpoint holds a {kind} state, given a {expected}")
        if kind == "torch":
            byte_state = _byte_state(entry["state"], f"generator {name!r}")
            current = gen.get_state()
            if byte_state.numel() != current.numel():
                raise CheckpointError(
                    f"generator {name!r}: checkpoint state is for device {entry.get('device')} "
                    f"({byte_state.numel()} bytes), the given generator is on {gen.device} "
                    f"({current.numel()} bytes)"
                )
            actions.append(lambda gen=gen, s=byte_state: gen.set_state(s))
        elif kind == "numpy.Generator":
            bit_state = _np_from_safe(entry["state"])
            if bit_state.get("bit_generator") != type(gen.bit_generator).__name__:
                raise CheckpointError(
                    f"generator {name!r}: checkpoint holds a {bit_state.get('bit_generator')} state, "
                    f"the given numpy Generator uses {type(gen.bit_generator).__name__}"
                )
            actions.append(lambda gen=gen, s=bit_state: setattr(gen.bit_generator, "state", s))
        elif kind == "numpy.RandomState":
            rs_state = _np_from_safe(entry["state"])
            actions.append(lambda gen=gen, s=rs_state: gen.set_state(s))
        else:
            py_gen_state = _python_random_from_safe(entry["state"])
            actions.append(lambda gen=gen, s=py_gen_state: gen.setstate(s))

    for action in actions:
        action()


# -------------------------------------------------------------------------------------------
# Save / load.


def _unwrap_module(module: nn.Module) -> nn.Module:
    """The module whose state dict has the plain names: strip DDP / DataParallel and
    torch.compile wrappers so checkpoints do not depend on how the model was run."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def _check_names(mapping: Any, what: str, kind: type) -> None:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a dict of name -> {kind.__name__}, got {type(mapping).__name__}")
    for name, value in mapping.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: names must be strings, got {name!r}")
        if not isinstance(value, kind):
            raise TypeError(f"{what}[{name!r}] must be a {kind.__name__}, got {type(value).__name__}")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    config: Mapping | Any,
    step: int,
    epoch: int,
    phase: str,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    rng: Mapping,
    data_state: Mapping,
    scaler: torch.amp.GradScaler | None = None,
    metrics: Mapping | None = None,
    extra: Mapping | None = None,
) -> Path:
    """Write one checkpoint file atomically and return its path.

    Args:
        path: target file; its folder is created. An existing file is replaced atomically.
        config: the run's config as a plain dict (``mgm_fast.config.to_dict(cfg)``); a config
            dataclass is converted with ``to_dict``.
        step: global optimisation step (int >= 0) the checkpoint is taken after.
        epoch: epoch counter (int >= 0).
        phase: name of the training phase (e.g. "pretrain", "joint"); free text.
        modules: ``{name: nn.Module}``; DDP / DataParallel / torch.compile wrappers are unwrapped.
        optimizers: ``{name: Optimizer}``.
        rng: :func:`capture_rng` output, taken at the same point of the loop as ``step``.
        data_state: sampler / data-order state (plain containers and tensors).
        scaler: a ``torch.amp.GradScaler`` or None.
        metrics: latest evaluation metrics (plain numbers), or None.
        extra: anything else (LR scheduler state dicts, EMA, ...), weights_only-safe.

    Raises:
        TypeError: an entry would not load with ``weights_only=True``; the message names it
            (e.g. ``metrics['delta_m'] is a numpy.float64``). Nothing is written then.

    Call it on one process only (rank 0) and after the step's optimiser updates; it reads
    tensors from their devices (one device-to-host copy per tensor, a host sync).
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = to_dict(config)
    for name, value in (("step", step), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(phase, str):
        raise TypeError(f"phase must be a str, got {type(phase).__name__}")
    _check_names(modules, "modules", nn.Module)
    _check_names(optimizers, "optimizers", torch.optim.Optimizer)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "mgm_fast_version": __version__,
        "torch_version": str(torch.__version__),
        "time": time.time(),
        "config": config,
        "step": step,
        "epoch": epoch,
        "phase": phase,
        "modules": {name: _unwrap_module(m).state_dict() for name, m in modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": rng,
        "data_state": data_state,
        "metrics": metrics,
        "extra": extra,
    }
    for key in ("config", "rng", "data_state"):
        if not isinstance(payload[key], Mapping):
            raise TypeError(f"{key} must be a dict, got {type(payload[key]).__name__}")
    for key in ("metrics", "extra"):
        if payload[key] is not None and not isinstance(payload[key], Mapping):
            raise TypeError(f"{key} must be a dict or None, got {type(payload[key]).__name__}")
    # Caught here rather than at resume time, when the run that could fix it is gone.
    missing_rng = [k for k in _RNG_KEYS if k not in rng]
    if missing_rng:
        raise TypeError(f"rng lacks {missing_rng}; pass capture_rng(generators) taken at this step")
    for key, value in payload.items():
        _check_safe(value, key)
    return atomic_torch_save(payload, path)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    # torch's weights_only refusal puts the informative line in the middle of a long text.
    detail = next((line for line in lines if line.startswith("WeightsUnpickler error")), None)
    return f"{type(err).__name__}: {detail or (lines[0] if lines else '')}"


def _describe_foreign(obj: Any, source: str) -> str:
    """Error text for a file that loads but is not one of our checkpoints."""
    expected = f"expected an mgm_fast checkpoint (a dict with format={FORMAT!r}, written by save_checkpoint)"
    if not isinstance(obj, Mapping):
        return f"{source}: holds a {type(obj).__name__}; {expected}"
    keys = list(obj)
    if "format" in obj:
        return f"{source}: format {obj['format']!r}; {expected}"
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    names = [k for k in keys if isinstance(k, str)]
    wrapped = next(
        (obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), Mapping)), None
    )
    if wrapped is not None:
        names += [k for k in wrapped if isinstance(k, str)]
    if any(n.removeprefix("module.").startswith(_RELEASED_PREFIXES) for n in names):
        return f"{source}: looks like a checkpoint of the released MGM code; {expected}; {_COMPAT_HINT}"
    if keys and len(tensors) == len(keys):
        return (
            f"{source}: a plain state dict ({len(keys)} tensors, e.g. {keys[:3]}), not an mgm_fast "
            f"checkpoint; load it with module.load_state_dict, or {_COMPAT_HINT}"
        )
    return (
        f"{source}: a dict without a 'format' entry (keys {keys[:_MAX_LISTED]}); {expected}; {_COMPAT_HINT}"
    )


def _check_layout(obj: Any, source: str) -> dict:
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise CheckpointError(_describe_foreign(obj, source))
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{source}: invalid checkpoint version {version!r}; expected an int in 1..{VERSION}"
        )
    if version > VERSION:
        raise CheckpointError(
            f"{source}: checkpoint version {version} is newer than this mgm_fast supports "
            f"(up to {VERSION}); it was written by mgm_fast {obj.get('mgm_fast_version', '?')}; upgrade mgm_fast"
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(
            f"{source}: incomplete checkpoint, missing entries {missing}; expected {list(REQUIRED_KEYS)}"
        )
    for key in ("modules", "optimizers"):
        if not isinstance(obj[key], Mapping) or not all(isinstance(v, Mapping) for v in obj[key].values()):
            raise CheckpointError(f"{source}: entry {key!r} must map names to state dicts")
    return dict(obj)


def _crc_check(path: Path) -> None:
    """Read every member of the zip archive and check its CRC-32: torch.load does not, so a
    flipped bit in tensor data would otherwise go unnoticed."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: corrupt checkpoint archive: {_first_line(err)}") from err
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint: CRC-32 mismatch in archive member {bad!r}")


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", *, check_crc: bool = False, mmap: bool = False
) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        map_location: where tensors go (default CPU); passed to ``torch.load``.
        check_crc: also verify the CRC-32 of every archive member (reads the file once more);
            catches bit rot that ``torch.load`` does not notice.
        mmap: memory-map tensor data instead of reading it (cheap inspection of big files).

    Returns:
        The checkpoint dict (see the module docstring), plus ``"_path"``: the file it came from.

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointError: truncated or corrupt file, a file that is not a torch archive, one that
            holds objects ``weights_only`` refuses, a foreign format (plain state dict,
            released-code checkpoint -- the message points to ``mgm_fast.compat``), a version
            newer than :data:`VERSION`, or missing entries. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({size} bytes, no zip directory): truncated, corrupt, "
            f"or not a torch file; expected an mgm_fast checkpoint written by save_checkpoint"
        )
    if check_crc:
        _crc_check(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        if "weights only" in str(err).lower():
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) refused its contents: it holds Python objects "
                f"other than tensors and plain containers (so save_checkpoint did not write it) or it "
                f"is corrupt; expected an mgm_fast checkpoint ({_first_line(err)})"
            ) from err
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({size} bytes; truncated or corrupt?): {_first_line(err)}"
        ) from err
    ckpt = _check_layout(obj, str(path))
    ckpt["_path"] = str(path)
    return ckpt


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check that ``path`` is a complete, uncorrupted checkpoint without loading its tensors
    into memory: CRC-32 of every archive member, then a memory-mapped weights_only load and the
    layout checks of :func:`load_checkpoint`. Returns the (memory-mapped) checkpoint dict;
    raises :class:`CheckpointError` naming the file otherwise."""
    return load_checkpoint(path, check_crc=True, mmap=True)


# -------------------------------------------------------------------------------------------
# Restore.


@dataclass
class RestoreReport:
    """What :func:`restore` did, and the checkpoint entries the trainer applies itself."""

    path: str | None
    step: int
    epoch: int
    phase: str
    config: dict
    data_state: dict
    metrics: dict | None
    extra: dict | None
    modules: list[str] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    """Checkpoint entries nothing was given for (``modules.x``, ``optimizers.y``, ...);
    non-empty only with ``strict=False``."""
    missing: list[str] = field(default_factory=list)
    """Given objects the checkpoint has no state for (left unchanged); only with ``strict=False``."""


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _module_problems(name: str, module: nn.Module, state: Mapping, strict: bool) -> list[str]:
    target = module.state_dict()
    problems = []
    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state]
    if strict and unexpected:
        problems.append(_listing(f"modules[{name!r}] unexpected keys", unexpected))
    if strict and missing:
        problems.append(_listing(f"modules[{name!r}] missing keys", missing))
    shapes = [
        f"{k}: expected {list(target[k].shape)}, got {list(v.shape)}"
        for k, v in state.items()
        if k in target and isinstance(v, torch.Tensor) and v.shape != target[k].shape
    ]
    if shapes:
        problems.append(_listing(f"modules[{name!r}] shape mismatches", shapes))
    return problems


_SHAPED_OPTIMIZER_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _optimizer_problems(name: str, optimizer: torch.optim.Optimizer, state: Mapping) -> list[str]:
    groups = state.get("param_groups")
    if not isinstance(groups, list) or "state" not in state:
        return [f"optimizers[{name!r}]: not an optimizer state dict (no 'state' / 'param_groups')"]
    ours = optimizer.param_groups
    if len(groups) != len(ours):
        return [f"optimizers[{name!r}]: {len(groups)} parameter groups in the checkpoint, {len(ours)} given"]
    problems = []
    index_to_param = {}
    for g, (saved, given) in enumerate(zip(groups, ours)):
        if len(saved["params"]) != len(given["params"]):
            problems.append(
                f"optimizers[{name!r}] group {g}: {len(saved['params'])} parameters in the checkpoint, "
                f"{len(given['params'])} given"
            )
            continue
        index_to_param.update(zip(saved["params"], given["params"]))
    for index, entry in state["state"].items():
        param = index_to_param.get(index)
        if param is None:
            continue
        for key in _SHAPED_OPTIMIZER_STATE:
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and value.shape != param.shape:
                problems.append(
                    f"optimizers[{name!r}] state of parameter {index} {key}: expected "
                    f"{list(param.shape)}, got {list(value.shape)}"
                )
    return problems


def restore(
    ckpt: Mapping | str | os.PathLike,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None = None,
    generators: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> RestoreReport:
    """Load modules, optimizers, the grad scaler and every RNG state from a checkpoint, in place.

    Args:
        ckpt: a dict from :func:`load_checkpoint`, or a path (loaded to the CPU).
        modules: ``{name: nn.Module}`` built as for the saved run and already on their device;
            wrappers (DDP, torch.compile) are unwrapped.
        optimizers: ``{name: Optimizer}`` built over those modules' parameters, in the same
            order as the saved run. Their hyperparameters (lr, betas, ...) come from the
            checkpoint, as with ``Optimizer.load_state_dict``.
        scaler: the run's ``GradScaler`` or None.
        generators: named generators for :func:`restore_rng`.
        strict: True (default): the names of modules, optimizers and generators, every module's
            keys and the presence of scaler state must match exactly; False: load what matches,
            warn and report the rest. Shapes must match either way.

    Returns:
        :class:`RestoreReport` with step, epoch, phase, config, data_state, metrics and extra
        (the data pipeline restores ``data_state`` itself) and the names loaded / skipped.

    Raises:
        CheckpointError: names the file and lists every unknown / missing name and shape
            mismatch. All checks run before anything is loaded, so on error nothing changed.
    """
    if not isinstance(ckpt, Mapping):
        ckpt = load_checkpoint(ckpt)
    source = str(ckpt.get("_path", "<checkpoint dict>"))
    ckpt = _check_layout(ckpt, source)
    _check_names(modules, "modules", nn.Module)
    _check_names(optimizers, "optimizers", torch.optim.Optimizer)
    generators = dict(generators or {})

    problems: list[str] = []
    unknown: list[str] = []
    missing: list[str] = []
    for kind, given in (("modules", modules), ("optimizers", optimizers)):
        saved = ckpt[kind]
        unknown += [f"{kind}.{k}" for k in saved if k not in given]
        missing += [f"{kind}.{k}" for k in given if k not in saved]
    saved_gens = ckpt["rng"].get("generators", {}) if isinstance(ckpt["rng"], Mapping) else {}
    unknown += [f"generators.{k}" for k in saved_gens if k not in generators]
    missing += [f"generators.{k}" for k in generators if k not in saved_gens]

    saved_scaler = ckpt["scaler"] or None  # a disabled GradScaler saves {}
    given_scaler = scaler if scaler is not None and scaler.is_enabled() else None
    if saved_scaler is not None and given_scaler is None:
        unknown.append("scaler")
    elif saved_scaler is None and given_scaler is not None:
        missing.append("scaler")

    if strict and (unknown or missing):
        if unknown:
            problems.append(_listing("in the checkpoint but not given", unknown))
        if missing:
            problems.append(_listing("given but not in the checkpoint", missing))

    module_names = [k for k in modules if k in ckpt["modules"]]
    optimizer_names = [k for k in optimizers if k in ckpt["optimizers"]]
    targets = {name: _unwrap_module(modules[name]) for name in module_names}
    for name in module_names:
        problems += _module_problems(name, targets[name], ckpt["modules"][name], strict)
    for name in optimizer_names:
        problems += _optimizer_problems(name, optimizers[name], ckpt["optimizers"][name])
    if problems:
        raise CheckpointError(
            f"{source}: checkpoint does not fit the objects to restore; nothing was loaded\n  "
            + "\n  ".join(problems)
        )
    if unknown or missing:
        warnings.warn(
            f"{source}: restore(strict=False) skipped checkpoint entries {unknown} and left "
            f"{missing} unchanged",
            stacklevel=2,
        )

    # The RNG states are checked before the first tensor is copied: restore_rng validates
    # everything before it sets anything, so run it first.
    common = [k for k in generators if k in saved_gens]
    rng_state = {**ckpt["rng"], "generators": {k: saved_gens[k] for k in common}}
    try:
        restore_rng(rng_state, {k: generators[k] for k in common})
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}; nothing was loaded") from err
    for name in module_names:
        targets[name].load_state_dict(ckpt["modules"][name], strict=strict)
    for name in optimizer_names:  # after the modules: it casts state to the parameters' device
        optimizers[name].load_state_dict(ckpt["optimizers"][name])
    if saved_scaler is not None and given_scaler is not None:
        given_scaler.load_state_dict(saved_scaler)

    return RestoreReport(
        path=ckpt.get("_path"),
        step=ckpt["step"],
        epoch=ckpt["epoch"],
        phase=ckpt["phase"],
        config=ckpt["config"],
        data_state=ckpt["data_state"],
        metrics=ckpt["metrics"],
        extra=ckpt["extra"],
        modules=module_names,
        optimizers=optimizer_names,
        unknown=unknown,
        missing=missing,
    )


# -------------------------------------------------------------------------------------------
# Run folder management.

_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
# Temp files of atomic_write for the names this manager owns.
_TMP_RE = re.compile(r"^\.(ckpt-\d{8,}\.pt|latest|best\.pt)\..+\.tmp$")


class CheckpointManager:
    """Checkpoints of one run in one folder.

    Layout of ``run_dir``:

    * ``ckpt-<step:08d>.pt`` -- one file per :meth:`save`, written atomically.
    * ``latest`` -- a small JSON file (written atomically, never a symlink) naming the newest
      checkpoint and the best one: ``{"format", "version", "latest", "step", "best"}`` with
      ``best`` either null or ``{"file", "step", "metric", "value", "mode"}``.
    * ``best.pt`` -- a hard link to (or, where links are unsupported, a copy of) the checkpoint
      with the best ``metrics[best_metric]``.

    After each save the oldest checkpoints beyond ``keep_last`` are deleted, never the one
    ``latest`` names nor the best one. Saving step ``s`` while files of later steps exist (the
    run was resumed from an earlier checkpoint into the same folder) renames those to
    ``stale-ckpt-<step:08d>.pt`` with a warning: they belong to the abandoned trajectory, are
    kept for inspection, and are never returned by :meth:`latest_path` nor rotated. Opening a folder removes temp files left by a killed
    writer and repairs ``best.pt`` if the writer died between updating ``latest`` and it.

    One writer per folder (rank 0); readers may run at any time.

    Args:
        run_dir: the folder (created if needed).
        keep_last: how many of the newest checkpoints to keep (>= 1), or None to keep all.
        keep_best: maintain ``best.pt``.
        best_metric: key of ``metrics`` that ranks checkpoints ("delta_m" by default).
        mode: "max" (higher is better) or "min".
    """

    POINTER = "latest"
    BEST = "best.pt"

    def __init__(
        self,
        run_dir: str | os.PathLike,
        keep_last: int | None = 3,
        keep_best: bool = True,
        best_metric: str = "delta_m",
        mode: str = "max",
    ) -> None:
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.mode = mode
        self._remove_temp_files()
        pointer = self._read_pointer()
        self.best: dict | None = pointer.get("best") if pointer else None
        """The best checkpoint so far: ``{"file", "step", "metric", "value", "mode"}`` or None."""
        if self.best is not None and (
            self.best.get("metric") != best_metric or self.best.get("mode") != mode
        ):
            warnings.warn(
                f"{self.run_dir}: best.pt ranks by {self.best.get('metric')!r} ({self.best.get('mode')}), "
                f"this manager by {best_metric!r} ({mode}); the next ranked save replaces it",
                stacklevel=2,
            )
            self.best = None
        self.last_saved: Path | None = None
        """Path of the newest checkpoint this manager wrote or found named by ``latest``."""
        if pointer and (self.run_dir / pointer["latest"]).is_file():
            self.last_saved = self.run_dir / pointer["latest"]
        if self.keep_best and self.best is not None:
            self._repair_best()

    # -- paths ---------------------------------------------------------------------------

    def path_for(self, step: int) -> Path:
        """``run_dir / f"ckpt-{step:08d}.pt"``."""
        return self.run_dir / f"ckpt-{step:08d}.pt"

    @property
    def best_path(self) -> Path | None:
        """``run_dir / "best.pt"`` if it exists, else None."""
        path = self.run_dir / self.BEST
        return path if path.is_file() else None

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every ``ckpt-*.pt`` file, oldest first (unverified)."""
        found = []
        for entry in self.run_dir.iterdir():
            match = _CKPT_RE.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    # -- pointer ---------------------------------------------------------------------------

    def _read_pointer(self) -> dict | None:
        path = self.run_dir / self.POINTER
        if not path.exists():
            return None
        try:
            pointer = json.loads(path.read_text(encoding="utf-8"))
            if pointer.get("format") != POINTER_FORMAT or not isinstance(pointer.get("latest"), str):
                raise ValueError(f"not a {POINTER_FORMAT} file")
        except (OSError, ValueError, AttributeError) as err:
            warnings.warn(f"{path}: unreadable checkpoint pointer ({err}); ignoring it", stacklevel=3)
            return None
        return pointer

    def _write_pointer(self, latest: Path, step: int) -> None:
        pointer = {
            "format": POINTER_FORMAT,
            "version": 1,
            "latest": latest.name,
            "step": step,
            "best": self.best,
        }
        atomic_write_text(self.run_dir / self.POINTER, json.dumps(pointer, indent=1) + "\n")

    # -- best ------------------------------------------------------------------------------

    def _is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best["value"] if self.mode == "max" else value < self.best["value"]

    def _publish_best(self, source: Path) -> None:
        """Point ``best.pt`` at ``source`` atomically: hard link where possible (no copy of a
        big file), else a copy; both go through a temp name and a rename."""
        target = self.run_dir / self.BEST
        fd, tmp = tempfile.mkstemp(prefix=f".{self.BEST}.", suffix=".tmp", dir=self.run_dir)
        os.close(fd)
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:

            def copy(handle: IO[bytes]) -> None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, handle, 1 << 22)

            atomic_write(target, copy)
            return
        try:
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.run_dir)

    def _repair_best(self) -> None:
        assert self.best is not None
        source = self.run_dir / self.best["file"]
        if not source.is_file():
            return  # the recorded file was removed by hand; keep whatever best.pt holds
        target = self.run_dir / self.BEST
        if target.is_file():
            if os.path.samefile(source, target):
                return
            try:
                if load_checkpoint(target, mmap=True)["step"] == self.best["step"]:
                    return  # a copy of the right checkpoint
            except CheckpointError:
                pass
        self._publish_best(source)

    # -- save / rotate -----------------------------------------------------------------------

    def save(
        self,
        *,
        step: int,
        epoch: int,
        phase: str,
        config: Mapping | Any,
        modules: Mapping[str, nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        rng: Mapping,
        data_state: Mapping,
        scaler: torch.amp.GradScaler | None = None,
        metrics: Mapping | None = None,
        extra: Mapping | None = None,
    ) -> Path:
        """:func:`save_checkpoint` to ``ckpt-<step:08d>.pt``, then update ``latest``, ``best.pt``
        (when ``metrics[best_metric]`` is finite and better) and rotate. Returns the path.

        Order matters for crash safety: the checkpoint is complete on disk before ``latest``
        names it, and ``latest`` records the new best before ``best.pt`` changes (reopening the
        folder finishes an interrupted ``best.pt`` update)."""
        path = save_checkpoint(
            self.path_for(step),
            config=config,
            step=step,
            epoch=epoch,
            phase=phase,
            modules=modules,
            optimizers=optimizers,
            rng=rng,
            data_state=data_state,
            scaler=scaler,
            metrics=metrics,
            extra=extra,
        )
        self._retire_later_than(step)
        improved = False
        if self.keep_best and metrics is not None and self.best_metric in metrics:
            value = float(metrics[self.best_metric])
            if self._is_better(value):
                self.best = {
                    "file": path.name,
                    "step": step,
                    "metric": self.best_metric,
                    "value": value,
                    "mode": self.mode,
                }
                improved = True
        self._write_pointer(path, step)
        if improved:
            self._publish_best(path)
        self.last_saved = path
        self._rotate(protect={path.name} | ({self.best["file"]} if self.best else set()))
        return path

    def _retire_later_than(self, step: int) -> None:
        """Rename checkpoints of steps after ``step`` out of the ``ckpt-*.pt`` namespace: once
        an earlier checkpoint was resumed, they no longer continue the run that writes here, and
        picking them by step number would resume the abandoned trajectory."""
        later = [p for s, p in self.checkpoints() if s > step]
        if not later:
            return
        for path in later:
            stale = path.with_name("stale-" + path.name)
            os.replace(path, stale)
            if self.best is not None and self.best["file"] == path.name:
                self.best = {**self.best, "file": stale.name}
        fsync_dir(self.run_dir)
        warnings.warn(
            f"{self.run_dir}: saving step {step} while later checkpoints exist (resumed from an earlier "
            f"one?); renamed {[p.name for p in later]} to stale-*.pt",
            stacklevel=3,
        )

    def _rotate(self, protect: set[str]) -> None:
        if self.keep_last is None:
            return
        existing = self.checkpoints()
        keep = {p.name for _, p in existing[-self.keep_last :]} | protect
        for _, path in existing:
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def _remove_temp_files(self) -> None:
        for entry in self.run_dir.iterdir():
            if _TMP_RE.match(entry.name):
                entry.unlink(missing_ok=True)

    # -- find ------------------------------------------------------------------------------

    def _complete(self, load: Callable[[Path], dict]) -> Iterator[tuple[Path, dict]]:
        """Checkpoints newest first that pass ``load``; a failing one is reported with a warning
        that names it and the fallback."""
        corrupt: list[str] = []
        for _, path in reversed(self.checkpoints()):
            try:
                ckpt = load(path)
            except CheckpointError as err:
                corrupt.append(f"{path.name} ({err})")
                continue
            except FileNotFoundError:
                continue  # rotated away by a concurrent writer
            if corrupt:
                warnings.warn(
                    f"{self.run_dir}: skipping corrupt or incomplete checkpoints {corrupt}; "
                    f"falling back to {path.name}",
                    stacklevel=3,
                )
                corrupt = []
            yield path, ckpt
        if corrupt:
            warnings.warn(
                f"{self.run_dir}: no complete checkpoint; corrupt or incomplete: {corrupt}", stacklevel=3
            )

    def latest_path(self) -> Path | None:
        """The newest complete checkpoint (verified with :func:`verify_checkpoint`: CRC and a
        memory-mapped load), or None if there is none. A corrupt newer file is skipped with a
        warning naming it."""
        for path, _ in self._complete(verify_checkpoint):
            return path
        return None

    def load_latest(self, map_location: Any = "cpu") -> dict | None:
        """:func:`load_checkpoint` of the newest complete checkpoint (CRC checked), falling back
        like :meth:`latest_path`; None if there is none. The file is in ``ckpt["_path"]``."""
        for _, ckpt in self._complete(lambda p: load_checkpoint(p, map_location, check_crc=True)):
            return ckpt
        return None


# -------------------------------------------------------------------------------------------
# Non-finite guard.


def check_finite(
    losses: Mapping[str, torch.Tensor | float],
    step: int,
    last_checkpoint: str | os.PathLike | None,
    policy: str = "stop",
    where: str | None = None,
) -> bool:
    """Check accumulated losses for NaN / inf; call at logging time, not every step.

    Args:
        losses: ``{name: value}``; tensors may live on the GPU and hold running sums or means
            accumulated on device since the last log (any shape; a NaN anywhere propagates into
            a sum, so checking the accumulator covers every step in the window).
        step: the current step, for the message.
        last_checkpoint: the newest good checkpoint (e.g. ``CheckpointManager.last_saved``) or
            None, for the message.
        policy: "stop" raises :class:`NonFiniteLossError`; "skip" returns False so the caller
            can drop the window (e.g. skip logging or reload).
        where: what the losses belong to (e.g. the training phase), the message's first words.

    Returns:
        True when every value is finite; False (policy "skip") otherwise.

    Cost: one host sync for all tensors together (a stacked ``isfinite`` reduced on device and
    read once), which is why it belongs at logging time and not inside the step.
    """
    if policy not in ("stop", "skip"):
        raise ValueError(f"policy must be 'stop' or 'skip', got {policy!r}")
    # Reduce each tensor on its own device, stack on one device, read one bool: one host sync.
    tensor_names = [n for n, v in losses.items() if isinstance(v, torch.Tensor)]
    bad = [n for n, v in losses.items() if not isinstance(v, torch.Tensor) and not math.isfinite(float(v))]
    if tensor_names:
        device = losses[tensor_names[0]].device
        flags = torch.stack([torch.isfinite(losses[n].detach()).all().to(device) for n in tensor_names])
        if not bool(flags.all()):
            # Failure path only: naming the culprits costs another sync, which no longer matters.
            bad += [n for n, ok in zip(tensor_names, flags.tolist()) if not ok]
    if not bad:
        return True
    if policy == "skip":
        return False
    values = {
        name: (float(v.detach().float().sum()) if isinstance(v, torch.Tensor) else float(v))
        for name, v in losses.items()
    }
    resume_from = (
        f"last good checkpoint: {last_checkpoint}"
        if last_checkpoint is not None
        else "no checkpoint written yet"
    )
    raise NonFiniteLossError(
        (f"{where}: " if where else "")
        + f"loss not finite at step {step}: "
        + ", ".join(f"{name}={values[name]}" for name in bad)
        + f"; {resume_from}",
        step=step,
        names=bad,
        values=values,
        last_checkpoint=None if last_checkpoint is None else str(last_checkpoint),
    )
