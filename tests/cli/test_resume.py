"""A crash loses at most one epoch, and a resumed run stays one run.

A run crashes (an exception after a given training step, with every row logged so far on disk,
including rows logged after the last checkpoint), then ``--ckpt_path last.ckpt`` resumes it:
the same version folder, the same W&B run id, and a ``metrics.csv`` equal, row for row and
key for key, to the one of a run that was never interrupted. (SIGKILL at random moments:
``benchmarks/fault_injection.py`` and its ``slow`` test.)
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

from nclightning.cli import main
from nclightning.loggers import read_run_record

ARGS = ["fit", "--config", "digits_mlp.yaml", "--trainer.max_epochs", "4",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.every_n_epochs", "2",
        "--trainer.callbacks+=cli_support.CrashAtStep"]  # fmt: skip
RUN = Path("runs/digits_mlp/version_0")


def _fixed_coupling() -> list[str]:
    import inspect

    from nclightning.callbacks import NeuralCollapseCallback

    name = (
        "coupling" if "coupling" in inspect.signature(NeuralCollapseCallback).parameters else "beta"
    )
    return [f"--trainer.callbacks.init_args.{name}", "1.0"]


def _args() -> list[str]:
    i = ARGS.index("--trainer.callbacks+=cli_support.CrashAtStep")
    return [*ARGS[:i], *_fixed_coupling(), *ARGS[i:]]  # the override targets the NC callback


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _fit(folder: Path, monkeypatch, crash_at: int | None = None, ckpt: str | None = None) -> None:
    import wandb

    wandb.teardown()
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("WANDB_MODE", "offline")
    if crash_at is None:
        monkeypatch.delenv("NCL_TEST_CRASH_AT", raising=False)
    else:
        monkeypatch.setenv("NCL_TEST_CRASH_AT", str(crash_at))
    extra = ["--ckpt_path", ckpt] if ckpt else []
    assert main([*_args(), *extra]) == 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        folder = tmp_path_factory.mktemp("uninterrupted")
        _fit(folder, mp)
        return _read(folder / RUN / "metrics.csv")
    finally:
        mp.undo()


def _wandb_ids(folder: Path) -> list[str]:
    return sorted(p.name.split("-")[3] for p in (folder / "runs" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("crash_at", [4, 6, 9])  # mid-epoch, an epoch's last step, mid-epoch
def test_crash_then_resume_equals_an_uninterrupted_run(
    tmp_path, monkeypatch, uninterrupted, crash_at, capsys
):
    with pytest.raises(RuntimeError, match="injected crash"):
        _fit(tmp_path, monkeypatch, crash_at=crash_at)
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    record = read_run_record(last)
    step = torch.load(last, weights_only=False, map_location="cpu")["global_step"]
    assert step >= crash_at - 3  # at most one epoch (3 steps) lost
    rows_at_crash = len(_read(tmp_path / RUN / "metrics.csv")[1])
    assert rows_at_crash > record["loggers"][0]["rows"]  # rows after the checkpoint were on disk

    capsys.readouterr()
    _fit(tmp_path, monkeypatch, ckpt=str(last))
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("nclightning:")]
    # the end of the run says where everything is: its folder, the report, both W&B folders
    assert f"nclightning: run in {RUN} (metrics.csv, config, checkpoints, snapshots)" in said
    assert f"nclightning: figures:  nclightning report {RUN}" in said
    (sync,) = [ln for ln in said if "wandb sync" in ln]
    folders = sync.split("wandb sync", 1)[1].split()
    assert sorted(folders) == sorted(str(p) for p in (Path("runs") / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    assert sorted(p.name for p in (tmp_path / "runs" / "digits_mlp").iterdir()) == ["version_0"]
    assert not (tmp_path / RUN / "config-2.yaml").exists()  # the same config, not a new run
    header, rows = _read(tmp_path / RUN / "metrics.csv")
    ref_header, ref_rows = uninterrupted
    assert header == ref_header
    assert rows == ref_rows  # every row, every key, every value, in order
    ids = _wandb_ids(tmp_path)
    assert len(ids) == 2 and ids[0] == ids[1] == record["loggers"][1]["id"]


def test_record_names_the_folder_and_rows(tmp_path, monkeypatch):
    _fit(tmp_path, monkeypatch)
    record = read_run_record(tmp_path / RUN / "checkpoints" / "last.ckpt")
    csv_entry, wandb_entry = record["loggers"]
    assert csv_entry["root"] == os.path.abspath(tmp_path / "runs" / "digits_mlp")
    assert csv_entry["version"] == 0 and wandb_entry["kind"] == "wandb"
    # the final checkpoint was saved before the last epoch's end-of-epoch rows were logged
    assert 0 < csv_entry["rows"] <= len(_read(tmp_path / RUN / "metrics.csv")[1])
