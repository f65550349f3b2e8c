"""Run files: distinct version folders under a race, resume-in-place rows, permissions."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
from pathlib import Path

from nclightning.loggers import CSVLogger, ResumePoint, rows_to_keep


def _reserve(args) -> int:
    root, barrier = args
    barrier.wait()  # every process asks for the next folder at the same moment
    return CSVLogger(root, name="exp").version


def test_simultaneous_loggers_reserve_distinct_folders(tmp_path):
    ctx = mp.get_context("fork")
    n = 8
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            versions = pool.map(_reserve, [(str(tmp_path), barrier)] * n)
    assert sorted(versions) == list(range(n))
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == sorted(
        f"version_{v}" for v in range(n)
    )


def test_the_next_folder_follows_existing_ones_and_a_prefix(tmp_path):
    (tmp_path / "exp" / "version_3").mkdir(parents=True)
    (tmp_path / "exp" / "measure_0").mkdir()
    assert CSVLogger(tmp_path, name="exp").version == 4
    m = CSVLogger(tmp_path, name="exp", version_prefix="measure_")
    assert m.version == "measure_1" and Path(m.log_dir) == tmp_path / "exp" / "measure_1"


def test_discard_removes_only_what_this_logger_created(tmp_path):
    other = tmp_path / "exp" / "version_0"
    other.mkdir(parents=True)
    logger = CSVLogger(tmp_path / "a" / "b", name="exp")
    logger.log_metrics({"x": 1.0}, step=0)
    assert Path(logger.log_dir, "metrics.csv").is_file()
    assert logger.discard()
    assert not (tmp_path / "a").exists()  # the folders it made are gone, parents included
    assert other.is_dir()
    assert CSVLogger(tmp_path, name="exp").discard() is False  # it created nothing yet


def test_rows_to_keep_is_the_rule_of_the_docstring():
    rows = [{"step": str(s), "v": str(i)} for i, s in enumerate([0, 2, 3, 5, 5, 6, 7])]
    # checkpoint at step 6 with 4 rows on disk: rows 0-3 stay; of the later rows, the one at
    # step 5 (< 6: never logged again) stays, those at steps 6 and 7 (logged again) go
    kept = rows_to_keep(rows, ResumePoint(rows=4, step=6))
    assert [r["v"] for r in kept] == ["0", "1", "2", "3", "4"]
    assert rows_to_keep(rows, ResumePoint(rows=0, step=0)) == []


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def test_resume_into_keeps_rows_drops_a_partial_line_and_appends(tmp_path):
    folder = tmp_path / "exp" / "version_0"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(
        "a,b,step\n1.5,,0\n,2.5,3\n7,,4\n,9,9\n3,4,1"  # no newline at the end: a torn write
    )
    logger = CSVLogger(tmp_path, name="exp")
    logger.resume_into(0, ResumePoint(rows=2, step=4))
    logger.log_metrics({"c": 8.0}, step=4)
    header, rows = _csv(folder / "metrics.csv")
    assert header == ["a", "b", "c", "step"]
    assert rows == [
        {"a": "1.5", "b": "", "c": "", "step": "0"},
        {"a": "", "b": "2.5", "c": "", "step": "3"},
        {"a": "", "b": "", "c": "8.0", "step": "4"},
    ]
    assert logger.rows_on_disk() == 3 and logger.created_folder is None


def test_every_row_is_on_disk_when_logged(tmp_path):
    logger = CSVLogger(tmp_path, name="exp")
    for step in range(3):
        logger.log_metrics({"loss": float(step)}, step=step)
        assert len(_csv(Path(logger.log_dir) / "metrics.csv")[1]) == step + 1
    logger.log_metrics({"acc": 0.5}, step=3)  # a new key: the header is rewritten
    header, rows = _csv(Path(logger.log_dir) / "metrics.csv")
    assert header == ["acc", "loss", "step"] and len(rows) == 4
    assert not [p for p in Path(logger.log_dir).iterdir() if p.name.startswith(".")]


_MODES = """
import json, os, stat, sys
from pathlib import Path
import torch
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from nclightning.loggers import AtomicCheckpointIO, CSVLogger

root = Path(sys.argv[1])
theirs = LightningCSVLogger(root / "l", name="exp")
theirs.log_metrics({"x": 1.0}, step=0)
theirs.save()
TorchCheckpointIO().save_checkpoint({"w": torch.ones(2)}, root / "l" / "c.ckpt")
ours = CSVLogger(root / "n", name="exp")
ours.log_metrics({"x": 1.0}, step=0)
ours.log_metrics({"y": 1.0}, step=1)  # a header rewrite: a temporary file renamed into place
AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, root / "n" / "c.ckpt")
mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
print(json.dumps({
    "lightning": [mode(Path(theirs.log_dir) / "metrics.csv"), mode(root / "l" / "c.ckpt")],
    "ours": [mode(Path(ours.log_dir) / "metrics.csv"), mode(root / "n" / "c.ckpt")],
    "folders": [mode(theirs.log_dir), mode(ours.log_dir)],
    "loads": torch.load(root / "n" / "c.ckpt")["w"].tolist(),
}))
"""


def test_files_get_the_permissions_of_lightnings_files(tmp_path):
    """In a process whose umask is 027 from the start (fsspec caches the umask it first sees)."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _MODES, str(tmp_path)],
        capture_output=True, text=True, preexec_fn=lambda: os.umask(0o027), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    modes = json.loads(done.stdout.strip().splitlines()[-1])
    assert modes["lightning"] == modes["ours"] == [0o640, 0o640]
    assert modes["folders"][0] == modes["folders"][1] == 0o750
    assert modes["loads"] == [1.0, 1.0]


def test_discard_keeps_a_folder_that_holds_results(tmp_path):
    logger = CSVLogger(tmp_path, name="exp")
    logger.log_metrics({"x": 1.0}, step=0)
    ckpt = Path(logger.log_dir) / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    assert logger.discard() is False and ckpt.is_file()
    other = CSVLogger(tmp_path, name="exp")
    other.log_metrics({"x": 1.0}, step=5)  # a row after a training step
    assert other.discard() is False and Path(other.log_dir).is_dir()
