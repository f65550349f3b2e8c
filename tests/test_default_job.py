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
from nclightning.metrics import MOMENT_KEYS
from nclightning.record.keys import (
    EPOCHS_TRAINED,
    PAIR_QUANTITIES,
    PAIR_STATUS,
    accuracy_key,
    layer_key,
    pair_key,
)
from nclightning.record.snapshots import list_snapshots, read_snapshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("default_job")
    cwd, mode = os.getcwd(), os.environ.get("WANDB_MODE")
    os.chdir(root)
    os.environ["WANDB_MODE"] = "offline"  # the W&B run is checked against the record below
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


def _probes(run: Path) -> list[dict[str, str]]:
    return [r for r in _rows(run) if r.get(EPOCHS_TRAINED)]


def test_penultimate_nc1_falls_at_least_10x_and_every_key_is_logged(run):
    probes = _probes(run)
    assert [float(r[EPOCHS_TRAINED]) for r in probes] == [float(e) for e in range(0, 151, 5)]
    assert not any(r.get("epoch") for r in probes)  # Lightning's epoch keeps its own meaning
    nc1 = layer_key("train", "penultimate", "nc1")
    first, last = float(probes[0][nc1]), float(probes[-1][nc1])
    assert first / last >= 10, (first, last)
    header = set(probes[0])
    per_layer = (*MOMENT_KEYS, "nc4")
    for layer in ("penultimate", "h0"):
        assert {layer_key("train", layer, k) for k in per_layer} <= header
    assert {layer_key("train", "penultimate", k) for k in ("nc3", "unc3")} <= header
    assert accuracy_key("train") in header
    pair = "h0->penultimate"
    quantities = [*PAIR_QUANTITIES, "predicted/nc1_tilde", "predicted/nc1", "residual/nc1"]
    assert {pair_key("train", pair, q) for q in quantities} <= header
    final = probes[-1]
    assert float(final[pair_key("train", pair, "status")]) == PAIR_STATUS["fitted"]
    assert float(final[pair_key("train", pair, "predicted/nc1_tilde")]) == pytest.approx(
        float(final[layer_key("train", "penultimate", "nc1_tilde")]), rel=1e-4
    )


def test_measure_of_the_last_checkpoint_reproduces_the_last_probe(run):
    """``nclightning measure`` of ``last.ckpt`` logs what the training run's last probe did."""
    root = run.parent.parent.parent
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ckpt = run / "checkpoints" / "last.ckpt"
        args = ["measure", "--config", "digits_mlp.yaml", "--ckpt_path", str(ckpt)]
        assert main([*args, "--trainer.enable_progress_bar", "false"]) == 0
    finally:
        os.chdir(cwd)
    (measured,) = _probes(run.parent / "measure_0")
    last = _probes(run)[-1]
    assert measured[EPOCHS_TRAINED] == last[EPOCHS_TRAINED] == "150.0"
    probe_keys = [k for k in last if k.startswith(("nc-", "pm-")) and last[k]]
    assert probe_keys and set(probe_keys) <= set(measured)
    for key in probe_keys:
        if key.endswith(("grad_norm", "objective")):  # a tolerance, not a value
            continue
        # the training run searched near its previous coupling, the measurement afresh: the
        # same root to the search's rtol (1e-8), predictions to ~1e-8 relative, so residuals
        # and skills (differences of log10 values, which can be near 0) to ~1e-8 decades
        small = 1e-7 if ("/residual/" in key or "/skill/" in key) else 1e-12
        assert float(measured[key]) == pytest.approx(float(last[key]), rel=1e-6, abs=small), key


def test_report_draws_the_figures_of_the_default_run(run, capsys, monkeypatch):
    from drawn import assert_metrics_figure, capture, logged_curves

    clipped = []
    figures = capture(monkeypatch, clipped)
    assert main(["report", str(run.parent)]) == 0
    assert "dropped" not in capsys.readouterr().err and clipped == []
    # every probe (0, 5, ..., 150) of every layer, as metrics.csv holds it
    logged = logged_curves(run / "metrics.csv", "train")
    assert [x for x, _ in logged["penultimate"]["nc1"]] == [float(e) for e in range(0, 151, 5)]
    assert assert_metrics_figure(figures["metrics_train"], logged) == 2 * 6 - 1  # nc3: one layer
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


def test_the_wandb_run_shows_what_metrics_csv_and_the_snapshots_hold(run):
    """The default job's offline W&B run, read back with wandb's reader: every layer chart and
    pair chart equals metrics.csv epoch for epoch, the per-class tables equal the last
    snapshot's moments (float64 reference), the snapshot artifact holds the snapshot files."""
    from wandbread import WandbRun, csv_series, md5_b64, number, reference_per_class

    # the fit's run: the first folder (a measurement of its checkpoint may have added one)
    wb = WandbRun(sorted((run.parent.parent / "wandb").glob("offline-run-*"))[0])
    assert wb.summary["state"] == "finished" and wb.summary["exit_code"] == 0
    rows = [{k: float(v) for k, v in r.items() if v} for r in _probes(run)]
    for layer in ("h0", "penultimate"):
        for metric in (*MOMENT_KEYS, "nc4"):
            (points,) = [
                p for name, p in wb.chart_lines(f"charts-train/{metric}").items() if name == layer
            ]
            assert points == pytest.approx(csv_series(rows, layer_key("train", layer, metric)))
    pair = "h0->penultimate"
    lines = wb.chart_lines(f"charts-train-{pair}/nc1")
    assert lines["H* predicted"] == pytest.approx(
        csv_series(rows, pair_key("train", pair, "predicted/nc1")), rel=1e-12
    )
    assert lines["H (penultimate) measured"] == pytest.approx(
        csv_series(rows, layer_key("train", "penultimate", "nc1")), rel=1e-12
    )
    snapshots = run / "snapshots" / "train"
    last = read_snapshot(list_snapshots(snapshots)[-1])
    assert last["epochs_trained"] == 150
    reference = reference_per_class(last["layers"]["penultimate"])
    for quantity in ("cdnv_matrix", "cosine_matrix"):
        table = wb.table(f"tables/{quantity}_train_penultimate")
        assert table["columns"] == ["class", *last["class_names"]]
        got = np.array([[number(v) for v in r[1:]] for r in table["data"]])
        np.testing.assert_allclose(got, reference[quantity], rtol=1e-10, atol=1e-12)
    table = wb.table("tables/class_var_train_penultimate")
    np.testing.assert_allclose([r[1] for r in table["data"]], reference["class_var"], 1e-12)
    (artifact,) = wb.artifacts("nc-snapshots")
    files = {p.name: md5_b64(p) for p in snapshots.iterdir()}
    assert {e["path"]: e["digest"] for e in artifact["manifest"]["contents"]} == files
    assert not any(k.startswith("figures/") for item in wb.history() for k in item)
