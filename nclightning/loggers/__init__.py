"""Loggers and run files that survive crashes, concurrent runs, resumes and networks.

* :class:`CSVLogger` (:mod:`.csv_logger`): atomically reserved ``version_N`` folders,
  every row on disk when logged, resume in the same folder with exactly the rows of an
  uninterrupted run.
* :class:`WandbLogger` (:mod:`.wandb_logger`): a run that starts within a bounded time or
  falls back to offline mode and says so; :func:`ensure_wandb_mode` (never a prompt).
* :class:`RunRecord`, :func:`resume_loggers`, :func:`discard_run` (:mod:`.resume`): what a
  checkpoint records about the run's logs, resuming from it, cleaning up a failed start.
* :class:`AtomicCheckpointIO` (:mod:`.checkpoint_io`): checkpoints renamed into place.

In your own script::

    from nclightning.loggers import CSVLogger, RunRecord, WandbLogger, resume_loggers

    loggers = [CSVLogger("runs", name="exp"), WandbLogger(project="exp", save_dir="runs")]
    trainer = Trainer(logger=loggers, callbacks=[RunRecord(), ...])
    resume_loggers(trainer, ckpt)            # only when resuming: same folder, same W&B run
    trainer.fit(model, datamodule, ckpt_path=ckpt)
"""

from nclightning.loggers.checkpoint_io import AtomicCheckpointIO
from nclightning.loggers.csv_logger import CSVLogger, ResumePoint, rows_to_keep
from nclightning.loggers.resume import RunRecord, discard_run, read_run_record, resume_loggers
from nclightning.loggers.wandb_logger import (
    WandbLogger,
    ensure_wandb_mode,
    finish_wandb_runs,
    is_offline,
    wandb_api_key_available,
    wandb_service_problem,
)

__all__ = [
    "AtomicCheckpointIO",
    "CSVLogger",
    "ResumePoint",
    "RunRecord",
    "WandbLogger",
    "discard_run",
    "ensure_wandb_mode",
    "finish_wandb_runs",
    "is_offline",
    "read_run_record",
    "resume_loggers",
    "rows_to_keep",
    "wandb_api_key_available",
    "wandb_service_problem",
]
