"""Atomic file writes: a process killed at any moment leaves the previous file or the new one,
never a torn one.

The writers here put the new content into a temp file in the target's own folder (``os.replace``
is atomic only within one file system), flush and fsync it, rename it over the target and fsync
the folder, so that the rename itself survives a power cut. The temp file is named
``.<target name>.<random>.tmp``; a writer killed before the rename leaves such a file behind,
which the owner of the folder may remove (``engine.checkpoint.CheckpointManager`` does).

Training checkpoints (:mod:`mgm_fast.engine.checkpoint`) and released-format exports
(:mod:`mgm_fast.compat`) both write through this module; it imports nothing of the package, so
neither depends on the other for it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable; some file systems cannot open or fsync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a binary temp file next to ``path``, fsync it, rename it over
    ``path`` and fsync the folder; the folder is created if needed. On any error the temp file is
    removed and ``path`` keeps its previous content. Returns ``path`` as a :class:`~pathlib.Path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`).

    If serialisation fails (or the process dies) the previous content of ``path`` stays intact
    and no temp file is left behind (a killed process may leave a ``.<name>.*.tmp`` file).
    """
    return atomic_write(path, lambda handle: torch.save(obj, handle))
