"""``ClassStatistics.compute()`` without a ``d x d`` copy of the scatter (docs/science.md §10).

With the full scatter, ``compute()`` takes nc1's quadratic forms ``u^T scatter u`` from the
packed state (``state_within_quadratic``), writes the eigenvectors of the between-class Gram
matrix over it (``_eigh_``) and makes the centred means again in blocks of rows for nc1: each
equals an independent float64 reference, and ``compute()`` grows the resident high-water
mark by less than the state's size (the path through the moments' scatter and means, and
every metric's own centred means, grew it by 1.8 to 2.3 times the state at these sizes;
``python benchmarks/scale_statistics.py --case case_statistics_memory`` checks the pass and
compute at N = 50,000, d = 2048, K = 1000).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import run_json_script

from nclightning.metrics import ClassStatistics
from nclightning.metrics.formulas import _eigh_
from nclightning.metrics.state import state_within_quadratic


def test_state_quadratic_forms_equal_the_two_pass_scatter(ref):
    """``u^T S u`` from the state (float64 batches, shifts from the data) against the
    float64 two-pass within-class scatter of the same features."""
    rng = np.random.default_rng(3)
    K, d = 7, 12
    x, y = ref.collapsed_data(rng, 900, d, K, 0.05)
    x = x.astype(np.float64)
    stats = ClassStatistics(K, d)
    for start in range(0, len(y), 128):
        stats.update(
            torch.from_numpy(x[start : start + 128]), torch.from_numpy(y[start : start + 128])
        )
    r = ref.moments(x, y, K)
    scatter = r.sigma_w * len(y)  # sum_k sum_i (h - mu_k)(h - mu_k)^T
    u = rng.standard_normal((300, d))  # more rows than one block of the quadratic forms
    expected = np.einsum("rd,de,re->r", u, scatter, u)
    views = stats._layout.views(stats.packed)
    got = state_within_quadratic(views, torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert state_within_quadratic(views, torch.zeros(0, d, dtype=torch.float64)).shape == (0,)


@pytest.mark.parametrize("absent", [False, True], ids=["all_present", "absent_classes"])
def test_compute_with_more_classes_than_a_block_equals_the_reference(ref, absent):
    """K' = 298 or 300 present classes (more than one block of 128 centred means) at
    d = 320 >= K': ``compute()`` equals the float64 two-pass reference."""
    rng = np.random.default_rng(8)
    K, d = 300, 320
    x, y = ref.collapsed_data(rng, 3000, d, K, 0.02)
    x = x.astype(np.float64)
    if absent:
        keep = (y != 7) & (y != 250)
        x, y = x[keep], y[keep]
    else:
        y[:K] = np.arange(K)  # every class present
    w = rng.standard_normal((K, d))
    stats = ClassStatistics(K, d, allow_missing_classes=True)
    stats.set_classifier(torch.from_numpy(w))
    for start in range(0, len(y), 700):
        part = slice(start, start + 700)
        stats.update(torch.from_numpy(x[part]), torch.from_numpy(y[part]))
    got = {k: float(v) for k, v in stats.compute().items()}
    expected = ref.metrics(x, y, K, w)
    for key, value in got.items():
        assert ref.rel_err(value, expected[key]) <= 1e-8, (key, value, expected[key])


def test_eigenvectors_written_over_the_gram_matrix():
    """Eigenvalues equal numpy's; the eigenvectors are orthonormal and rebuild the matrix."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 90, generator=g, dtype=torch.float64)
    gram = a @ a.T
    expected = np.linalg.eigvalsh(gram.numpy())
    lam, u = _eigh_(gram.clone())
    np.testing.assert_allclose(lam.numpy(), expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close((u * lam) @ u.T, gram, rtol=1e-12, atol=1e-9)


# The peak is the resident high-water mark (/proc/self/status VmHWM) reset to the resident
# size after the pass (/proc/self/clear_refs, Linux >= 4.0), as in test_tiles.py.
_COMPUTE = r"""
import json, sys, torch
torch.set_num_threads(1)
from nclightning.metrics import ClassStatistics


def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key + ":"))


K, d = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
warm = ClassStatistics(3, 8)  # loads the kernels and libraries compute uses
warm.update(torch.randn(6, 8), torch.arange(3).repeat(2))
warm.compute()
del warm
mu = 10 * torch.randn(K, d, generator=g)
stats = ClassStatistics(K, d)
for y in torch.arange(K).repeat(2).split(512):
    stats.update(mu[y] + 1e-3 * torch.randn(y.shape[0], d, generator=g), y)
del y
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status_mb("VmRSS")
values = {k: float(v) for k, v in stats.compute().items()}
print(json.dumps({"grow_mb": status_mb("VmHWM") - base, "values": values}))
"""


def test_compute_grows_memory_by_less_than_the_state():
    """K = 500, d = 1536 (state 29.7 MiB: the scatter 18 MiB, shifts and sums 11.7 MiB):
    compute() grows the high-water mark by less than the state (it measured 3.5 to 14 MiB,
    allocator-dependent; the path through ``moments()`` and ``metrics_from_moments``
    measured 53 to 68 MiB)."""
    K, d = 500, 1536
    got = run_json_script(_COMPUTE, K, d)
    state_mb = (K * (2 * d + 3) + d * d) * 8 / 2**20
    assert all(np.isfinite(v) for v in got["values"].values()), got["values"]
    assert got["grow_mb"] < state_mb, (got["grow_mb"], state_mb)
