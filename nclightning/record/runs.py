"""Reading a run back: its versions, ``metrics.csv``, snapshots, one stitched history.

This module owns the run directory as the loggers and the callback leave it; it is the one
reader of the run record (``nclightning report``, ``study`` and ``measure`` use it). Keys are
those of :mod:`nclightning.record.keys`; snapshots those of :mod:`nclightning.record.snapshots`.

* **Versions.** A version folder holds a ``metrics.csv`` (Lightning's CSVLogger: header = the
  union of the keys, a cell left empty where a row did not log the key), a saved config
  (``config.yaml``) and/or snapshot folders ``snapshots/{probe}/probe-NNNN.pt``.
  :func:`find_versions` finds every one under a folder.
* **Resumed runs**, recognised from the run record, never from the order of steps in a file.
  A run resumed in the same folder needs no stitching: the CSV logger cuts its file back to
  the checkpoint's rows before appending (:mod:`nclightning.loggers.resume`). A run resumed in
  a new version of the same logger folder continues the earlier one: version B continues
  version A (siblings) when B holds A's resume note (``resumed_from.json``, written by
  :class:`~nclightning.loggers.RunRecord`: the checkpoint, its step, A's folder), when B's
  saved config has a ``ckpt_path`` inside A, or when a snapshot folder of B carries the owner
  token of one of A's (:func:`~nclightning.record.snapshots.claim_directory`).
  :func:`find_runs` chains them; B's resume step is the note's, else the checkpoint's own
  record (when the file is still there), else B's first logged step.
* **One history.** The rows of a chain are stitched into one and put on one x-axis of
  completed epochs by the rules of :mod:`nclightning.record.history` (docs/science.md §9);
  snapshot files follow the same rule, one file per ``(probe, epochs_trained)``, the later
  version's winning. Rows of an abandoned timeline that were dropped are counted in
  :attr:`Run.notes`, one line each, which ``nclightning report`` prints.
* Which runs are seeds of one setting: :mod:`nclightning.record.groups`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from nclightning.errors import DataError
from nclightning.record import keys, snapshots
from nclightning.record.history import (
    INDEX_KEYS,
    Dropped,
    Row,
    completed_epochs,
    read_metrics_csv,
    stitch,
)

__all__ = [
    "INDEX_KEYS",
    "Row",
    "Run",
    "Version",
    "completed_epochs",
    "find_runs",
    "find_versions",
    "load_run",
    "read_metrics_csv",
    "read_resume_note",
    "resume_step",
    "run_labels",
    "stitch",
]

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
RESUME_NOTE = "resumed_from.json"
"""Written into a version folder that resumed a run logged in another folder (RunRecord);
the same name as :data:`nclightning.loggers.resume.RESUME_NOTE` (checked by a test)."""
SNAPSHOT_FOLDER = "snapshots"
_VERSION = re.compile(r"version_(\d+)")


# ---------------------------------------------------------------------------------------------
# versions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One folder a logger wrote: ``version_N`` or any folder with a ``metrics.csv``."""

    path: Path
    metrics_csv: Path | None
    config_file: Path | None
    snapshot_dirs: Mapping[str, Path] = field(default_factory=dict)  # probe -> folder

    @property
    def number(self) -> int | None:
        """``N`` of a ``version_N`` folder, else None."""
        m = _VERSION.fullmatch(self.path.name)
        return int(m.group(1)) if m else None


MEASURE_PREFIX = "measure_"
"""Folders of ``nclightning measure`` (``{name}/measure_N``): never part of a resume chain."""


def _natural(text: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def _version_at(folder: Path) -> Version | None:
    csv_file = folder / METRICS_FILE
    snaps = {}
    root = folder / SNAPSHOT_FOLDER
    if root.is_dir():
        for sub in sorted(root.iterdir()):
            if sub.is_dir() and snapshots.list_snapshots(sub):
                snaps[sub.name] = sub
    files = snapshots.list_snapshots(folder)
    if files:  # a snapshot folder of its own (snapshot_dir=path): the files name the probe
        snaps[str(snapshots.read_snapshot(files[0])["probe"])] = folder
    if not csv_file.is_file() and not snaps:
        return None
    config = folder / CONFIG_FILE
    return Version(
        folder,
        csv_file if csv_file.is_file() else None,
        config if config.is_file() else None,
        snaps,
    )


def find_versions(root: str | Path) -> list[Version]:
    """Every version folder under ``root`` (``root`` included), in natural path order.

    A ``.csv`` file given as ``root`` is read as its folder's metrics. Snapshot folders inside
    a version's ``snapshots/`` belong to that version; a snapshot folder elsewhere
    (``snapshot_dir=path``) is a version of its own, its probe named by its files. Folders of
    ``nclightning measure`` (``measure_N``) are read only when given themselves.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"no such directory: {root}")
    if root.is_file():
        if root.name != METRICS_FILE and root.suffix != ".csv":
            raise DataError(f"{root} is not a directory (expected a run directory or a .csv)")
        beside = _version_at(root.parent)
        snaps = beside.snapshot_dirs if beside is not None else {}
        return [Version(root.parent, root, _config_beside(root), snaps)]
    folders = {root} | {p.parent for p in root.rglob(METRICS_FILE)}
    for snap in {p.parent for p in root.rglob("probe-*.pt")}:
        # snapshots/{probe}/ belongs to the version folder above it
        folders.add(snap.parent.parent if snap.parent.name == SNAPSHOT_FOLDER else snap)
    found = []
    for folder in sorted(folders, key=lambda p: _natural(str(p))):
        inside = folder.relative_to(root).parts if folder != root else ()
        if any(part.startswith(MEASURE_PREFIX) for part in inside):
            continue
        version = _version_at(folder)
        if version is not None:
            found.append(version)
    return found


def _config_beside(path: Path) -> Path | None:
    config = path.parent / CONFIG_FILE
    return config if config.is_file() else None


def _read_config(path: Path | None) -> dict | None:
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _owner_tokens(version: Version) -> set[str]:
    tokens = set()
    for folder in version.snapshot_dirs.values():
        owner = folder / snapshots.OWNER_FILE
        if owner.is_file():
            tokens.add(owner.read_text().strip())
    return tokens


def _ckpt_inside(ckpt: Any, folder: Path) -> bool:
    """Whether a config's ``ckpt_path`` lies in ``folder`` (absolute, or relative to any cwd)."""
    if not isinstance(ckpt, str) or not ckpt:
        return False
    path = PurePath(ckpt)
    if path.is_absolute() and Path(path).resolve().is_relative_to(folder.resolve()):
        return True
    tail = (folder.parent.name, folder.name)  # e.g. digits_mlp/version_0/checkpoints/last.ckpt
    parts = path.parts
    return any(parts[i : i + 2] == tail for i in range(len(parts) - 1))


def read_resume_note(folder: Path) -> dict | None:
    """The resume note of a version folder (:data:`RESUME_NOTE`), or None."""
    import json

    try:
        note = json.loads((folder / RESUME_NOTE).read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _same_folder(a: Any, b: Path) -> bool:
    try:
        return isinstance(a, str) and Path(a).resolve() == b.resolve()
    except OSError:
        return False


def _continues(later: Version, earlier: Version) -> bool:
    if later.path.name.startswith(MEASURE_PREFIX):  # a measurement: a run of its own
        return False
    note = read_resume_note(later.path)
    if note is not None:
        return _same_folder(note.get("from"), earlier.path)
    config = _read_config(later.config_file) or {}
    if _ckpt_inside(config.get("ckpt_path"), earlier.path):
        return True
    return bool(_owner_tokens(later) & _owner_tokens(earlier))


def _chains(versions: Sequence[Version]) -> list[list[Version]]:
    """Resume chains among sibling versions: each leaf version with its ancestors, in order."""
    order = sorted(
        versions,
        key=lambda v: (str(v.path.parent), -1 if v.number is None else v.number, v.path.name),
    )
    parent: dict[Path, Version] = {}
    for i, later in enumerate(order):
        for earlier in reversed(order[:i]):
            if earlier.path.parent == later.path.parent and _continues(later, earlier):
                parent[later.path] = earlier
                break
    has_child = {p.path for p in parent.values()}
    chains = []
    for leaf in order:
        if leaf.path in has_child:
            continue
        chain = [leaf]
        while chain[0].path in parent:
            chain.insert(0, parent[chain[0].path])
        chains.append(chain)
    return chains


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run: a resume chain of versions read back as one history.

    ``rows[i]`` maps logged keys to floats (empty cells absent); ``x[i]`` is its completed
    epochs (module docstring). ``snapshots[probe]`` lists the snapshot files in
    ``epochs_trained`` order after stitching; ``config`` is the first version's saved config;
    ``notes`` says what stitching dropped (one line per resume that cut rows).
    """

    label: str
    versions: tuple[Version, ...]
    rows: list[Row]
    x: list[float]
    snapshots: dict[str, list[Path]]
    config: dict | None
    notes: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.versions[0].path

    def series(self, key: str) -> list[tuple[float, float]]:
        """``[(completed epochs, value), ...]`` of ``key`` in logging order (x known only)."""
        return [
            (x, row[key]) for x, row in zip(self.x, self.rows) if key in row and math.isfinite(x)
        ]

    def snapshot(self, probe: str, epochs_trained: float | None = None) -> dict[str, Any]:
        """The snapshot of ``probe`` at ``epochs_trained`` (default: the last one)."""
        files = self.snapshots.get(probe) or []
        if not files:
            raise DataError(f"{self.label}: no snapshots of probe {probe!r}")
        if epochs_trained is None:
            return snapshots.read_snapshot(files[-1])
        for path in files:
            if path == snapshots.snapshot_path(path.parent, int(epochs_trained)):
                return snapshots.read_snapshot(path)
        raise DataError(f"{self.label}: no snapshot of probe {probe!r} at {epochs_trained:g}")


def _snapshot_rows(version: Version) -> list[Row]:
    """Rows rebuilt from the snapshots' ``row`` fields (a version without a metrics.csv)."""
    rows = []
    for folder in version.snapshot_dirs.values():
        for path in snapshots.list_snapshots(folder):
            snap = snapshots.read_snapshot(path)
            row = {k: float(v) for k, v in snap["row"].items()}
            row[keys.EPOCHS_TRAINED] = float(snap["epochs_trained"])
            row[keys.STEP] = float(snap.get("step", math.nan))
            rows.append(row)
    rows.sort(key=lambda r: (r[keys.EPOCHS_TRAINED], r[keys.STEP]))
    return rows


def _probe_steps(rows: Sequence[Row]) -> dict[tuple[str, float], float]:
    out = {}
    for row in rows:
        if keys.EPOCHS_TRAINED in row:
            for key in row:
                parsed = keys.parse_key(key)
                if parsed is not None:
                    out[(parsed.probe, row[keys.EPOCHS_TRAINED])] = row.get(keys.STEP, math.nan)
    return out


def _stitch_snapshots(chain: Sequence[Version], rows: Sequence[Row]) -> dict[str, list[Path]]:
    """Snapshot files per probe by the stitching rule; with CSV rows, only those they confirm."""
    steps = _probe_steps(rows)
    by_probe: dict[str, dict[int, Path]] = {}
    for version in chain:
        for probe, folder in version.snapshot_dirs.items():
            for path in snapshots.list_snapshots(folder):
                epoch = int(path.stem.split("-")[1])
                by_probe.setdefault(probe, {})[epoch] = path  # later version wins
    out = {}
    for probe, files in by_probe.items():
        logged = {e for (p, e) in steps if p == probe}
        kept = [files[e] for e in sorted(files) if not logged or e in logged]
        out[probe] = kept
    return out


def resume_step(version: Version) -> float | None:
    """The step at which ``version`` resumed an earlier one, as the run record says.

    The resume note's ``step``; else, when the saved config names a checkpoint file that is
    still there, that checkpoint's :class:`~nclightning.loggers.RunRecord` step; else None.
    """
    note = read_resume_note(version.path)
    if note is not None and isinstance(note.get("step"), (int, float)):
        return float(note["step"])
    ckpt = (_read_config(version.config_file) or {}).get("ckpt_path")
    if isinstance(ckpt, str) and ckpt and Path(ckpt).is_file():
        from nclightning.loggers.resume import read_run_record

        try:
            record = read_run_record(ckpt)
        except Exception:  # an unreadable checkpoint says nothing
            record = None
        if record is not None and isinstance(record.get("step"), (int, float)):
            return float(record["step"])
    return None


def load_run(chain: Sequence[Version], label: str | None = None) -> Run:
    """Read and stitch the versions of one run (chain order: first to last)."""
    parts = []
    for version in chain:
        parts.append(
            read_metrics_csv(version.metrics_csv)
            if version.metrics_csv
            else _snapshot_rows(version)
        )
    starts = [None, *(resume_step(v) for v in chain[1:])]
    dropped: list[Dropped] = []
    rows = stitch(parts, starts, dropped)
    label = label or chain[0].path.name
    notes = [
        f"{label}: {d.rows} row(s) logged after step {d.after_step:g} before "
        f"{chain[d.resumed_by].path.name} resumed from its checkpoint were dropped "
        "(the abandoned timeline)"
        for d in dropped
    ]
    return Run(
        label=label,
        versions=tuple(chain),
        rows=rows,
        x=completed_epochs(rows),
        snapshots=_stitch_snapshots(chain, rows),
        config=_read_config(chain[0].config_file),
        notes=notes,
    )


def _siblings(versions: Sequence[Version]) -> list[Version]:
    """``versions`` plus the other versions of their logger folders (a chain may reach them)."""
    seen = {v.path: v for v in versions}
    for parent in {v.path.parent for v in versions if v.number is not None}:
        for folder in parent.iterdir():
            if folder.is_dir() and _VERSION.fullmatch(folder.name) and folder not in seen:
                version = _version_at(folder)
                if version is not None:
                    seen[folder] = version
    return list(seen.values())


def find_runs(roots: str | Path | Sequence[str | Path]) -> list[Run]:
    """Every run under ``roots``: versions found, chained (resumes), read and stitched.

    A version given directly brings in the earlier versions it continues. Labels are the
    runs' folder paths, shortened to the shortest unique tails (:func:`run_labels`).
    """
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    found: list[Version] = []
    for root in roots:
        versions = find_versions(root)
        if not versions:
            raise DataError(
                f"no run found under {root}: expected a metrics.csv (CSV logger output) or "
                "snapshot files snapshots/{probe}/probe-NNNN.pt"
            )
        found += [v for v in versions if v.path not in {f.path for f in found}]
    wanted = {v.path for v in found}
    chains = [c for c in _chains(_siblings(found)) if any(v.path in wanted for v in c)]
    chains.sort(key=lambda c: _natural(str(c[0].path)))
    labels = run_labels([c[0].path for c in chains])
    return [load_run(c, lab) for c, lab in zip(chains, labels)]


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Folder names, extended with parent names until they are unique."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        owners: dict[str, set] = {}
        for lab, p in zip(labels, parts):
            owners.setdefault(lab, set()).add(p)
        grow = [
            i for i, lab in enumerate(labels) if len(owners[lab]) > 1 and depth[i] < len(parts[i])
        ]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for lab in labels:  # the same folder given twice
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}-{seen[lab]}")
    return out
