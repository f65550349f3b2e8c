"""NC4, the NCC mismatch (docs/science.md §1): exact in memory, streaming with NCCMismatch.

Every value is compared with a brute-force count (explicit distances to every mean).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nclightning.metrics import ClassMoments, ClassStatistics, NCCMismatch, collapse_metrics

K, D, N = 6, 12, 3000


@pytest.fixture(scope="module")
def problem():
    """Overlapping classes and a noisy classifier, so that NC4 is well inside (0, 1)."""
    rng = np.random.default_rng(11)
    mu = 2.0 * rng.standard_normal((K, D)) + 1.0
    y = rng.integers(0, K, N)
    x = mu[y] + 1.5 * rng.standard_normal((N, D))
    w = mu - mu.mean(0) + 1.0 * rng.standard_normal((K, D))
    b = rng.standard_normal(K)
    x_train = x + 0.8 * rng.standard_normal((1, D)) + 0.5 * rng.standard_normal((N, D))
    return x, y, w, b, x_train


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _means(x, y, classes=range(K)):
    return np.stack([x[y == k].astype(np.float64).mean(0) for k in classes])


def _nearest(x, means):
    return ((x[:, None, :] - means[None]) ** 2).sum(2).argmin(1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_nc4_in_memory_matches_brute_force(problem, ref, dtype):
    x, y, w, b, _ = problem
    x = x.astype(dtype)
    means = _means(x, y)
    expected = ref.nc4(x, means, w, b)
    assert 0.05 < expected < 0.95
    got = collapse_metrics(_t(x), _t(y), _t(w), _t(b))
    assert float(got["nc4"]) == pytest.approx(expected, abs=0.5 / N)  # same mismatch count
    # bias-free classifier (MSE setting of docs/science.md §6)
    assert float(collapse_metrics(_t(x), _t(y), _t(w))["nc4"]) == pytest.approx(
        ref.nc4(x, means, w), abs=0.5 / N
    )


def test_collapse_metrics_with_given_predictions(problem):
    """Any layer: the network's predictions against the layer's own final class means."""
    x, y, _, _, _ = problem
    rng = np.random.default_rng(3)
    preds = np.where(rng.random(N) < 0.7, y, rng.integers(0, K, N))  # a noisy "network"
    expected = float(np.mean(preds != _nearest(x, _means(x, y))))
    assert 0.05 < expected < 0.95
    got = collapse_metrics(_t(x), _t(y), predictions=_t(preds), chunk_size=777)
    assert float(got["nc4"]) == pytest.approx(expected, abs=0.5 / N)
    assert "nc3" not in got and "nc4" not in collapse_metrics(_t(x), _t(y))


@pytest.mark.parametrize("with_classifier", [False, True])
def test_streaming_against_given_means(problem, with_classifier):
    """A held-out probe against the TRAIN probe's means (``nc4_train_means``), in batches."""
    x, y, w, b, x_train = problem
    train = ClassMoments.from_features(_t(x_train), _t(y), K)
    rng = np.random.default_rng(4)
    preds = np.where(rng.random(N) < 0.6, y, rng.integers(0, K, N))
    if with_classifier:
        ncc = NCCMismatch(train, weight=_t(w), bias=_t(b))
        votes = np.argmax(x @ w.T + b, axis=1)
        batches = zip(_t(x).split(301), [None] * 10)
    else:
        ncc = NCCMismatch(train.means, train.present)
        votes = preds
        batches = zip(_t(x).split(301), _t(preds).split(301))
    for xb, pb in batches:
        ncc.update(xb, pb)
    nearest = _nearest(x, _means(x_train, y))
    expected = float(np.mean(votes != nearest))
    assert 0.05 < expected < 0.95
    got = ncc.compute()
    assert got.dtype == torch.float64 and got.ndim == 0
    assert float(got) == pytest.approx(expected, abs=0.5 / N)
    # meaningful: the probe's own means give a different value
    assert abs(float(np.mean(votes != _nearest(x, _means(x, y)))) - expected) > 5 / N


def test_nearest_centre_over_present_classes_only(problem):
    x, y, w, b, _ = problem
    keep = y != 2  # class 2 absent from the whole pass
    xk, yk = x[keep], y[keep]
    got = collapse_metrics(_t(xk), _t(yk), _t(w), _t(b), num_classes=K, allow_missing_classes=True)
    present = [k for k in range(K) if k != 2]
    ncc = np.array(present)[_nearest(xk, _means(xk, yk, present))]
    x_clf = np.argmax(xk @ w.T + b, axis=1)
    assert float(got["nc4"]) == pytest.approx(np.mean(x_clf != ncc), abs=0.5 / len(yk))


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric NCCMismatch was called before")
def test_nan_without_samples_reset_and_states():
    """NaN before any sample (torchmetrics warns about exactly that: silenced here)."""
    ncc = NCCMismatch(torch.eye(3, 4))
    assert ncc.compute().isnan()
    ncc.update(torch.eye(3, 4), torch.tensor([0, 1, 1]))
    assert float(ncc.compute()) == pytest.approx(1 / 3)
    assert {k: float(v) for k, v in ncc.metric_state.items()} == {
        "mismatches": 1.0,
        "samples": 3.0,
    }
    ncc.set_dtype(torch.float16)  # states stay float64 under module-wide casts
    assert {v.dtype for v in ncc.metric_state.values()} == {torch.float64}
    ncc.reset()
    assert ncc.compute().isnan()


def test_coinciding_means_give_nan():
    """A dead layer: every class mean is the same point, so no nearest centre exists."""
    same = torch.ones(3, 4)
    ncc = NCCMismatch(same)
    ncc.update(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    assert ncc.compute().isnan()
    one = NCCMismatch(torch.ones(3, 4), torch.tensor([True, False, False]))  # one class: defined
    one.update(torch.randn(5, 4), torch.tensor([0, 0, 1, 0, 2]))
    assert float(one.compute()) == pytest.approx(2 / 5)


def test_validation():
    ncc = NCCMismatch(torch.zeros(3, 4) + torch.arange(3.0).unsqueeze(1))
    with pytest.raises(ValueError, match="rows"):
        ncc.update(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="predictions must be"):
        ncc.update(torch.zeros(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"classifier \(weight\) or the predictions"):
        ncc.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="weight"):
        NCCMismatch(torch.zeros(3, 4), weight=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="bias"):
        NCCMismatch(torch.zeros(3, 4), weight=torch.zeros(3, 4), bias=torch.zeros(4))
    with pytest.raises(ValueError, match="no class is present"):
        NCCMismatch(torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool))


def test_class_statistics_keeps_no_nc4_state():
    """NC4 moved out of ClassStatistics: its compute() never reports an NCC key."""
    stats = ClassStatistics(3, 4)
    stats.set_classifier(torch.randn(3, 4))
    stats.update(torch.randn(30, 4), torch.arange(3).repeat(10))
    assert {"nc4", "nc4_train_means"}.isdisjoint(stats.compute())
    assert set(stats.metric_state) == {"packed"}
