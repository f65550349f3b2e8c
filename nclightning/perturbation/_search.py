"""The search for the ``beta`` whose minimiser of Eq. 2 reproduces a measured metric.

Owns the root search of :func:`~nclightning.perturbation.fit_pair` (docs/science.md §7, §10),
for any metric of ``H*`` it fits. The documented root:

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
from the previous one, and the refined root is solved again from the ridge start. When that
finds a lower minimum, the two grid points that bracket the crossing are solved from the ridge
start too, and if either finds a lower minimum the whole scan is repeated with both starts at
every grid point (the lower objective kept; ``Solver.branches`` counts the points where the
starts disagreed), then refined and checked again. Where the root's ridge start agrees, the
bracket ends are not checked (before 2026-12 they always were, at two ridge solves per fit,
about a quarter of a fit's cost at K=10; on the default job's 31 fits no coupling changed).
Refinement points start from the interpolation of the bracket's minimisers in ``log beta`` or
its nearer end, whichever has the lower objective. Where two branches exchange global
optimality inside the bracket the metric of the global minimiser jumps: the search then ends
at the jump and reports it (``jump``) instead of a root.

**Accuracy where it matters** (the cost, ``benchmarks/scale.py``). Every solve is only as
accurate as the decision it serves, and each finer one continues from the coarser minimiser
(nothing is solved twice): a scan point is solved *coarse* (Newton step :data:`COARSE_STEP`),
enough for its side of a target farther than :data:`SIDE`; *loose* (:data:`LOOSE_STEP`) within
:data:`SIDE` and for the ridge runs of the guard; to the solver's ``tol`` (and a Newton step of
:data:`TIGHT_STEP`) within :data:`CLOSE`. A warm start comes with its evaluation (the solve
does not repeat it), each solve tries the preconditioner the previous one chose first
(:mod:`._newton`), and the metric comes from the solve's last evaluation. Brent's method
brings ``log(value / target)`` to 0 (nearly linear in ``log beta`` where the metric follows a
power of ``beta``), so the refinement needs few points;
the reported point is always solved to ``tol``.
It stops when the bracket is narrower than ``rtol``, or when the secant through the last two
points solved to ``tol`` puts the root within half of that of the newest (no point is solved
only to confirm the bracket).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from torch import Tensor

from nclightning.perturbation._linesearch import Evaluation
from nclightning.perturbation._model import Model, State
from nclightning.perturbation._newton import Choice, NewtonResult
from nclightning.perturbation._spectral import Spectrum
from nclightning.perturbation.solver import minimize_model

__all__ = ["Point", "RootSearch", "Solver"]

Metric = Callable[[Model, State], float]

COARSE_STEP = 5e-2
"""Newton step (relative to ``|W|``) that ends a coarse solve: enough for the side of a target
farther than :data:`SIDE`. Measured on 160 random pairs (K 2-24, d 3-79, anisotropic H0) and
the default job's: the error of a coarse value is at most 0.14 of its distance to a target
farther than :data:`SIDE` (0.05 at a step of 1e-2, 0.30 at 1e-1; 1 would flip a side); 28%
fewer Hessian products than 1e-2 at d=512, K=100, 14% on the default job's fits."""
LOOSE_STEP = 1e-4
"""Newton step (relative to ``|W|``) that ends a loose solve: the metric is then right to about
that relative accuracy (a small gradient alone does not say it, see ``._newton``)."""
SIDE = 0.25
"""A coarse point within this relative distance of the target is continued to a loose solve."""
CLOSE = 0.002
"""A loose point within this relative distance of the target is continued to ``tol``: farther
out, Brent's next step from loose values is as good (0.02 solved 8% more Hessian products on
the default job's fits and at d=512, K=100)."""
TIGHT_STEP = 1e-9
"""Newton step (relative to ``|W|``) that ends a solve to the solver's ``tol`` (``"tight"``): the
error it leaves in ``W`` bounds that of the metric, hence of the root. At 1e-8 (before
2026-12-07) the default job's couplings were off by up to 2.3e-8 from a reference solved to
``tol=1e-13``, more than the search's ``rtol``; at 1e-9, by at most 2.7e-9 (+2.5% Hessian
products)."""
LEVELS = {"coarse": (1e-4, COARSE_STEP), "loose": (1e-6, LOOSE_STEP)}
"""``(largest tol, step_tol)`` of the solves short of ``tol`` (a ``"tight"`` solve)."""


@dataclass
class Point:
    """One evaluated ``beta``: the kept minimiser and its metric."""

    beta: float
    value: float
    model: Model
    result: NewtonResult
    cold: bool  # whether the ridge start was among the starts
    level: str = "tight"  # "coarse", "loose" (LEVELS) or "tight" (to the solver's tol)

    @property
    def loose(self) -> bool:
        return self.level != "tight"

    @property
    def W(self) -> Tensor:  # eigenbasis
        return self.result.x

    @property
    def state(self) -> State:  # of W, at beta
        return cast(State, self.result.evaluation.ctx)


class Solver:
    """Minimisers of Eq. 2 along ``beta`` for one ``H0`` (a :class:`Spectrum`), best of starts."""

    def __init__(
        self, spec: Spectrum, lambda_W: float, lambda_H: float, metric: Metric, tol: float
    ) -> None:
        self.spec, self.lw, self.lh, self.metric, self.tol = spec, lambda_W, lambda_H, metric, tol
        self.points: list[Point] = []
        self.branches = 0
        self.last: Choice | None = None  # the preconditioner the last solve ended with

    def predict(self, beta: float, prev: Point, before: Point | None) -> Tensor | Evaluation:
        """Warm start at ``beta``: ``prev``'s minimiser or its secant extrapolation in
        ``log beta`` through ``before``'s, whichever has the lower objective at ``beta`` (then
        with its evaluation there, which the solve starts from)."""
        if before is None:
            return prev.W
        t = math.log(beta / prev.beta) / math.log(prev.beta / before.beta)
        model = Model(self.spec, self.lw, self.lh, beta)
        return _better_start(model, prev.W + t * (prev.W - before.W), prev)

    def at(
        self,
        beta: float,
        starts: Sequence[Tensor | Evaluation | Point | None],
        level: str = "tight",
    ) -> Point:
        """Solve at ``beta`` from every start (``None``: ridge; a :class:`Point`: its minimiser,
        and its evaluation when at this ``beta``; an :class:`Evaluation` at this ``beta``,
        from :meth:`predict`); keep the lowest objective.

        ``level="loose"``: to a Newton step of :data:`LOOSE_STEP` only, enough for the side of a
        target farther than :data:`CLOSE`, or to compare objectives (their error is quadratic);
        ``"coarse"``: to :data:`COARSE_STEP`, enough for a side farther than :data:`SIDE`.
        """
        model = Model(self.spec, self.lw, self.lh, beta)
        tol, step = self.tol, TIGHT_STEP
        if level in LEVELS:
            tol, step = max(self.tol, LEVELS[level][0]), LEVELS[level][1]

        def run(w: Tensor | Evaluation | Point | None) -> NewtonResult:
            start: Tensor | None = None
            ev0: Evaluation | None = None
            if isinstance(w, Tensor):
                start = w
            elif isinstance(w, Point):
                start = w.W
                if w.beta == beta:  # continued: its evaluation is reused
                    ev0 = w.result.evaluation
            elif isinstance(w, Evaluation):
                start, ev0 = cast(State, w.ctx).W, w
            return minimize_model(
                model,
                start,
                tol=tol,
                step_tol=step,
                max_iter=200,
                ev0=ev0,
                last=self.last,
                rebuild=level != "coarse",
            )

        runs = [run(w) for w in starts]
        best = min(runs, key=lambda r: (not r.converged, r.evaluation.f))
        if best.choice is not None:
            self.last = best.choice
        fs = [r.evaluation.f for r in runs if r.converged]
        if fs and max(fs) - min(fs) > 1e-10 * abs(min(fs)):
            self.branches += 1
        cold = any(w is None for w in starts)
        point = Point(beta, self.metric(model, best.evaluation.ctx), model, best, cold, level)
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
        """Scan from the top, refine, check the root with a cold start; where that finds a
        lower minimum, check the bracket and rescan with both starts (module docstring)."""
        if solver.last is None:  # the scan starts at the top, where fixed-H is exact
            solver.last = Choice(Model.FIXED_H)
        upper, lower = self._scan(solver, guard=False)
        root = self._root(solver, upper, lower, near)
        if root is not None and not self._agree_with_cold(solver, (root,)):
            checked = False
            if not self._agree_with_cold(solver, (upper, lower)):
                # the warm chain left the global branch above the root: both starts everywhere
                upper, lower = self._scan(solver, guard=True)
                root = self._root(solver, upper, lower, near)
                checked = root is None or self._agree_with_cold(solver, (root,))
            if root is not None and not checked:
                # the refined branch is not the global one at the root: report the global one
                root = solver.at(root.beta, [solver.points[-1]])
                self.jump = True
        self.reachable = root is not None
        if root is not None:
            self.point = root
        self.history = [(p.beta, p.value) for p in solver.points]
        return self

    def _root(
        self, solver: Solver, upper: Point | None, lower: Point | None, near: float | None
    ) -> Point | None:
        """The refined crossing of a scan's ``(upper, lower)``, ``None`` when it found none."""
        if lower is None:
            return None
        return lower if upper is None else self._refine(solver, lower, upper, near)

    def _gap(self, p: Point) -> float:
        """What the refinement brings to 0: ``log(value / target)`` for a positive target (a
        metric like ``nc1_tilde`` is closer to a power of ``beta`` than to a line), else
        ``value - target``; same sign, same root."""
        if self.target > 0:
            return math.log(max(p.value, 1e-300) / self.target)
        return p.value - self.target

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
            starts: list[Tensor | Evaluation | None] = (
                [None] if prev is None else [warm, None] if guard else [warm]
            )
            p = self._tight(solver, solver.at(beta, starts, level="tight" if guard else "coarse"))
            if p.value == self.target:
                return None, p
            if prev is not None and self._side(p) != self._side(prev):
                return prev, p
            prev, before = p, prev
        self.point = min(solver.points, key=lambda q: abs(q.value - self.target))
        return None, None

    def _tight(self, solver: Solver, p: Point, force: bool = False, loose: bool = False) -> Point:
        """``p`` continued to the accuracy its distance to the target needs: a coarse point
        within :data:`SIDE` (or any, with ``loose`` or ``force``) to a loose one, a loose one
        within :data:`CLOSE` (or any, with ``force``) to ``tol``; each continuation starts from
        ``p``'s minimiser, so nothing is solved twice."""
        gap = abs(p.value - self.target)
        if p.level == "coarse" and (force or loose or gap <= SIDE * abs(self.target)):
            p = solver.at(p.beta, [p], level="loose")
            gap = abs(p.value - self.target)
        if p.loose and (force or gap <= CLOSE * abs(self.target)):
            return solver.at(p.beta, [p])
        return p

    def _agree_with_cold(self, solver: Solver, points: Sequence[Point | None]) -> bool:
        """Whether ridge starts at ``points`` find no lower minimum (the guard).

        The ridge runs are loose. A loose objective can be off by more than :data:`MARGIN`
        (measured: up to 1.4e-8 relative at ``LOOSE_STEP`` on the default job's pairs, where
        both starts reach the same minimiser, ``W`` equal to 4e-9), so a lower loose objective
        is confirmed by continuing both solves to ``tol`` before it counts: the decision is
        made on objectives accurate to ~1e-14, far below the margin.
        """
        for p in points:
            if p is None or p.cold:
                continue
            q = solver.at(p.beta, [None], level="loose")
            if _lower(q, p) and (p.loose or q.loose):
                p, q = solver.at(p.beta, [p]), solver.at(q.beta, [q])
            if _lower(q, p):
                return False
        return True

    def _refine(self, solver: Solver, lower: Point, upper: Point, near: float | None) -> Point:
        """Brent's method on ``x = log beta`` between two points on opposite sides, each new
        point loose unless the best so far is within :data:`CLOSE` (then to ``tol``), warm
        started from the interpolation of the bracket's minimisers (:func:`_start`)."""
        f = {id(p): self._gap(p) for p in (lower, upper)}
        a, b, c = upper, lower, upper  # b: best so far, [b, c] brackets the crossing
        d = e = math.log(upper.beta) - math.log(lower.beta)
        xtol = 0.5 * math.log1p(self.rtol)
        trial = math.log(near) if near is not None and lower.beta < near < upper.beta else None
        last: Point | None = None  # the point evaluated before b, when b is the newest
        for _ in range(self.max_evals):
            if (f[id(b)] > 0) == (f[id(c)] > 0):
                c, d = a, math.log(b.beta) - math.log(a.beta)
                e = d
            if abs(f[id(c)]) < abs(f[id(b)]):
                a, b, c, last = b, c, b, None
            xb, xm = math.log(b.beta), 0.5 * (math.log(c.beta) - math.log(b.beta))
            if (
                abs(xm) <= xtol
                or abs(b.value - self.target) <= 1e-11 * abs(self.target)
                or (last is not None and _secant_step(last, b, f) <= 0.5 * xtol)
            ):
                break
            d, e = _brent_step(a, b, c, f, xm, xtol, d, e)
            if trial is not None:
                d, trial = trial - xb, None
            a = b
            step = d if abs(d) > xtol else math.copysign(xtol, xm)
            x = xb + step  # loose first, unless the best point so far is already close
            level = "tight" if abs(b.value - self.target) <= CLOSE * abs(self.target) else "loose"
            last, b = b, self._tight(solver, solver.at(math.exp(x), [_start(b, c, x)], level=level))
            f[id(b)] = self._gap(b)
            if b.loose:
                last = None
        if b.loose:  # ended on a point far from the target (a jump): report it solved to tol
            b = self._tight(solver, b, force=True)
            f[id(b)] = self._gap(b)
        self.bracket = (min(b.beta, c.beta), max(b.beta, c.beta))
        tol = 1e-6 * abs(self.target)
        self.jump = abs(b.value - self.target) > tol and abs(c.value - self.target) > tol
        return b


MARGIN = 1e-9
"""Relative objective gap that counts as a lower minimum in the local-minimum guard."""


def _lower(q: Point, p: Point) -> bool:
    """Whether ``q``'s minimum is lower than ``p``'s by more than :data:`MARGIN`."""
    fp = p.result.evaluation.f
    return q.result.evaluation.f < fp - MARGIN * abs(fp)


def _secant_step(a: Point, b: Point, f: dict[int, float]) -> float:
    """``|log beta|`` from ``b`` (solved to ``tol``) to the root by the secant through ``a``:
    below ``xtol / 2`` the root lies within ``xtol`` of ``b`` without one more solve to confirm
    it (``inf`` where the secant is undefined)."""
    fa, fb = f[id(a)], f[id(b)]
    dx = math.log(b.beta) - math.log(a.beta)
    if fa == fb or dx == 0:
        return math.inf
    return abs(fb * dx / (fb - fa))


def _start(b: Point, c: Point, x: float) -> Tensor | Evaluation:
    """Warm start at ``log beta = x`` inside ``[b, c]``: the interpolation of their minimisers
    in ``log beta`` or the nearer one's, whichever has the lower objective at ``x`` (then with
    its evaluation there, which the solve starts from)."""
    near = min((b, c), key=lambda p: abs(math.log(p.beta) - x))
    xb, xc = math.log(b.beta), math.log(c.beta)
    if xb == xc:
        return near.W
    t = (x - xb) / (xc - xb)
    model = Model(near.model.spec, near.model.lw, near.model.lh, math.exp(x))
    return _better_start(model, b.W + t * (c.W - b.W), near)


def _better_start(model: Model, guess: Tensor, near: Point) -> Evaluation:
    """The evaluation at ``model``'s ``beta`` of ``guess`` or of ``near``'s minimiser, whichever
    has the lower objective (``near``'s ``beta``-free products are reused)."""
    states = [model.state(guess), model.state(near.state.W, near.state)]
    f = [model.objective_at(st) for st in states]
    k = 0 if f[0] < f[1] else 1
    return model.evaluation(states[k], f[k])


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
