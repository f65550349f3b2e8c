"""Defined behaviour at the edges: absent classes, K > d, d = 1, validation, copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nclightning.metrics import (
    MOMENT_KEYS,
    ClassMoments,
    ClassStatistics,
    collapse_metrics,
    metrics_from_moments,
)


def _data(seed, N, d, K, spread=0.3):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(K), rng.integers(0, K, N - K)])
    rng.shuffle(y)
    x = 2.0 * rng.standard_normal((K, d))[y] + 1.0 + spread * rng.standard_normal((N, d))
    return x, y


def _assert_matches(got, expected, ref, rtol):
    for key in expected:
        assert ref.rel_err(float(got[key]), expected[key]) <= rtol, (key, got[key], expected[key])


def test_class_absent_from_some_batches(ref):
    x, y = _data(0, 400, 5, 4)
    order = np.argsort(y, kind="stable")  # class-sorted: most batches hold a single class
    xs, ys = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    stats = ClassStatistics(4, 5)
    for xb, yb in zip(xs.split(37), ys.split(37)):
        stats.update(xb, yb)
    _assert_matches(stats.compute(), ref.metrics(x, y, 4), ref, 1e-10)


@pytest.mark.parametrize(("K", "d"), [(12, 3), (4, 1), (2, 1)])
def test_more_classes_than_dimensions_and_d1(ref, K, d):
    x, y = _data(1, 600, d, K)
    got = collapse_metrics(torch.from_numpy(x), torch.from_numpy(y), chunk_size=64)
    assert set(got) == set(MOMENT_KEYS)
    expected = ref.metrics(x, y, K)
    for key in expected:
        if np.isnan(expected[key]):  # d = 1: two centred means share a direction
            assert key == "gnc2_log" and d == 1 and K > 2 and np.isnan(float(got[key]))
        elif key.startswith(("nc2", "gnc2")) and abs(expected[key]) < 1e-12:
            assert abs(float(got[key])) < 1e-12, key  # exactly 0 in theory (e.g. K = 2)
        else:
            assert ref.rel_err(float(got[key]), expected[key]) <= 1e-9, (key, got[key])
    # rank of Sigma_B is min(d, K - 1): the pseudo-inverse keeps all of it
    m = ClassMoments.from_features(torch.from_numpy(x), torch.from_numpy(y), K)
    assert int(torch.linalg.matrix_rank(m.sigma_b)) == min(d, K - 1)


def test_missing_class_error_names_the_class():
    x, y = _data(2, 300, 4, 5)
    keep = y != 3
    xt, yt = torch.from_numpy(x[keep]), torch.from_numpy(y[keep])
    stats = ClassStatistics(5, 4)
    stats.update(xt, yt)
    with pytest.raises(ValueError, match=r"class 3 has no sample"):
        stats.compute()
    with pytest.raises(ValueError, match=r"class 3 has no sample"):
        stats.moments()
    with pytest.raises(ValueError, match=r"class 3 has no sample"):
        collapse_metrics(xt, yt, num_classes=5)


def test_allow_missing_classes_uses_present_ones(ref):
    x, y = _data(3, 300, 4, 5)
    keep = y != 1
    xk, yk = x[keep], y[keep]
    w = np.random.default_rng(0).standard_normal((5, 4))
    stats = ClassStatistics(5, 4, allow_missing_classes=True)
    stats.set_classifier(torch.from_numpy(w))
    stats.update(torch.from_numpy(xk), torch.from_numpy(yk))
    expected = ref.metrics(xk, yk, 5, w)  # the reference skips absent classes (K' = 4)
    _assert_matches(stats.compute(), expected, ref, 1e-10)
    m = stats.moments()
    assert m.present.tolist() == [True, False, True, True, True]
    assert m.counts[1] == 0 and torch.all(m.means[1] == 0)


def test_validation_errors():
    stats = ClassStatistics(3, 4)
    with pytest.raises(ValueError, match="label 3 outside"):
        stats.update(torch.zeros(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="label -1 outside"):
        stats.update(torch.zeros(2, 4), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="rows"):
        stats.update(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be"):
        stats.update(torch.zeros(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="floating"):
        stats.update(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="compute_dtype"):
        ClassStatistics(3, 4, compute_dtype=torch.float16)
    stats.update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))  # empty batch is fine
    assert not stats.metric_state["packed"].any()


@pytest.mark.parametrize(
    ("scatter", "extra"), [("full", lambda K, d: d * d), ("none", lambda K, d: 0)]
)
def test_state_size_is_independent_of_n(scatter, extra):
    K, d = 7, 5
    stats = ClassStatistics(K, d, scatter=scatter)
    size = K * (2 * d + 3) + extra(K, d)
    for n in (10, 1000, 20000):
        stats.update(torch.randn(n, d), torch.randint(0, K, (n,)))
        states = stats.metric_state
        assert all(isinstance(v, torch.Tensor) for v in states.values())
        assert sum(v.numel() for v in states.values()) == size


def test_per_class_scatter_and_moments_interface(ref):
    x, y = _data(4, 500, 6, 3, spread=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    stats = ClassStatistics(3, 6, scatter="per_class")
    other = ClassStatistics(3, 6, scatter="per_class")
    stats.update(xt[:200], yt[:200])
    other.update(xt[200:], yt[200:])
    stats.merge_state(other)  # exercises the exact merge of the per-class block too
    m = stats.moments()
    r = ref.moments(x, y, 3)
    for k in range(3):
        dev = x[y == k] - r.means[k]
        np.testing.assert_allclose(m.class_scatter[k].numpy(), dev.T @ dev, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(
        m.class_scatter.sum(0).numpy(), m.scatter.numpy(), rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(m.sigma_w.numpy(), r.sigma_w, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(m.sigma_b.numpy(), r.sigma_b, rtol=1e-10)
    np.testing.assert_allclose(m.gram.numpy(), x.T @ x, rtol=1e-12)
    np.testing.assert_allclose(
        m.class_sums.numpy(), np.stack([x[y == k].sum(0) for k in range(3)]), rtol=1e-12
    )
    np.testing.assert_allclose(m.global_mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.centered_means.numpy(), r.M.T, rtol=1e-10, atol=1e-12)
    assert m.total == 500 and m.present.all()
    # the same formulas run on the exact two-pass moments
    exact = ClassMoments.from_features(xt, yt, 3, per_class_scatter=True)
    a, b = metrics_from_moments(m), metrics_from_moments(exact)
    _assert_matches(a, b, ref, 1e-9)
    np.testing.assert_allclose(
        m.class_scatter.numpy(), exact.class_scatter.numpy(), rtol=1e-9, atol=1e-15
    )


def test_forward_only_accumulates():
    x, y = _data(5, 100, 3, 3)
    stats = ClassStatistics(3, 3)
    assert stats(torch.from_numpy(x[:50]), torch.from_numpy(y[:50])) is None
    stats(torch.from_numpy(x[50:]), torch.from_numpy(y[50:]))
    assert stats.moments().total == 100


def test_clone_and_pickle_keep_accumulating(ref):
    import pickle

    x, y = _data(6, 300, 4, 3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    stats = ClassStatistics(3, 4)
    stats.update(xt[:100], yt[:100])
    for copy in (stats.clone(), pickle.loads(pickle.dumps(stats))):
        copy.update(xt[100:], yt[100:])
        _assert_matches(copy.compute(), ref.metrics(x, y, 3), ref, 1e-10)
    assert stats.moments().total == 100  # the original is untouched


def test_pad_equals_moments_of_zero_padded_features():
    """ClassMoments.pad(dim) = moments of the features with zero coordinates appended."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(90, 4, generator=gen, dtype=torch.float64) + 3.0
    y = torch.arange(3).repeat(30)
    m = ClassMoments.from_features(x, y, per_class_scatter=True, norm_sums=True).pad(7)
    padded = torch.cat([x, torch.zeros(90, 3, dtype=torch.float64)], 1)
    ref = ClassMoments.from_features(padded, y, per_class_scatter=True, norm_sums=True)
    for name in ("counts", "means", "scatter", "class_ss", "class_scatter", "norm_sums"):
        torch.testing.assert_close(getattr(m, name), getattr(ref, name), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="fewer"):
        m.pad(3)


def test_non_finite_features_give_nan_metrics_not_an_error():
    stats = ClassStatistics(3, 4, allow_missing_classes=True)
    x = torch.randn(30, 4)
    x[7, 2] = float("nan")
    stats.update(x, torch.arange(3).repeat(10))
    m, metrics = stats.moments_and_metrics()
    assert not torch.isfinite(m.scatter).all()
    assert set(metrics) == set(MOMENT_KEYS) and all(v.isnan() for v in metrics.values())
    assert stats.compute().keys() == metrics.keys()


def test_moments_and_metrics_equal_the_separate_calls():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(200, 6, generator=gen), torch.arange(4).repeat(50)
    stats = ClassStatistics(4, 6)
    stats.update(x, y)
    m, metrics = stats.moments_and_metrics()
    assert metrics.keys() == stats.compute().keys()
    assert all(bool(metrics[k] == stats.compute()[k]) for k in metrics)
    torch.testing.assert_close(m.scatter, stats.moments().scatter, rtol=0, atol=0)
