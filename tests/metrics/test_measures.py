"""The measures of docs/science.md §8 and the per-class arrays against float64 references.

Balanced and imbalanced classes, streamed in batches; the collapsed regime in float32; the
explicit pairwise differences where the Gram shortcut cancels; K = 1000 classes in memory.
"""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest
import torch

from nclightning.metrics import (
    PER_CLASS_KEYS,
    ClassMoments,
    ClassStatistics,
    class_quantities,
    metrics_from_moments,
)
from nclightning.metrics.measures import cdnv_pairs, gnc2_log

MEASURES = ("gnc2_log", "unc3", "nc5", "feature_norm", "class_mean_norm")
K, D = 7, 9


def _data(balanced: bool, seed: int, spread: float = 0.8, n: int = 700):
    rng = np.random.default_rng(seed)
    if balanced:
        y = np.repeat(np.arange(K), n // K)
    else:  # largest class 20x the smallest
        w = np.geomspace(1.0, 20.0, K)
        y = np.repeat(np.arange(K), np.maximum(1, (n * w / w.sum()).astype(int)))
    rng.shuffle(y)
    mu = 3.0 * rng.standard_normal((K, D)) + 2.0
    x = mu[y] + spread * rng.standard_normal((len(y), D))
    weight = mu - mu.mean(0) + rng.standard_normal((K, D))
    ood = rng.standard_normal(D) + 1.0
    return x, y, weight, ood


def _stream(x, y, dtype=None):
    stats = ClassStatistics(K, x.shape[1], compute_dtype=dtype)
    for xb, yb in zip(torch.from_numpy(x).split(97), torch.from_numpy(y).split(97)):
        stats.update(xb, yb)
    return stats.moments()


def _assert_arrays(got, expected, rtol, atol=0.0):
    got = got.numpy()
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    ok = ~np.isnan(expected)
    np.testing.assert_allclose(got[ok], expected[ok], rtol=rtol, atol=atol)


@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "imbalanced"])
def test_measures_match_reference(ref, balanced):
    x, y, weight, ood = _data(balanced, 1 if balanced else 2)
    m = _stream(x, y, torch.float64)
    got = metrics_from_moments(m, torch.from_numpy(weight), ood_mean=torch.from_numpy(ood))
    expected = ref.measures(x, y, K, weight, ood)
    assert set(MEASURES) <= set(got)
    for key in MEASURES:
        assert ref.rel_err(got[key], expected[key]) <= 1e-10, (key, got[key], expected[key])
    quantities = class_quantities(m)
    assert tuple(quantities) == PER_CLASS_KEYS
    for key, value in ref.class_quantities(x, y, K).items():
        _assert_arrays(quantities[key], value, rtol=1e-10, atol=1e-14)


def test_imbalanced_centre_is_the_mean_of_class_means(ref):
    """unc3 and nc5 centre on the mean of class means (matched above at 1e-10); centring on
    the sample mean instead gives values that tolerance would reject."""
    x, y, weight, ood = _data(False, 2)
    m = ClassMoments.from_features(torch.from_numpy(x), torch.from_numpy(y), K)
    got = metrics_from_moments(m, torch.from_numpy(weight), ood_mean=torch.from_numpy(ood))
    means = np.stack([x[y == k].mean(0) for k in range(K)])
    c = means - x.mean(0)  # the sample-mean centre
    cos_w = [
        weight[k] @ c[k] / (np.linalg.norm(weight[k]) * np.linalg.norm(c[k])) for k in range(K)
    ]
    v = ood - x.mean(0)
    cos_o = [abs(c[k] @ v) / (np.linalg.norm(c[k]) * np.linalg.norm(v)) for k in range(K)]
    assert ref.rel_err(got["unc3"], float(np.var(cos_w, ddof=1))) > 1e-6
    assert ref.rel_err(got["nc5"], float(np.mean(cos_o))) > 1e-6


@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "imbalanced"])
def test_collapsed_float32_measures_and_arrays(ref, balanced):
    """Float32 features, RMS within-class deviation 1e-4 of the mean norm (docs/science.md §10)."""
    rng = np.random.default_rng(5 if balanced else 6)
    sizes = None if balanced else np.linspace(300, 3000, K).astype(int)
    x, y = ref.collapsed_data(rng, 7 * 1000, 64, K, 1e-4, sizes=sizes)
    w = rng.standard_normal((K, 64))
    ood = rng.standard_normal(64)
    m = _stream(x, y)
    got = metrics_from_moments(m, torch.from_numpy(w), ood_mean=torch.from_numpy(ood))
    expected = ref.measures(x, y, K, w, ood)
    for key in MEASURES:
        assert ref.rel_err(got[key], expected[key]) <= 1e-6, (key, got[key], expected[key])
    quantities, exp = class_quantities(m), ref.class_quantities(x, y, K)
    _assert_arrays(quantities["class_var"], exp["class_var"], rtol=1e-6)
    _assert_arrays(quantities["cdnv_matrix"], exp["cdnv_matrix"], rtol=1e-6)
    _assert_arrays(quantities["cosine_matrix"], exp["cosine_matrix"], rtol=0, atol=1e-9)


def test_explicit_differences_where_the_gram_shortcut_cancels():
    """Two class means 1e-6 apart at distance 1e3 from the origin: the pairwise CDNV from
    explicit differences is exact; |a|^2 + |b|^2 - 2 a.b would lose every digit."""
    base = torch.full((3, 4), 1e3, dtype=torch.float64)
    offsets = torch.tensor([[0, 0, 0, 0], [1e-6, 0, 0, 0], [0, 2.0, 0, 0]], dtype=torch.float64)
    means = base + offsets
    m = ClassMoments(
        torch.ones(3, dtype=torch.float64) * 10,
        means,
        None,
        torch.tensor([1e-12, 2e-12, 3e-12], dtype=torch.float64) * 10,
    )
    pairs = cdnv_pairs(m)
    dist2 = (means[1, 0] - means[0, 0]).item() ** 2  # exact (Sterbenz): about 1e-12
    assert pairs[0, 1].item() == pytest.approx((1e-12 + 2e-12) / (2 * dist2), rel=1e-12)
    gram = (means[0] @ means[0] + means[1] @ means[1] - 2 * means[0] @ means[1]).item()
    assert abs(gram - dist2) > 0.1 * dist2  # the shortcut: off by more than 10%
    # nearly identical directions: gnc2_log from explicit differences of unit vectors
    eps = 1e-7
    u = torch.tensor([[1.0, 0, 0], [1.0, eps, 0], [-1.0, 0, 0.5]], dtype=torch.float64)
    mu = u - u.mean(0)  # any means; the reference recomputes the same geometry
    c = mu - mu.mean(0)
    un = (c / c.norm(dim=1, keepdim=True)).numpy()
    logs = [-np.log(np.linalg.norm(un[i] - un[j])) for i in range(3) for j in range(i + 1, 3)]
    moments = ClassMoments(torch.ones(3).double(), mu, None, torch.zeros(3).double())
    assert gnc2_log(moments) == pytest.approx(float(np.var(logs, ddof=1)), rel=1e-9)


def _peak_rss_mib() -> float:
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def test_thousand_classes_stay_in_memory(ref):
    """K = 1000, d = 512: no [K, K, d] tensor (4 GiB) is formed; spot checks vs loops."""
    k, d = 1000, 512
    g = torch.Generator().manual_seed(0)
    means = torch.randn(k, d, generator=g, dtype=torch.float64) + 5.0
    counts = torch.randint(1, 50, (k,), generator=g).double()
    class_ss = torch.rand(k, generator=g, dtype=torch.float64) * counts
    m = ClassMoments(counts, means, None, class_ss, norm_sums=counts * 3.0)
    before = _peak_rss_mib()
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    scalars = metrics_from_moments(m, weight, ood_mean=torch.zeros(d, dtype=torch.float64))
    quantities = class_quantities(m)
    assert _peak_rss_mib() - before < 512
    assert all(np.isfinite(scalars[key]) for key in scalars if key != "nc1")
    assert "nc1" not in scalars  # no scatter accumulated
    mu, v = means.numpy(), (class_ss / counts).numpy()
    c = mu - mu.mean(0)
    for i, j in [(0, 1), (17, 999), (500, 3), (998, 999)]:
        cdnv = (v[i] + v[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2))
        assert quantities["cdnv_matrix"][i, j].item() == pytest.approx(cdnv, rel=1e-12)
        cos = c[i] @ c[j] / (np.linalg.norm(c[i]) * np.linalg.norm(c[j]))
        assert quantities["cosine_matrix"][i, j].item() == pytest.approx(cos, abs=1e-14)
    assert scalars["feature_norm"] == pytest.approx(3.0)
