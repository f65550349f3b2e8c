"""ClassStatistics relies on torchmetrics' public API, within the version range it declares.

The installed torchmetrics satisfies pyproject's bound (lower and upper); the statistics
read no private torchmetrics member (``_defaults``, ``_computed``, ``_to_sync``...), and the
behaviours those members once served hold through public calls: ``.to(half)`` and
``set_dtype`` keep the float64 state, a classifier set after ``compute`` is used by the next
``compute``, and ``merge_state`` is exact.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import tomllib
import torch
from packaging.requirements import Requirement

from nclightning.metrics import ClassMoments, ClassStatistics

ROOT = Path(__file__).parents[2]


def test_installed_torchmetrics_within_the_declared_bounds():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "torchmetrics"]
    ops = {s.operator for s in req.specifier}
    assert ">=" in ops and "<" in ops, req  # a lower and an upper bound
    assert req.specifier.contains(version("torchmetrics")), (req, version("torchmetrics"))


def test_no_private_torchmetrics_member_is_read():
    private = re.compile(r"\._(defaults|computed|to_sync|should_unsync|cache|update_count)\b")
    for name in ("statistics.py", "state.py", "accumulate.py"):
        text = (ROOT / "nclightning" / "metrics" / name).read_text()
        assert not private.search(text), (name, private.search(text))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(4).repeat(30)
    return 3 * torch.eye(4, 6)[y] + 0.1 * torch.randn(120, 6, generator=g), y


def test_public_behaviours_without_private_members():
    x, y = _data()
    exact = ClassMoments.from_features(x, y, 4)
    stats = ClassStatistics(4, 6, compute_dtype=torch.float64)
    stats.update(x[:50], y[:50])
    stats = stats.to(torch.float16)
    stats.set_dtype(torch.float16)
    assert stats.packed.dtype == torch.float64
    stats.update(x[50:], y[50:])
    first = stats.compute()
    assert "nc3" not in first
    stats.set_classifier(torch.randn(4, 6, dtype=torch.float64))
    assert "nc3" in stats.compute()  # never a cached result
    torch.testing.assert_close(stats.moments().scatter, exact.scatter, rtol=1e-12, atol=1e-12)
    a = ClassStatistics(4, 6, compute_dtype=torch.float64)
    b = ClassStatistics(4, 6, compute_dtype=torch.float64)
    a.update(x[:70], y[:70])
    b.update(x[70:], y[70:])
    a.merge_state(b)
    torch.testing.assert_close(a.moments().scatter, exact.scatter, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.moments().means, exact.means, rtol=1e-13, atol=1e-13)
