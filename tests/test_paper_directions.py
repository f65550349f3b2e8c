"""The paper's experimental claims, in their small offline versions (docs/science.md §6).

Each test trains the bundled offline config of one figure and asserts the *direction* of the
paper's claim (docs/science.md §6.5): Fig. 2, layer-wise training (§6.2), and Fig. 3, the
weight-decay study (§6.3). They train whole jobs, so they are marked ``slow`` (about two
minutes together on 2 cores); CI runs them, ``pytest -m 'not slow'`` leaves them out.
"""

from __future__ import annotations

import csv
import math
from itertools import pairwise
from pathlib import Path

import pytest

from nclightning.cli import main
from nclightning.record.keys import accuracy_key, layer_key

pytestmark = pytest.mark.slow


def _rows(run_dir: Path) -> list[dict[str, str]]:
    (csv_file,) = run_dir.rglob("metrics.csv")
    return list(csv.DictReader(open(csv_file)))


def _final(run_dir: Path, key: str) -> float:
    return [float(r[key]) for r in _rows(run_dir) if r.get(key)][-1]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_fig2_nc1_of_the_deepest_features_decreases_as_layers_are_added(tmp_path):
    """§6.2: nc1 and nc1_tilde of the deepest features fall at every added layer."""
    assert (
        main(
            [
                "fit",
                "--config",
                "layerwise_mlp_digits.yaml",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
        == 0
    )
    rows = _rows(tmp_path / "runs" / "layerwise_mlp_digits")
    stage_end = {}  # depth -> last probe at that depth
    for r in rows:
        if r.get(layer_key("train", "deepest", "nc1")):
            stage_end[int(float(r["depth"]))] = r
    assert sorted(stage_end) == [1, 2, 3, 4, 5, 6]
    for metric in ("nc1", "nc1_tilde"):
        values = [float(stage_end[d][layer_key("train", "deepest", metric)]) for d in range(1, 7)]
        assert all(b < a for a, b in pairwise(values)), (metric, values)
    assert float(stage_end[6][accuracy_key("train")]) == 1.0


def test_fig3_feature_weight_decay_moves_collapse_more_than_classifier_weight_decay(tmp_path):
    """§6.3: |log nc1 change| summed over the x2/x0 variants, features vs classifier."""
    assert (
        main(
            [
                "study",
                "wd",
                "--config",
                "wd_study_digits.yaml",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
        == 0
    )
    root = tmp_path / "runs" / "wd_study_digits"
    key = layer_key("train", "penultimate", "nc1")
    for loss in ("mse", "ce"):
        nc1 = {d.name.removeprefix(f"{loss}_"): _final(d, key) for d in root.glob(f"{loss}_*")}
        base = nc1.pop("wd0.005_fc0.005")
        move = {name: abs(math.log(v / base)) for name, v in nc1.items()}
        features = move["wd0.01_fc0.005"] + move["wd0.0_fc0.005"]
        classifier = move["wd0.005_fc0.01"] + move["wd0.005_fc0.0"]
        assert features > classifier, (loss, nc1, base)
        assert all(_final(d, accuracy_key("train")) == 1.0 for d in root.glob(f"{loss}_*"))
