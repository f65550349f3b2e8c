"""What a person sees in W&B is what was measured: an offline run read back with wandb's own
reader (``wandb leet inspect --json``, ``--summary --json``) and compared with the run's
``metrics.csv`` and snapshot files, value for value and epoch for epoch.

The run is made the way users make one: a plain ``LightningModule`` that logs its own epoch
metrics, a plain ``DataLoader``, the callback, and the README's loggers.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandbread import WandbRun, csv_series, md5_b64, number, reference_per_class

from nclightning.callbacks import NeuralCollapseCallback
from nclightning.callbacks.figures import Chart, layer_charts, pair_charts
from nclightning.loggers import CSVLogger, WandbLogger
from nclightning.record.snapshots import list_snapshots, read_snapshot

K, D, EPOCHS = 3, 8, 3
LAYERS = {"h0": "body.1", "h": "body.3"}  # two ReLU outputs of width 16: a pair


class Net(LightningModule):
    """A plain LightningModule: a small MLP, its own epoch-level loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, K)
        )

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(K).repeat_interleave(20)
    x = torch.randn(len(y), D, generator=g) + 2.0 * nn.functional.one_hot(y, D).float()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=0)


@dataclass
class Recorded:
    """A finished run: its W&B record as wandb reads it, metrics.csv probe rows, snapshots."""

    wb: WandbRun
    rows: list[dict[str, float]]
    run_id: str
    snapshots: Path


def _csv_rows(folder: Path) -> list[dict[str, float]]:
    """The probe rows of a CSV logger's metrics.csv."""
    with open(Path(folder) / "metrics.csv") as f:
        return [
            {k: float(v) for k, v in r.items() if v != ""}
            for r in csv.DictReader(f)
            if r.get("epochs_trained")
        ]


def _fit(tmp: Path, measure: bool = False, ckpt_path=None, **options) -> Recorded:
    """One fit of 3 epochs (4 probes), or with ``measure`` one ``trainer.validate`` of an
    untrained network (one probe), both loggers, the W&B run finished as a script ends."""
    import wandb

    wandb.teardown()
    torch.manual_seed(0)
    csv_logger = CSVLogger(str(tmp), name="mine")
    wandb_logger = WandbLogger(project="mine", save_dir=str(tmp))
    cb = NeuralCollapseCallback(layers=LAYERS, pairs=[("h0", "h")], **options)
    trainer = Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=[csv_logger, wandb_logger],
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if measure:
        trainer.validate(Net(), _loader())
    else:
        trainer.fit(Net(), _loader(), ckpt_path=ckpt_path)
    run_dir = Path(wandb_logger.experiment.dir).parent
    run_id = wandb_logger.experiment.id
    wandb_logger.experiment.finish()
    rows = _csv_rows(Path(csv_logger.log_dir))
    snapshots = Path(csv_logger.log_dir) / "snapshots" / cb.name
    return Recorded(WandbRun(run_dir), rows, run_id, snapshots)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The default: no figures (``log_figures=False``)."""
    return _fit(tmp_path_factory.mktemp("wandb_views"))


def test_every_probe_scalar_in_wandbs_history_equals_metrics_csv(run):
    probe_rows = {r["epochs_trained"]: r for r in run.rows}
    assert sorted(probe_rows) == [0.0, 1.0, 2.0, 3.0]
    seen = 0
    for item in run.wb.history():
        if "nc-train/h/nc1" not in item:
            continue
        expected = probe_rows[float(item["epochs_trained"])]
        for key, value in item.items():
            if key.startswith(("nc-train/", "pm-train-")):
                assert _same(number(value), expected[key]), key
                seen += 1
    assert seen >= 4 * 40  # four probes, every metric of two layers and the pair
    # the run summary: the last probe's finite values
    last = probe_rows[float(EPOCHS)]
    summary = run.wb.summary["summary"]
    for key, value in last.items():
        if key.startswith(("nc-train/", "pm-train-")) and math.isfinite(value):
            assert _same(number(summary[key]), value), key


def test_one_chart_per_metric_with_every_layer_over_epochs_trained(run):
    metrics = ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc3", "nc4", "feature_norm")
    for metric in metrics:
        lines = run.wb.chart_lines(f"charts-train/{metric}")
        expected_layers = [a for a in LAYERS if f"nc-train/{a}/{metric}" in run.rows[0]]
        assert sorted(lines) == sorted(expected_layers), metric
        for layer, points in lines.items():
            csv_points = csv_series(run.rows, f"nc-train/{layer}/{metric}")
            assert sorted(points) == sorted(csv_points) == [0.0, 1.0, 2.0, 3.0][: len(points)]
            for x, y in points.items():
                assert _same(y, csv_points[x]), (metric, layer, x)


def test_the_pair_charts_show_measured_predicted_h0_and_residuals_as_in_metrics_csv(run):
    pair = "pm-train-h0->h"
    for metric in ("nc1", "nc2_etf", "cdnv"):
        charts = {
            f"charts-train-h0->h/{metric}": {
                "H (h) measured": f"nc-train/h/{metric}",
                "H* predicted": f"{pair}/predicted/{metric}",
                "H0 (h0) measured": f"nc-train/h0/{metric}",
            },
            f"charts-train-h0->h/residual/{metric}": {
                "H* predicted": f"{pair}/residual/{metric}",
                **{
                    f"baseline {k.split('/')[-2]}": k
                    for k in run.rows[0]
                    if k.startswith(f"{pair}/baseline/") and k.endswith(f"/{metric}")
                },
            },
        }
        for chart, sources in charts.items():
            lines = run.wb.chart_lines(chart)
            assert set(lines) == set(sources)
            for name, key in sources.items():
                csv_points = csv_series(run.rows, key)
                assert sorted(lines[name]) == sorted(csv_points), (chart, name)
                for x, y in lines[name].items():
                    assert _same(y, csv_points[x]), (chart, name, x)


def test_pair_charts_draw_every_logged_baseline_beside_the_models_residual():
    """Baselines (``pm-{probe}-{pair}/baseline/{name}/{metric}``, decades) are read
    generically and drawn with the model's residual; the values chart has H, H* and H0."""
    rows = [
        {
            "epochs_trained": float(e),
            "nc-p/a/nc1": 1.0 / (e + 1),
            "nc-p/b/nc1": 0.5 / (e + 1),
            "pm-p-a->b/predicted/nc1": 0.4 / (e + 1),
            "pm-p-a->b/residual/nc1": -0.1 * e,
            "pm-p-a->b/baseline/h0/nc1": 0.3,
            "pm-p-a->b/baseline/etf/nc1": math.nan if e == 1 else -2.0,
        }
        for e in range(3)
    ]
    assert pair_charts(rows, "p") == {
        "charts-p-a->b/nc1": Chart(
            "nc1: a->b (p probe)",
            {
                "H (b) measured": [(0.0, 0.5), (1.0, 0.25), (2.0, 0.5 / 3)],
                "H* predicted": [(0.0, 0.4), (1.0, 0.2), (2.0, 0.4 / 3)],
                "H0 (a) measured": [(0.0, 1.0), (1.0, 0.5), (2.0, 1.0 / 3)],
            },
        ),
        "charts-p-a->b/residual/nc1": Chart(
            "log10(x / measured) of nc1: a->b (p probe)",
            {
                "H* predicted": [(0.0, 0.0), (1.0, -0.1), (2.0, -0.2)],
                "baseline h0": [(0.0, 0.3), (1.0, 0.3), (2.0, 0.3)],
                "baseline etf": [(0.0, -2.0), (2.0, -2.0)],  # the NaN leaves a gap
            },
        ),
    }


def test_a_layerwise_run_charts_one_line_per_stage_as_its_metrics_figure():
    """Rows with a ``depth`` (LayerwiseTraining): the deepest layer of each stage is a line."""
    stages = [(0, 1, 4.0), (2, 1, 2.0), (2, 2, 3.0), (4, 2, math.nan), (6, 2, 1.0)]
    rows = [
        {"epochs_trained": float(e), "depth": float(d), "nc-train/h0/nc1": 9.0,
         "nc-train/deepest/nc1": v}
        for e, d, v in stages
    ]  # fmt: skip
    charts = layer_charts(rows, "train")
    assert charts == {
        "charts-train/nc1": Chart(
            "nc1 (train probe)",
            {"depth 1": [(0.0, 4.0), (2.0, 2.0)], "depth 2": [(2.0, 3.0), (6.0, 1.0)]},
        )
    }
    flat = [{k: v for k, v in r.items() if k != "depth"} for r in rows[:2]]
    assert layer_charts(flat, "train")["charts-train/nc1"].lines == {
        "h0": [(0.0, 9.0), (2.0, 9.0)],
        "deepest": [(0.0, 4.0), (2.0, 2.0)],
    }


def test_per_class_tables_as_the_readme_names_them_equal_the_last_snapshot(run):
    last = read_snapshot(list_snapshots(run.snapshots)[-1])
    assert last["epochs_trained"] == EPOCHS
    names = [str(k) for k in range(K)]
    for layer in LAYERS:
        reference = reference_per_class(last["layers"][layer])
        table = run.wb.table(f"tables/class_var_train_{layer}")
        assert table["columns"] == ["class", "class_var"]
        assert [r[0] for r in table["data"]] == names
        np.testing.assert_allclose([r[1] for r in table["data"]], reference["class_var"], 1e-12)
        for quantity in ("cdnv_matrix", "cosine_matrix"):
            table = run.wb.table(f"tables/{quantity}_train_{layer}")
            assert table["columns"] == ["class", *names]
            got = np.array([[number(v) for v in r[1:]] for r in table["data"]])
            np.testing.assert_allclose(got, reference[quantity], rtol=1e-10, atol=1e-12)


def test_the_snapshots_are_a_versioned_artifact_with_the_files_on_disk(run):
    (artifact,) = run.wb.artifacts("nc-snapshots")
    assert artifact["name"] == f"snapshots-{run.run_id}-train"
    assert artifact["type"] == "nc-snapshots"
    assert artifact["aliases"] == ["latest"]
    assert json.loads(artifact["metadata"])["epochs_trained"] == [0, 1, 2, 3]
    on_disk = {p.name: p for p in run.snapshots.iterdir()}
    entries = {e["path"]: e for e in artifact["manifest"]["contents"]}
    assert set(entries) == set(on_disk)
    assert sum(name.startswith("probe-") for name in entries) == EPOCHS + 1
    for name, entry in entries.items():
        assert entry["digest"] == md5_b64(on_disk[name]), name


def test_probe_rows_carry_numbers_only_and_no_figures_by_default(run):
    items = run.wb.history()
    probe_items = [i for i in items if "nc-train/h/nc1" in i]
    assert len(probe_items) == EPOCHS + 1
    media = ("figures/", "tables/", "charts-")
    assert not any(k.startswith(media) for i in probe_items for k in i)
    assert not any(k.startswith("figures/") for i in items for k in i)
    # the views: one history row, at the last probe's epochs_trained
    (views,) = [i for i in items if any(k.startswith(media) for k in i)]
    assert float(views["epochs_trained"]) == EPOCHS


@pytest.mark.slow
def test_log_figures_renders_the_report_figures_once_at_the_end_of_the_run(tmp_path):
    run = _fit(tmp_path, log_figures=True)
    items = run.wb.history()
    with_figures = [i for i in items if any(k.startswith("figures/") for k in i)]
    assert len(with_figures) == 1
    (item,) = with_figures
    assert float(item["epochs_trained"]) == EPOCHS
    logged = {k.split(".")[0] for k in item if k.startswith("figures/")}
    for name in ("metrics_train", "pm_h0_to_h_train", "class_cosine_train_h"):
        assert f"figures/{name}" in logged, name
    entry = run.wb.summary["summary"]["figures/metrics_train"]
    from matplotlib.image import imread

    png = imread(run.wb.run_dir / "files" / entry["path"])
    assert png.ndim == 3 and float(png.std()) > 0.01


def test_a_measurement_logs_its_views_and_snapshot_artifact_when_it_ends(tmp_path):
    """``trainer.validate`` (what ``nclightning measure`` runs): one probe, its own W&B run."""
    run = _fit(tmp_path, measure=True, probe="val")
    (row,) = run.rows
    assert row["epochs_trained"] == 0
    lines = run.wb.chart_lines("charts-val/nc1")
    assert lines == {layer: {0.0: row[f"nc-val/{layer}/nc1"]} for layer in LAYERS}
    (artifact,) = run.wb.artifacts("nc-snapshots")
    assert artifact["name"] == f"snapshots-{run.run_id}-val"
    assert {e["path"] for e in artifact["manifest"]["contents"]} == {
        p.name for p in run.snapshots.iterdir()
    }
    reference = reference_per_class(read_snapshot(list_snapshots(run.snapshots)[0])["layers"]["h"])
    table = run.wb.table("tables/class_var_val_h")
    np.testing.assert_allclose([r[1] for r in table["data"]], reference["class_var"], 1e-12)


def test_a_resumed_run_charts_the_whole_run_from_both_records(tmp_path):
    """Stopped after 2 epochs (its last checkpoint), resumed to 3 with W&B: the charts hold
    the first part's probes (its metrics.csv) and the resumed part's (the new metrics.csv)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    first = CSVLogger(str(tmp_path / "first"), name="mine")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    Trainer(
        max_epochs=EPOCHS - 1,
        accelerator="cpu",
        logger=first,
        callbacks=[NeuralCollapseCallback(layers=LAYERS, pairs=[("h0", "h")]), ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(Net(), _loader())
    before = _csv_rows(Path(first.log_dir))
    run = _fit(tmp_path / "resumed", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [r["epochs_trained"] for r in before] == [0.0, 1.0, 2.0]
    assert [r["epochs_trained"] for r in run.rows] == [3.0]
    for metric in ("nc1", "nc2_etf"):
        lines = run.wb.chart_lines(f"charts-train/{metric}")
        for layer in LAYERS:
            key = f"nc-train/{layer}/{metric}"
            assert lines[layer] == {**csv_series(before, key), **csv_series(run.rows, key)}
