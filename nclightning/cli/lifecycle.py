"""The life of one CLI run around the Trainer call: threads, resume, success and failure.

* :func:`configure_threads`: intra-op threads by :mod:`nclightning.runtime`'s rule, exported
  to ``OMP_NUM_THREADS`` for worker processes (``ddp_spawn``, ``ddp``), said in one line;
* :func:`prepare_trainer`: every Trainer gets :class:`~nclightning.loggers.RunRecord` and
  atomic checkpoint writes (:class:`~nclightning.loggers.AtomicCheckpointIO`);
* :func:`resume`: ``--ckpt_path`` continues the checkpoint's CSV folder and W&B run;
* :func:`after_failure`: a run that failed before its first training step (and did not
  resume) removes its version folder and W&B run; a later failure marks the W&B run failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "after_failure",
    "after_success",
    "configure_threads",
    "mark_measurement",
    "prepare_trainer",
    "reserve_folders",
    "resume",
    "user_error_of_worker",
]


def _say(message: str) -> None:
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        print(f"nclightning: {message}", file=sys.stderr, flush=True)


def _batch_size(datamodule: Any, model: Any) -> int | None:
    for owner in (
        datamodule,
        getattr(datamodule, "hparams", None),
        getattr(model, "hparams", None),
    ):
        value = getattr(owner, "batch_size", None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def configure_threads(trainer: Any, model: Any, datamodule: Any) -> None:
    """Apply the thread rule to this process and export it to the run's worker processes."""
    from nclightning import runtime

    processes = max(1, int(getattr(trainer, "num_devices", 1) or 1))
    choice = runtime.configure_threads(
        model, _batch_size(datamodule, model), processes=processes, export=True
    )
    if choice.applied:
        plural = "s" if choice.threads > 1 else ""
        _say(
            f"{choice.threads} CPU thread{plural} per process ({choice.reason}); "
            "OMP_NUM_THREADS=N sets it"
        )


def prepare_trainer(trainer: Any) -> Any:
    """Add :class:`RunRecord` and atomic checkpoint writes to a Trainer built by the CLI."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from nclightning.loggers import AtomicCheckpointIO, RunRecord

    if not any(isinstance(cb, RunRecord) for cb in trainer.callbacks):
        trainer.callbacks.append(RunRecord())
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


def resume(trainer: Any, ckpt_path: Any) -> bool:
    """Point the loggers at the checkpoint's run; True when a checkpoint file is resumed."""
    from nclightning.loggers import resume_loggers

    if not ckpt_path or not Path(str(ckpt_path)).is_file():
        return False
    for message in resume_loggers(trainer, ckpt_path):
        _say(message)
    return True


def reserve_folders(trainer: Any) -> None:
    """Reserve the CSV version folders here, before the Trainer starts other processes.

    With ``ddp_spawn`` the workers get the logger with its folder chosen (the same one on
    every rank), and this process can remove it if the run fails before its first step.
    """
    from nclightning.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            _ = logger.version


def mark_measurement(trainer: Any) -> None:
    """``nclightning measure``: CSV folders ``measure_N``, W&B runs of ``job_type`` measure."""
    from lightning.pytorch.loggers import WandbLogger

    from nclightning.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and logger._version is None:
            logger.version_prefix = "measure_"
        elif isinstance(logger, WandbLogger) and logger._experiment is None:
            logger._wandb_init["job_type"] = "measure"


def after_success(trainer: Any, measure: bool = False) -> None:
    """Say where everything is: the run folder, the report command, the W&B runs to sync."""
    from lightning.pytorch.loggers import CSVLogger

    from nclightning.loggers import finish_wandb_runs

    if trainer.is_global_zero:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                folder = Path(logger.log_dir)
                if measure:
                    _say(f"measurements in {folder / 'metrics.csv'} (snapshots beside it)")
                else:
                    _say(f"run in {folder} (metrics.csv, config, checkpoints, snapshots)")
                _say(f"figures:  nclightning report {folder}")
    finish_wandb_runs(trainer)


def after_failure(trainer: Any, keep: bool = False) -> None:
    """Clean up after an exception in the Trainer call (see the module docstring)."""
    from nclightning.loggers import discard_run, finish_wandb_runs

    if trainer is None:
        return
    if not keep and trainer.global_step == 0:
        removed = discard_run(trainer)
        if removed:
            _say(f"the run failed before its first training step; removed {', '.join(removed)}")
        return
    try:
        finish_wandb_runs(trainer, exit_code=1)
    except Exception:  # never hide the original error
        pass


def user_error_of_worker(err: BaseException) -> str | None:
    """The message of a :class:`~nclightning.errors.UserError` raised in a spawned worker.

    ``ddp_spawn`` re-raises a worker's exception as ``ProcessRaisedException`` whose text
    ends with the worker's traceback (``nclightning.errors.ConfigurationError: message``).
    """
    import importlib

    from nclightning.errors import UserError

    if type(err).__name__ != "ProcessRaisedException":
        return None
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    name, sep, message = last.partition(": ")
    module, _, cls = name.rpartition(".")
    try:
        kind = getattr(importlib.import_module(module), cls) if sep and module else None
    except ImportError:
        return None
    return message if isinstance(kind, type) and issubclass(kind, UserError) else None
