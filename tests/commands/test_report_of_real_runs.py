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
