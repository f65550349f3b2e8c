"""Memory: the cached and the streamed probe give the same numbers; a probe that cannot fit is
refused with the ways out; ``max_dim`` projects wide layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from support import RecordingLogger, reference_metrics

from nclightning import NeuralCollapseCallback
from nclightning.data import SyntheticDataModule
from nclightning.errors import ConfigurationError
from nclightning.models import CollapseClassifier
from nclightning.record.keys import layer_key

K = 4


def _fit(cb, backbone="mlp", shape=(16,), epochs=1, **model_kw):
    seed_everything(0)
    dm = SyntheticDataModule(
        num_classes=K,
        samples_per_class=20,
        test_samples_per_class=5,
        shape=shape,
        batch_size=16,
        seed=0,
        separation=3.0,
    )
    torch.manual_seed(0)
    kwargs = {"backbone_kwargs": {"depth": 3, "width": 24}} if backbone == "mlp" else {}
    model = CollapseClassifier(
        num_classes=K,
        input_shape=shape,
        backbone=backbone,
        scheduler="none",
        **{**kwargs, **model_kw},
    )
    logger = RecordingLogger()
    Trainer(
        max_epochs=epochs, accelerator="cpu", logger=logger, callbacks=[cb],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    ).fit(model, dm)  # fmt: skip
    return logger.probes(), model, dm


def test_the_streamed_probe_logs_what_the_cached_probe_logs():
    common = dict(coupling=1.0, log_figures=False)
    cached, *_ = _fit(NeuralCollapseCallback(**common))
    streamed_cb = NeuralCollapseCallback(cache_budget=0, **common)
    streamed, *_ = _fit(streamed_cb)
    assert not streamed_cb.plan.cached
    assert sorted(cached) == sorted(streamed) == [0, 1]
    for epoch, row in cached.items():
        assert set(row) == set(streamed[epoch])
        for key, value in row.items():
            got = streamed[epoch][key]
            if key.endswith(("grad_norm", "objective")):
                continue
            # residuals, baselines and skill are log10 ratios: equal to 1e-6 decades
            log_ratio = any(f"/{q}/" in key for q in ("residual", "baseline", "skill"))
            assert (math.isnan(value) and math.isnan(got)) or got == pytest.approx(
                value, rel=1e-6, abs=1e-6 if log_ratio else 1e-9
            ), key


def test_a_probe_that_cannot_fit_in_memory_is_refused_with_the_ways_out():
    # a flattened 64 x 32 x 32 conv map (d = 65536) streamed: 32 GiB of d x d statistics
    cb = NeuralCollapseCallback(
        layers={"stem": "backbone.relu"},
        pairs=[],
        pool="flatten",
        cache_budget=0,
        log_figures=False,
    )
    with pytest.raises(ConfigurationError, match="does not fit in memory") as err:
        _fit(cb, backbone="resnet18", shape=(3, 32, 32), backbone_kwargs={"width": 64})
    assert "stem: 65536" in str(err.value) and "max_dim" in str(err.value)


def test_max_dim_measures_a_fixed_projection_of_wide_layers():
    cb = NeuralCollapseCallback(
        layers={"h": "backbone"}, pairs=[], max_dim=8, seed=5, log_figures=False
    )
    probes, model, dm = _fit(cb)
    assert cb.plan.layers[0].dim == 8
    P = cb.projections["h"].double()  # [24, 8], orthonormal columns
    assert torch.allclose(P.T @ P, torch.eye(8, dtype=torch.float64), atol=1e-6)
    x, y = (torch.stack(t) for t in zip(*dm.probe_dataset("train")))
    model.eval()
    with torch.no_grad():
        h = (model.features(x).double() @ P).numpy()
    for key, value in reference_metrics(h, y.numpy(), K).items():
        assert probes[1][layer_key("train", "h", key)] == pytest.approx(value, rel=1e-5), key
    assert np.isfinite(probes[1][layer_key("train", "h", "nc4")])
