"""``nclightning report``: the figures written for real run folders, with the logged values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import runbuild as rb
from figtools import assert_png, panels

from nclightning import cli, plotting
from nclightning.commands import report

TRAIN_VAL = ("train", "val")


def train_val_run(root: Path) -> Path:
    """A run with train and val probes, a pair fit on train, snapshots of the train probe."""
    folder = rb.write_csv(root / "runs", rb.training_rows(6, probes=TRAIN_VAL), name="digits")
    rb.write_config(folder, seed=0)
    rb.write_snapshots(folder, "train", range(7))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_val_run(tmp_path_factory.mktemp("trainval"))


@pytest.fixture
def spy(monkeypatch):
    """Record what the report hands each plotting function (then draw it for real)."""
    calls: dict[str, list] = {}
    for name in ("metric_curves", "overlay", "measured_vs_predicted", "cosine_vs_etf",
                 "cdnv_heatmap", "class_variance_bars", "depth_profile"):  # fmt: skip
        real = getattr(plotting, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            calls.setdefault(_name, []).append((args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(plotting, name, wrapped)
    # the figures are built (so that bad input still fails) but not rendered to PNG
    monkeypatch.setattr(plotting, "save_figure", lambda fig, path, **kw: Path(path))
    return calls


def same(a, b) -> bool:
    """Nested equality where NaN equals NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def written(capsys) -> list[Path]:
    return [Path(p) for p in capsys.readouterr().out.split()]


def test_a_train_and_val_run_gives_every_figure(run_dir, tmp_path, capsys):
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path)]) == 0
    names = {p.name for p in written(capsys)}
    layers = rb.LAYERS
    assert names == {
        "metrics_train.png",
        "metrics_val.png",
        "depth_profile_train.png",
        "depth_profile_val.png",
        "pm_h0_to_penultimate_train.png",
        "class_variance_train.png",
        *(f"class_cosine_train_{lay}.png" for lay in layers),
        *(f"class_cdnv_train_{lay}.png" for lay in layers),
        *(f"splits_train_vs_val_{lay}.png" for lay in layers),  # both split names
    }
    for name in names:
        assert_png(tmp_path / name)


def test_the_curves_get_the_logged_values_the_lr_and_the_zero_error_epoch(run_dir, spy, tmp_path):
    assert report.main([str(run_dir), "--out", str(tmp_path), "--probe", "train"]) == 0
    ((hist, metrics), kwargs), *_ = spy["metric_curves"]
    assert list(hist) == list(rb.LAYERS) and metrics == list(rb.METRICS)
    assert hist["blocks.0"]["nc1"] == [
        (float(e), rb.value("train", "blocks.0", "nc1", e)) for e in range(7)
    ]
    assert kwargs["lr"] == {"lr-SGD": [(float(e), rb.lr(e)) for e in range(6)]}
    assert kwargs["marks"] == {"zero train error (nc-train/accuracy = 1)": 4.0}


def test_the_split_figure_holds_both_probes_and_the_transfer_nc4(run_dir, spy, tmp_path):
    assert report.main([str(run_dir), "--out", str(tmp_path), "--probe", "val"]) == 0
    splits = [(a, k) for a, k in spy["metric_curves"] if k.get("legend_title") == "probe"]
    assert len(splits) == len(rb.LAYERS)
    (lines, metrics), kwargs = next((a, k) for a, k in splits if "penultimate," in k["title"])
    assert list(lines) == ["train", "val", "val vs train means"]
    assert lines["val vs train means"] == {
        "nc4": [(float(e), 0.05 * (4 - e) ** 2) for e in range(7)]
    }
    assert lines["val"]["nc1"][-1] == (6.0, rb.value("val", "penultimate", "nc1", 6))
    assert lines["train"]["nc1"][-1] == (6.0, rb.value("train", "penultimate", "nc1", 6))
    assert "nc4" in metrics and kwargs["dashed"] == {"val vs train means"}


def test_the_pair_figure_gets_the_fit(run_dir, spy, tmp_path):
    assert report.main([str(run_dir), "--out", str(tmp_path), "--probe", "train"]) == 0
    (((h0, h, h_star, metrics), kw),) = spy["measured_vs_predicted"]
    assert metrics == ["nc1", "nc1_tilde", "cdnv", "nc2_etf"]  # the norm ratio is no residual
    assert kw["fitted"] == ("nc1_tilde",) and "1.2" in kw["notes"][0]  # measured ||H||/||H0||
    assert h_star["nc1"] == 0.9 * h["nc1"] == 0.9 * rb.value("train", "penultimate", "nc1", 6)
    assert h0["nc1"] == rb.value("train", "h0", "nc1", 6) and h0["norm_ratio"] == 1.0
    assert kw["residuals"]["nc1"] == pytest.approx(math.log10(0.9), abs=1e-15)
    assert kw["coupling"][0] == (0.0, math.inf) and kw["status"][0][1] == "not_more_collapsed"
    assert "fitted, coupling 8.5" in kw["title"]


def test_the_class_figures_come_from_the_last_snapshot(run_dir, spy, tmp_path):
    assert report.main([str(run_dir), "--out", str(tmp_path), "--probe", "train"]) == 0
    feats = rb.features(6, rb.LAYERS.index("penultimate"))
    K = 4
    mu = np.stack([feats.h[feats.y == k].mean(0) for k in range(K)])
    c = mu - mu.mean(0)
    u = c / np.linalg.norm(c, axis=1, keepdims=True)
    ((cos, names), kw) = next(
        (a, k) for a, k in spy["cosine_vs_etf"] if k["title"].endswith("penultimate")
    )
    np.testing.assert_allclose(cos, u @ u.T, rtol=1e-10)
    assert names == ["cat", "dog", "ship", "frog"] and "6 epochs" in kw["title"]
    (((variances, _), _),) = spy["class_variance_bars"]
    want = [np.mean(np.sum((feats.h[feats.y == k] - mu[k]) ** 2, 1)) for k in range(K)]
    np.testing.assert_allclose(variances["penultimate"], want, rtol=1e-10)
    assert report.main([str(run_dir), "--out", str(tmp_path), "--epoch", "2"]) == 0
    assert "2 epochs" in spy["cdnv_heatmap"][-1][1]["title"]


def test_a_resumed_run_gives_the_figures_of_the_uninterrupted_one(tmp_path, spy):
    root = tmp_path / "runs"
    v0 = rb.write_csv(root, rb.crashed_part(4, 3, mid_epoch=True), name="digits")
    v1 = rb.write_csv(root, rb.training_rows(6, start=3), name="digits")
    rb.write_config(v0, seed=0)
    rb.write_config(v1, seed=0, ckpt_path="runs/digits/version_0/checkpoints/last.ckpt")
    ref = rb.write_csv(tmp_path / "ref", rb.training_rows(6), name="digits")
    assert report.main([str(root), "--out", str(tmp_path / "a")]) == 0
    assert report.main([str(ref), "--out", str(tmp_path / "b")]) == 0
    resumed, straight = spy["metric_curves"][0], spy["metric_curves"][-1]
    assert same(resumed[0], straight[0]) and resumed[1]["lr"] == straight[1]["lr"]
    want = [(float(e), rb.coupling(e)) for e in range(7)]
    assert spy["measured_vs_predicted"][0][1]["coupling"] == want


def three_seeds(root: Path, zero_at=(3, 4, 5), wd=5e-4, name="wd"):
    for seed, z in enumerate(zero_at, start=1):
        folder = rb.write_csv(root, rb.training_rows(6, scale=1 + 0.2 * seed, zero_at=z), name=name)
        rb.write_config(folder, seed=seed, wd=wd)


def test_three_seeds_are_one_band_and_align_at_zero_training_error(tmp_path, spy, capsys):
    three_seeds(tmp_path / "sweep")
    three_seeds(tmp_path / "sweep", zero_at=(9, 9, 9), wd=1e-3, name="wd_x2")  # never reaches it
    rc = report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--metrics", "nc1"])
    assert rc == 0
    captured = capsys.readouterr()
    out = {Path(p).name for p in captured.out.split() if Path(p).parent == tmp_path / "out"}
    assert out == {"overlay_nc1_train.png", "overlay_nc1_train_since_zero_error.png"}
    plain, aligned = spy["overlay"]
    curves = plain[0][0]
    assert list(curves) == ["wd", "wd_x2"]
    assert [s[-1] for s in curves["wd"]] == [
        (6.0, rb.value("train", "penultimate", "nc1", 6, scale=1 + 0.2 * s)) for s in (1, 2, 3)
    ]
    shifted = aligned[0][0]["wd"]
    assert [s[0][0] for s in shifted] == [-3.0, -4.0, -5.0]  # x = epochs - zero-error epoch
    assert list(aligned[0][0]) == ["wd"] and aligned[1]["xlabel"].startswith("epochs since")
    fig = plotting.overlay(curves, metric="nc1")  # the drawn figure has the band
    assert any(
        c.get_gid() == "band:wd: mean, min-max of 3 runs" for c in panels(fig)[0].collections
    )
    assert "never reached zero training error (left out of the aligned overlays): wd_x2" in (
        captured.err
    )


def test_grouping_can_be_switched_off(tmp_path, spy, capsys):
    three_seeds(tmp_path / "sweep")
    out = str(tmp_path / "out")
    assert (
        report.main([str(tmp_path / "sweep"), "--out", out, "--group", "none", "--metrics", "nc1"])
        == 0
    )
    assert list(spy["overlay"][0][0][0]) == ["version_0", "version_1", "version_2"]
    assert tmp_path / "out" / "version_1" / "metrics_train.png" in written(capsys)


def test_a_layerwise_run_is_drawn_per_stage_and_by_depth(tmp_path, spy):
    rows = rb.layerwise_rows(4, 3)
    rb.write_csv(tmp_path, rows)
    assert report.main([str(tmp_path)]) == 0
    ((stages, _), kw), *_ = spy["metric_curves"]
    assert list(stages) == ["depth 1", "depth 2", "depth 3", "depth 4"]
    assert stages["depth 2"]["nc1"] == [(3.0 + e, 0.25 - 0.01 * e) for e in range(3)]
    (((values, metrics), kw),) = spy["depth_profile"]
    assert list(values) == ["1", "2", "3", "4"] and metrics == ["nc1", "nc1_tilde"]
    assert values["3"] == {"nc1": 2.0**-3 - 0.02, "nc1_tilde": 3.0**-3}
    assert kw["xlabel"].startswith("depth")


# ---------------------------------------------------------------------------------------------
# errors: one line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("nclightning report: error: ")
    return err[0]


def test_missing_and_empty_folders(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "no such directory" in error_line(capsys)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert report.main([str(tmp_path / "empty")]) == 2
    line = error_line(capsys)
    assert str(tmp_path / "empty") in line and "metrics.csv" in line and "probe-NNNN.pt" in line


def test_a_csv_without_probe_keys_and_one_of_an_earlier_version(tmp_path, capsys):
    rb.write_csv(tmp_path / "a", [{"epoch": 0, "train/loss": 1.0, "step": 1}])
    assert report.main([str(tmp_path / "a")]) == 2
    assert "nc-train/penultimate/nc1" in error_line(capsys)
    rb.write_csv(tmp_path / "b", [{"epoch": 0, "nc/train/h0/nc1": 1.0, "step": 1}])
    assert report.main([str(tmp_path / "b")]) == 2
    assert "earlier nclightning" in error_line(capsys)


def test_unknown_metric_layer_or_probe_write_nothing(run_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    assert report.main([str(run_dir), *out, "--metrics", "nc9"]) == 2
    assert "nc9" in error_line(capsys)
    assert report.main([str(run_dir), *out, "--layers", "fc"]) == 2
    assert "fc" in error_line(capsys)
    assert report.main([str(run_dir), *out, "--probe", "test"]) == 2
    assert "'test'" in (line := error_line(capsys)) and "train, val" in line
    other = rb.write_csv(tmp_path / "other", rb.training_rows(2))
    assert report.main([str(run_dir), str(other), *out, "--overlay-layer", "nowhere"]) == 2
    assert "nowhere" in error_line(capsys)
    assert not (tmp_path / "out").exists()
