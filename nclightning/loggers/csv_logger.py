"""``CSVLogger``: Lightning's CSV logger, safe against concurrent runs, crashes and resumes.

Differences from :class:`lightning.pytorch.loggers.CSVLogger` (same arguments, same files):

* **Distinct folders.** The next ``version_N`` is *reserved* with an atomic ``mkdir``: two
  runs started at the same moment with the same ``save_dir``/``name`` get ``version_N`` and
  ``version_{N+1}`` (Lightning's logger gives both the same folder and they overwrite each
  other).
* **Nothing lost to a crash.** Rows reach ``metrics.csv`` as they are logged
  (``flush_logs_every_n_steps=1``); the file is appended to in one write per flush, and a
  header change (a new key) rewrites it atomically (temporary file and rename), so a SIGKILL
  leaves a readable file holding every row logged before it.
* **Resume in place.** :meth:`resume_into` points the logger at an existing version folder and
  keeps exactly the rows an uninterrupted run would have at the resume point (see
  :func:`rows_to_keep`); Lightning's logger deletes that folder's ``metrics.csv`` instead.
* **No empty folders.** :meth:`discard` removes the folder this process reserved (used when a
  run fails before its first training step).

Files get the permissions of any other file the process writes (``0o666 & ~umask``).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, cast

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn

from nclightning.loggers._files import atomic_write_bytes, remove_created, remove_stale_temporaries

__all__ = ["CSVLogger", "ResumePoint", "rows_to_keep"]


class ResumePoint:
    """Where a checkpoint was saved in a CSV log: ``rows`` rows on disk, logger step ``step``."""

    def __init__(self, rows: int, step: int) -> None:
        self.rows, self.step = int(rows), int(step)

    def __repr__(self) -> str:
        return f"ResumePoint(rows={self.rows}, step={self.step})"


def rows_to_keep(rows: list[dict[str, str]], point: ResumePoint) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` an uninterrupted run holds when training resumes at ``point``.

    The first ``point.rows`` rows were on disk when the checkpoint was saved: they stay. A row
    written later stays only if its ``step`` is below the checkpoint's step: the resumed run
    logs every row from that step on again, but Lightning's epoch-end training metrics of the
    checkpoint's own epoch (logged at ``step - 1`` after the checkpoint was saved) are never
    logged again.
    """

    def step(row: dict[str, str]) -> float:
        try:
            return float(row.get("step") or math.inf)
        except ValueError:
            return math.inf

    head = rows[: point.rows]
    return head + [r for r in rows[point.rows :] if step(r) < point.step]


def _read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV log (values as written); a partial last line (a crash mid-write) is dropped."""
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]


def _csv_bytes(rows: list[dict[str, Any]], keys: list[str], header: bool) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=keys)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _has_results(folder: Path) -> bool:
    """Whether a run folder holds a checkpoint or a metrics row logged after step 0."""
    if any(folder.rglob("*.ckpt")):
        return True
    path = folder / _Writer.NAME_METRICS_FILE
    if not path.is_file():
        return False
    return any(float(r.get("step") or 0) > 0 for r in _read_rows(path))


class _Writer(ExperimentWriter):
    """Lightning's writer with one-write appends, atomic header rewrites and a resume point."""

    def __init__(self, log_dir: str, resume: ResumePoint | None = None) -> None:
        self._resume = resume
        self.rows_written = 0
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self._resume is None:
            return super()._check_log_dir_exists()
        if not path.is_file():
            if self._resume.rows:
                rank_zero_warn(f"resuming: {path} is missing; it will hold the new rows only")
            return
        remove_stale_temporaries(path)
        rows = rows_to_keep(_read_rows(path), self._resume)
        self.metrics_keys = sorted(set().union(*rows)) if rows else []
        atomic_write_bytes(path, _csv_bytes(rows, self.metrics_keys, header=bool(rows)))
        self.rows_written = len(rows)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        rows = _read_rows(path)
        atomic_write_bytes(path, _csv_bytes(rows, fieldnames, header=True))

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        new_keys = self._record_new_keys()
        exists = path.is_file() and path.stat().st_size > 0
        if new_keys and exists:
            self._rewrite_with_new_header(self.metrics_keys)
        data = _csv_bytes(self.metrics, self.metrics_keys, header=not exists)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self.rows_written += len(self.metrics)
        self.metrics = []


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` with reserved version folders, crash-safe rows and resume.

    Args are Lightning's (``save_dir``, ``name``, ``version``, ``prefix``,
    ``flush_logs_every_n_steps``, here 1 by default: every row on disk as soon as it is
    logged), plus ``version_prefix``: the folder name before the number (``"version_"``;
    ``nclightning measure`` uses ``"measure_"``). See the module docstring.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from nclightning.loggers import CSVLogger
        >>> with tempfile.TemporaryDirectory() as root:
        ...     logger = CSVLogger(root, name="demo")
        ...     logger.log_metrics({"nc-train/penultimate/nc1": 0.5}, step=0)
        ...     print(logger.version, (Path(logger.log_dir) / "metrics.csv").read_text())
        0 nc-train/penultimate/nc1,step
        0.5,0
        <BLANKLINE>
    """

    def __init__(
        self,
        save_dir: str | os.PathLike = "lightning_logs",
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 1,
        version_prefix: str = "version_",
    ) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)  # type: ignore[arg-type]
        self.version_prefix = version_prefix
        self._created: Path | None = None
        self._created_parents: list[Path] = []
        self._resume: ResumePoint | None = None
        self._discarded = False

    # -- version folders --------------------------------------------------------------------

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = self._reserve_version()
        return self._version

    def _next_number(self) -> int:
        root, numbers = Path(self.root_dir), [-1]
        if root.is_dir():
            for d in root.iterdir():
                tail = d.name[len(self.version_prefix) :]
                if d.name.startswith(self.version_prefix) and tail.isdigit() and d.is_dir():
                    numbers.append(int(tail))
        return max(numbers) + 1

    def _reserve_version(self) -> int | str:
        """The next free folder, created here (atomically) on rank 0; other ranks only look."""
        n = self._next_number()
        if rank_zero_only.rank != 0 or "://" in str(self.root_dir):  # type: ignore[attr-defined]
            return self._label(n)
        root = Path(self.root_dir)
        self._created_parents = [p for p in (root, *root.parents) if not p.exists()]
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (root / self._folder(n)).mkdir()
                break
            except FileExistsError:
                n += 1
        self._created = root / self._folder(n)
        return self._label(n)

    def _folder(self, n: int) -> str:
        return f"{self.version_prefix}{n}"

    def _label(self, n: int) -> int | str:
        """Lightning's ``log_dir`` adds ``version_`` to ints; other prefixes need a string."""
        return n if self.version_prefix == "version_" else self._folder(n)

    @property
    def created_folder(self) -> Path | None:
        """The version folder this process reserved (None when resuming or not yet created)."""
        return self._created

    # -- writing ----------------------------------------------------------------------------

    @property
    @rank_zero_experiment
    def experiment(self) -> _Writer:
        if self._discarded:
            raise RuntimeError("this CSVLogger's folder was discarded; it logs nothing more")
        if self._experiment is None:
            log_dir = self.log_dir  # reserves the folder (and notes the parents it creates)
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _Writer(log_dir, self._resume)
        return cast(_Writer, self._experiment)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self._discarded:
            super().log_metrics(metrics, step)

    def log_hyperparams(self, params: Any = None) -> None:
        if not self._discarded:
            super().log_hyperparams(params)

    def save(self) -> None:
        if not self._discarded:
            super().save()

    def finalize(self, status: str) -> None:
        if not self._discarded:
            super().finalize(status)

    def rows_on_disk(self) -> int:
        """Flush pending rows; the number of data rows ``metrics.csv`` now holds (rank 0)."""
        if rank_zero_only.rank != 0 or self._experiment is None:  # type: ignore[attr-defined]
            return 0
        self.save()
        return cast(_Writer, self._experiment).rows_written

    # -- resume and discard -----------------------------------------------------------------

    def resume_into(self, version: int | str, point: ResumePoint) -> None:
        """Write into the existing folder ``version`` keeping the rows up to ``point``.

        Call before the Trainer starts (the folder is opened when the run starts).
        """
        if self._experiment is not None:
            raise RuntimeError("CSVLogger.resume_into must be called before the run starts")
        if self._created is not None:  # reserved but unused: give the folder back
            self.discard()
        self._version, self._resume = version, point

    def discard(self) -> bool:
        """Remove the version folder this process reserved, with its files; True if removed.

        A folder holding a checkpoint or a row logged after step 0 is kept: it has results.
        """
        if self._created is None or _has_results(self._created):
            return False
        remove_created(self._created, self._created_parents)
        self._created, self._experiment, self._discarded = None, None, True
        return True
