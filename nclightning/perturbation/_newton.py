"""Truncated Newton (Newton-CG) with a Wolfe line search, on float64 tensors.

Owns the optimiser of :func:`nclightning.perturbation.solve` (docs/science.md §10). Generic:
it minimises any ``fun(x) -> Evaluation`` given ``hessian(x, ev) -> (hvp, preconditioners)``,
exact Hessian-vector products and one or more symmetric positive definite approximations of
the inverse Hessian. One iteration:

1. *choose a preconditioner*: for each candidate ``M`` (built only when asked, in order), the
   step ``z = -M g`` and the residual of the first CG step along it, relative to ``|g|``; keep
   the ``M`` with the smallest, and the first one outright when its residual is below
   :data:`GOOD_ENOUGH` (measured on the default job and at d=512, K=100: the later candidate
   was never better then). The candidate chosen at the previous iteration (or, through
   ``last``, the previous solve of a search) is tried first and kept outright below
   :data:`INCUMBENT_GOOD_ENOUGH`: the fixed-H one wins at large ``beta``, the block one at
   small, and building the other only to lose cost 10% of a fit at d=512, K=100. In a run
   with ``rebuild=False`` (a solve to a coarse step) the operator itself, as it was built at
   the previous iteration, is tried before that under the same rule, and nothing is built
   when it passes; such a run hands its operator on (``NewtonResult.choice``) to the next
   run of a search. At d=512, K=100 a fit builds 19 preconditioners instead of 37 (building
   a fresh one at every iteration of a solve to loose or tight accuracy, and at the start of
   the run after one, stays cheaper: reusing within such solves cost 25% more Hessian
   products at d=512, K=100, and across them 4% more time on the default job's fits). The
   first-step residual does not always predict how fast CG converges: a candidate whose last
   CG solve (in this run or the runs before it in a search) contracted the residual by less
   than :data:`SLOW_CG` per iteration is tried after the others and chosen over them only
   where they leave more than :data:`SLOW_FLOOR` of the gradient;
2. *direction*: preconditioned conjugate gradients on ``H p = -g`` until the residual falls
   below ``forcing * |g|`` (``forcing = min(0.5, max(sqrt(rel), sqrt(step_tol),
   FORCING_STEP * |last step| / |x|))``:
   superlinear convergence down to the accuracy the stop asks for, no further: a solve that
   stops at a Newton step of ``step_tol |x|`` needs no direction more accurate than
   ``sqrt(step_tol)``, the error it leaves being ``~ forcing |step| + |step|^2``) or a
   direction of non-positive curvature appears (then the CG iterate so far, or the
   preconditioned gradient step at the first CG iteration);
3. *step*: strong-Wolfe line search from step length 1 (:mod:`._linesearch`); when it fails,
   one retry along the preconditioned gradient, then stop (float64 floor).

Stops when ``ev.rel <= tol`` (the caller's relative stationarity measure) and the Newton step
is below ``step_tol`` relative to ``x``, unless ``escape(x, ev)`` offers a direction of negative
curvature (a saddle): then the best of four step lengths along it, and Newton again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nclightning.perturbation._linesearch import Evaluation, line_search

__all__ = ["Choice", "Evaluation", "NewtonResult", "minimize"]

Operator = Callable[[Tensor], Tensor]
Factory = Callable[[], Operator | None]
"""Builds one preconditioner at the current point, or ``None`` where it is not available."""
Hessian = Callable[[Tensor, Evaluation], tuple[Operator, Sequence[Factory]]]

GOOD_ENOUGH = 0.3
"""First-CG-step residual (relative) below which the first preconditioner is kept without
building the others."""
INCUMBENT_GOOD_ENOUGH = 0.6
"""The same for the preconditioner chosen at the previous iteration (or solve): kept below
this without building the others."""
SLOW_CG = 0.75
"""Mean contraction of the CG residual per iteration above which the preconditioner that gave
it counts as slow (:func:`_choose`) until a CG solve with it is faster. Typical solves reach
0.2-0.7 (the default job's and d=512, K=100); the fixed-H one reached 0.85 at d=2048, K=1000
near the root, 65 products per direction where the block one needed 20."""
SLOW_FLOOR = 0.9
"""A candidate whose last CG solve converged slowly scores at least this (its first-step
residual, relative) against one that has not been slow: the first-step residual does not
predict how fast CG converges. At d=1024, K=400 the fixed-H one's first step left less of the
gradient than the block one's (over 0.6), then CG needed 70 products per direction with it
(contraction 0.86) where the block one needed 20 (0.61); demoting it: 400 -> 344 products per
fit, 12% faster."""
FORCING_STEP = 0.2
"""The CG forcing term is at least this times the relative size of the step just taken: far
from the minimiser the Newton model is off by about the step itself, and a direction solved
more accurately is wasted (d=512, K=100: 166 -> 156 Hessian products per fit, 4% of its time;
the default job's fits: 7212 -> 6905; no coupling moved by more than 5e-10)."""
Escape = Callable[[Tensor, Evaluation], Tensor | None]


@dataclass
class NewtonResult:
    """Final point, its evaluation and counts; ``message`` says why the optimiser stopped."""

    x: Tensor
    evaluation: Evaluation
    iterations: int
    evaluations: int
    hessian_products: int
    converged: bool
    message: str
    choice: Choice | None = None  # the preconditioner the last direction used (module doc)


@dataclass(frozen=True)
class Choice:
    """A preconditioner chosen for a direction: its factory's index, the operator as built
    (``None`` where it must not be reused), the mean contraction of the residual per
    iteration its CG solve reached (``None`` where not measured) and the indices whose last
    measured CG solve, in this run or the runs handed on to it, converged slowly."""

    index: int
    operator: Operator | None = None
    rate: float | None = None
    slow_indices: frozenset[int] = frozenset()

    @property
    def slow(self) -> bool:
        """Whether its CG solve converged slowly (:data:`SLOW_CG`)."""
        return self.index in self.slow_indices or (self.rate is not None and self.rate > SLOW_CG)

    def without_operator(self) -> Choice:
        """The same choice, its operator not to be reused (built afresh next time)."""
        return Choice(self.index, None, self.rate, self.slow_indices)

    def then(self, index: int, operator: Operator | None, rate: float | None) -> Choice:
        """The next choice, with what its CG solve measured added to the slow indices."""
        slow = set(self.slow_indices)
        if rate is not None:
            (slow.add if rate > SLOW_CG else slow.discard)(index)
        return Choice(index, operator, rate, frozenset(slow))


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _norm(a: Tensor) -> float:
    return float(torch.linalg.vector_norm(a))


def _choose(
    hvp: Operator, factories: Sequence[Factory], g: Tensor, last: Choice | None = None
) -> tuple[Operator, int, tuple[Tensor, Tensor] | None, int]:
    """The candidate whose gradient step leaves the smallest first-CG-step residual (the first
    one below :data:`GOOD_ENOUGH` outright), #products, ``(z, H z)`` of the chosen step
    ``z = M g`` (``None`` when not computed: the first conjugate-gradient direction is ``-z``,
    so its product is not computed again) and the chosen index.

    ``last``, the choice of the previous direction: its operator (where given, as built at the
    earlier point) is tried before anything is built, then its factory before the others;
    either is kept outright below :data:`INCUMBENT_GOOD_ENOUGH`. A candidate whose last CG
    solve converged slowly (``Choice.slow_indices``, :data:`SLOW_CG`) is tried after the others,
    its operator is not reused, and it wins only where the others' residuals exceed
    :data:`SLOW_FLOOR`; where every candidate has been slow, the incumbent is kept outright
    only below :data:`GOOD_ENOUGH`."""
    best: Operator | None = None
    best_score, first, products, g_norm, chosen = math.inf, None, 0, _norm(g), -1
    prefer = None if last is None else last.index
    incumbent = INCUMBENT_GOOD_ENOUGH
    slow: set[int] = set()
    if last is not None:
        slow = set(last.slow_indices) | ({last.index} if last.slow else set())
    others = [i for i in range(len(factories)) if i not in slow]
    if not others:
        slow = set()  # every candidate has been slow: judged by their residuals alone
    if last is not None and last.slow:
        if others:  # one that has not been slow is the incumbent; the slow one comes last
            prefer, last = others[0], None
        else:
            incumbent = GOOD_ENOUGH

    def residual(z: Tensor, hz: Tensor) -> float:  # of the first CG step along z
        zz = _dot(hz, hz)
        return _norm(g - (_dot(hz, g) / zz) * hz) if zz > 0 else math.inf

    if last is not None and last.operator is not None:
        z = last.operator(g)
        hz = hvp(z)
        products += 1
        if residual(z, hz) <= incumbent * g_norm:
            return last.operator, products, (z, hz), last.index
    order = sorted(range(len(factories)), key=lambda i: (i != prefer, i in slow))
    while order:
        i = order.pop(0)
        m = factories[i]()
        if m is None:
            continue
        if best is None and not order:
            return m, products, None, i  # the only candidate: nothing to compare
        z = m(g)
        hz = hvp(z)
        products += 1
        score = residual(z, hz)  # min_a |a H z - g|
        if i in slow:  # wins only where the others leave more than SLOW_FLOOR
            score = max(score, SLOW_FLOOR * g_norm)
        if score < best_score:
            best, best_score, first, chosen = m, score, (z, hz), i
        good = incumbent if i == prefer else GOOD_ENOUGH
        if best_score <= good * g_norm:
            break
    if best is None:
        raise RuntimeError("no preconditioner is available at this point")
    return best, products, first, chosen


def _cg(
    hvp: Operator,
    precond: Operator,
    g: Tensor,
    forcing: float,
    max_cg: int,
    small: Callable[[Tensor], bool] | None = None,
    first: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, int, bool, float | None]:
    """Approximate solution of ``H p = -g`` by preconditioned CG: ``(p, #products, small,
    rate)``, ``rate`` the mean contraction of the residual per CG iteration (``None`` when the
    solve ended early: negligible step, non-positive curvature).

    ``first``: ``(M g, H M g)`` when already computed (the first product is then reused).

    ``small(p)`` is asked once, when the residual first falls below ``0.1 |g|``: a step that is
    already negligible then ends the solve (the convergence test of :func:`minimize` needs
    its size, not its digits).
    """
    p = g.new_zeros(g.shape)
    r = -g
    z = precond(r) if first is None else -first[0]
    d = z
    rz = _dot(r, z)
    g_norm = _norm(g)
    products = 0
    for k in range(1, max_cg + 1):
        if k == 1 and first is not None:
            hd = -first[1]  # H(-M g), computed by the choice of preconditioner
        else:
            hd, products = hvp(d), products + 1
        curv = _dot(d, hd)
        if curv <= 0:  # non-positive curvature: keep what we have
            return (z if k == 1 else p), products, False, None
        a = rz / curv
        p.add_(d, alpha=a)  # p, r, z: tensors of this solve alone (updated in place)
        r.sub_(hd, alpha=a)
        r_norm = _norm(r)
        if small is not None and r_norm <= 0.1 * g_norm:
            if small(p):
                return p, products, True, None
            small = None
        if r_norm <= forcing * g_norm:
            return p, products, False, (r_norm / g_norm) ** (1.0 / k)
        z = precond(r)
        rz, rz_old = _dot(r, z), rz
        d = z.add_(d, alpha=rz / rz_old)
    return p, products, False, (_norm(r) / g_norm) ** (1.0 / max_cg)


def _is_small(step: Tensor, x: Tensor, step_tol: float) -> bool:
    return _norm(step) <= step_tol * _norm(x)


def _direction(
    hessian: Hessian,
    x: Tensor,
    ev: Evaluation,
    forcing: float,
    max_cg: int,
    small: Callable[[Tensor], bool] | None,
    last: Choice | None = None,
) -> tuple[Tensor, Operator, int, bool, Choice]:
    """Newton-CG direction at ``x``, the preconditioner, #Hessian products, whether the step
    was found negligible (``small``) before the CG solve was complete, and the choice made
    (:func:`_choose`, ``last``: the previous one)."""
    hvp, factories = hessian(x, ev)
    precond, used, first, chosen = _choose(hvp, factories, ev.grad, last)
    direction, k, negligible, rate = _cg(hvp, precond, ev.grad, forcing, max_cg, small, first)
    if _dot(direction, ev.grad) >= 0:
        direction = -precond(ev.grad)
    choice = (last or Choice(chosen)).then(chosen, precond, rate)
    return direction, precond, used + k, negligible, choice


class _Run:
    """The state of one :func:`minimize` call and its named steps."""

    def __init__(
        self,
        fun: Callable[[Tensor], Evaluation],
        x0: Tensor,
        hessian: Hessian,
        escape: Escape | None,
        opts: dict[str, Any],
        ev0: Evaluation | None = None,
        last: Choice | None = None,
    ) -> None:
        self.fun, self.hessian, self.escape, self.opts = fun, hessian, escape, opts
        self.x, self.ev = x0, fun(x0) if ev0 is None else ev0
        self.evals, self.hvps, self.escapes = int(ev0 is None), 0, 0
        self.last = last  # the preconditioner of the last direction (or previous run)
        self.last_step = 0.0  # |step taken| / |x| at the last iteration

    def result(self, it: int, ok: bool, msg: str) -> NewtonResult:
        return NewtonResult(self.x, self.ev, it, self.evals, self.hvps, ok, msg, self.last)

    def newton_direction(self) -> tuple[Tensor, Operator, bool, float]:
        """``(direction, preconditioner, negligible, forcing)`` at the current point."""
        tol, step_tol = self.opts["tol"], self.opts["step_tol"]
        forcing = min(
            0.5,
            max(math.sqrt(self.ev.rel), math.sqrt(step_tol), FORCING_STEP * self.last_step),
        )
        x = self.x
        check = (lambda p: _is_small(p, x, step_tol)) if self.ev.rel <= tol else None
        direction, precond, used, small, choice = _direction(
            self.hessian, x, self.ev, forcing, self.opts["max_cg"], check, self.last
        )
        self.last = choice if not self.opts["rebuild"] else choice.without_operator()
        self.hvps += used
        small = small or (self.ev.rel <= tol and _is_small(direction, x, step_tol))
        return direction, precond, small, forcing

    def line_step(self, direction: Tensor, precond: Operator) -> tuple[float, Tensor] | None:
        """Take the Wolfe step along ``direction`` (else along the preconditioned gradient)."""
        for d in (direction, None):
            d = -precond(self.ev.grad) if d is None else d
            step, new, used = line_search(self.fun, self.x, self.ev, d, 1.0)
            self.evals += used
            if new is not None:
                self.last_step = step * _norm(d) / max(_norm(self.x), 1e-300)
                self.x, self.ev = self.x + step * d, new
                return step, d
        return None

    def leave_saddle(self) -> bool:
        """At a stationary point: step along a negative-curvature direction, if any."""
        if self.escape is None or self.escapes >= self.opts["max_escapes"]:
            return False
        v = self.escape(self.x, self.ev)
        if v is None:
            return False
        self.escapes += 1
        scale = _norm(self.x) / _norm(v)
        trials = [(t, self.fun(self.x + t * v)) for t in (scale * 10.0**-k for k in range(4))]
        self.evals += len(trials)
        t, new = min(trials, key=lambda tv: tv[1].f)
        if not new.f < self.ev.f:
            return False
        self.x, self.ev = self.x + t * v, new
        return True


def minimize(
    fun: Callable[[Tensor], Evaluation],
    x0: Tensor,
    *,
    hessian: Hessian,
    tol: float,
    max_iter: int,
    step_tol: float = 1e-8,
    max_cg: int = 200,
    escape: Escape | None = None,
    max_escapes: int = 8,
    ev0: Evaluation | None = None,
    last: Choice | None = None,
    rebuild: bool = True,
) -> NewtonResult:
    """Minimise ``fun`` from ``x0`` (module docstring); ``ev0``: ``fun(x0)``, when known;
    ``last``: the preconditioner a previous run on a nearby problem ended with
    (``NewtonResult.choice``): its factory is tried first, and its operator, where that run
    handed it on, before anything is built; ``rebuild=False``: each iteration tries the
    operator of the one before first too, and the result hands it on (for a solve stopping at
    a coarse step, whose directions need little accuracy).

    Converged when ``Evaluation.rel <= tol`` *and* the error left in ``x`` is bounded: the next
    Newton step is at most ``step_tol |x|``, or the full step just taken was at most
    ``sqrt(step_tol) |x|`` with a CG forcing term at most ``sqrt(step_tol)`` (quadratic
    convergence leaves ``~step_tol``). A small gradient alone does not bound the error where
    the Hessian is ill-conditioned. Also converged when ``rel <= tol`` and no step decreases
    ``f`` any more (float64 floor).
    """
    opts = dict(tol=tol, step_tol=step_tol, max_cg=max_cg, max_escapes=max_escapes, rebuild=rebuild)
    run, root = _Run(fun, x0, hessian, escape, opts, ev0, last), math.sqrt(step_tol)
    for it in range(max_iter):
        if not (math.isfinite(run.ev.f) and math.isfinite(run.ev.rel)):
            return run.result(it, False, "non-finite objective")
        direction, precond, small, forcing = run.newton_direction()
        if small:
            if run.leave_saddle():
                continue
            return run.result(it, True, "relative gradient below tol, Newton step below step_tol")
        rel_before = run.ev.rel
        taken = run.line_step(direction, precond)
        if taken is None:
            ok = rel_before <= tol
            msg = "relative gradient below tol at the float64 floor" if ok else "line search failed"
            return run.result(it, ok, msg)
        step, d = taken
        if run.ev.rel <= tol and step == 1.0 and forcing <= root and _is_small(d, run.x, root):
            # quadratic convergence: the error left is ~ forcing |step| + |step|^2 <= step_tol
            if run.leave_saddle():
                continue
            return run.result(it + 1, True, "relative gradient below tol after a small Newton step")
    if run.ev.rel <= tol and math.isfinite(run.ev.f):
        return run.result(max_iter, True, "relative gradient below tol at the iteration cap")
    return run.result(max_iter, False, f"no convergence in {max_iter} iterations")
