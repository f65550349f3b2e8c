"""``AtomicCheckpointIO``: checkpoints written through a temporary file in their own folder.

Lightning writes a checkpoint to a temporary file in the system's temporary folder and moves
it into place; when that folder is on another file system (a ``tmpfs`` ``/tmp``) the move is
a copy, and a crash during it leaves a truncated ``last.ckpt``. This plug-in writes local
checkpoints next to their destination and renames them into place (atomic on POSIX), with
the permissions of any other file the process writes (temporaries a crash left are
removed at the next save); remote paths (``s3://`` ...) keep
Lightning's behaviour. ``Trainer(plugins=[AtomicCheckpointIO()])``; the ``nclightning``
command installs it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from nclightning.files import atomic_save
from nclightning.loggers._files import remove_stale_temporaries

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` with atomic local saves."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        remove_stale_temporaries(path)  # left by a crash during an earlier save
        atomic_save(checkpoint, path)
