"""``nclightning report`` on real digits runs: train against val, and seeds as one band.

Three short CLI runs of the default job's config (seeds 1-3, 10 epochs, a train and a val
probe) are trained for real, then reported: each layer gets its split figure (train against
val), the val probe logs ``nc4_train_means``, and the overlay draws the three seeds as one band.
``slow``: about 40 s on 2 cores.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import yaml
from figtools import panels

from nclightning import plotting
from nclightning.cli import CONFIG_DIR, main
from nclightning.record.keys import layer_key

pytestmark = pytest.mark.slow

SEEDS = (1, 2, 3)


def _config_with_a_val_probe(path: Path) -> Path:
    config = yaml.safe_load((Path(CONFIG_DIR) / "digits_mlp.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    (train,) = [c for c in callbacks if c["class_path"].endswith("NeuralCollapseCallback")]
    val = copy.deepcopy(train)
    val["init_args"]["probe"] = "val"
    callbacks.append(val)
    config["trainer"]["max_epochs"] = 10
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seeds")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("WANDB_MODE", "disabled")
        config = _config_with_a_val_probe(root / "digits_train_val.yaml")
        for seed in SEEDS:
            args = ["fit", "--config", str(config), "--seed_everything", str(seed)]
            assert main([*args, "--trainer.enable_progress_bar", "false"]) == 0
    return root / "runs" / "digits_mlp"


def test_a_train_and_val_run_gives_the_split_figures(runs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(runs / "version_0"), "--out", str(out)]) == 0
    names = {p.name for p in out.glob("*.png")}
    for layer in ("penultimate", "h0"):
        assert f"splits_train_vs_val_{layer}.png" in names, sorted(names)
    assert {"metrics_train.png", "metrics_val.png"} <= names
    rows = list(csv.DictReader(open(runs / "version_0" / "metrics.csv")))
    key = layer_key("val", "penultimate", "nc4_train_means")
    values = [float(r[key]) for r in rows if r.get(key)]
    assert len(values) == 3 and all(0 <= v <= 1 and math.isfinite(v) for v in values)  # 0, 5, 10


def test_three_seeds_give_one_banded_overlay(runs, tmp_path, monkeypatch):
    bands = []  # read when drawn: the report clears each figure once it is saved
    real = plotting.overlay

    def overlay(*args, **kwargs):
        fig = real(*args, **kwargs)
        bands.extend(
            c.get_gid() for ax in panels(fig) for c in ax.collections
            if str(c.get_gid()).startswith("band:")
        )  # fmt: skip
        return fig

    monkeypatch.setattr(plotting, "overlay", overlay)
    out = tmp_path / "overlay"
    assert main(["report", str(runs), "--out", str(out), "--metrics", "nc1"]) == 0
    assert (out / "overlay_nc1_train.png").is_file()
    assert any(f"of {len(SEEDS)} runs" in gid for gid in bands), bands


def test_pair_figure_draws_the_runs_metrics_csv_value_for_value(runs):
    """The pair figure of a real run, read back: every bar and the coupling line against the
    cells of ``metrics.csv`` at the fit's last epoch; readable shape, no clipped tick labels."""
    from nclightning.record import figures
    from nclightning.record.history import read_metrics_csv

    rows = read_metrics_csv(runs / "version_0" / "metrics.csv")
    rows = [r for r in rows if "epochs_trained" in r]
    x = [r["epochs_trained"] for r in rows]
    fig = figures.pair_figures(rows, "train", x)["pm_h0_to_penultimate_train"]
    head = "pm-train-h0->penultimate/"
    last = [r for r in rows if any(k.startswith(head + "predicted/") for k in r)][-1]
    values, residuals, coupling = panels(fig)
    metrics = [t.get_text() for t in values.get_xticklabels()]
    assert metrics == ["nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc2_equinorm", "nc3"]

    def cells(prefix):  # {metric: value} of the last fit
        return {m: last[head + prefix + m] for m in metrics if head + prefix + m in last}

    h = {m: last[layer_key("train", "penultimate", m)] for m in metrics}
    baselines = {b: cells(f"baseline/{b}/") for b in ("h0", "ratio", "etf")}
    drawn_values = [h, cells("predicted/")] + [
        {m: h[m] * 10**r for m, r in baselines[b].items()} for b in ("h0", "ratio", "etf")
    ]
    drawn_residuals = [cells("residual/")] + [baselines[b] for b in ("h0", "ratio", "etf")]
    assert "nc1_tilde" not in drawn_residuals[0]  # fitted: no residual, and no bar
    for containers, want, read in (
        (values.containers, drawn_values, lambda p: p.get_y() + p.get_height()),
        (residuals.containers, drawn_residuals, lambda p: p.get_height()),
    ):
        assert len(containers) == len(want)
        for container, expected in zip(containers, want):
            got = {metrics[round(p.get_x() + p.get_width() / 2)]: read(p) for p in container}
            assert got.keys() == expected.keys()
            for m, v in expected.items():
                assert got[m] == pytest.approx(v, rel=1e-9, abs=1e-12), m
    (line,) = [ln for ln in coupling.get_lines() if ln.get_label() == "_coupling"]
    series = [(r["epochs_trained"], r[head + "coupling"]) for r in rows if head + "coupling" in r]
    finite = [(e, c) for e, c in series if math.isfinite(c)]
    assert list(zip(line.get_xdata(), line.get_ydata())) == finite
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    flags = {r[head + "perturbative"] for r in rows if head + "perturbative" in r}
    assert ("not perturbative" in legend) == (0.0 in flags)
    assert not any("Thm" in t or "apply" in t for t in legend)
    w, hgt = fig.get_size_inches()
    assert 1.0 <= w / hgt <= 2.0 and min(w, hgt) >= 6
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width = fig.bbox.width
    for ax in (values, residuals, coupling):
        for t in [*ax.get_yticklabels(), ax.yaxis.label]:
            if t.get_text():
                box = t.get_window_extent(renderer)
                assert 0 <= box.x0 and box.x1 <= width, (ax.get_title(), t.get_text())
