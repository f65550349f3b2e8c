"""The callback under DDP (2 CPU processes, gloo) and across a checkpoint resume; W&B offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from support import RecordingLogger

from nclightning import NeuralCollapseCallback
from nclightning.data import SyntheticDataModule
from nclightning.models import CollapseClassifier

WORKER = Path(__file__).with_name("ddp_callback_worker.py")


def _run_worker(devices: int, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(devices), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def test_two_process_ddp_agrees_on_every_rank_and_with_one_process(tmp_path):
    (one,) = _run_worker(1, tmp_path / "one")
    ranks = _run_worker(2, tmp_path / "two")
    # every rank holds the same values (pair fits are solved on rank 0 and broadcast) ...
    assert ranks[0]["callback_metrics"] == ranks[1]["callback_metrics"]
    assert ranks[0]["best"] == ranks[1]["best"] != ""  # ... so a pm- monitor works under DDP
    # ... the epochs' orders differ and interleave to the single-process order ...
    for epoch, single in enumerate(one["orders"]):
        a, b = ranks[0]["orders"][epoch], ranks[1]["orders"][epoch]
        assert [i for pair in zip(a, b) for i in pair] == single
    assert one["orders"][0] != one["orders"][1] != one["orders"][2]
    # ... and training with the same global batches logs the single-process values
    two = ranks[0]["history"]
    assert [r["epochs_trained"] for r in one["history"]] == [r["epochs_trained"] for r in two]
    for r1, r2 in zip(one["history"], two):
        assert set(r1) == set(r2)
        for key, v1 in r1.items():
            if key.endswith(("grad_norm", "objective")):  # a tolerance, not a value
                continue
            if math.isnan(v1):
                assert math.isnan(r2[key]), key
            else:
                assert r2[key] == pytest.approx(v1, rel=2e-4, abs=1e-6), key
    # every sample counted once: the accuracy is a multiple of 1/1000
    acc = one["history"][-1]["nc-train/accuracy"] * 1000
    assert acc == pytest.approx(round(acc), abs=1e-6)


def _fit(tmp_path, max_epochs, ckpt_path=None, name="a", save_on_train_epoch_end=None):
    seed_everything(0)
    dm = SyntheticDataModule(
        num_classes=4,
        samples_per_class=40,
        test_samples_per_class=10,
        shape=(16,),
        batch_size=16,
        seed=0,
    )
    model = CollapseClassifier(
        num_classes=4,
        input_shape=(16,),
        backbone="mlp",
        backbone_kwargs={"depth": 3, "width": 24, "batch_norm": True},
        lr=0.05,
        weight_decay=5e-4,
        scheduler="multistep",
        milestones=[3],
    )
    logger = RecordingLogger()
    cb = NeuralCollapseCallback(log_figures=False)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / name,
        save_top_k=-1,
        every_n_epochs=1,
        filename="{epoch}",
        save_on_train_epoch_end=save_on_train_epoch_end,
    )
    trainer = Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[cb, ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return logger.probes()


@pytest.mark.parametrize("save_at_validation_end", [False, True])
def test_resume_from_a_checkpoint_logs_what_an_uninterrupted_run_logs(
    tmp_path, save_at_validation_end
):
    full = _fit(tmp_path, 5, name="full")
    save = False if save_at_validation_end else None
    _fit(tmp_path, 2, name="part", save_on_train_epoch_end=save)
    resumed = _fit(tmp_path, 5, ckpt_path=tmp_path / "part" / "epoch=1.ckpt", name="resumed")
    assert sorted(full) == [0, 1, 2, 3, 4, 5]
    # A checkpoint saved at validation end precedes that epoch's probe (train-epoch-end hook):
    # the resumed run catches the missed probe of epoch 2 up first.
    assert sorted(resumed) == ([2, 3, 4, 5] if save_at_validation_end else [3, 4, 5])
    for epoch in resumed:
        assert set(resumed[epoch]) == set(full[epoch])
        for key, value in full[epoch].items():
            got = resumed[epoch][key]
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(
                value, rel=1e-9, abs=1e-12
            ), (epoch, key)


def _leet(run_dir: Path, *flags: str):
    """wandb's own reader of an offline run: ``wandb leet inspect [--summary] --json``."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", *flags, "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_an_offline_wandb_run_read_back_with_wandbs_reader(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    dm = SyntheticDataModule(num_classes=4, samples_per_class=30, shape=(16,), batch_size=32)
    model = CollapseClassifier(
        num_classes=4,
        input_shape=(16,),
        backbone="mlp",
        backbone_kwargs={"depth": 3, "width": 16},
        scheduler="none",
    )
    logger = WandbLogger(project="nclightning-test", save_dir=str(tmp_path))
    cb = NeuralCollapseCallback(coupling=1.0, log_figures=True)
    Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    ).fit(model, dm)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    summary = json.loads(_leet(run_dir, "--summary"))
    text = json.dumps(summary)
    # the scalars, grouped in one section per probe and per pair, the settings in the config
    for key in (
        "nc-train/penultimate/nc1",
        "nc-train/accuracy",
        "pm-train-h0->penultimate/coupling",
        "pm-train-h0->penultimate/residual/nc1",
        "epochs_trained",
    ):
        assert key in text, key
    assert "neural_collapse/train" in text
    records = _leet(run_dir)
    # figures and tables as media
    for key in (
        "figures/metrics_train",  # the report's figures, under the report's names
        "figures/pm_h0_to_penultimate_train",
        "figures/class_cosine_train_penultimate",
        "tables/cdnv_matrix_train_penultimate",
    ):
        assert key in records, key
    images = sorted(run_dir.rglob("*.png"))
    from matplotlib.image import imread

    png = imread(next(p for p in images if "metrics_train" in p.name))
    assert png.ndim == 3 and float(torch.from_numpy(png).float().std()) > 0.01
