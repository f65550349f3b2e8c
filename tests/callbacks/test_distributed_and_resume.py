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


def _run_worker(devices: int, out: Path) -> list[dict[str, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(devices), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "rows.json").read_text())


def test_two_process_ddp_logs_the_single_process_values(tmp_path):
    one = _run_worker(1, tmp_path / "one")
    two = _run_worker(2, tmp_path / "two")
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [0.0, 1.0, 2.0]
    for r1, r2 in zip(one, two):
        assert set(r1) == set(r2)
        assert "nc/train/penultimate/nc4" in r1 or r1["epoch"] == 0
        for key, v1 in r1.items():
            v2 = r2[key]
            if key.endswith("grad_norm"):  # a stopping tolerance, not a value
                assert v1 < 1e-8 and v2 < 1e-8
            elif math.isnan(v1):
                assert math.isnan(v2), key
            else:
                assert v2 == pytest.approx(v1, rel=1e-6, abs=1e-12), key
    # every sample counted once: the accuracy is a multiple of 1/1437, not of 1/1438
    acc = one[-1]["nc/train/accuracy"] * 1437
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
    cb = NeuralCollapseCallback(beta="fit", log_figures_every_n_epochs=0)
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


def test_wandb_offline_run_holds_the_metrics_and_figures(tmp_path, monkeypatch):
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
    cb = NeuralCollapseCallback(beta=1.0, log_figures_every_n_epochs=1)
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
    config = dict(logger.experiment.config)
    logger.experiment.finish()
    assert config["neural_collapse"]["pairs"] == [["h0", "penultimate"]]
    images = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.png"))
    assert any("metric_curves" in n for n in images), images
    assert any("pm/h0->penultimate" in n for n in images), images
    blob = next(run_dir.glob("*.wandb")).read_bytes()
    for key in (b"nc/train/penultimate/nc1", b"pm/h0->penultimate/nc1_tilde", b"epoch"):
        assert key in blob
    # the PNGs are real figures
    from matplotlib.image import imread

    png = imread(next(p for p in run_dir.rglob("*.png") if "metric_curves" in p.name))
    assert png.ndim == 3 and float(torch.from_numpy(png).float().std()) > 0.01
