"""The embedded default job, end to end: ``nclightning fit --config digits_mlp.yaml``.

It trains the whole default job (150 epochs, about 30 s on 2 cores), so it is marked
``slow``: CI runs it, ``pytest -m 'not slow'`` leaves it out. One run serves the acceptance
checks of the foundation (100% train accuracy, checkpoint, logs), of the callback (NC1 falls
at least 10x, keys in the CSV) and of the report (figures).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from nclightning.cli import main
from nclightning.metrics import METRIC_KEYS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("default_job")
    cwd, mode = os.getcwd(), os.environ.get("WANDB_MODE")
    os.chdir(root)
    os.environ["WANDB_MODE"] = "disabled"
    try:
        assert (
            main(["fit", "--config", "digits_mlp.yaml", "--trainer.enable_progress_bar", "false"])
            == 0
        )
    finally:
        os.chdir(cwd)
        if mode is None:
            os.environ.pop("WANDB_MODE")
        else:
            os.environ["WANDB_MODE"] = mode
    return root / "runs" / "digits_mlp" / "version_0"


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def test_reaches_100_percent_train_accuracy_and_writes_checkpoints(run):
    rows = _rows(run)
    train_acc = [float(r["train/acc"]) for r in rows if r.get("train/acc")]
    assert len(train_acc) == 150 and train_acc[-1] == 1.0
    assert sum(a == 1.0 for a in train_acc) > 50  # many epochs in the terminal phase
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and len(ckpts) >= 6  # every 25 epochs + last
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 149
    assert any("NeuralCollapseCallback" in k for k in state["callbacks"])
    assert (run / "config.yaml").is_file()


def test_penultimate_nc1_falls_at_least_10x_and_every_key_is_logged(run):
    probes = [r for r in _rows(run) if r.get("nc/train/penultimate/nc1")]
    epochs = [float(r["epoch"]) for r in probes]
    assert epochs == [float(e) for e in range(0, 151, 5)]
    first = float(probes[0]["nc/train/penultimate/nc1"])
    last = float(probes[-1]["nc/train/penultimate/nc1"])
    assert first / last >= 10, (first, last)
    header = set(probes[0])
    for layer in ("penultimate", "h0"):
        assert {f"nc/train/{layer}/{k}" for k in (*METRIC_KEYS, "nc4")} <= header
    assert "nc/train/penultimate/nc3" in header and "nc/train/accuracy" in header
    pm = {
        f"pm/h0->penultimate/{k}"
        for k in ("nc1", "nc1_tilde", "beta", "objective", "grad_norm", "converged", "reachable")
    }
    assert pm <= header
    final = probes[-1]
    assert float(final["pm/h0->penultimate/reachable"]) == 1.0
    assert float(final["pm/h0->penultimate/nc1_tilde"]) == pytest.approx(
        float(final["nc/train/penultimate/nc1_tilde"]), rel=1e-4
    )


def test_report_draws_the_figures_of_the_default_run(run, capsys):
    assert main(["report", str(run.parent)]) == 0
    out = run.parent / "report"
    names = sorted(p.name for p in out.glob("*.png"))
    assert {
        "metrics_train.png",
        "depth_profile_train.png",
        "pm_h0_to_penultimate_train.png",
    } <= set(names), names
    for name in names:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 200
        assert (
            float(np.std(img)) > 0.02
            and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20
        )
