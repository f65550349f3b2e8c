"""Small file helpers shared by the loggers: atomic writes with ordinary permissions, cleanup."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from nclightning.files import file_mode

__all__ = ["atomic_write_bytes", "file_mode", "remove_created", "remove_stale_temporaries"]


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete ``.{name}.*`` files beside ``path``: temporaries of writes a crash interrupted.

    Only for files one process writes at a time (a run's own ``metrics.csv``, checkpoints).
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A crash (even SIGKILL) leaves the old file or the new one, never a mix.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_created(path: Path, created_parents: list[Path]) -> None:
    """Remove ``path`` (a folder this process created) and those parents left empty by it."""
    shutil.rmtree(path, ignore_errors=True)
    for parent in created_parents:  # deepest first
        try:
            parent.rmdir()
        except OSError:  # not empty (another run wrote there meanwhile) or gone
            break
