"""Cost at CIFAR-100 and ImageNet sizes against same-process baselines (issue 18).

Run: ``python benchmarks/scale.py [--only NAME] [--quick] [--threads 1]``. Each case prints one
line ``case, measured, baseline unit, ratio, target, PASS/FAIL``: the measured time divided by
the median time of its baseline operation, timed in the same process, interleaved with the
measured runs (before and after), so a loaded machine moves both.

Cases (``CASES``; ``--only`` takes a case name or a comma-separated list):

* ``fit_pair_512_100``, ``fit_pair_2048_1000``, ``fit_pair_4096_100``: one
  :func:`~nclightning.perturbation.fit_pair` (default normalisation, default coupling range,
  no ``near``) on synthetic class moments of that width ``d`` and class count ``K``, in units
  of one float64 ``torch.linalg.inv`` of a ``d x d`` SPD matrix. Targets 100, 60, 60.

``--quick`` runs only the smallest fit case (d=512, K=100) and one repeat. ``--cap S`` stops a
measured run after ``S`` seconds (default 900): the line then reads ``> S`` and FAIL when
``S`` is already over the target.

Synthetic ``H0``: Gaussian class means (``||mu_k|| ~ 3``) and a within-class scatter with a
``1/j`` spectrum in a random basis (``Tr Sigma_W ~ Tr Sigma_B``: ``nc1_tilde ~ 1``), 50
samples per class; ``H`` has the same means and counts, its within-class spread shrunk
anisotropically (a partially collapsed later layer, ``nc1_tilde`` about a third of ``H0``'s).
Only moments are built (no features): the fit's cost does not depend on ``N``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nclightning.metrics import ClassMoments
from nclightning.perturbation import fit_pair

LAMBDA_W = LAMBDA_H = 5e-4
PER_CLASS = 50
CAP_S = 900.0  # --cap: seconds one measured run may take


class Capped(Exception):
    """A measured run passed ``CAP_S`` seconds."""


@dataclass
class Outcome:
    """One measured case: ``ratio = measured / unit`` against ``target``."""

    case: str
    measured: float
    unit_name: str
    unit: float
    target: float
    detail: str = ""

    capped: bool = False  # measured is the cap: the run did not finish

    @property
    def ratio(self) -> float:
        return self.measured / self.unit

    @property
    def passed(self) -> bool:
        return not self.capped and self.ratio <= self.target

    def line(self) -> str:
        more = "> " if self.capped else ""
        return (
            f"{self.case}, {more}{self.measured:.3f} s, {self.unit_name} = {self.unit:.4f} s, "
            f"{more}{self.ratio:.1f}, <= {self.target:g}, {'PASS' if self.passed else 'FAIL'}"
        )


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _capped(fn: Callable[[], object]) -> tuple[float, object]:
    """``_timed(fn)``, or ``(CAP_S, None)`` when it runs longer than ``CAP_S`` seconds."""

    def stop(*_):
        raise Capped

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, CAP_S)
    try:
        return _timed(fn)
    except Capped:
        return CAP_S, None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def interleaved(measure: Callable[[], object], unit: Callable[[], object], repeats: int):
    """``(median measured s, median unit s, last output)``: unit runs before and after each;
    the output is ``None`` when a run passed ``CAP_S`` (no further repeats then)."""
    unit()  # warm-up
    units, times, out = [_timed(unit)[0]], [], None
    for _ in range(repeats):
        t, out = _capped(measure)
        times.append(t)
        units.append(_timed(unit)[0])
        units.append(_timed(unit)[0])
        if out is None:
            return t, statistics.median(units), None
    return statistics.median(times), statistics.median(units), out


# -- fit_pair -----------------------------------------------------------------------------------
def synthetic_pair(d: int, K: int, seed: int = 0) -> tuple[ClassMoments, ClassMoments]:
    """``(H0, H)`` moments (module docstring), built in ``O(d^3)`` without features."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    N = K * PER_CLASS
    counts = torch.full((K,), float(PER_CLASS), dtype=f64)
    means = 3.0 * torch.randn(K, d, generator=g, dtype=f64) / math.sqrt(d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=f64))
    spec = 1.0 / torch.arange(1, d + 1, dtype=f64)
    spec *= 9.0 / float(spec.sum())  # Tr Sigma_W ~ 9 ~ Tr Sigma_B
    share = 1.0 + 0.2 * torch.rand(K, generator=g, dtype=f64)  # unequal class variances

    def moments(spectrum: torch.Tensor) -> ClassMoments:
        scatter = (q * (N * spectrum)) @ q.T
        scatter = 0.5 * (scatter + scatter.T)
        class_ss = float(scatter.trace()) * share / float(share.sum())
        return ClassMoments(counts.clone(), means.clone(), scatter, class_ss)

    # H: the leading within-class directions shrink most (partial collapse)
    shrink = 0.3 + 0.4 * torch.linspace(0.0, 1.0, d, dtype=f64)
    return moments(spec), moments(spec * shrink.square())


def fit_case(d: int, K: int, target: float, repeats: int) -> Outcome:
    """One ``fit_pair`` at ``(d, K)`` in units of one ``d x d`` float64 SPD inverse."""
    m0, m = synthetic_pair(d, K)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    spd = a @ a.T / d + torch.eye(d, dtype=torch.float64)

    def fit():
        return fit_pair(m0, m, lambda_W=LAMBDA_W, lambda_H=LAMBDA_H)

    med, unit, res = interleaved(fit, lambda: torch.linalg.inv(spd), repeats)
    name, unit_name = f"fit_pair d={d} K={K}", f"inv({d}x{d}) f64"
    if res is None:
        return Outcome(name, med, unit_name, unit, target, f"stopped at {CAP_S:g} s", True)
    s = res.solve
    detail = (
        f"status={res.status} coupling={res.coupling:.10g} converged={res.converged} "
        f"final solve: {s.iterations} Newton, {s.hessian_products} hvp"
    )
    return Outcome(name, med, unit_name, unit, target, detail)


def case_fit_pair_512_100(quick: bool) -> Outcome:
    return fit_case(512, 100, 100, 1 if quick else 3)


def case_fit_pair_2048_1000(quick: bool) -> Outcome:
    return fit_case(2048, 1000, 60, 1)


def case_fit_pair_4096_100(quick: bool) -> Outcome:
    return fit_case(4096, 100, 60, 1)


CASES: dict[str, Callable[[bool], Outcome]] = {
    "fit_pair_512_100": case_fit_pair_512_100,
    "fit_pair_2048_1000": case_fit_pair_2048_1000,
    "fit_pair_4096_100": case_fit_pair_4096_100,
}
QUICK = ("fit_pair_512_100",)


def _statistics_cases() -> dict[str, Callable[[bool], bool]]:
    """The cases of ``scale_statistics.py`` (ClassStatistics, K=32768, MLP probe); each prints
    its own line with its ratio and target and returns whether it met the target."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import scale_statistics as stats

    def wrap(case: Callable[[], bool]) -> Callable[[bool], bool]:
        def run(quick: bool) -> bool:
            stats.QUICK = quick
            return case()

        return run

    return {c.__name__.removeprefix("case_"): wrap(c) for c in stats.CASES}


def _set_cap(seconds: float) -> None:
    global CAP_S
    CAP_S = float(seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="case name(s), comma separated")
    ap.add_argument("--quick", action="store_true", help="the smallest cases, one repeat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cap", type=float, default=CAP_S, help="seconds per measured run")
    args = ap.parse_args(argv)
    _set_cap(args.cap)
    lines = _statistics_cases()
    names = [n for n in args.only.split(",") if n] or [
        *(QUICK if args.quick else CASES),
        *lines,
    ]
    unknown = [n for n in names if n not in CASES and n not in lines]
    if unknown:
        print(f"unknown case(s) {unknown}: choose from {[*CASES, *lines]}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"loadavg at start {os.getloadavg()[0]:.2f}"
    )
    print("case, measured, baseline unit, ratio, target, PASS/FAIL")
    failed = 0
    for name in names:
        if name in lines:  # prints its own line (ratio and target)
            failed += not lines[name](args.quick)
            continue
        out = CASES[name](args.quick)
        print(out.line(), flush=True)
        if out.detail:
            print(f"  ({out.detail})", flush=True)
        failed += not out.passed
    print(f"loadavg at end {os.getloadavg()[0]:.2f}; {failed} of {len(names)} case(s) FAIL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
