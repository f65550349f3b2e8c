"""Speed of the perturbation-model solver (docs/science.md §2), with in-run baselines.

Run: ``python benchmarks/perturbation.py [--repeats 5] [--joint-cap 120]``. Float64, CPU, 2
threads (``--threads``). Three measurements, each a median over ``--repeats`` runs:

1. ``solve`` from statistics (a ``ClassMoments``) at ``d=512, K=100`` to relative gradient
   norm ``<= 1e-9`` for several ``beta`` (target: < 2 s).
2. Flatness in ``N``: moments of ``N = 10^3 .. 10^6`` synthetic features (one streaming pass
   in chunks, reported separately), then the same solve: its time must not grow with ``N``.
3. Ratio at ``N=50,000, d=512, K=10``: the statistics solver against a *dense* solver over
   ``(W, H)`` to the same tolerance in the same run (target: >= 100x). The dense solver is
   the same preconditioned L-BFGS with ``H = H*(W)`` materialised as an ``N x d`` matrix at
   every evaluation (variable projection: objective, gradient, relative gradient norm and
   preconditioner all computed from the dense ``H``), so both take the same iterations and
   the ratio is the cost of carrying ``H``. ``--joint-cap S`` (default 0: off) also runs
   plain joint L-BFGS over ``(W, H)`` (``torch.optim.LBFGS``, strong Wolfe, memory 5: each
   stored pair is ``2 N d`` floats) for about ``S`` seconds (checked every 5 iterations).

Features are synthetic: Gaussian class means (between-class std 1 per direction scaled to
``||mu_k|| ~ 3``) and anisotropic within-class noise (spectrum ``~ 1/j``), ``nc1_tilde ~ 1``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from nclightning.metrics import ClassMoments
from nclightning.perturbation import solve
from nclightning.perturbation._lbfgs import Evaluation, minimize

LAMBDA_W = LAMBDA_H = 5e-4
TOL = 1e-9


class Synthetic:
    """Deterministic chunked features ``[N, d]`` with labels ``i mod K`` (balanced)."""

    def __init__(self, K: int, d: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.K, self.d, self.seed = K, d, seed
        self.means = 3.0 * torch.randn(K, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        spec = 1.0 / torch.arange(1, d + 1, dtype=torch.float64)
        spec *= 9.0 / float(spec.sum())  # Tr Sigma_W ~ 9 ~ Tr Sigma_B
        self.mix = q * spec.sqrt()  # noise = z @ mix.T

    def chunk(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        labels = torch.arange(start, start + size) % self.K
        z = torch.randn(size, self.d, generator=g, dtype=torch.float64)
        return self.means[labels] + z @ self.mix.T, labels

    def features(self, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chunk(0, N)

    def moments(self, N: int, chunk: int = 50_000, tile: int | None = None) -> ClassMoments:
        """Exact moments in one pass: per-chunk two-pass moments merged pairwise (Chan).

        ``tile``: stream the first ``tile`` samples ``N / tile`` times over (same problem
        at every ``N``: identical minimiser and iterations, only ``N`` changes).
        """
        acc = None
        step = chunk if tile is None else tile
        for start in range(0, N, step):
            size = min(step, N - start)
            x, y = self.chunk(start, size) if tile is None else self.chunk(0, size)
            m = ClassMoments.from_features(x, y, self.K)
            acc = m if acc is None else _merge(acc, m)
        return acc


def _merge(a: ClassMoments, b: ClassMoments) -> ClassMoments:
    n = a.counts + b.counts
    w = (a.counts * b.counts / n.clamp_min(1)).unsqueeze(1)
    delta = b.means - a.means
    means = a.means + (b.counts / n.clamp_min(1)).unsqueeze(1) * delta
    scatter = a.scatter + b.scatter + delta.T @ (w * delta)
    class_ss = a.class_ss + b.class_ss + (w.squeeze(1) * delta.square().sum(1))
    return ClassMoments(n, means, scatter, class_ss)


def _median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), out


# -- dense baseline: the same optimiser, H materialised ----------------------------------------
class DenseModel:
    """Eq. 2 with ``H = H*(W)`` as a dense ``[N, d]`` matrix at every evaluation."""

    def __init__(self, h0, labels, K, lambda_W, lambda_H, beta) -> None:
        self.h0, self.K = h0, K
        self.y = torch.nn.functional.one_hot(labels, K).to(torch.float64)
        self.N, self.d = h0.shape
        self.lw, self.lh, self.beta = lambda_W, lambda_H, beta
        self.c = lambda_H + beta
        self.last_h = None

    def features(self, W):
        M = W @ W.T + self.c * torch.eye(self.K, dtype=W.dtype)
        X = self.y @ W + self.beta * self.h0  # rows of W^T Y + beta H0
        return (X - (X @ W.T) @ torch.linalg.solve(M, W)) / self.c  # X A (Woodbury)

    def evaluate(self, W) -> Evaluation:
        H = self.features(W)
        self.last_h = H
        R = H @ W.T - self.y
        f = (
            float(R.square().sum() + self.lh * H.square().sum())
            + self.beta * float((H - self.h0).square().sum())
        ) / (2 * self.N) + self.lw / (2 * self.K) * float(W.square().sum())
        whh = (H @ W.T).T @ H / self.N
        yh = self.y.T @ H / self.N
        grad = whh - yh + (self.lw / self.K) * W
        scale = float(whh.norm() + yh.norm()) + self.lw / self.K * float(W.norm())
        return Evaluation(f, grad, float(grad.norm()) / scale, H)

    def preconditioner(self, W, ev):
        p = ev.ctx.T @ ev.ctx / self.N
        p.diagonal().add_(self.lw / self.K)
        L = torch.linalg.cholesky(p)
        return lambda q: torch.cholesky_solve(q.T, L).T

    def initial(self):
        g = self.h0.T @ self.h0 / self.N
        g.diagonal().add_(self.lw / self.K)
        return torch.linalg.solve(g, self.h0.T @ self.y / self.N).T.contiguous()

    def solve(self, tol):
        return minimize(
            self.evaluate, self.initial(), tol=tol, max_iter=5000, precond=self.preconditioner
        )


def joint_lbfgs(h0, labels, K, lambda_W, lambda_H, beta, tol, cap_s):
    """Plain joint L-BFGS over (W, H) until rel. grad <= tol or cap_s seconds."""
    N, d = h0.shape
    y = torch.nn.functional.one_hot(labels, K).to(torch.float64)
    W = torch.zeros(K, d, dtype=torch.float64, requires_grad=True)
    H = h0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [W, H],
        lr=1,
        max_iter=5,
        history_size=5,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )

    def closure():
        opt.zero_grad()
        f = (
            (H @ W.T - y).square().sum()
            + lambda_H * H.square().sum()
            + beta * (H - h0).square().sum()
        ) / (2 * N) + lambda_W / (2 * K) * W.square().sum()
        f.backward()
        return f

    t0 = time.perf_counter()
    rel = math.inf
    while time.perf_counter() - t0 < cap_s:
        opt.step(closure)
        with torch.no_grad():
            gw = W.grad
            whh = (H @ W.T).T @ H / N
            yh = y.T @ H / N
            scale = float(whh.norm() + yh.norm()) + lambda_W / K * float(W.norm())
            g_all = math.sqrt(float(gw.square().sum() + H.grad.square().sum()))
            rel = g_all / scale
        if rel <= tol:
            break
    return time.perf_counter() - t0, rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-n", type=int, default=10**6)
    ap.add_argument("--joint-cap", type=float, default=0.0, help="seconds; 0 = skip")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"loadavg at start {os.getloadavg()[0]:.2f}; lambda_W=lambda_H={LAMBDA_W:g}, "
        f"tol={TOL:g}, medians of {args.repeats}"
    )

    # 1. d = 512, K = 100 from statistics
    K, d = 100, 512
    data = Synthetic(K, d)
    m = data.moments(10**4)
    solve(m, None, LAMBDA_W, LAMBDA_H, 1.0)  # warm-up
    print(f"\n[1] solve from statistics, d={d}, K={K} (target < 2 s)")
    print(f"{'beta':>8} {'median s':>9} {'min s':>7} {'iters':>6} {'rel grad':>9} {'nc1~(H*)':>9}")
    for beta in (0.01, 0.1, 1.0, 10.0, 100.0, 1e4):
        med, best, r = _median_time(
            lambda b=beta: solve(m, None, LAMBDA_W, LAMBDA_H, b, tol=TOL), args.repeats
        )
        flag = "" if med < 2 else "  (over 2 s)"
        print(
            f"{beta:>8g} {med:>9.3f} {best:>7.3f} {r.iterations:>6d} {r.rel_grad_norm:>9.1e} "
            f"{r.metrics['nc1_tilde']:>9.4f}{flag}"
        )

    # 2. flatness in N
    print(f"\n[2] flatness in N (d={d}, K={K}, beta=1): moments pass vs solve")
    for tiled in (False, True):
        print(
            "  same problem at every N (the 10^3-sample set streamed N/10^3 times):"
            if tiled
            else "  fresh samples at every N (the sample moments, hence the problem, change):"
        )
        print(f"{'N':>9} {'moments s':>10} {'solve median s':>15} {'iters':>6} {'ms/iter':>8}")
        per_iter, solve_times = [], []
        N = 10**3
        while N <= args.max_n:
            t = time.perf_counter()
            mN = data.moments(N, tile=10**3 if tiled else None)
            t_mom = time.perf_counter() - t
            med, _, r = _median_time(
                lambda mm=mN: solve(mm, None, LAMBDA_W, LAMBDA_H, 1.0, tol=TOL), args.repeats
            )
            solve_times.append(med)
            per_iter.append(1e3 * med / max(r.iterations, 1))
            print(f"{N:>9d} {t_mom:>10.2f} {med:>15.3f} {r.iterations:>6d} {per_iter[-1]:>8.2f}")
            N *= 10
        print(
            f"  max/min over N: solve time {max(solve_times) / min(solve_times):.2f}, "
            f"time per iteration {max(per_iter) / min(per_iter):.2f}"
        )

    # 3. ratio against the dense solver
    K, d, N, beta = 10, 512, 50_000, 1.0
    data = Synthetic(K, d, seed=1)
    h0, labels = data.features(N)
    print(f"\n[3] statistics vs dense at N={N}, d={d}, K={K}, beta={beta:g} (target >= 100x)")
    t = time.perf_counter()
    m = ClassMoments.from_features(h0, labels, K)
    t_mom = time.perf_counter() - t
    solve(m, None, LAMBDA_W, LAMBDA_H, beta)  # warm-up
    med_s, _, r_s = _median_time(
        lambda: solve(m, None, LAMBDA_W, LAMBDA_H, beta, tol=TOL), args.repeats
    )
    dense = DenseModel(h0, labels, K, LAMBDA_W, LAMBDA_H, beta)
    med_d, _, r_d = _median_time(lambda: dense.solve(TOL), max(1, min(3, args.repeats)))
    stats_h = solve(h0, labels, LAMBDA_W, LAMBDA_H, beta, tol=TOL).H
    gap = float((stats_h - dense.features(r_d.x)).abs().max())
    print(
        f"statistics: {med_s:.4f} s ({r_s.iterations} iters, rel grad {r_s.rel_grad_norm:.1e});"
        f" one-off moments pass {t_mom:.2f} s"
    )
    print(
        f"dense:      {med_d:.4f} s ({r_d.iterations} iters, rel grad "
        f"{r_d.evaluation.rel:.1e}, converged={r_d.converged})"
    )
    print(f"max |H_stats - H_dense| = {gap:.1e}")
    print(
        f"ratio dense / statistics: {med_d / med_s:.0f}x "
        f"(including the moments pass: {med_d / (med_s + t_mom):.1f}x)"
    )
    if args.joint_cap > 0:
        t_j, rel_j = joint_lbfgs(h0, labels, K, LAMBDA_W, LAMBDA_H, beta, TOL, args.joint_cap)
        status = "reached tol" if rel_j <= TOL else f"stopped at cap, rel grad {rel_j:.1e}"
        print(f"joint L-BFGS over (W, H): {t_j:.1f} s, {status}; ratio >= {t_j / med_s:.0f}x")
    print(f"\nloadavg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
