"""Classes the CLI tests name in configs (``class_path: cli_support.X``)."""

from __future__ import annotations

import os

from lightning.pytorch import Callback

from nclightning.errors import ConfigurationError


class SetupFails(Callback):
    """Raises a :class:`ConfigurationError` in ``setup``, as a callback with a bad setting does."""

    def setup(self, trainer, pl_module, stage) -> None:
        raise ConfigurationError("layer 'nosuch' not found; did you mean 'penultimate'?")


class CrashAtStep(Callback):
    """Raises after the training step ``NCL_TEST_CRASH_AT`` (unset: never), as a crash would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        at = os.environ.get("NCL_TEST_CRASH_AT")
        if at and trainer.global_step == int(at):
            raise RuntimeError(f"injected crash after step {at}")
