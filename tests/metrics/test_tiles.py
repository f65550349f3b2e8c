"""Pairwise metrics in tiles (docs/science.md §1, §8): no ``[K, K]`` matrix for the scalars.

The tiled pass equals the textbook ``[K, K]`` formulas of ``conftest.py`` (numpy loops),
whatever the tile size (one row per tile, a few rows, everything at once), and a statistics
pass over K = 32768 classes at d = 768 (a language model's vocabulary) stays within 2 GB.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import run_json_script

from nclightning.metrics import ClassMoments, class_quantities
from nclightning.metrics.measures import PAIR_KEYS, pair_scalars, pairwise_sq_distances

K, D = 40, 24


@pytest.fixture(scope="module")
def data(ref):
    rng = np.random.default_rng(11)
    x, y = ref.collapsed_data(rng, 2000, D, K, 0.05)
    return x, y, ref.metrics(x, y, K), ClassMoments.from_features(torch.from_numpy(x), y_t(y), K)


def y_t(y):
    return torch.from_numpy(np.asarray(y))


@pytest.mark.parametrize("tile", [1, K, 7 * K, K * K, 1 << 19], ids=lambda t: f"tile{t}")
def test_tiled_pair_scalars_equal_the_untiled_formulas(data, ref, tile):
    _, _, expected, m = data
    got = pair_scalars(m, tile=tile)
    untiled = pair_scalars(m, tile=K * K)
    for key in PAIR_KEYS:
        assert ref.rel_err(got[key], expected[key]) <= 1e-10, (key, tile)
        assert ref.rel_err(got[key], untiled[key]) <= 1e-12, (key, tile)


def test_tiled_distances_and_class_matrices_equal_the_reference(data, ref):
    x, y, _, m = data
    c = m.means.double()
    brute = (c.unsqueeze(0) - c.unsqueeze(1)).square().sum(-1)  # [K, K, d]: fine at K = 40
    torch.testing.assert_close(pairwise_sq_distances(c), brute, rtol=1e-10, atol=1e-12)
    q, exp = class_quantities(m), ref.class_quantities(x, y, K)
    for key, value in exp.items():
        np.testing.assert_allclose(q[key].numpy(), value, rtol=1e-10, atol=1e-14)


def test_tiles_keep_the_nan_rules():
    """Two coinciding class means: cdnv and gnc2_log are NaN in every tiling, the rest not."""
    means = np.random.default_rng(5).standard_normal((6, 5))
    means[4] = means[1]
    m = ClassMoments(
        torch.full((6,), 3.0, dtype=torch.float64),
        torch.from_numpy(means),
        None,
        torch.ones(6, dtype=torch.float64),
    )
    for tile in (1, 6, 36):
        got = pair_scalars(m, tile=tile)
        assert np.isnan(got["cdnv"]) and np.isnan(got["gnc2_log"]), tile
        assert all(np.isfinite(got[k]) for k in ("nc2_etf", "nc2_equiangle", "nc2_maxangle"))


# The peak is the resident high-water mark (/proc/self/status VmHWM), reset to the resident
# size before the pass (/proc/self/clear_refs, Linux >= 4.0). Not ru_maxrss: a child starts
# with its parent's (pytest's) mark, which can hide a pass's whole peak.
_VOCAB = r"""
import json, sys, torch
torch.set_num_threads(1)
from nclightning.metrics import ClassStatistics, metrics_from_moments


def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key + ":"))


K, d, per = int(sys.argv[1]), int(sys.argv[2]), 2
g = torch.Generator().manual_seed(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status_mb("VmRSS")
stats = ClassStatistics(K, d, scatter="full")
for start in range(0, K, 4096):
    y = torch.arange(start, min(K, start + 4096)).repeat(per)
    angle = y.unsqueeze(1) * 0.37 + torch.arange(d)
    x = torch.randn(y.shape[0], d, generator=g) + 3 * torch.sin(angle)
    stats.update(x, y)
m = stats.moments()
values = metrics_from_moments(m)
var = m.class_ss / m.counts
ok = bool(torch.isfinite(var).all())
print(json.dumps({"grow_mb": status_mb("VmHWM") - base, "values": values, "var_ok": ok}))
"""


def _vocab_pass(K: int, d: int) -> dict:
    return dict(run_json_script(_VOCAB, K, d, timeout=1800))


def test_many_classes_pass_never_forms_a_class_by_class_matrix():
    """K = 4096 classes, two samples each, d = 16: every scalar finite and the process grows
    by less than one [K, K] float64 matrix (128 MiB) would take."""
    got = _vocab_pass(4096, 16)
    assert got["var_ok"]
    for key in ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc2_equiangle"):
        assert np.isfinite(got["values"][key]), key
    assert got["grow_mb"] < 128, got["grow_mb"]


@pytest.mark.slow
def test_vocabulary_sized_pass_within_2gb():
    """K = 32768 classes (two samples each): nc1, nc1_tilde, cdnv, nc2 and the per-class
    variances in one pass, the process growing by less than 2 GB, where one K x K float64
    matrix alone is 8 GB. d = 64 here (the pairwise pass is O(K^2 d): 30 s instead of 6
    minutes); ``python benchmarks/scale.py --only vocabulary`` runs d = 768."""
    got = _vocab_pass(32768, 64)
    assert got["var_ok"]
    for key in ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc2_equiangle", "nc2_maxangle"):
        assert np.isfinite(got["values"][key]), key
    assert got["grow_mb"] < 2048, got["grow_mb"]
