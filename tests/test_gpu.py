"""Checks that need a CUDA device: exactness on the GPU, bf16 inputs, solver, callback.

Every test here is ``RunIf(min_cuda_gpus=1)`` (``runif.py``): collected everywhere, reported
as skipped (with the reason) on a machine without CUDA, selected by ``pytest -m gpu``
(``benchmarks/gpu_check.sh`` runs them on a GPU machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from runif import RunIf
from support import RecordingLogger, reference_metrics

from nclightning import NeuralCollapseCallback, perturbation
from nclightning.data import SyntheticDataModule
from nclightning.metrics import ClassStatistics
from nclightning.models import CollapseClassifier
from nclightning.record.keys import layer_key, pair_key

pytestmark = [pytest.mark.gpu, RunIf(min_cuda_gpus=1)]


@pytest.fixture
def tf32_allowed():
    """TF32 matmuls allowed globally for one test (as many Lightning users set), then restored."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _collapsed(N=20_000, d=256, K=10, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((K, d))
    mu *= 10 / np.linalg.norm(mu, axis=1, keepdims=True)
    y = rng.integers(0, K, N)
    x = (mu[y] + 1e-3 / np.sqrt(d) * rng.standard_normal((N, d))).astype(np.float32)
    return x, y


def test_class_statistics_on_cuda_is_exact_in_the_collapsed_regime(tf32_allowed):
    """docs/science.md §10.1: 1e-6 relative against a float64 two-pass reference, on the GPU,
    with TF32 allowed globally (the statistics force full-precision float32 products)."""
    x, y = _collapsed()
    st = ClassStatistics(10, x.shape[1]).cuda()
    for xb, yb in zip(torch.from_numpy(x).split(137), torch.from_numpy(y).split(137)):
        st.update(xb.cuda(non_blocking=True), yb.cuda(non_blocking=True))
    got = st.compute()
    expected = reference_metrics(x, y, 10)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-6), key


@RunIf(min_cuda_gpus=1, bf16_cuda=True)
def test_bfloat16_features_are_accepted_and_upcast():
    x, y = _collapsed(N=4000, d=64)
    xb = torch.from_numpy(x).cuda().bfloat16()
    st = ClassStatistics(10, 64).cuda()
    st.update(xb, torch.from_numpy(y).cuda())
    expected = reference_metrics(xb.float().cpu().numpy(), y, 10)
    assert float(st.compute()["nc1_tilde"]) == pytest.approx(expected["nc1_tilde"], rel=1e-5)


def test_solver_on_cuda_matches_cpu():
    x, y = _collapsed(N=5000, d=64)
    x = torch.from_numpy(x).double() + torch.randn(5000, 64, dtype=torch.float64)
    y = torch.from_numpy(y)
    params = {"lambda_W": 5e-4, "lambda_H": 5e-4, "beta": 1.0}
    cpu = perturbation.solve(x, y, **params)
    gpu = perturbation.solve(x.cuda(), y.cuda(), **params)
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-9)
    assert gpu.metrics["nc1_tilde"] == pytest.approx(cpu.metrics["nc1_tilde"], rel=1e-6)


def test_callback_under_bf16_mixed_precision_and_channels_last():
    dm = SyntheticDataModule(num_classes=4, samples_per_class=64, shape=(3, 32, 32), batch_size=64)
    model = CollapseClassifier(
        num_classes=4,
        input_shape=(3, 32, 32),
        backbone="resnet18",
        backbone_kwargs={"width": 16},
        channels_last=True,
    )
    logger = RecordingLogger()
    cb = NeuralCollapseCallback(layers="all", log_figures=False)
    Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=2,
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    ).fit(model, dm)
    row = logger.probes()[2]
    layers = [k.split("/")[1] for k in row if k.endswith("/nc1")]
    assert len(layers) == 10  # stem, 8 blocks, pooled features, all in one bf16 pass
    for layer in layers:
        assert np.isfinite(row[layer_key("train", layer, "nc1")])
        assert 0.0 <= row[layer_key("train", layer, "nc4")] <= 1.0  # exact NC4 on the GPU


def test_pair_fit_of_a_probe_on_cuda():
    dm = SyntheticDataModule(num_classes=4, samples_per_class=64, shape=(3, 32, 32), batch_size=64)
    model = CollapseClassifier(
        num_classes=4, input_shape=(3, 32, 32), backbone="resnet18", backbone_kwargs={"width": 16}
    )
    logger = RecordingLogger()
    cb = NeuralCollapseCallback(log_figures=False)
    Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    ).fit(model, dm)
    row = logger.probes()[1]
    assert row[pair_key("train", "h0->penultimate", "converged")] == 1.0
    assert np.isfinite(row[pair_key("train", "h0->penultimate", "coupling")])
