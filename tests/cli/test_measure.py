"""``nclightning measure``: a saved checkpoint validated with the config's loggers and callbacks."""

from __future__ import annotations

import csv

import pytest

from nclightning.cli import main

QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
         "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_measure_writes_a_metrics_csv_beside_the_training_run(tmp_path, capsys):
    assert main(["fit", "--config", "digits_mlp.yaml", *QUICK]) == 0
    runs = tmp_path / "runs" / "digits_mlp"
    ckpt = runs / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    args = ["measure", "--config", "digits_mlp.yaml", "--ckpt_path", str(ckpt), *QUICK[2:]]
    assert main(args) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["measure_0", "version_0"]
    with open(runs / "measure_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0.0 <= float(r["val/acc"]) <= 1.0 for r in rows if r.get("val/acc"))
    assert any(r.get("val/acc") for r in rows)
    assert "measure_0/metrics.csv" in capsys.readouterr().err


def test_measure_needs_a_checkpoint_that_exists(capsys):
    assert main(["measure", "--config", "digits_mlp.yaml"]) == 2
    assert "--ckpt_path" in capsys.readouterr().err
    assert main(["measure", "--config", "digits_mlp.yaml", "--ckpt_path", "nope.ckpt"]) == 2
    assert "no checkpoint file at nope.ckpt" in capsys.readouterr().err
