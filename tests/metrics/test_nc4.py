"""NC4, the NCC mismatch (docs/science.md §1): exact in memory, streaming with reference means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nclightning.metrics import ClassStatistics, collapse_metrics

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
    x_prev = x + 0.8 * rng.standard_normal((1, D)) + 0.5 * rng.standard_normal((N, D))
    return x, y, w, b, x_prev


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_nc4_in_memory_matches_brute_force(problem, ref, dtype):
    x, y, w, b, _ = problem
    x = x.astype(dtype)
    means = np.stack([x[y == k].astype(np.float64).mean(0) for k in range(K)])
    expected = ref.nc4(x, means, w, b)
    assert 0.05 < expected < 0.95
    got = collapse_metrics(_t(x), _t(y), _t(w), _t(b))
    assert got["nc4"] == pytest.approx(expected, abs=0.5 / N)  # same count of mismatches
    # bias-free classifier (MSE setting of docs/science.md §6)
    assert collapse_metrics(_t(x), _t(y), _t(w))["nc4"] == pytest.approx(
        ref.nc4(x, means, w), abs=0.5 / N
    )


def test_streaming_nc4_uses_previous_pass_means(problem, ref):
    x, y, w, b, x_prev = problem
    prev = ClassStatistics(K, D)
    for xb, yb in zip(_t(x_prev).split(250), _t(y).split(250)):
        prev.update(xb, yb)
    prev_moments = prev.moments()

    stats = ClassStatistics(K, D)
    stats.set_reference(prev_moments, _t(w), _t(b))
    for xb, yb in zip(_t(x).split(137), _t(y).split(137)):
        stats.update(xb, yb)
    got = stats.compute()
    assert stats.nc4_reference == "previous_pass"
    prev_means = np.stack([x_prev[y == k].mean(0) for k in range(K)])
    expected = ref.nc4(x, prev_means, w, b)
    assert got["nc4"] == pytest.approx(expected, abs=0.5 / N)
    # meaningful: the current pass's own means give a different value
    own = np.stack([x[y == k].mean(0) for k in range(K)])
    assert abs(ref.nc4(x, own, w, b) - expected) > 5 / N
    # nc3 uses the classifier given with the reference and the *current* means
    assert got["nc3"] == pytest.approx(ref.metrics(x, y, K, w)["nc3"], rel=1e-9)


def test_nc4_absent_without_reference_and_reference_survives_reset(problem, ref):
    x, y, w, b, _ = problem
    stats = ClassStatistics(K, D)
    stats.update(_t(x), _t(y))
    assert "nc4" not in stats.compute() and stats.nc4_reference is None

    means = np.stack([x[y == k].mean(0) for k in range(K)])
    stats.reset()
    stats.set_reference(_t(means), _t(w), _t(b), source="custom")
    stats.update(_t(x[:1000]), _t(y[:1000]))
    stats.reset()  # new pass: counts cleared, reference kept
    stats.update(_t(x), _t(y))
    got = stats.compute()
    assert stats.nc4_reference == "custom"
    assert got["nc4"] == pytest.approx(ref.nc4(x, means, w, b), abs=0.5 / N)

    stats.clear_reference()
    assert "nc4" not in stats.compute()
    assert "nc3" in stats.compute()


def test_nc4_counts_samples_seen_with_reference_and_cache_is_invalidated(problem, ref):
    x, y, w, b, _ = problem
    means = np.stack([x[y == k].mean(0) for k in range(K)])
    stats = ClassStatistics(K, D)
    stats.update(_t(x[:1000]), _t(y[:1000]))
    first = stats.compute()
    stats.set_reference(_t(means), _t(w), _t(b))
    assert "nc4" in stats.compute() and "nc4" not in first  # cached value not reused
    assert np.isnan(stats.compute()["nc4"])  # reference set, no sample counted yet
    stats.update(_t(x[1000:]), _t(y[1000:]))
    assert stats.compute()["nc4"] == pytest.approx(ref.nc4(x[1000:], means, w, b), abs=0.5 / N)
    assert int(stats.nc4_samples) == N - 1000


def test_nc4_nearest_centre_over_present_classes_only(problem, ref):
    x, y, w, b, _ = problem
    keep = y != 2  # class 2 absent from the whole pass
    xk, yk = x[keep], y[keep]
    got = collapse_metrics(_t(xk), _t(yk), _t(w), _t(b), num_classes=K, allow_missing_classes=True)
    present = [k for k in range(K) if k != 2]
    means = np.stack([xk[yk == k].mean(0) for k in present])
    x_clf = np.argmax(xk @ w.T + b, axis=1)
    dist = np.stack([np.sum((xk - m) ** 2, 1) for m in means], 1)
    ncc = np.array(present)[np.argmin(dist, 1)]
    assert got["nc4"] == pytest.approx(np.mean(x_clf != ncc), abs=0.5 / N)


def test_set_reference_validates_shapes(problem):
    _, _, w, b, _ = problem
    stats = ClassStatistics(K, D)
    with pytest.raises(ValueError, match="reference means"):
        stats.set_reference(torch.zeros(K, D + 1), _t(w), _t(b))
    with pytest.raises(ValueError, match="weight"):
        stats.set_reference(torch.zeros(K, D), torch.zeros(K, D + 1))
    with pytest.raises(ValueError, match="bias"):
        stats.set_reference(torch.zeros(K, D), _t(w), torch.zeros(K + 1))


def test_streaming_nc4_against_given_predictions(problem):
    """Any layer: NC4 = fraction where the network's prediction != the nearest reference mean."""
    x, y, _, _, x_prev = problem
    prev_means = np.stack([x_prev[y == k].mean(0) for k in range(K)])
    rng = np.random.default_rng(3)
    preds = np.where(rng.random(N) < 0.7, y, rng.integers(0, K, N))  # a noisy "network"
    nearest = ((x[:, None, :] - prev_means[None]) ** 2).sum(2).argmin(1)  # brute force
    expected = float(np.mean(preds != nearest))
    assert 0.05 < expected < 0.95

    stats = ClassStatistics(K, D)
    stats.set_reference(_t(prev_means), source="previous_probe")  # no classifier needed
    for xb, yb, pb in zip(_t(x).split(301), _t(y).split(301), _t(preds).split(301)):
        stats.update(xb, yb, predictions=pb)
    got = stats.compute()
    assert got["nc4"] == pytest.approx(expected, abs=0.5 / N)
    assert stats.nc4_reference == "previous_probe" and "nc3" not in got

    # without a classifier, predictions are required
    with pytest.raises(ValueError, match="predictions"):
        stats.update(_t(x[:5]), _t(y[:5]))
