"""Scatter modes, fixed shifts and the span mode of ClassStatistics (docs/science.md §10).

``"full"``, ``"per_class"``, ``"none"`` and ``scatter_basis`` agree wherever they report the
same metric; the two-sweep pattern of a cached probe (exact means first, then the scatter
around them, projected on the span of the means) is exact in float32 when collapse is
strong; a fixed shift makes the merge a plain sum; misuse gets a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nclightning.errors import ConfigurationError
from nclightning.metrics import ClassMoments, ClassStatistics, metrics_from_moments
from nclightning.metrics.accumulate import Accumulator
from nclightning.metrics.formulas import nc1
from nclightning.metrics.state import Layout, state_moments

K, D = 6, 10


def _data(seed=0, spread=0.5, n=600):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(K), rng.integers(0, K, n - K)])
    mu = 4.0 * rng.standard_normal((K, D)) + 3.0
    x = mu[y] + spread * rng.standard_normal((n, D))
    return torch.from_numpy(x), torch.from_numpy(y)


def _stream(x, y, sizes=(37,), **options):
    stats = ClassStatistics(K, x.shape[1], **options)
    start, i = 0, 0
    while start < len(y):
        b = sizes[i % len(sizes)]
        stats.update(x[start : start + b], y[start : start + b])
        start, i = start + b, i + 1
    return stats


@pytest.mark.parametrize("shift", [False, True], ids=["own_shift", "fixed_shift"])
def test_modes_agree_with_the_full_scatter(ref, shift):
    x, y = _data()
    exact = ClassMoments.from_features(x, y, K)
    opts = {"compute_dtype": torch.float64, "shift": exact.means + 0.01 if shift else None}
    full = _stream(x, y, **opts).compute()
    expected = ref.metrics(x.numpy(), y.numpy(), K)
    for key in expected:
        assert ref.rel_err(float(full[key]), expected[key]) <= 1e-10, key
    for mode, extra in (
        ("per_class", {"scatter": "per_class"}),
        ("none", {"scatter": "none"}),
        ("span", {"scatter_basis": exact.mean_span()}),
    ):
        got = _stream(x, y, sizes=(50, 3), **opts, **extra).compute()
        assert set(got) == set(full) - ({"nc1"} if mode == "none" else set()), mode
        for key in got:
            assert ref.rel_err(float(got[key]), float(full[key])) <= 1e-10, (mode, key)


def test_span_scatter_is_the_projected_scatter():
    x, y = _data(1)
    exact = ClassMoments.from_features(x, y, K)
    basis = exact.mean_span()
    assert basis.shape == (D, K - 1)
    torch.testing.assert_close(basis.T @ basis, torch.eye(K - 1, dtype=torch.float64))
    mt = exact.centered_means
    assert torch.linalg.matrix_norm(mt - mt @ basis @ basis.T) < 1e-12 * torch.linalg.matrix_norm(
        mt
    )
    m = _stream(x, y, compute_dtype=torch.float64, scatter_basis=basis).moments()
    assert m.scatter is None and m.class_scatter is None
    torch.testing.assert_close(m.span_scatter, basis.T @ exact.scatter @ basis, rtol=1e-10, atol=0)
    u = torch.randn(3, K - 1, dtype=torch.float64) @ basis.T  # directions inside the span
    torch.testing.assert_close(
        m.within_quadratic(u), ((u @ exact.scatter) * u).sum(1), rtol=1e-10, atol=0
    )


def test_two_sweeps_of_a_cached_probe_are_exact_in_float32(ref):
    """Sweep 1: scatter="none" for the means; sweep 2: shift = those means, the scatter on
    their span (NC1) and the full per-class scatter (an H0 layer), float32 features with a
    within-class RMS deviation of 1e-5 of the mean norm, one large batch."""
    rng = np.random.default_rng(9)
    xn, yn = ref.collapsed_data(rng, 20_000, 128, K, 1e-5)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)
    first = _stream(x, y, sizes=(20_000,), scatter="none").moments()
    assert first.scatter is None and first.span_basis is None
    expected = ref.metrics(xn, yn, K)
    span = _stream(x, y, sizes=(4096,), shift=first.means, scatter_basis=first.mean_span())
    got = span.compute()
    for key in expected:
        assert ref.rel_err(float(got[key]), expected[key]) <= 1e-6, key
    per_class = _stream(x, y, sizes=(4096,), shift=first.means, scatter="per_class").moments()
    r = ref.moments(xn, yn, K)
    for k in range(K):
        dev = xn[yn == k].astype(np.float64) - r.means[k]
        want = dev.T @ dev
        err = np.linalg.norm(per_class.class_scatter[k].numpy() - want) / np.linalg.norm(want)
        assert err <= 1e-6, k


def test_fixed_shift_merge_is_a_plain_sum():
    x, y = _data(2)
    shift = ClassMoments.from_features(x, y, K).means
    a = _stream(x[:250], y[:250], compute_dtype=torch.float64, shift=shift)
    b = _stream(x[250:], y[250:], compute_dtype=torch.float64, shift=shift)
    layout = Layout(K, D, "full")
    va = layout.views(a.metric_state["packed"].clone())
    vb = layout.views(b.metric_state["packed"])
    a.merge_state(b)
    merged = layout.views(a.metric_state["packed"])
    torch.testing.assert_close(merged["c"], va["c"], rtol=0, atol=0)
    for name in ("n", "t", "r", "a", "q"):
        torch.testing.assert_close(merged[name], va[name] + vb[name], rtol=0, atol=0)
    whole = _stream(x, y, compute_dtype=torch.float64).moments()
    torch.testing.assert_close(a.moments().scatter, whole.scatter, rtol=1e-12, atol=1e-12)


def test_shifts_are_stored_as_used_and_means_stay_exact():
    """A float64 shift is rounded to float32 (the precision deviations are formed in), so
    ``mu = c + t / n`` is exact: the means match the float64 two-pass means."""
    x, y = _data(3, spread=1e-4)
    x32 = x.float()
    exact = ClassMoments.from_features(x32, y, K)
    m = _stream(x32, y, shift=exact.means).moments()
    torch.testing.assert_close(m.means, exact.means, rtol=1e-13, atol=0)


def test_accelerator_path_without_host_checks(ref):
    """The masked, synchronisation-free shift update (what runs on accelerators) on CPU:
    exact in float64 and within 1e-6 in float32 for singleton batches then one large one."""
    x, y = _data(4)
    for host_checks in (True, False):
        layout = Layout(K, D, "full")
        packed = torch.zeros(layout.size, dtype=torch.float64)
        views = layout.views(packed)
        acc = Accumulator(layout, None, torch.float64, False, host_checks=host_checks)
        for xb, yb in zip(x.split(13), y.split(13)):
            acc.add(packed, xb, yb, torch.float64)
        got = metrics_from_moments(state_moments(views, layout))
        for key, value in ref.metrics(x.numpy(), y.numpy(), K).items():
            assert ref.rel_err(got[key], value) <= 1e-10, (host_checks, key)
    rng = np.random.default_rng(10)
    xn, yn = ref.collapsed_data(rng, 20_000, 64, K, 1e-5)
    layout = Layout(K, 64, "full")
    packed = torch.zeros(layout.size, dtype=torch.float64)
    views = layout.views(packed)
    acc = Accumulator(layout, None, torch.float32, False, host_checks=False)
    xt, yt = torch.from_numpy(xn), torch.from_numpy(yn)
    for i in range(50):
        acc.add(packed, xt[i : i + 1], yt[i : i + 1], torch.float32)
    acc.add(packed, xt[50:], yt[50:], torch.float32)
    assert ref.rel_err(nc1(state_moments(views, layout)), ref.metrics(xn, yn, K)["nc1"]) <= 1e-6


def test_mode_validation_errors():
    with pytest.raises(ConfigurationError, match="scatter must be"):
        ClassStatistics(3, 4, scatter="diagonal")
    with pytest.raises(ConfigurationError, match="span mode"):
        ClassStatistics(3, 4, scatter="per_class", scatter_basis=torch.eye(4)[:, :2])
    with pytest.raises(ConfigurationError, match="needs scatter_basis"):
        ClassStatistics(3, 4, scatter="span")
    with pytest.raises(ConfigurationError, match="orthonormal"):
        ClassStatistics(3, 4, scatter_basis=2 * torch.eye(4)[:, :2])
    with pytest.raises(ConfigurationError, match=r"\[d, r\]"):
        ClassStatistics(3, 4, scatter_basis=torch.eye(5)[:, :2])
    with pytest.raises(ConfigurationError, match="shift must be"):
        ClassStatistics(3, 4, shift=torch.zeros(3, 5))
    with pytest.raises(ConfigurationError, match="shift must be"):
        ClassStatistics(3, 4, shift=torch.full((3, 4), float("nan")))
    assert ClassStatistics(3, 4, per_class_scatter=True).scatter_mode == "per_class"


def test_missing_scatter_errors_name_the_fix():
    x, y = _data(5)
    none = _stream(x, y, scatter="none").moments()
    for what in (lambda m: m.sigma_w, lambda m: m.gram, lambda m: nc1(m)):
        with pytest.raises(ConfigurationError, match="scatter='full'"):
            what(none)
    other = ClassMoments.from_features(*_data(6), K)
    wrong = _stream(x, y, scatter_basis=other.mean_span()).moments()
    with pytest.raises(ConfigurationError, match="span of span_basis"):
        nc1(wrong)
    outside = torch.zeros(1, D, dtype=torch.float64)
    outside[0, 0] = 1.0
    with pytest.raises(ConfigurationError, match="outside the span"):
        _stream(x, y, scatter_basis=other.mean_span()[:, :2]).moments().within_quadratic(outside)
    with pytest.raises(ValueError, match="go together"):
        ClassMoments(none.counts, none.means, None, none.class_ss, span_basis=torch.eye(D))


def test_pad_keeps_the_span_mode():
    x, y = _data(7)
    exact = ClassMoments.from_features(x, y, K)
    m = _stream(x, y, compute_dtype=torch.float64, scatter_basis=exact.mean_span()).moments()
    padded = m.pad(D + 3)
    assert padded.span_basis.shape == (D + 3, K - 1) and padded.scatter is None
    assert nc1(padded) == pytest.approx(nc1(exact), rel=1e-10)
