"""One history from logged rows: reading ``metrics.csv``, stitching resumes, the x-axis.

Owns the two rules every reader of a run uses (:mod:`nclightning.record.runs` applies them to
a run directory; docs/science.md §9):

* **Stitching** (:func:`stitch`). A run is the parts of its resume chain, first to last (one
  part for a run that never resumed). Where a part resumes (its resume step ``s``, from the run
  record: :mod:`nclightning.record.runs`), whatever the earlier parts logged at a step above
  ``s`` belongs to the abandoned timeline and is dropped, and counted. Inside one part rows are
  kept in the order they were logged whatever their steps: Lightning logs a probe row at the
  global step and the epoch-end rows after it one step lower, and that is no resume (a CSV log
  resumed in place is cut back to the checkpoint by the logger itself,
  :func:`nclightning.loggers.csv_logger.rows_to_keep`). A value logged again for the same key
  at the same moment (a probe's ``epochs_trained``; for other rows Lightning's ``epoch`` and
  ``step``) replaces the earlier one. A resumed run thus reads as the uninterrupted one.
* **One x-axis: completed training epochs** (:func:`completed_epochs`). Probe rows sit at
  their ``epochs_trained``. A Lightning row carrying ``epoch`` (its 0-based running epoch)
  logged at that epoch's last step (an epoch-level metric) sits at ``epoch + 1``; one logged
  earlier in the epoch (a step-level metric), and a row with a ``step`` only (the learning
  rate of ``LearningRateMonitor``), sits where its step falls in the run's own step <-> epoch
  correspondence: linear between the ``(step, completed epochs)`` pairs that the probe rows
  (at the global step), the epoch ends (logged by Lightning one step below the global step at
  which the epoch ends) and the start of training (step 0 = 0 epochs) give, and beyond the last
  pair along the last steps-per-epoch. Lightning's ``epoch`` and ``epochs_trained`` keep
  their own meanings in the rows; the x-axis is kept beside them, never written into them.
"""

from __future__ import annotations

import bisect
import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nclightning.record import keys

__all__ = ["INDEX_KEYS", "Dropped", "Row", "completed_epochs", "read_metrics_csv", "stitch"]

Row = dict[str, float]
INDEX_KEYS = frozenset({keys.STEP, "epoch", keys.EPOCHS_TRAINED, keys.DEPTH})
"""Columns that say when and where a row was logged, not what was measured."""


def read_metrics_csv(path: str | Path) -> list[Row]:
    """Rows of a CSV logger file as ``{key: float}``; empty and non-numeric cells left out.

    Values are parsed with ``float`` (``nan``, ``inf`` included): exactly the logged floats.
    """
    rows: list[Row] = []
    with Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row: Row = {}
            for key, cell in raw.items():
                if key is None or cell is None or cell == "":
                    continue
                try:
                    row[key] = float(cell)
                except ValueError:
                    continue
            rows.append(row)
    return rows


def _moment(row: Mapping[str, float]) -> tuple:
    """When a row was logged, as rule (2) of :func:`stitch` compares it."""
    if keys.EPOCHS_TRAINED in row:
        return ("probe", row[keys.EPOCHS_TRAINED])
    return ("lightning", row.get("epoch"), row.get(keys.STEP))


@dataclass(frozen=True)
class Dropped:
    """Rows of part ``part`` (and before) logged after step ``after_step``, where part
    ``resumed_by`` resumed: the abandoned timeline that :func:`stitch` left out."""

    rows: int
    after_step: float
    resumed_by: int


def stitch(
    parts: Iterable[Sequence[Mapping[str, float]]],
    starts: Sequence[float | None] | None = None,
    dropped: list[Dropped] | None = None,
) -> list[Row]:
    """One history from the row lists of a resume chain, by the module's stitching rule.

    ``parts`` are the rows of each version in chain order (one part for a single file);
    ``starts[i]`` is the step at which part ``i`` resumed, as the run record says (the
    checkpoint's step); None, or no ``starts``, takes the part's first logged step. The first
    part's start is never used. Returns new rows in logging order; a row whose every measured
    value was replaced or dropped is left out. Each cut that dropped rows is appended to
    ``dropped``.
    """
    cells: list[tuple[int, str, float]] = []  # (row index, key, value), in logging order
    index: list[Mapping[str, float]] = []
    for n, part in enumerate(parts):
        part = list(part)
        if n > 0 and cells:
            start = starts[n] if starts is not None and n < len(starts) else None
            if start is None:
                start = min((r[keys.STEP] for r in part if keys.STEP in r), default=math.inf)
            abandoned = {c[0] for c in cells if index[c[0]].get(keys.STEP, -math.inf) > start}
            if abandoned:
                cells = [c for c in cells if c[0] not in abandoned]
                if dropped is not None:
                    dropped.append(Dropped(len(abandoned), float(start), n))
        for row in part:
            index.append(row)
            i = len(index) - 1
            cells += [(i, k, v) for k, v in row.items() if k not in INDEX_KEYS]
    last: dict[tuple, int] = {}
    for n, (i, key, _) in enumerate(cells):
        last[(key, _moment(index[i]))] = n
    out: dict[int, Row] = {}
    for n, (i, key, value) in enumerate(cells):
        if last[(key, _moment(index[i]))] == n:
            row = out.setdefault(i, {k: v for k, v in index[i].items() if k in INDEX_KEYS})
            row[key] = value
    return [out[i] for i in sorted(out)]


def completed_epochs(rows: Sequence[Mapping[str, float]]) -> list[float]:
    """The x of every row: completed training epochs (module docstring); NaN when unknown."""
    pairs = _step_epoch_pairs(rows)
    end_step = _epoch_end_steps(rows)
    steps = [s for s, _ in pairs]
    out = []
    for row in rows:
        step = row.get(keys.STEP, math.nan)
        if keys.EPOCHS_TRAINED in row:
            out.append(float(row[keys.EPOCHS_TRAINED]))
        elif "epoch" in row and not step < end_step.get(row["epoch"], -math.inf):
            out.append(float(row["epoch"]) + 1.0)
        else:
            x = _interpolate(steps, pairs, step)
            if "epoch" in row:  # a step-level row inside its own epoch
                x = min(max(x, row["epoch"]), row["epoch"] + 1.0)
            out.append(x)
    return out


def _epoch_end_steps(rows: Sequence[Mapping[str, float]]) -> dict[float, float]:
    end: dict[float, float] = {}
    for row in rows:
        if "epoch" in row and keys.EPOCHS_TRAINED not in row and keys.STEP in row:
            e = row["epoch"]
            end[e] = max(end.get(e, -math.inf), row[keys.STEP])
    return end


def _step_epoch_pairs(rows: Sequence[Mapping[str, float]]) -> list[tuple[float, float]]:
    """``(step, completed epochs)`` known exactly: probe rows and epoch ends, sorted by step."""
    known: dict[float, float] = {0.0: 0.0}  # training starts at step 0
    for row in rows:
        if keys.EPOCHS_TRAINED in row and keys.STEP in row:
            known[row[keys.STEP]] = max(known.get(row[keys.STEP], -1.0), row[keys.EPOCHS_TRAINED])
    for epoch, step in _epoch_end_steps(rows).items():
        # Lightning logs an epoch's end one step below the global step it ends at
        known[step + 1] = max(known.get(step + 1, -1.0), epoch + 1.0)
    pairs = sorted((s, c) for s, c in known.items() if math.isfinite(s) and math.isfinite(c))
    monotone: list[tuple[float, float]] = []
    for s, c in pairs:  # a stale pair must not make the map run backwards
        if not monotone or c >= monotone[-1][1]:
            monotone.append((s, c))
    return monotone


def _interpolate(steps: list[float], pairs: list[tuple[float, float]], step: float) -> float:
    """Completed epochs at ``step``: linear between known pairs, the last slope beyond them."""
    if math.isnan(step) or not pairs:
        return math.nan
    i = bisect.bisect_left(steps, step)
    if i < len(pairs) and steps[i] == step:
        return pairs[i][1]
    if 0 < i < len(pairs):
        (s0, c0), (s1, c1) = pairs[i - 1], pairs[i]
        return c0 + (step - s0) * (c1 - c0) / (s1 - s0)
    if i == len(pairs) and len(pairs) >= 2:
        (s0, c0), (s1, c1) = pairs[-2], pairs[-1]
        return c1 + (step - s1) * (c1 - c0) / (s1 - s0) if s1 > s0 else math.nan
    return math.nan
