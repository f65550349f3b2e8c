"""Snapshot files: one ``probe-{epochs_trained:04d}.pt`` per probe, the statistics behind a row.

A snapshot holds what the figures of one probe need beyond its scalars (per-class matrices,
the measured-vs-predicted view) and lets metrics be recomputed from moments. Written
atomically (a crash leaves the previous file or none, never half of one) with the permissions
of any other file the process writes (``0o666 & ~umask``, as Lightning's checkpoints); read
with ``torch.load(..., weights_only=True)``.

Layout (format :data:`FORMAT`; tensors on the CPU, float64 unless said)::

    {"format": 2, "probe": str, "epochs_trained": int, "step": int,
     "row": {key: float},                       # every scalar logged by this probe
     "class_names": [str] | None,
     "layers": {alias: {"counts": [K], "means": [K, d], "class_ss": [K],
                        "norm_sums": [K] (optional), "scatter": [d, d] (optional)}},
     "classifier": {"weight": [K, d]} (optional; the layer feeding it is named in "feeds"),
     "feeds": alias | None,
     "pairs": {"h0->h": {"status": str, "normalization": str, "coupling": float,
                         "scale": float, "predicted": {m: float}, "measured": {m: float},
                         "residuals": {m: float}, "baselines": {name: {m: float}},
                         "skill": {m: float}, "linearisation_error": float}},
     "features": {alias: [n, d] float16} (optional), "labels": [n] (optional)}

A snapshot directory belongs to one run: :func:`claim_directory` writes an owner file with the
run's token and refuses a directory that another run already claimed.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nclightning.errors import ConfigurationError
from nclightning.files import atomic_save, file_mode

__all__ = [
    "FORMAT",
    "OWNER_FILE",
    "claim_directory",
    "list_snapshots",
    "read_snapshot",
    "snapshot_path",
    "write_snapshot",
]

FORMAT = 2
OWNER_FILE = ".nclightning-owner"
_NAME = re.compile(r"probe-(\d+(?:\.\d+)?)\.pt")


def snapshot_path(directory: str | Path, epochs_trained: float) -> Path:
    """``{directory}/probe-{epochs_trained:04d}.pt``; a probe inside an epoch (training stopped
    by ``max_steps``) as ``probe-0002.333.pt``."""
    e = float(epochs_trained)
    name = f"{int(e):04d}" if e.is_integer() else f"{int(e):04d}.{f'{e % 1:.3f}'[2:]}"
    return Path(directory) / f"probe-{name}.pt"


def write_snapshot(directory: str | Path, snapshot: Mapping[str, Any]) -> Path:
    """Write ``snapshot`` (the layout of the module docstring) atomically; return its path."""
    payload = {"format": FORMAT, **snapshot}
    return atomic_save(payload, snapshot_path(directory, payload["epochs_trained"]))


def read_snapshot(path: str | Path) -> dict[str, Any]:
    """Load one snapshot (``weights_only=True``); ``ValueError`` naming the file if malformed."""
    import torch

    path = Path(path)
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read snapshot {path}: {err}") from err
    missing = [k for k in ("format", "probe", "epochs_trained", "row", "layers") if k not in snap]
    if missing or snap.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an nclightning snapshot of format {FORMAT} "
            f"(missing {missing or 'nothing'}, format {snap.get('format')!r})"
        )
    return snap


def list_snapshots(directory: str | Path) -> list[Path]:
    """The snapshot files of ``directory``, in order of ``epochs_trained``."""
    found = []
    for p in Path(directory).glob("probe-*.pt"):
        m = _NAME.fullmatch(p.name)
        if m:
            found.append((float(m.group(1)), p))
    return [p for _, p in sorted(found)]


def claim_directory(directory: str | Path, token: str) -> Path:
    """Make ``directory`` this run's snapshot folder, identified by ``token``.

    A new or empty folder is claimed (owner file written); a folder this run claimed before (a
    resumed run carries its token in its checkpoint) is reused. A folder holding another run's
    snapshots is refused with :class:`~nclightning.errors.ConfigurationError`: nothing is ever
    overwritten silently.
    """
    directory = Path(directory)
    owner = directory / OWNER_FILE
    if owner.is_file():
        if owner.read_text().strip() == token:
            return directory
        raise ConfigurationError(
            f"snapshot folder {directory} belongs to another run (its {OWNER_FILE} names "
            f"run {owner.read_text().strip()!r}); leave snapshot_dir unset to write into this "
            "run's own version folder, or choose an empty folder"
        )
    if list_snapshots(directory):
        raise ConfigurationError(
            f"snapshot folder {directory} already holds snapshots of an earlier run; leave "
            "snapshot_dir unset to write into this run's own version folder, or choose an "
            "empty folder"
        )
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{OWNER_FILE}.", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(tmp, file_mode())
    try:
        os.link(tmp, owner)  # atomic: fails if another process claimed it meanwhile
    except FileExistsError:
        Path(tmp).unlink(missing_ok=True)
        return claim_directory(directory, token)
    Path(tmp).unlink(missing_ok=True)
    return directory
