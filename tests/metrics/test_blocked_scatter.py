"""The blocked symmetric scatter product (``d >= 2 QBLOCK``, accumulate.py) against a float64
two-pass reference: the full symmetric scatter, ragged last block included, any batching."""

from __future__ import annotations

import torch

from nclightning.metrics import ClassMoments, ClassStatistics
from nclightning.metrics.accumulate import QBLOCK


def test_blocked_scatter_matches_float64_two_pass_reference():
    d, K, N = 2 * QBLOCK + 77, 5, 1500  # three column blocks, the last one ragged
    g = torch.Generator().manual_seed(3)
    mu = 10 * torch.randn(K, d, generator=g, dtype=torch.float64) / d**0.5
    y = torch.randint(0, K, (N,), generator=g)
    h = (mu[y] + 0.01 * torch.randn(N, d, generator=g, dtype=torch.float64)).float()
    ref = ClassMoments.from_features(h.double(), y, K)
    assert ref.scatter is not None
    for sizes in ([N], [1, 700, 799]):
        stats = ClassStatistics(K, d)
        for hb, yb in zip(h.split(sizes), y.split(sizes)):
            stats.update(hb, yb)
        m = stats.moments()
        assert m.scatter is not None
        assert torch.equal(m.scatter, m.scatter.T)
        err = (m.scatter - ref.scatter).abs().max() / ref.scatter.abs().max()
        assert err < 1e-5, (sizes, float(err))
        assert torch.allclose(m.means, ref.means, rtol=0, atol=1e-9 * float(mu.abs().max()))
        stats.reset()
        assert not bool(stats.packed.any()) and stats.packed.numel() == stats._layout.size


def test_reset_restores_a_given_shift():
    shift = torch.arange(12.0).reshape(3, 4)
    stats = ClassStatistics(3, 4, shift=shift)
    stats.update(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    stats.reset()
    again = ClassStatistics(3, 4, shift=shift)
    assert torch.equal(stats.packed, again.packed)
