"""Speed of the perturbation-model solver and of fit_pair (docs/science.md §2, §7, §10).

Run: ``python benchmarks/perturbation.py [--repeats 5] [--threads 2] [--only 1234]``. Float64,
CPU. Four measurements, each a median over ``--repeats`` runs, with in-run baselines:

1. ``solve`` from statistics (a ``ClassMoments``, ``H0`` at the UFM scale) from the ridge start,
   for ``beta / lambda_H`` in ``[1e-2, 1e4]``, at ``d=512, K=100`` and ``d=1024, K=10``: time,
   Newton iterations, Hessian-vector products (the solver docstring quotes these counts).
2. Flatness in ``N``: the same problem streamed ``N / 10^3`` times (``N = 10^3 .. 10^6``): the
   solve's time must not grow with ``N``.
3. Ratio at ``N=50,000, d=512, K=10``: the statistics solver against the same Newton optimiser
   with ``H = H*(W)`` materialised as an ``N x d`` matrix at every evaluation and
   Hessian-vector product (autograd), same preconditioners (target: >= 100x).
   ``--joint-cap S`` also runs plain joint L-BFGS over ``(W, H)`` for about ``S`` seconds.
4. ``fit_pair`` (the whole coupling search, default normalisation) at ``d=1024, K=10`` (target
   < 1 s) and ``d=512, K=100`` (target < 2 s); ``H`` is ``H0`` with its within-class spread
   halved. In-run ratios: over one solve at the fitted coupling, and over one eval forward of
   ``benchmarks/callback.py``'s MLP (6 x 1024, 8192 CIFAR-shaped samples): the callback's
   whole probe may cost 1.15 forwards.

Features are synthetic: Gaussian class means (``||mu_k|| ~ 3``) and anisotropic within-class
noise (spectrum ``~ 1/j``), ``nc1_tilde ~ 1``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from nclightning.metrics import ClassMoments
from nclightning.perturbation import DEFAULT_NORMALIZATION, fit_pair, solve
from nclightning.perturbation._linesearch import Evaluation
from nclightning.perturbation._model import Model
from nclightning.perturbation._newton import minimize
from nclightning.perturbation._scale import fixed_scale
from nclightning.perturbation._spectral import Spectrum

LAMBDA_W = LAMBDA_H = 5e-4
TOL = 1e-10


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
    """Eq. 2 with ``H = H*(W)`` as a dense ``[N, d]`` matrix at every evaluation.

    Objective, gradient and Hessian-vector products (autograd through ``H*(W)``) all carry
    ``H``; the preconditioners are the statistics model's (same iterations, same directions).
    """

    def __init__(self, h0, labels, K, lambda_W, lambda_H, beta, stats_model) -> None:
        self.h0, self.K, self.stats = h0, K, stats_model
        self.basis = stats_model.spec.basis  # the statistics model works in Sw0's eigenbasis
        self.y = torch.nn.functional.one_hot(labels, K).to(torch.float64)
        self.N, self.d = h0.shape
        self.lw, self.lh, self.beta = lambda_W, lambda_H, beta
        self.c = lambda_H + beta

    def features(self, W):
        M = W @ W.T + self.c * torch.eye(self.K, dtype=W.dtype)
        X = self.y @ W + self.beta * self.h0  # rows of W^T Y + beta H0
        return (X - (X @ W.T) @ torch.linalg.solve(M, W)) / self.c  # X A (Woodbury)

    def f_of(self, We):  # We in the eigenbasis, like the statistics model
        W = We @ self.basis.T
        H = self.features(W)
        return (
            (H @ W.T - self.y).square().sum()
            + self.lh * H.square().sum()
            + self.beta * (H - self.h0).square().sum()
        ) / (2 * self.N) + self.lw / (2 * self.K) * W.square().sum()

    def evaluate(self, We) -> Evaluation:
        x = We.detach().requires_grad_(True)
        W = x @ self.basis.T
        H = self.features(W)
        f = (
            (H @ W.T - self.y).square().sum()
            + self.lh * H.square().sum()
            + self.beta * (H - self.h0).square().sum()
        ) / (2 * self.N) + self.lw / (2 * self.K) * W.square().sum()
        (grad,) = torch.autograd.grad(f, x)
        with torch.no_grad():
            whh = (H @ W.T).T @ H / self.N
            yh = self.y.T @ H / self.N
            scale = float(whh.norm() + yh.norm()) + self.lw / self.K * float(W.norm())
        # ctx: the statistics model's K x K quantities, for its preconditioners only
        rel = float(grad.norm()) / scale
        return Evaluation(float(f.detach()), grad, rel, self.stats.state(We))

    def hessian(self, We, ev):
        _, preconds = self.stats.hessian(We, ev)

        def hvp(V):
            return torch.func.jvp(torch.func.grad(self.f_of), (We,), (V,))[1]

        return hvp, preconds

    def solve(self, tol):
        return minimize(
            self.evaluate, self.stats.initial(), hessian=self.hessian, tol=tol, max_iter=200
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


def _normalised(m: ClassMoments) -> ClassMoments:
    """``H0`` at the UFM scale: ``Tr Sigma_B = rho (K-1)/K`` (the ``"between"`` rule)."""
    return _scaled(m, fixed_scale(m, "between", LAMBDA_W, LAMBDA_H))


def solves(K: int, d: int, repeats: int) -> None:
    """[1] one solve from the ridge start per coupling, H0 at the UFM scale."""
    m = _normalised(Synthetic(K, d).moments(10**4))
    solve(m, lambda_W=LAMBDA_W, lambda_H=LAMBDA_H, beta=LAMBDA_H)  # warm-up
    print(f"\n[1] solve from statistics, d={d}, K={K}, H0 at the UFM scale")
    print(
        f"{'coupling':>9} {'median s':>9} {'newton':>6} {'hvp':>5} {'rel grad':>9} {'nc1~(H*)':>9}"
    )
    for coupling in (1e-2, 0.1, 1.0, 10.0, 1e2, 1e3, 1e4):
        beta = coupling * LAMBDA_H
        med, _, r = _median_time(
            lambda b=beta: solve(m, lambda_W=LAMBDA_W, lambda_H=LAMBDA_H, beta=b, tol=TOL), repeats
        )
        print(
            f"{coupling:>9g} {med:>9.3f} {r.iterations:>6d} {r.hessian_products:>5d} "
            f"{r.rel_grad_norm:>9.1e} {r.metrics['nc1_tilde']:>9.4f}"
        )


def flatness(max_n: int, repeats: int) -> None:
    """[2] the solve's time does not grow with N."""
    K, d = 100, 512
    data = Synthetic(K, d)
    print(f"\n[2] flatness in N (d={d}, K={K}, beta=1): moments pass vs solve")
    print(f"{'N':>9} {'moments s':>10} {'solve median s':>15} {'newton':>6}")
    times = []
    N = 10**3
    while N <= max_n:
        t = time.perf_counter()
        mN = data.moments(N, tile=10**3)  # the same problem at every N
        t_mom = time.perf_counter() - t
        med, _, r = _median_time(
            lambda mm=mN: solve(mm, lambda_W=LAMBDA_W, lambda_H=LAMBDA_H, beta=1.0, tol=TOL),
            repeats,
        )
        times.append(med)
        print(f"{N:>9d} {t_mom:>10.2f} {med:>15.3f} {r.iterations:>6d}")
        N *= 10
    print(f"  max/min solve time over N: {max(times) / min(times):.2f}")


def dense_ratio(repeats: int) -> None:
    """[3] statistics solver vs the same optimiser carrying H densely."""
    K, d, N, beta = 10, 512, 50_000, 1.0
    h0, labels = Synthetic(K, d, seed=1).features(N)
    print(f"\n[3] statistics vs dense at N={N}, d={d}, K={K}, beta={beta:g} (target >= 100x)")
    t = time.perf_counter()
    m = ClassMoments.from_features(h0, labels, K)
    t_mom = time.perf_counter() - t
    med_s, _, r_s = _median_time(
        lambda: solve(m, lambda_W=LAMBDA_W, lambda_H=LAMBDA_H, beta=beta, tol=TOL), repeats
    )
    stats = Model(Spectrum.of(m), LAMBDA_W, LAMBDA_H, beta)
    dense = DenseModel(h0, labels, K, LAMBDA_W, LAMBDA_H, beta, stats)
    med_d, _, r_d = _median_time(lambda: dense.solve(TOL), 1)
    gap = float((r_s.W - r_d.x @ stats.spec.basis.T).abs().max())
    print(f"statistics: {med_s:.4f} s ({r_s.iterations} Newton, {r_s.hessian_products} hvp)")
    print(f"dense:      {med_d:.4f} s ({r_d.iterations} Newton, converged={r_d.converged})")
    print(f"max |W_stats - W_dense| = {gap:.1e}; one-off moments pass {t_mom:.2f} s")
    print(
        f"ratio dense / statistics: {med_d / med_s:.0f}x "
        f"(including the moments pass: {med_d / (med_s + t_mom):.1f}x)"
    )


def pair_moments(K: int, d: int, N: int = 10**4):
    """H0 (synthetic, per-class scatter) and H: the same classes, within-class spread halved."""
    x, y = Synthetic(K, d).features(N)
    m0 = ClassMoments.from_features(x, y, K, per_class_scatter=True)
    mu = m0.means[y]
    return m0, ClassMoments.from_features(mu + 0.5 * (x - mu), y, K)


def bare_forward(repeats: int) -> float:
    """Median time of one eval forward of benchmarks/callback.py's MLP over its 8192 samples."""
    from nclightning.models import CollapseClassifier

    model = CollapseClassifier(
        10,
        (3, 32, 32),
        backbone="mlp",
        backbone_kwargs={"depth": 6, "width": 1024, "batch_norm": True},
    ).eval()
    x = torch.randn(8192, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run():
        with torch.no_grad():
            for xb in x.split(256):
                model(xb)

    run()
    return _median_time(run, repeats)[0]


def _scaled(m: ClassMoments, s: float) -> ClassMoments:
    return ClassMoments(
        counts=m.counts, means=s * m.means, scatter=s * s * m.scatter, class_ss=s * s * m.class_ss
    )


def pair_fits(repeats: int, forward: float) -> None:
    """[4] fit_pair (the whole coupling search) and its in-run ratios."""
    print("\n[4] fit_pair, H = H0 with the within-class spread halved")
    print(
        f"{'d':>5} {'K':>4} {'normalisation':>13} {'median s':>9} {'target':>7} {'near s':>7} "
        f"{'solve s':>8} {'/solve':>7} {'/forward':>8} {'coupling':>9}"
    )
    cases = [(1024, 10, 1.0, DEFAULT_NORMALIZATION), (1024, 10, 1.0, "norm_ratio")]
    cases.append((512, 100, 2.0, DEFAULT_NORMALIZATION))  # norm_ratio there: ~4x, not run
    for d, K, target, norm in cases:
        m0, m = pair_moments(K, d)

        def fit(near=None, m0=m0, m=m, norm=norm):
            kw = dict(lambda_W=LAMBDA_W, lambda_H=LAMBDA_H, normalization=norm)
            return fit_pair(m0, m, near=near, **kw)

        fit()  # warm-up
        med, _, res = _median_time(fit, repeats)
        near, _, _ = _median_time(lambda f=fit, c=res.coupling: f(c), repeats)
        h0 = _scaled(m0, res.scale)
        one, _, _ = _median_time(
            lambda h0=h0, b=res.beta: solve(h0, lambda_W=LAMBDA_W, lambda_H=LAMBDA_H, beta=b),
            repeats,
        )
        print(
            f"{d:>5d} {K:>4d} {norm:>13} {med:>9.3f} {target:>6.1f}s {near:>7.3f} "
            f"{one:>8.3f} {med / one:>7.1f} {med / forward:>8.3f} {res.coupling:>9.4g}"
        )
    print(
        "  near: with the fitted coupling as near=; /solve: over one solve at the fitted "
        f"coupling from the ridge start; /forward: over one eval forward of the callback "
        f"benchmark's MLP ({forward:.3f} s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-n", type=int, default=10**6)
    ap.add_argument("--joint-cap", type=float, default=0.0, help="seconds; 0 = skip")
    ap.add_argument("--only", default="1234", help="sections to run, e.g. 14")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"loadavg at start {os.getloadavg()[0]:.2f}; lambda_W=lambda_H={LAMBDA_W:g}, "
        f"tol={TOL:g}, medians of {args.repeats}"
    )
    if "1" in args.only:
        solves(100, 512, args.repeats)
        solves(10, 1024, args.repeats)
    if "2" in args.only:
        flatness(args.max_n, args.repeats)
    if "3" in args.only:
        dense_ratio(args.repeats)
        if args.joint_cap > 0:
            K, d, N = 10, 512, 50_000
            h0, labels = Synthetic(K, d, seed=1).features(N)
            t_j, rel_j = joint_lbfgs(h0, labels, K, LAMBDA_W, LAMBDA_H, 1.0, TOL, args.joint_cap)
            print(f"joint L-BFGS over (W, H): {t_j:.1f} s, rel grad {rel_j:.1e}")
    if "4" in args.only:
        pair_fits(args.repeats, bare_forward(args.repeats))
    print(f"\nloadavg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
