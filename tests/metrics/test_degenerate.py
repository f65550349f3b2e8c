"""Degenerate inputs never raise: every metric against hand-computed values (docs/science.md §9).

The rule: a formula whose denominator is 0 (coinciding class means, a zero vector in a
cosine, ``Sigma_B = 0``) is NaN; a formula that stays defined keeps its value (a feature
norm of identical features, a class-mean norm of 0, the variance of a single value is 0).
"""

from __future__ import annotations

import math

import pytest
import torch

from nclightning.metrics import (
    METRIC_KEYS,
    ClassStatistics,
    NCCMismatch,
    class_quantities,
    collapse_metrics,
    metrics_from_moments,
)

NAN = math.nan
W3 = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [-1.0, 0, 0, 0]], dtype=torch.float64)


def _stream(x, y, K=3):
    stats = ClassStatistics(K, x.shape[1], allow_missing_classes=True)
    for xb, yb in zip(x.split(2), y.split(2)):
        stats.update(xb, yb)
    return stats


def _check(got: dict, expected: dict) -> None:
    assert set(got) == set(expected), set(got) ^ set(expected)
    for key, value in expected.items():
        g = float(got[key])
        if math.isnan(value):
            assert math.isnan(g), (key, g)
        else:
            assert g == pytest.approx(value, rel=1e-12, abs=1e-12), (key, g, value)


def _identical(value: float):
    """K = 3, d = 4, 9 samples, all equal to ``value * (1, 2, 2, 0)``."""
    x = value * torch.tensor([[1.0, 2.0, 2.0, 0.0]], dtype=torch.float64).repeat(9, 1)
    return x, torch.tensor([0, 1, 2, 0, 1, 2, 1, 2, 2])


ALL_UNDEFINED = dict.fromkeys((k for k in METRIC_KEYS if k not in ("nc4_train_means",)), NAN)


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_identical_features_dead_layer(value):
    """Every class mean coincides and nothing varies: only the norms are defined."""
    x, y = _identical(value)
    expected = {**ALL_UNDEFINED, "feature_norm": 3.0 * value, "class_mean_norm": 0.0}
    got = collapse_metrics(x, y, W3, ood_mean=torch.ones(4, dtype=torch.float64))
    _check(got, expected)  # nc4 NaN: no nearest centre when all means coincide
    m = _stream(x, y).moments()
    ood = torch.zeros(4)
    _check(
        metrics_from_moments(m, W3, ood_mean=ood), {k: v for k, v in expected.items() if k != "nc4"}
    )
    q = class_quantities(m)
    assert q["class_var"].tolist() == [0.0, 0.0, 0.0]
    assert q["cdnv_matrix"].isnan().all() and q["cosine_matrix"].isnan().all()


def test_coinciding_means_with_spread():
    """Means all equal to v, within-class deviations +-e_k: V_k = ||e_k||^2, ratios NaN."""
    v = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    e = torch.tensor([[0.1, 0, 0, 0], [0, 0.2, 0, 0], [0, 0, 0.3, 0]], dtype=torch.float64)
    x = torch.cat([v + e, v - e])  # rows: classes 0, 1, 2, 0, 1, 2
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    stats = _stream(x, y)
    norms = [math.sqrt(1.1**2 + 1), math.sqrt(0.9**2 + 1), math.sqrt(1 + 1.2**2)]
    norms += [math.sqrt(1 + 0.8**2), math.sqrt(2 + 0.09), math.sqrt(2 + 0.09)]
    expected = {k: NAN for k in ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc2_equinorm", "gnc2_log")}
    expected |= {"nc2_equiangle": NAN, "nc2_maxangle": NAN, "class_mean_norm": 0.0}
    expected["feature_norm"] = sum(norms) / 6
    _check(stats.compute(), expected)
    q = class_quantities(stats.moments())
    torch.testing.assert_close(q["class_var"], torch.tensor([0.01, 0.04, 0.09]).double())
    assert q["cdnv_matrix"].isnan().all()


def _two_coincide():
    """Means a, a, b with a = (1, 0, 0, 0), b = (-2, 0, 0, 0) (so mu_c = 0), two samples per
    class: class 0 a +- (0.1, 0, 0, 0), class 1 a +- (0, 0.2, 0, 0), class 2 b +- (0.3, ...)."""
    a = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    b = torch.tensor([-2.0, 0, 0, 0], dtype=torch.float64)
    e = torch.tensor([[0.1, 0, 0, 0], [0, 0.2, 0, 0], [0.3, 0, 0, 0]], dtype=torch.float64)
    mu = torch.stack([a, a, b])
    return torch.cat([mu + e, mu - e]), torch.tensor([0, 1, 2, 0, 1, 2])


def test_two_coinciding_means_hand_computed():
    x, y = _two_coincide()
    got = collapse_metrics(x, y, W3, predictions=y, ood_mean=torch.tensor([1.0, 1, 0, 0]))
    p, q = 1 / math.sqrt(3), 1 / math.sqrt(6)
    expected = {
        # Sigma_B = (2/9) D^2 u u^T (D = 3, u = e_1); u^T Sigma_W u = (2 * 0.01 + 2 * 0.09) / 6
        "nc1": (1 / 3) * (9 / (2 * 9)) * (0.2 / 6),
        "nc1_tilde": (0.28 / 6) / 2.0,  # Tr Sigma_W / Tr Sigma_B
        "cdnv": NAN,  # classes 0 and 1 have the same mean
        "nc2_etf": math.sqrt(2 - math.sqrt(2)),  # rank-1 Gram (1, 1, -2) against the ETF
        "nc2_equinorm": math.sqrt(3) / 4,  # norms r, r, 2r: std sqrt(1/3) r, mean 4r/3
        "nc2_equiangle": math.sqrt(16 / 15),  # cosines 1, -1, -1 (each twice)
        "nc2_maxangle": 1.5,  # |1 + 1/2|
        "gnc2_log": NAN,  # u_0 = u_1: log(1/0)
        "nc3": math.sqrt((p - q) ** 2 + 0.5 + (2 * q - p) ** 2),
        "unc3": 1 / 3,  # cos(w_k, mu_k - mu_c) = 1, 0, 1
        "nc4": 2 / 6,  # class 1's samples: NCC tie with class 0 goes to the lower index
        "nc5": 1 / math.sqrt(2),  # |cos((+-1, 0, 0, 0), (1, 1, 0, 0))|
        "feature_norm": (1.1 + 0.9 + 2 * math.sqrt(1.04) + 2.3 + 1.7) / 6,
        "class_mean_norm": (1 + 1 + 2) / 3,
    }
    _check(got, expected)
    quantities = class_quantities(_stream(x, y).moments())
    cos = torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    torch.testing.assert_close(quantities["cosine_matrix"], cos)
    v = torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64)
    cdnv = torch.tensor(
        [[NAN, NAN, (v[0] + v[2]) / 18], [NAN, NAN, (v[1] + v[2]) / 18], [0, 0, NAN]]
    ).double()
    cdnv[2, :2] = cdnv[:2, 2]
    torch.testing.assert_close(quantities["cdnv_matrix"], cdnv, equal_nan=True)


def test_a_class_mean_at_the_centre():
    """Means -v, 0, v: the middle centred mean is 0, so its cosines are undefined."""
    v = torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    mu = torch.stack([-v, 0 * v, v])
    e = 0.1 * torch.eye(4, dtype=torch.float64)[:3]
    x, y = torch.cat([mu + e, mu - e]), torch.tensor([0, 1, 2, 0, 1, 2])
    got = metrics_from_moments(_stream(x, y).moments(), W3, ood_mean=torch.ones(4))
    assert got["nc2_etf"] == pytest.approx(math.sqrt(2 - math.sqrt(2)), rel=1e-12)
    assert got["nc2_equinorm"] == pytest.approx(math.sqrt(3) / 2, rel=1e-12)  # norms r, 0, r
    assert got["class_mean_norm"] == pytest.approx(4 / 3, rel=1e-12)
    for key in ("nc2_equiangle", "nc2_maxangle", "gnc2_log", "unc3", "nc5"):
        assert math.isnan(got[key]), key
    assert math.isfinite(got["nc1"]) and math.isfinite(got["nc3"])
    cos = class_quantities(_stream(x, y).moments())["cosine_matrix"]
    assert cos[1].isnan().all() and cos[:, 1].isnan().all()
    assert cos[0, 2] == pytest.approx(-1.0, abs=1e-15)


def test_one_class_present_and_two_classes():
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)
    one = _stream(x, torch.tensor([1, 1]), K=3).compute()
    expected = dict.fromkeys(("nc1", "nc1_tilde", "cdnv", "gnc2_log"), NAN)
    expected |= dict.fromkeys(("nc2_etf", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle"), NAN)
    expected |= {"feature_norm": (math.sqrt(5) + math.sqrt(13)) / 2, "class_mean_norm": 0.0}
    _check(one, expected)
    # K = 2: one pair, so gnc2_log and the angle spreads are 0; ETF distance 0
    two = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 0.0], [4.0, 2.0]], dtype=torch.float64)
    got = _stream(two, torch.tensor([0, 0, 1, 1]), K=2).compute()
    for key in ("gnc2_log", "nc2_etf", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle"):
        assert float(got[key]) == pytest.approx(0.0, abs=1e-12), key
    assert float(got["cdnv"]) == pytest.approx((1 + 1) / (2 * 9))  # V_k = 1, ||mu_0 - mu_1|| = 3


def test_zero_classifier_rows():
    x, y = _two_coincide()
    m = _stream(x, y).moments()
    w = W3.clone()
    w[1] = 0
    got = metrics_from_moments(m, w)
    assert math.isnan(got["unc3"]) and math.isfinite(got["nc3"])
    assert all(math.isnan(v) for k, v in metrics_from_moments(m, 0 * W3).items() if "nc3" in k)


def test_ncc_mismatch_on_a_dead_layer():
    x, y = _identical(2.0)
    ncc = NCCMismatch(_stream(x, y).moments())
    ncc.update(x, y)
    assert ncc.compute().isnan()
