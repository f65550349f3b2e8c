"""Several probes in one Trainer, their state across checkpoints, and a callback reused for a
second fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from support import RecordingLogger, nearest_mean

from nclightning import NeuralCollapseCallback
from nclightning.data import SyntheticDataModule
from nclightning.errors import ConfigurationError
from nclightning.models import CollapseClassifier
from nclightning.record.keys import layer_key, pair_key

K = 4


def _data(seed=0):
    return SyntheticDataModule(
        num_classes=K,
        samples_per_class=30,
        test_samples_per_class=12,
        shape=(16,),
        batch_size=16,
        seed=seed,
        separation=3.0,
    )


def _model(seed=0, width=24):
    torch.manual_seed(seed)
    return CollapseClassifier(
        num_classes=K,
        input_shape=(16,),
        backbone="mlp",
        backbone_kwargs={"depth": 3, "width": width, "batch_norm": False},
        lr=0.05,
        weight_decay=5e-4,
        scheduler="none",
    )


def _callbacks(**kw):
    common = dict(coupling=1.0, log_figures=False, **kw)
    return [NeuralCollapseCallback(probe="val", **common), NeuralCollapseCallback(**common)]


def _fit(tmp_path, epochs, ckpt_path=None, callbacks=None, logger=None):
    seed_everything(0)
    callbacks = callbacks or _callbacks()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger or RecordingLogger(),
        callbacks=[*callbacks, ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_model(), datamodule=_data(), ckpt_path=ckpt_path)
    return trainer, callbacks


def test_train_and_val_probes_run_side_by_side_with_their_own_keys_and_state(tmp_path):
    trainer, (val, train) = _fit(tmp_path, 2)
    assert val.state_key != train.state_key
    rows = trainer.logger.probes()
    assert sorted(rows) == [0, 1, 2]
    for row in rows.values():
        for probe in ("train", "val"):
            assert math.isfinite(row[layer_key(probe, "penultimate", "nc1")])
            assert pair_key(probe, "h0->penultimate", "coupling") in row
        assert math.isfinite(row[layer_key("val", "penultimate", "nc4_train_means")])
        assert layer_key("train", "penultimate", "nc4_train_means") not in row


def test_held_out_nc4_against_the_train_means_is_the_ncc_classifier_of_the_train_probe(tmp_path):
    dm = _data()
    trainer, _ = _fit(tmp_path, 1)
    model = trainer.lightning_module.eval()
    feats = {}
    for split in ("train", "val"):
        x, y = (torch.stack(t) for t in zip(*dm.probe_dataset(split)))
        with torch.no_grad():
            feats[split] = (
                model.features(x).double().numpy(),
                y.numpy(),
                model(x).argmax(1).numpy(),
            )
    h, y, _ = feats["train"]
    train_means = np.stack([h[y == k].mean(0) for k in range(K)])
    hv, _, pred = feats["val"]
    expected = np.mean(pred != nearest_mean(hv, train_means))
    row = trainer.logger.probes()[1]
    assert row[layer_key("val", "penultimate", "nc4_train_means")] == pytest.approx(
        expected, abs=1e-12
    )


def test_resumed_train_and_val_probes_log_what_an_uninterrupted_run_logs(tmp_path):
    full, _ = _fit(tmp_path / "full", 4)
    _fit(tmp_path / "part", 2)
    resumed, cbs = _fit(tmp_path / "part", 4, ckpt_path=tmp_path / "part" / "ckpt" / "last.ckpt")
    expected, got = full.logger.probes(), resumed.logger.probes()
    assert sorted(got) == [3, 4]  # the resumed run probes only what is new
    for epoch in (3, 4):
        assert set(got[epoch]) == set(expected[epoch])
        for key, value in expected[epoch].items():
            if math.isnan(value):
                assert math.isnan(got[epoch][key]), key
            else:
                assert got[epoch][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert [r["epochs_trained"] for r in cbs[1].history] == [0, 1, 2, 3, 4]  # state restored


def test_resuming_with_other_layers_or_another_probe_is_refused(tmp_path):
    _fit(tmp_path, 1)
    last = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(ConfigurationError, match="layers"):
        _fit(tmp_path, 2, ckpt_path=last, callbacks=_callbacks(layers={"penultimate": "backbone"}))
    with pytest.raises(ConfigurationError, match="probe"):
        cbs = [NeuralCollapseCallback(probe="test", coupling=1.0, log_figures=False)]
        _fit(tmp_path, 2, ckpt_path=last, callbacks=cbs)


def test_two_instances_with_the_same_probe_are_refused(tmp_path):
    """Their state keys (Lightning's convention: one per probe name) would collide."""
    twins = [NeuralCollapseCallback(coupling=1.0), NeuralCollapseCallback(coupling=1.0)]
    assert twins[0].state_key == "NeuralCollapseCallback{'probe': 'train'}"
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        _fit(tmp_path, 1, callbacks=twins)


def test_a_second_fit_with_the_same_instance_starts_clean():
    cb = NeuralCollapseCallback(coupling=1.0, max_samples=40, log_figures=False)
    for seed, width in ((0, 24), (1, 12)):
        seed_everything(seed)
        Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            callbacks=[cb],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        ).fit(_model(seed, width), datamodule=_data(seed))
        assert [r["epochs_trained"] for r in cb.history] == [0, 1]
        assert cb.last_result.moments["penultimate"].dim == width
