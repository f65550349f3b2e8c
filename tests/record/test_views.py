"""``record.views``: series, pair fits, zero training error, per-class quantities of snapshots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import runbuild as rb
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from runbuild import floats

from nclightning.metrics import ClassMoments
from nclightning.record import history, keys, views


@pytest.fixture(scope="module")
def rows():
    return floats(rb.training_rows(6, probes=("train", "val")))


def test_probes_layers_and_series(rows):
    x = history.completed_epochs(rows)
    assert views.probes(rows) == ["train", "val"]
    hist = views.layer_history(rows, "train", x)
    assert list(hist) == list(rb.LAYERS)  # header order is alphabetical: depth order restored
    want = [(float(e), rb.value("train", "blocks.0", "cdnv", e)) for e in range(7)]
    assert hist["blocks.0"]["cdnv"] == want
    assert "nc3" in hist["penultimate"] and "nc3" not in hist["h0"]
    assert views.metric_names(hist) == list(rb.METRICS)
    assert list(views.layer_history(rows, "train", x, ["penultimate", "h0"])) == [
        "penultimate",
        "h0",
    ]
    assert views.last_values(hist)["h0"]["nc1"] == rb.value("train", "h0", "nc1", 6)
    held_out = views.layer_history(rows, "val")  # x = epochs_trained by default
    assert held_out["penultimate"]["nc4_train_means"][0] == (0.0, 0.8)


def test_learning_rate_and_zero_training_error(rows):
    x = history.completed_epochs(rows)
    assert views.lr_series(rows, x) == {"lr-SGD": [(float(e), rb.lr(e)) for e in range(6)]}
    assert views.zero_error_epoch(rows, x) == (4.0, "nc-train/accuracy")
    # without a train probe, Lightning's train/acc (epoch e at e + 1 completed epochs)
    lightning_only = [r for r in rows if keys.EPOCHS_TRAINED not in r]
    x2 = history.completed_epochs(lightning_only)
    assert views.zero_error_epoch(lightning_only, x2) == (4.0, "train/acc")
    never = [{**r, "nc-train/accuracy": 0.5} if "nc-train/accuracy" in r else r for r in rows]
    assert views.zero_error_epoch(never, x) is None  # the probe decides when it is logged
    assert views.zero_error_epoch(rows[:3], x[:3]) is None


def test_pair_view_at_the_last_fitted_epoch(rows):
    x = history.completed_epochs(rows)
    assert views.pair_names(rows, "train") == [rb.PAIR] and views.pair_names(rows, "val") == []
    view = views.pair_view(rows, "train", rb.PAIR, x)
    assert view.epoch == 6.0
    for m in ("nc1", "cdnv", "nc2_etf"):
        measured = rb.value("train", "penultimate", m, 6)
        assert view.measured_h[m] == measured and view.predicted[m] == 0.9 * measured
        assert view.measured_h0[m] == rb.value("train", "h0", m, 6)
        assert view.residuals[m] == pytest.approx(math.log10(0.9), abs=1e-15)
    assert "nc1_tilde" not in view.residuals  # the metric the coupling is fitted to
    assert view.measured_h0["norm_ratio"] == 1.0
    assert view.measured_h["norm_ratio"] == pytest.approx(1.2, rel=1e-14)
    assert view.coupling == [(float(e), rb.coupling(e)) for e in range(7)]
    assert view.status[0] == (0.0, "not_more_collapsed") and view.status[1] == (1.0, "fitted")
    assert [p for _, p in view.perturbative] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert views.pair_view(rows, "train", "h0->nowhere", x) is None


def test_pair_view_takes_baselines_and_skill_of_its_epoch_only(rows):
    """Baselines and skill at the view's epoch; a comparison logged at another epoch (here
    nc1_tilde, compared only while nothing was fitted) is not carried over; the measured norm
    ratio comes from its own key."""
    x = history.completed_epochs(rows)
    pk = lambda q: keys.pair_key("train", rb.PAIR, q)  # noqa: E731
    extra = {
        0.0: {pk("baseline/h0/nc1_tilde"): 0.3, pk("skill/nc1_tilde"): 0.1},
        6.0: {pk("baseline/h0/nc1"): 0.25, pk("baseline/ratio/nc1"): -0.5,
              pk("baseline/etf/cdnv"): 0.01, pk("skill/nc1"): -0.2,
              pk("measured/norm_ratio"): 1.7},
    }  # fmt: skip
    rows = [{**r, **extra.get(e, {})} if keys.EPOCHS_TRAINED in r else r for r, e in zip(rows, x)]
    view = views.pair_view(rows, "train", rb.PAIR, x)
    assert view.epoch == 6.0 and view.fitted == ("nc1_tilde",)
    assert view.baselines == {"h0": {"nc1": 0.25}, "ratio": {"nc1": -0.5}, "etf": {"cdnv": 0.01}}
    assert view.skill == {"nc1": -0.2}
    assert view.measured_h["norm_ratio"] == 1.7


def test_layerwise_depth_values_and_stages():
    rows = rb.layerwise_rows(3, 2)
    assert views.depth_values(rows, "train") == {
        "1": {"nc1": 0.49, "nc1_tilde": 1 / 3},
        "2": {"nc1": 0.24, "nc1_tilde": 1 / 9},
        "3": {"nc1": 2.0**-3 - 0.01, "nc1_tilde": 1 / 27},
    }
    stages = views.stage_history(rows, "train")
    assert list(stages) == ["depth 1", "depth 2", "depth 3"]
    assert stages["depth 2"]["nc1"] == [(2.0, 0.25), (3.0, 0.24)]
    assert views.depth_values(rows, "val") == {} and views.stage_history(rows[:0], "train") == {}


# ---------------------------------------------------------------------------------------------
# per-class quantities against a float64 brute force on raw features
# ---------------------------------------------------------------------------------------------


def brute_force(h: np.ndarray, y: np.ndarray, K: int):
    """Per-class V_k, pairwise CDNV and centred-mean cosines by loops over classes."""
    present = [k for k in range(K) if np.any(y == k)]
    mu = {k: h[y == k].mean(0) for k in present}
    var = np.full(K, np.nan)
    for k in present:
        var[k] = np.mean(np.sum((h[y == k] - mu[k]) ** 2, axis=1))
    centre = np.mean([mu[k] for k in present], axis=0)
    cdnv, cos = np.full((K, K), np.nan), np.full((K, K), np.nan)
    for k in present:
        for j in present:
            a, b = mu[k] - centre, mu[j] - centre
            cos[k, j] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            if k != j:
                cdnv[k, j] = (var[k] + var[j]) / (2 * np.sum((mu[k] - mu[j]) ** 2))
    return var, cdnv, cos


def moments_of(h: np.ndarray, y: np.ndarray, K: int) -> dict[str, torch.Tensor]:
    """Snapshot moments; an absent class has count 0, zero mean and zero sum of squares."""
    counts = np.bincount(y, minlength=K).astype(float)
    means = np.zeros((K, h.shape[1]))
    ss = np.zeros(K)
    for k in range(K):
        if counts[k]:
            means[k] = h[y == k].mean(0)
            ss[k] = np.sum((h[y == k] - means[k]) ** 2)
    return {
        "counts": torch.tensor(counts),
        "means": torch.tensor(means),
        "class_ss": torch.tensor(ss),
    }


@settings(max_examples=25, deadline=None)
@given(
    K=st.integers(2, 7),
    d=st.integers(2, 9),
    seed=st.integers(0, 10_000),
    absent=st.booleans(),
    spread=st.sampled_from([1.0, 1e-3]),
)
def test_per_class_quantities_match_a_brute_force(K, d, seed, absent, spread):
    g = np.random.default_rng(seed)
    n = g.integers(2, 12, size=K)  # imbalanced
    if absent and K > 2:
        n[K - 1] = 0
    y = np.repeat(np.arange(K), n)
    h = 5.0 * g.standard_normal((K, d))[y] + spread * g.standard_normal((len(y), d))
    got = views.per_class(moments_of(h, y, K))
    var, cdnv, cos = brute_force(h, y, K)
    np.testing.assert_allclose(got["class_var"], var, rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(got["cdnv_matrix"], cdnv, rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(got["cosine_matrix"], cos, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_per_class_of_a_simplex_etf_and_of_class_moments():
    K = 5
    means = torch.eye(K, dtype=torch.float64)  # centred: a simplex ETF
    layer = {"counts": torch.full((K,), 3.0), "means": means, "class_ss": torch.zeros(K)}
    q = views.per_class(layer)
    off = ~np.eye(K, dtype=bool)
    np.testing.assert_allclose(q["cosine_matrix"][off], -1 / (K - 1), rtol=1e-14)
    assert np.all(q["class_var"] == 0) and np.all(q["cdnv_matrix"][off] == 0)

    moments = ClassMoments(layer["counts"], means, None, layer["class_ss"])  # the callback's
    np.testing.assert_array_equal(views.per_class(moments)["class_var"], q["class_var"])
    with pytest.raises(ValueError, match="class_ss"):
        views.per_class({"counts": layer["counts"], "means": means})
