"""``nclightning report``: parsing CSV logger output and snapshots, figures, errors."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from nclightning import cli
from nclightning.commands import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ["h0", "blocks.0", "blocks.1", "penultimate"]  # shallow to deep
METRICS = ["nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle"]
EPOCHS = 6


# ---------------------------------------------------------------------------------------------
# realistic inputs
# ---------------------------------------------------------------------------------------------


def callback_rows(epochs: int = EPOCHS, scale: float = 1.0) -> list[dict[str, float]]:
    """Rows as the NeuralCollapseCallback and Lightning log them, interleaved.

    Callback rows carry ``epoch`` = completed epochs (0 = baseline); the val probe runs every
    other epoch only (missing keys); nc3/nc4 only for the penultimate layer; nc4 reaches 0;
    nc3 of the baseline is NaN. Lightning rows carry its 0-based epoch index.
    """
    rows: list[dict[str, float]] = []
    step = 0
    for e in range(epochs + 1):
        if e > 0:
            step += 10
            rows.append({"train/loss": 2.0 / e, "lr-SGD": 0.05, "epoch": e - 1, "step": step})
            rows.append(
                {"val/acc": 0.5 + 0.05 * e, "val/loss": 1.0 / e, "epoch": e - 1, "step": step}
            )
        row: dict[str, float] = {"epoch": e, "step": step}
        for split in ("train", "val") if e % 2 == 0 else ("train",):
            for i, layer in enumerate(LAYERS):
                for j, m in enumerate(METRICS):
                    row[f"nc/{split}/{layer}/{m}"] = (
                        scale * (j + 1) * (1.5 - 0.2 * i) * math.exp(-e * (0.2 + 0.1 * i))
                    )
            row[f"nc/{split}/penultimate/nc3"] = math.nan if e == 0 else 1.0 / (e + 1)
            row[f"nc/{split}/penultimate/nc4"] = max(0.0, 0.3 - 0.1 * e)
            row[f"nc/{split}/accuracy"] = min(1.0, 0.1 + 0.2 * e)
        for m in METRICS:
            row[f"pm/h0->penultimate/{m}"] = 0.9 * row[f"nc/train/penultimate/{m}"]
        row["pm/h0->penultimate/beta"] = 2.5 + e
        row["pm/h0->penultimate/objective"] = 0.1
        row["pm/h0->penultimate/grad_norm"] = 1e-7
        rows.append(row)
    return rows


def write_csv_logger(root: Path, rows: list[dict[str, float]], version: int | None = None) -> Path:
    """Log ``rows`` with Lightning's own CSVLogger (saving in chunks, so the header grows)."""
    from lightning.fabric.loggers import CSVLogger

    logger = CSVLogger(
        root_dir=str(root), name="lightning_logs", version=version, flush_logs_every_n_steps=10_000
    )
    for i, row in enumerate(rows):
        row = dict(row)
        step = int(row.pop("step", i))
        logger.log_metrics(row, step=step)
        if i % 3 == 2:
            logger.save()
    logger.finalize("success")
    path = Path(logger.log_dir) / "metrics.csv"
    assert path.is_file()
    return path


def make_features(epoch: int, n: int = 30, K: int = 4, d: int = 6, seed: int = 0):
    g = np.random.default_rng(seed + epoch)
    means = 3.0 * g.standard_normal((K, d))
    labels = np.repeat(np.arange(K), n)
    noise = 2.0 * math.exp(-0.5 * epoch) * g.standard_normal((K * n, d))
    return means[labels] + noise, labels


def moments(features: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    """Class moments in the snapshot format, with plain torch ops."""
    h = torch.from_numpy(features)
    y = torch.from_numpy(labels)
    K = int(y.max()) + 1
    counts = torch.bincount(y, minlength=K).double()
    means = torch.stack([h[y == k].mean(0) for k in range(K)])
    dev = h - means[y]
    return {
        "counts": counts,
        "means": means,
        "scatter": dev.T @ dev,
        "class_ss": torch.stack([dev[y == k].square().sum() for k in range(K)]),
    }


def numpy_nc1_tilde(features: np.ndarray, labels: np.ndarray) -> float:
    K = labels.max() + 1
    mu = np.stack([features[labels == k].mean(0) for k in range(K)])
    tr_w = np.sum((features - mu[labels]) ** 2) / len(labels)
    tr_b = np.sum((mu - mu.mean(0)) ** 2) / K
    return tr_w / tr_b


def write_snapshots(directory: Path, epochs: int = 4) -> dict[tuple[int, str], float]:
    """Snapshot files with real tensors; returns the numpy nc1_tilde per (epoch, layer)."""
    directory.mkdir(parents=True)
    expected = {}
    for e in range(epochs):
        layers, feats = {}, {}
        for i, alias in enumerate(("h0", "penultimate")):
            f, y = make_features(e * (i + 1), seed=10 * i)
            layers[alias] = moments(f, y)
            feats[alias] = torch.from_numpy(f).half()
            expected[(e, alias)] = numpy_nc1_tilde(f, y)
        snap = {
            "epoch": e,
            "split": "train",
            "layers": layers,
            "pairs": {"h0->penultimate": {"beta": 3.0, "metrics": {"nc1_tilde": 0.5 / (e + 1)}}},
        }
        if e == epochs - 1:  # optional payloads
            snap["features"], snap["labels"] = feats, torch.from_numpy(y)
        torch.save(snap, directory / f"epoch_{e:04d}.pt")
    return expected


def assert_png(path: Path) -> None:
    """A valid PNG with non-trivial content."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert float(img.var()) > 1e-3
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20


def same(a: dict, b: dict) -> bool:
    """Dict equality where NaN equals NaN."""
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> tuple[Path, Path, list[dict[str, float]]]:
    root = tmp_path_factory.mktemp("run")
    rows = callback_rows()
    return root, write_csv_logger(root, rows), rows


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------


def test_csv_written_by_lightning_parses_to_the_exact_values(csv_run):
    _, path, rows = csv_run
    with path.open(newline="") as f:
        header = next(csv.reader(f))
    assert header == sorted(header) and "nc/train/h0/nc1" in header  # CSVLogger's format
    parsed = report.read_metrics_csv(path)
    assert len(parsed) == len(rows)
    for got, want in zip(parsed, rows):
        assert same(got, {k: float(v) for k, v in want.items()})
    baseline = next(r for r in parsed if "nc/train/h0/nc1" in r)
    assert baseline["epoch"] == 0 and math.isnan(baseline["nc/train/penultimate/nc3"])
    assert "nc/val/h0/nc1" not in parsed[3]  # epoch 1: no val probe -> empty cells skipped


def test_history_orders_layers_and_keeps_every_point(csv_run):
    _, path, rows = csv_run
    parsed = report.read_metrics_csv(path)
    assert report.splits(parsed) == ["train", "val"]
    hist = report.history(parsed, "train")
    assert list(hist) == LAYERS  # header order is alphabetical; heuristic restores depth order
    nc1 = hist["blocks.1"]["nc1"]
    assert nc1 == [
        (float(r["epoch"]), r["nc/train/blocks.1/nc1"])
        for r in rows
        if "nc/train/blocks.1/nc1" in r
    ]
    assert [e for e, _ in hist["h0"]["cdnv"]] == list(map(float, range(EPOCHS + 1)))
    val = report.history(parsed, "val")
    assert [e for e, _ in val["h0"]["nc1"]] == [0.0, 2.0, 4.0, 6.0]
    assert "accuracy" not in hist and "nc3" in hist["penultimate"] and "nc3" not in hist["h0"]
    assert report.history(parsed, "train", ["penultimate", "h0"]).keys() == {"penultimate", "h0"}
    assert list(report.history(parsed, "train", ["penultimate", "h0"])) == ["penultimate", "h0"]


def test_pm_summary_takes_the_last_epoch(csv_run):
    _, path, rows = csv_run
    parsed = report.read_metrics_csv(path)
    ((pair, pm),) = report.pm_summary(parsed, "train").items()
    last = rows[-1]
    assert pair == "h0->penultimate" and pm.epoch == EPOCHS and pm.beta == 2.5 + EPOCHS
    assert pm.h_star == {m: last[f"pm/h0->penultimate/{m}"] for m in METRICS}
    assert pm.h0 == {m: last[f"nc/train/h0/{m}"] for m in METRICS}
    assert pm.h["nc4"] == 0.0 and pm.h["nc1"] == last["nc/train/penultimate/nc1"]


def test_snapshots_reproduce_numpy_nc1_tilde(tmp_path):
    expected = write_snapshots(tmp_path / "run" / "snapshots")
    rows = report.read_snapshots(tmp_path / "run" / "snapshots")
    assert [r["epoch"] for r in rows] == [0.0, 1.0, 2.0, 3.0]
    for (e, alias), value in expected.items():
        assert rows[e][f"nc/train/{alias}/nc1_tilde"] == pytest.approx(value, rel=1e-12)
    assert rows[3]["pm/h0->penultimate/nc1_tilde"] == 0.5 / 4
    assert rows[0]["pm/h0->penultimate/beta"] == 3.0
    # collapse shrinks over epochs in these features
    assert rows[3]["nc/train/h0/nc1_tilde"] < rows[0]["nc/train/h0/nc1_tilde"]


def test_depth_values_of_a_layerwise_run():
    rows = [
        {"epoch": 0, "depth": 1, "nc/train/deepest/nc1": 9.0},
        {"epoch": 1, "depth": 1, "nc/train/deepest/nc1": 5.0, "nc/train/deepest/nc1_tilde": 2.0},
        {"epoch": 1, "train/loss": 0.3},
        {"epoch": 0, "depth": 10, "nc/train/deepest/nc1": 0.5},
        {"epoch": 0, "depth": 2, "nc/train/deepest/nc1": 3.0},
    ]
    assert report.depth_values(rows, "train") == {
        "1": {"nc1": 5.0, "nc1_tilde": 2.0},
        "2": {"nc1": 3.0},
        "10": {"nc1": 0.5},
    }
    assert report.depth_values([*rows[:1], {"epoch": 1, "nc/train/x/nc1": 1.0}], "val") == {}


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def test_report_of_one_csv_run(csv_run, capsys):
    root, _, _ = csv_run
    assert report.main([str(root)]) == 0
    out = root / "report"
    printed = capsys.readouterr().out.split()
    names = {"metrics_train.png", "depth_profile_train.png", "pm_h0_to_penultimate_train.png"}
    assert {Path(p).name for p in printed} == names
    assert all(Path(p).parent == out for p in printed)
    for name in names:
        assert_png(out / name)


def test_figures_get_the_logged_values(csv_run, tmp_path, monkeypatch):
    """What the report hands to each figure function (wiring, not pixels)."""
    from nclightning import plotting

    root, _, rows = csv_run
    calls: dict[str, list] = {}
    for name in ("metric_curves", "depth_profile", "measured_vs_predicted"):
        real = getattr(plotting, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.setdefault(_name, []).append((args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(plotting, name, spy)
    assert report.main([str(root), "--out", str(tmp_path)]) == 0
    (((hist, metrics), _),) = calls["metric_curves"]
    assert list(hist) == LAYERS and metrics == ["nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc3", "nc4"]
    assert hist["h0"]["nc1"][-1] == (EPOCHS, rows[-1]["nc/train/h0/nc1"])
    (((values, profile), kwargs),) = calls["depth_profile"]
    assert list(values) == LAYERS and profile == ["nc1", "nc1_tilde", "cdnv", "nc2_etf"]
    assert values["blocks.1"]["cdnv"] == rows[-1]["nc/train/blocks.1/cdnv"]
    assert kwargs["xlabel"] == "layer"
    (((h0, h, h_star, pm_metrics), kwargs),) = calls["measured_vs_predicted"]
    assert pm_metrics == METRICS and kwargs["beta"] == 2.5 + EPOCHS
    assert h_star["nc1"] == rows[-1]["pm/h0->penultimate/nc1"]
    assert (
        h0["nc1"] == rows[-1]["nc/train/h0/nc1"]
        and h["nc1"] == rows[-1]["nc/train/penultimate/nc1"]
    )


def test_layerwise_run_depth_profile(tmp_path, monkeypatch, capsys):
    from nclightning import plotting

    rows = []
    for depth in range(1, 5):
        for e in range(3):
            rows.append(
                {
                    "epoch": e,
                    "depth": depth,
                    "step": 10 * depth + e,
                    "nc/train/deepest/nc1": 2.0**-depth - 0.01 * e,
                    "nc/train/deepest/nc1_tilde": 3.0**-depth,
                }
            )
    write_csv_logger(tmp_path, rows)
    seen, curves = [], []
    real, real_curves = plotting.depth_profile, plotting.metric_curves
    monkeypatch.setattr(
        plotting, "depth_profile", lambda *a, **k: seen.append((a, k)) or real(*a, **k)
    )
    monkeypatch.setattr(
        plotting, "metric_curves", lambda *a, **k: curves.append(a[0]) or real_curves(*a, **k)
    )
    assert report.main([str(tmp_path)]) == 0
    (stages,) = curves  # one curve per stage, epochs restarting at each
    assert list(stages) == ["depth 1", "depth 2", "depth 3", "depth 4"]
    assert stages["depth 2"]["nc1"] == [(e, 0.25 - 0.01 * e) for e in range(3)]
    (((values, metrics), kwargs),) = seen
    assert list(values) == ["1", "2", "3", "4"] and metrics == ["nc1", "nc1_tilde"]
    assert values["3"] == {"nc1": 2.0**-3 - 0.02, "nc1_tilde": 3.0**-3}
    assert kwargs["xlabel"].startswith("depth")
    assert_png(tmp_path / "report" / "depth_profile_train.png")


def test_report_through_the_cli_with_options(csv_run, tmp_path, capsys):
    root, _, _ = csv_run
    rc = cli.main(
        [
            "report",
            str(root),
            "--out",
            str(tmp_path / "r"),
            "--split",
            "val",
            "--metrics",
            "nc1",
            "nc4",
            "--layers",
            "penultimate",
            "blocks.0",
        ]
    )
    assert rc == 0
    printed = [Path(p) for p in capsys.readouterr().out.split()]
    assert {p.name for p in printed} == {
        "metrics_val.png",
        "depth_profile_val.png",
        "pm_h0_to_penultimate_val.png",
    }
    for p in printed:
        assert p.parent == tmp_path / "r"
        assert_png(p)


def test_report_of_a_snapshot_directory(tmp_path, capsys):
    write_snapshots(tmp_path / "run" / "snaps")
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    printed = [Path(p) for p in capsys.readouterr().out.split()]
    assert {p.name for p in printed} == {
        "metrics_train.png",
        "depth_profile_train.png",
        "pm_h0_to_penultimate_train.png",
    }
    for p in printed:
        assert_png(p)


def test_several_runs_give_overlays_labelled_by_directory(tmp_path, capsys, monkeypatch):
    for name, scale in (("wd_x2_features", 0.5), ("baseline", 1.0)):
        write_csv_logger(tmp_path / "sweep" / name, callback_rows(scale=scale))
    monkeypatch.chdir(tmp_path)
    rc = report.main(
        [
            str(tmp_path / "sweep" / "wd_x2_features"),
            "sweep/baseline",
            "--metrics",
            "nc1",
            "nc2_etf",
        ]
    )
    assert rc == 0
    printed = [Path(p) for p in capsys.readouterr().out.split()]
    overlays = sorted(p.name for p in printed if p.name.startswith("overlay_"))
    assert overlays == ["overlay_nc1_train.png", "overlay_nc2_etf_train.png"]
    assert (tmp_path / "report" / "overlay_nc1_train.png").is_file()
    assert (tmp_path / "report" / "baseline" / "metrics_train.png").is_file()
    assert (tmp_path / "report" / "wd_x2_features" / "metrics_train.png").is_file()
    for p in printed:
        assert_png(p)


def test_newest_version_is_used(tmp_path, capsys):
    old = write_csv_logger(tmp_path, callback_rows(epochs=2), version=0)
    new = write_csv_logger(tmp_path, callback_rows(epochs=4), version=1)
    os.utime(old, (1e9, 1e9))
    run = report.load_run(tmp_path, "run")
    assert run.source == new
    assert str(old) in capsys.readouterr().err
    assert max(r.get("epoch", 0) for r in run.rows) == 4


def test_a_csv_file_can_be_given(csv_run, tmp_path, capsys):
    _, path, _ = csv_run
    assert report.main([str(path), "--out", str(tmp_path), "--metrics", "nc1"]) == 0
    assert (tmp_path / "metrics_train.png").is_file()


def test_run_labels_are_unique():
    labels = report._labels([Path("/a/mse/version_0"), Path("/a/ce/version_0"), Path("/b/x")])
    assert labels == ["mse/version_0", "ce/version_0", "x"]


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("nclightning report: error: ")
    return err[0]


def test_missing_directory(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    line = error_line(capsys)
    assert "no such directory" in line and str(tmp_path / "nope") in line


def test_directory_without_metrics(tmp_path, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert report.main([str(tmp_path / "empty")]) == 2
    line = error_line(capsys)
    assert str(tmp_path / "empty") in line and "metrics.csv" in line and "epoch_*.pt" in line


def test_csv_without_nc_keys(tmp_path, capsys):
    path = write_csv_logger(tmp_path, [{"epoch": 0, "train/loss": 1.0, "step": 1}])
    assert report.main([str(tmp_path)]) == 2
    line = error_line(capsys)
    assert str(path) in line and "nc/train/penultimate/nc1" in line


def test_unknown_metric_layer_or_split(csv_run, tmp_path, capsys):
    root, _, _ = csv_run
    out = ["--out", str(tmp_path)]
    assert report.main([str(root), *out, "--metrics", "nc9"]) == 2
    assert "nc9" in error_line(capsys)
    assert report.main([str(root), *out, "--layers", "fc"]) == 2
    assert "fc" in error_line(capsys)
    assert report.main([str(root), *out, "--split", "test"]) == 2
    line = error_line(capsys)
    assert "nc/test" in line and "train, val" in line
    assert not list(tmp_path.glob("*.png"))


def test_an_error_in_any_run_writes_nothing(csv_run, tmp_path, capsys):
    root, _, _ = csv_run
    other = tmp_path / "layerwise"
    write_csv_logger(other, [{"epoch": 0, "depth": 1, "nc/train/deepest/nc1": 1.0}])
    out = tmp_path / "out"
    assert report.main([str(root), str(other), "--out", str(out), "--metrics", "cdnv"]) == 2
    line = error_line(capsys)
    assert "cdnv" in line and str(other) in line
    assert not out.exists()
    # without a shared layer the overlays are skipped, the rest is written
    assert report.main([str(root), str(other), "--out", str(out), "--metrics", "nc1"]) == 0
    captured = capsys.readouterr()
    assert "share no layer" in captured.err
    assert not list(out.glob("overlay_*")) and (out / "layerwise" / "metrics_train.png").is_file()
