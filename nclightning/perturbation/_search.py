"""The search for the ``beta`` whose minimiser of Eq. 2 reproduces a measured metric.

Owns the root search shared by :func:`~nclightning.perturbation.fit_beta` and
:func:`~nclightning.perturbation.fit_pair` (docs/science.md §7, §10). The documented root:

* **the largest** ``beta`` of the range (the smallest perturbation of ``H0``) at which the
  metric of the global minimiser crosses the target: the grid ``10^(k / points_per_decade)``
  inside ``[lo, hi]`` (plus both ends) is scanned from ``hi`` down and the first sign change is
  refined (Brent's method in ``log beta`` to ``rtol``). ``beta -> metric`` is not always
  monotone, so a lower crossing may exist; it is not the one reported. Two crossings closer
  than one grid step can be missed (the grid is the resolution of "largest").
* when the whole range lies on one side of the target the target is *unreachable* in the
  range: the evaluated point closest to it is reported.
* ``near`` (a previous root) is the first point tried inside the final bracket: it saves
  evaluations, never changes which bracket is refined, so the root is the same to ``rtol``.

**Local-minimum guard.** Eq. 2 is not convex; a chain of warm starts along ``beta`` can stay on
a branch of local minima after it stopped being global. The scan warm-starts each grid point
from the previous one; the two grid points that bracket the first crossing are then solved
again from the ridge start, and if either finds a lower minimum the whole scan is repeated
with both starts at every grid point (the lower objective kept; ``Solver.branches`` counts
the points where the starts disagreed). Refinement points start from the nearer end of the
bracket, and the root is checked once more against a ridge start. Where two branches
exchange global optimality inside the bracket the metric of the global minimiser jumps: the
search then ends at the jump and reports it (``jump``) instead of a root.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from nclightning.perturbation._model import Model
from nclightning.perturbation._newton import NewtonResult
from nclightning.perturbation._spectral import Spectrum
from nclightning.perturbation.solver import minimize_model

__all__ = ["Point", "RootSearch", "Solver"]

Metric = Callable[[Model, Tensor], float]

LOOSE_STEP = 1e-4
"""Newton step (relative to ``|W|``) that ends a loose solve: the metric is then right to about
that relative accuracy (a small gradient alone does not say it, see ``._newton``)."""
CLOSE = 0.02
"""A loose point within this relative distance of the target is solved again to ``tol``."""


@dataclass
class Point:
    """One evaluated ``beta``: the kept minimiser and its metric."""

    beta: float
    value: float
    model: Model
    result: NewtonResult
    cold: bool  # whether the ridge start was among the starts
    loose: bool = False  # solved to LOOSE_TOL only

    @property
    def W(self) -> Tensor:  # eigenbasis
        return self.result.x


class Solver:
    """Minimisers of Eq. 2 along ``beta`` for one ``H0`` (a :class:`Spectrum`), best of starts."""

    def __init__(
        self, spec: Spectrum, lambda_W: float, lambda_H: float, metric: Metric, tol: float
    ) -> None:
        self.spec, self.lw, self.lh, self.metric, self.tol = spec, lambda_W, lambda_H, metric, tol
        self.points: list[Point] = []
        self.branches = 0

    def predict(self, beta: float, prev: Point, before: Point | None) -> Tensor:
        """Warm start at ``beta``: ``prev``'s minimiser or its secant extrapolation in
        ``log beta`` through ``before``'s, whichever has the lower objective at ``beta``."""
        if before is None:
            return prev.W
        t = math.log(beta / prev.beta) / math.log(prev.beta / before.beta)
        guess = prev.W + t * (prev.W - before.W)
        model = Model(self.spec, self.lw, self.lh, beta)
        return guess if model.evaluate(guess).f < model.evaluate(prev.W).f else prev.W

    def at(self, beta: float, starts: list[Tensor | None], loose: bool = False) -> Point:
        """Solve at ``beta`` from every start (``None``: ridge); keep the lowest objective.

        ``loose``: to a Newton step of :data:`LOOSE_STEP` only, enough for the side of a target
        farther than :data:`CLOSE`, or to compare objectives (their error is quadratic).
        """
        model = Model(self.spec, self.lw, self.lh, beta)
        kw = dict(tol=max(self.tol, 1e-6), step_tol=LOOSE_STEP) if loose else dict(tol=self.tol)
        runs = [minimize_model(model, w, max_iter=200, **kw) for w in starts]
        best = min(runs, key=lambda r: (not r.converged, r.evaluation.f))
        fs = [r.evaluation.f for r in runs if r.converged]
        if fs and max(fs) - min(fs) > 1e-10 * abs(min(fs)):
            self.branches += 1
        cold = any(w is None for w in starts)
        point = Point(beta, self.metric(model, best.x), model, best, cold, loose)
        if not math.isfinite(point.value):
            raise ValueError(f"the fitted metric is not finite at beta={beta:g} ({point.value})")
        self.points.append(point)
        return point


@dataclass
class RootSearch:
    """Outcome of :meth:`find`; ``point`` is the reported ``beta`` (``None`` before a search)."""

    target: float
    lo: float
    hi: float
    points_per_decade: float = 1.0
    rtol: float = 1e-8
    max_evals: int = 60
    point: Point | None = None
    bracket: tuple[float, float] | None = None
    reachable: bool = False
    jump: bool = False
    history: list[tuple[float, float]] = field(default_factory=list)

    def grid(self) -> list[float]:
        """Descending ``hi, 10^(k/ppd) ..., lo`` (docs: module docstring)."""
        ppd = self.points_per_decade
        k_hi = math.floor(math.log10(self.hi) * ppd * (1 + 1e-12))
        k_lo = math.ceil(math.log10(self.lo) * ppd * (1 - 1e-12))
        inner = [10 ** (k / ppd) for k in range(k_hi, k_lo - 1, -1)]
        inner = [b for b in inner if self.lo < b < self.hi]
        return [self.hi, *inner, self.lo]

    def find(self, solver: Solver, near: float | None = None) -> RootSearch:
        """Scan from the top, check the bracket with cold starts, refine (module docstring)."""
        upper, lower = self._scan(solver, guard=False)
        if lower is not None and not self._agree_with_cold(solver, (upper, lower)):
            upper, lower = self._scan(solver, guard=True)
        if lower is not None:
            self.reachable = True
            self.point = lower if upper is None else self._refine(solver, lower, upper, near)
            if not self._agree_with_cold(solver, (self.point,)):
                # the refined branch is not the global one at the root: report the global one
                self.point = solver.at(self.point.beta, [solver.points[-1].W])
                self.jump = True
        self.history = [(p.beta, p.value) for p in solver.points]
        return self

    def _side(self, p: Point) -> bool:
        return p.value > self.target

    def _scan(self, solver: Solver, guard: bool) -> tuple[Point | None, Point | None]:
        """``(upper, lower)`` grid points around the first crossing from the top.

        Warm starts along the grid, plus the ridge start at every point when ``guard``.
        ``(None, None)`` when no grid point crosses (``self.point``: the closest one).
        """
        prev: Point | None = None
        before: Point | None = None
        for beta in self.grid():
            warm = None if prev is None else solver.predict(beta, prev, before)
            starts: list[Tensor | None] = (
                [None] if prev is None else [warm, None] if guard else [warm]
            )
            p = self._tight(solver, solver.at(beta, starts, loose=not guard))
            if p.value == self.target:
                return None, p
            if prev is not None and self._side(p) != self._side(prev):
                return self._tight(solver, prev, force=True), self._tight(solver, p, force=True)
            prev, before = p, prev
        self.point = min(solver.points, key=lambda q: abs(q.value - self.target))
        return None, None

    def _tight(self, solver: Solver, p: Point, force: bool = False) -> Point:
        """``p`` solved to ``tol`` if it was loose and close to the target (or ``force``)."""
        if p.loose and (force or abs(p.value - self.target) <= CLOSE * abs(self.target)):
            return solver.at(p.beta, [p.W])
        return p

    def _agree_with_cold(self, solver: Solver, points: Sequence[Point | None]) -> bool:
        """Whether ridge starts at ``points`` find no lower minimum (the guard).

        The ridge runs are loose: the objective's error is second order in the gradient's,
        far below the ``1e-9`` relative margin that counts as a lower minimum.
        """
        for p in points:
            if p is None or p.cold:
                continue
            q = solver.at(p.beta, [None], loose=True)
            if q.result.evaluation.f < p.result.evaluation.f - 1e-9 * abs(p.result.evaluation.f):
                return False
        return True

    def _refine(self, solver: Solver, lower: Point, upper: Point, near: float | None) -> Point:
        """Brent's method on ``x = log beta`` between two points on opposite sides."""
        f = {id(p): p.value - self.target for p in (lower, upper)}
        a, b, c = upper, lower, upper  # b: best so far, [b, c] brackets the crossing
        d = e = math.log(upper.beta) - math.log(lower.beta)
        xtol = 0.5 * math.log1p(self.rtol)
        trial = math.log(near) if near is not None and lower.beta < near < upper.beta else None
        for _ in range(self.max_evals):
            if (f[id(b)] > 0) == (f[id(c)] > 0):
                c, d = a, math.log(b.beta) - math.log(a.beta)
                e = d
            if abs(f[id(c)]) < abs(f[id(b)]):
                a, b, c = b, c, b
            xb, xm = math.log(b.beta), 0.5 * (math.log(c.beta) - math.log(b.beta))
            if abs(xm) <= xtol or abs(f[id(b)]) <= 1e-11 * abs(self.target):
                break
            d, e = _brent_step(a, b, c, f, xm, xtol, d, e)
            if trial is not None:
                d, trial = trial - xb, None
            a = b
            step = d if abs(d) > xtol else math.copysign(xtol, xm)
            x = xb + step  # warm start from the nearer end of the bracket
            b = solver.at(math.exp(x), [min((b, c), key=lambda p: abs(math.log(p.beta) - x)).W])
            f[id(b)] = b.value - self.target
        self.bracket = (min(b.beta, c.beta), max(b.beta, c.beta))
        tol = 1e-6 * abs(self.target)
        self.jump = abs(f[id(b)]) > tol and abs(f[id(c)]) > tol
        return b


def _brent_step(
    a: Point, b: Point, c: Point, f: dict[int, float], xm: float, xtol: float, d: float, e: float
) -> tuple[float, float]:
    """Brent's interpolation step ``(d, e)``: inverse quadratic / secant, else bisection."""
    fa, fb, fc = f[id(a)], f[id(b)], f[id(c)]
    if abs(e) < xtol or abs(fa) <= abs(fb):
        return xm, xm
    xa, xb = math.log(a.beta), math.log(b.beta)
    s = fb / fa
    if a is c:
        p, q = 2 * xm * s, 1 - s
    else:
        q, r = fa / fc, fb / fc
        p = s * (2 * xm * q * (q - r) - (xb - xa) * (r - 1))
        q = (q - 1) * (r - 1) * (s - 1)
    if p > 0:
        q = -q
    p = abs(p)
    if 2 * p < min(3 * xm * q - abs(xtol * q), abs(e * q)):
        return p / q, d
    return xm, xm
