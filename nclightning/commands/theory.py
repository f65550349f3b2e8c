"""``nclightning theory spectrum|flow``: numerical checks of the perturbation theory.

* ``spectrum`` draws the paper's Figure 1 (docs/science.md §5, Theorem 4.2): the singular values
  of the diagonal block ``F_kk`` of the perturbation operator at the collapsed UFM minimiser,
  for ``beta=100, K=4, d=10, n=10, lambda_W=sqrt(2)`` and several ``lambda_H``, against the
  closed-form table (dashed), and prints the largest deviations.
* ``flow`` integrates the central-path gradient flow (docs/science.md §3, Theorem 3.1) from
  random non-collapsed features and draws ``nc1_tilde``, ``Tr Sigma_W`` and ``Tr Sigma_B``
  (with the ``exp(2 lambda_H t)``-scaled traces of the theorem), printing whether the
  theorem's monotonicity holds along the computed trajectory.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from nclightning.perturbation import (
    block_singular_values,
    central_path_flow,
    perturbation_operator,
    theorem_spectrum,
    ufm_minimizer,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nclightning theory",
        description="Numerical checks of Tirer, Huang & Niles-Weed (ICML 2023).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser, lambda_h: list[float]) -> None:
        q.add_argument("--out", type=Path, required=True, help="output PNG")
        q.add_argument("--K", type=int, default=4, help="classes (default 4)")
        q.add_argument("--d", type=int, default=10, help="feature dimension (default 10)")
        q.add_argument("--n", type=int, default=10, help="samples per class (default 10)")
        q.add_argument("--lambda-W", type=float, default=math.sqrt(2), help="default sqrt(2)")
        q.add_argument(
            "--lambda-H", type=float, nargs="+", default=lambda_h, help=f"default {lambda_h}"
        )
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--dpi", type=int, default=120)

    s = sub.add_parser("spectrum", help="Figure 1: singular values of F_kk (Theorem 4.2)")
    common(s, [0.01, 0.05, 0.1, 0.3])
    s.add_argument("--beta", type=float, default=100.0, help="default 100")
    s.add_argument(
        "--form", choices=["exact", "eq5"], default="exact", help="operator (default exact)"
    )
    s.add_argument("--block", type=int, default=0, help="class k of the block F_kk (default 0)")

    f = sub.add_parser("flow", help="nc1_tilde, Tr Sw, Tr Sb along the central-path flow")
    common(f, [0.1])
    f.add_argument("--t-end", type=float, default=10.0, help="integration time (default 10)")
    f.add_argument("--points", type=int, default=201, help="output times (default 201)")
    f.add_argument("--between", type=float, default=1.0, help="std of the class means of H0")
    f.add_argument("--within", type=float, default=1.0, help="within-class std of H0")
    return p


def _save(fig: Any, out: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=dpi, format="png")


def _spectrum(args: argparse.Namespace) -> int:
    from matplotlib.figure import Figure

    K, d, n, lw, beta = args.K, args.d, args.n, args.lambda_W, args.beta
    if not 0 <= args.block < K:
        raise SystemExit(f"--block must lie in 0..{K - 1}")
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    print(f"F_kk spectrum, k={args.block}, form={args.form}, beta={beta:g}, K={K}, d={d}, n={n}")
    for i, lh in enumerate(args.lambda_H):
        if not lh * lw < 1:
            print(f"  lambda_H={lh:g}: lambda_H lambda_W >= 1, collapsed minimiser is 0; skipped")
            continue
        W, H, labels = ufm_minimizer(K, d, n, lw, lh, seed=args.seed)
        F = perturbation_operator(H, labels, lw, lh, beta, form=args.form, minimizer=(W, H))
        sv = block_singular_values(F, [n] * K, d)[args.block][args.block]
        table = theorem_spectrum(K, d, n, lw, lh, beta)
        pred = torch.tensor([v for v, m, _ in table for _ in range(m)], dtype=sv.dtype)
        pred = pred.sort(descending=True).values
        dev = float((sv - pred).abs().max())
        idx = torch.arange(1, sv.numel() + 1)
        (line,) = ax.plot(idx, sv, "o", ms=3, label=rf"$\lambda_H$={lh:g}", color=f"C{i}")
        ax.plot(idx, pred, "--", lw=1, color=line.get_color())
        mult = ", ".join(f"{v:.6f} x{m}" for v, m, _ in table)
        print(f"  lambda_H={lh:g}: max |sigma - table| = {dev:.2e}  (table: {mult})")
    ax.set_xlabel("index")
    ax.set_ylabel(r"singular value of $F_{kk}$")
    ax.set_title(
        rf"$F_{{kk}}$ ({args.form}), $\beta$={beta:g}, K={K}, d={d}, n={n}, "
        rf"$\lambda_W$={lw:.3g}; dashed: Theorem 4.2 table"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, args.out, args.dpi)
    print(f"wrote {args.out}")
    return 0


def _flow(args: argparse.Namespace) -> int:
    from matplotlib.figure import Figure

    K, d, n, lw = args.K, args.d, args.n, args.lambda_W
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(K).repeat_interleave(n)
    means = args.between * torch.randn(K, d, generator=g, dtype=torch.float64)
    h0 = means[labels] + args.within * torch.randn(K * n, d, generator=g, dtype=torch.float64)
    fig = Figure(figsize=(12, 3.8))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    ok = True
    for i, lh in enumerate(args.lambda_H):
        tr = central_path_flow(h0, labels, lw, lh, args.t_end, num_points=args.points)
        scale = torch.exp(2 * lh * tr.t)
        sw, sb = scale * tr.tr_sw, scale * tr.tr_sb
        checks = {
            "nc1_tilde strictly decreasing": bool((tr.nc1_tilde.diff() < 0).all()),
            "exp(2 lh t) Tr Sw non-increasing": bool((sw.diff() <= 1e-12 * sw[:-1]).all()),
            "exp(2 lh t) Tr Sb strictly increasing": bool((sb.diff() > 0).all()),
        }
        ok &= all(checks.values())
        summary = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items())
        print(
            f"lambda_H={lh:g}: nc1_tilde {float(tr.nc1_tilde[0]):.4g} -> "
            f"{float(tr.nc1_tilde[-1]):.4g} over t in [0, {args.t_end:g}] "
            f"({tr.steps} steps); {summary}"
        )
        c = f"C{i}"
        lab = rf"$\lambda_H$={lh:g}"
        scaled = rf"$e^{{2\lambda_H t}}\times$ ({lh:g})"
        axes[0].semilogy(tr.t, tr.nc1_tilde, color=c, label=lab)
        axes[1].semilogy(tr.t, tr.tr_sw, color=c, label=lab)
        axes[1].semilogy(tr.t, sw, "--", color=c, label=scaled)
        axes[2].semilogy(tr.t, tr.tr_sb, color=c, label=lab)
        axes[2].semilogy(tr.t, sb, "--", color=c, label=scaled)
    for ax, title in zip(
        axes, [r"$\widetilde{NC}_1$", r"Tr $\Sigma_W$", r"Tr $\Sigma_B$"], strict=True
    ):
        ax.set_xlabel("t")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        rf"central-path flow $dH/dt = -N\nabla L(H)$, K={K}, d={d}, n={n}, $\lambda_W$={lw:.3g}"
    )
    fig.tight_layout()
    _save(fig, args.out, args.dpi)
    print(f"wrote {args.out}")
    if not ok:
        print("Theorem 3.1 monotonicity violated along the computed trajectory", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    """Entry point of ``nclightning theory`` (dispatched by :mod:`nclightning.cli`)."""
    args = _parser().parse_args(argv)
    return _spectrum(args) if args.command == "spectrum" else _flow(args)
