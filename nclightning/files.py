"""Files the project writes: atomic replacement and ordinary permissions.

Every file nclightning writes (snapshots, CSV rows, checkpoints, configs) is written to a
temporary file in the same folder and renamed into place, so a crash (even SIGKILL) leaves
the old file or the new one, never a mix; and it gets the mode a plain ``open(path, "w")``
would give it, ``0o666 & ~umask``, like Lightning's own files.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_save", "atomic_write_bytes", "file_mode"]

_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _LOCK:  # elsewhere: set and restore (briefly visible to other threads)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """``0o666 & ~umask``: the mode of a new file created with ``open(path, "w")``."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    return _atomic(Path(path), lambda f: f.write(data))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see the module docstring)."""
    import torch

    return _atomic(Path(path), lambda f: torch.save(obj, f))


def _atomic(path: Path, write: Callable[[Any], object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
