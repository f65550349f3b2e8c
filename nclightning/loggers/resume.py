"""One run across crashes: what a checkpoint records about the run's logs, and resuming from it.

:class:`RunRecord` (a callback) adds to every checkpoint, under ``"nclightning_run"``::

    {"format": 1, "step": int,                 # the loggers' step when it was saved
     "loggers": [{"kind": "csv", "root": str, "version": int | str, "rows": int},
                 {"kind": "wandb", "id": str, "project": str | None}, ...]}

flushing the CSV rows first, so ``rows`` rows are on disk. :func:`resume_loggers` reads it
back before a resumed fit and points each logger at its earlier folder / W&B run: the CSV log
keeps the rows an uninterrupted run would hold at that point
(:func:`~nclightning.loggers.csv_logger.rows_to_keep`) and the resumed run appends the rest,
so its ``metrics.csv`` equals an uninterrupted run's. A logger whose folder differs from the
record (another ``save_dir``, or a Trainer resumed without :func:`resume_loggers`) starts a new
version; :class:`RunRecord` then writes a resume note into it (``resumed_from.json``: the
checkpoint, its step, the earlier folder), from which :mod:`nclightning.record.runs` stitches
the two versions into one run.

:func:`discard_run` removes what a run that failed before its first step created (its CSV
version folder, its W&B run), so a failed start leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from nclightning.files import atomic_write_bytes
from nclightning.loggers.csv_logger import CSVLogger, ResumePoint
from nclightning.loggers.wandb_logger import WandbLogger

__all__ = ["RECORD_KEY", "RunRecord", "discard_run", "read_run_record", "resume_loggers"]

RECORD_KEY = "nclightning_run"


def _logger_step(trainer: Any) -> int:
    """The step loggers receive (Lightning's ``_batches_that_stepped``, else global_step)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


class RunRecord(Callback):
    """Store where the run's logs are (and how far they got) in every checkpoint.

    Add it to a Trainer's callbacks (the ``nclightning`` command does) and call
    :func:`resume_loggers` before ``trainer.fit(..., ckpt_path=...)``. When the run fails
    before its first training step, it removes the CSV folder and W&B run the run created
    (:func:`discard_run`; resumed runs keep theirs). Under ``ddp_spawn`` that happens in the
    launching process, so reserve the CSV folder there before ``fit`` (``logger.version``; the
    CLI does); a W&B run started by a spawned worker stays, marked failed.
    """

    def __init__(self) -> None:
        self._resumed: dict[str, Any] | None = None
        self._ckpt_path: str | None = None

    @property
    def state_key(self) -> str:
        return "nclightning.RunRecord"

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(RECORD_KEY)
        self._resumed = record if isinstance(record, dict) else None
        path = getattr(trainer, "ckpt_path", None)
        self._ckpt_path = os.path.abspath(path) if isinstance(path, (str, os.PathLike)) else None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """A resumed fit logging to a new CSV folder notes there which run it continues."""
        if self._resumed is None or not trainer.is_global_zero:
            return
        entries = [e for e in self._resumed.get("loggers", []) if e.get("kind") == "csv"]
        csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, _LightningCSVLogger)]
        for logger, entry in zip(csv_loggers, entries):
            earlier = _version_folder(entry)
            here = os.path.abspath(logger.log_dir)
            if earlier is None or earlier == here:
                continue  # resumed in place: the logger cut its file back to the checkpoint
            step = self._resumed.get("step")
            note = {"checkpoint": self._ckpt_path, "step": step, "from": earlier}
            os.makedirs(here, exist_ok=True)
            atomic_write_bytes(Path(here) / RESUME_NOTE, json.dumps(note, indent=1).encode())
        self._resumed = None

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        loggers: list[dict[str, Any]] = []
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                rows = logger.rows_on_disk()
                root = os.path.abspath(logger.root_dir)
                loggers.append(
                    {"kind": "csv", "root": root, "version": logger.version, "rows": rows}
                )
            elif isinstance(logger, _LightningWandbLogger):
                loggers.append({"kind": "wandb", "id": logger.version, "project": logger.name})
            else:
                loggers.append({"kind": type(logger).__name__})
        checkpoint[RECORD_KEY] = {"format": 1, "step": _logger_step(trainer), "loggers": loggers}

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """A run that fails before its first training step removes what it created."""
        if trainer.global_step == 0:
            removed = discard_run(trainer)
            if removed and trainer.is_global_zero:
                print(
                    "nclightning: the run failed before its first training step; removed "
                    + ", ".join(removed),
                    file=sys.stderr,
                    flush=True,
                )


RESUME_NOTE = "resumed_from.json"


def _version_folder(entry: dict[str, Any]) -> str | None:
    """The folder of a CSV logger entry of a run record."""
    root, version = entry.get("root"), entry.get("version")
    if not isinstance(root, str) or version is None:
        return None
    name = f"version_{version}" if isinstance(version, int) else str(version)
    return os.path.abspath(os.path.join(root, name))


def read_run_record(ckpt_path: str | os.PathLike) -> dict[str, Any] | None:
    """The :class:`RunRecord` entry of a checkpoint file, or None (older checkpoint, no record)."""
    import pickle

    import torch

    try:  # plain tensors and containers (Lightning's own checkpoints), memory-mapped
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError):  # other objects, or not a zip file
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    record = ckpt.get(RECORD_KEY) if isinstance(ckpt, dict) else None
    return record if isinstance(record, dict) and record.get("format") == 1 else None


def _resume_csv(logger: CSVLogger, entry: dict[str, Any], step: int) -> str:
    root = os.path.abspath(logger.root_dir)
    if root != entry["root"]:
        return (
            f"CSV log: the checkpoint's run wrote to {entry['root']}, this run writes to "
            f"{root}: a new version folder (`nclightning report` stitches the versions)"
        )
    if logger._version is not None and logger.created_folder is None:
        if logger._version != entry["version"]:
            return f"CSV log: writing to {logger.log_dir} as configured (not the checkpoint's)"
    logger.resume_into(entry["version"], ResumePoint(entry["rows"], step))
    return f"CSV log: resuming in {logger.log_dir} after its row {entry['rows']}"


def resume_loggers(loggers: Any, ckpt_path: str | os.PathLike) -> list[str]:
    """Point ``loggers`` (a list, or a Trainer) at the run the checkpoint was saved from.

    Call after building the loggers and before ``trainer.fit(..., ckpt_path=ckpt_path)``.
    Returns one message per logger saying what it will do (empty without a record).
    """
    loggers = list(getattr(loggers, "loggers", loggers) or [])
    if not Path(ckpt_path).is_file():
        return []
    record = read_run_record(ckpt_path)
    if record is None:
        return []
    csv_entries = [e for e in record["loggers"] if e.get("kind") == "csv"]
    wandb_entries = [e for e in record["loggers"] if e.get("kind") == "wandb"]
    messages = []
    for logger in loggers:
        if isinstance(logger, CSVLogger) and csv_entries:
            messages.append(_resume_csv(logger, csv_entries.pop(0), int(record["step"])))
        elif isinstance(logger, _LightningWandbLogger) and wandb_entries:
            run_id = wandb_entries.pop(0).get("id")
            if run_id and logger._experiment is None:
                setattr(logger, RESUMED_FLAG, True)
                if isinstance(logger, WandbLogger):
                    logger.resume_run(run_id)
                else:
                    logger._id = run_id
                    logger._wandb_init.update(id=run_id, resume="allow")
                messages.append(f"W&B: resuming run {run_id}")
    return messages


RESUMED_FLAG = "_ncl_resumed"  # set on a W&B logger that continues an earlier run


def _discard_wandb(logger: _LightningWandbLogger) -> bool:
    """Finish and delete the W&B run this logger started (never a run it resumed)."""
    from nclightning.loggers.wandb_logger import is_offline

    run = logger._experiment
    if run is None or getattr(logger, RESUMED_FLAG, False) or not getattr(run, "dir", None):
        return False
    disabled = type(run).__name__ in ("NoopRun", "RunDisabled")
    run_dir, path, offline = Path(run.dir).parent, getattr(run, "path", None), is_offline(run)
    try:
        run.finish(exit_code=1, quiet=True)  # type: ignore[call-arg]  # older wandb
    except TypeError:
        run.finish(exit_code=1)
    logger._experiment = None
    if disabled:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    latest = run_dir.parent / "latest-run"
    if latest.is_symlink() and not latest.exists():
        latest.unlink()
    if not offline and path:
        _delete_online_run(path)
    return True


def _delete_online_run(path: str, timeout: float = 10.0) -> None:
    """Delete an online W&B run (best effort, at most ``timeout`` seconds)."""
    import threading

    def delete() -> None:
        try:
            import wandb

            wandb.Api(timeout=int(timeout)).run(path).delete()
        except Exception:
            pass

    thread = threading.Thread(target=delete, daemon=True)
    thread.start()
    thread.join(timeout)


def discard_run(loggers: Any) -> list[str]:
    """Remove the CSV folders and W&B runs these loggers created; what was removed, as text.

    Folders and runs continued from a checkpoint (:func:`resume_loggers`) are never removed.
    """
    removed = []
    for logger in list(getattr(loggers, "loggers", loggers) or []):
        if isinstance(logger, CSVLogger):
            folder = logger.created_folder
            if logger.discard():
                removed.append(str(folder))
        elif isinstance(logger, _LightningWandbLogger):
            run = logger._experiment
            name = getattr(run, "id", None)
            if _discard_wandb(logger):
                removed.append(f"W&B run {name}")
    return removed
