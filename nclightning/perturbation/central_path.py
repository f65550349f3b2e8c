"""Central path of the UFM and its gradient flow (docs/science.md §3, Eq. 4, Theorem 3.1).

Features are rows ``H[N, d]``. ``L(H) = f(W*(H), H; 0)`` is Eq. 2 with ``beta = 0`` and ``W``
at its closed form ``W*(H) = Y H^T (H H^T + (N lambda_W / K) I)^-1`` (docs/science.md §2; rows:
``W* = S (H^T H + N lambda_W/K I)^-1`` with ``S[K, d]`` the class sums). The flow
``dH/dt = -N grad L(H)`` (the paper writes ``K n``) is integrated with an adaptive
Dormand-Prince 5(4) scheme; by the envelope theorem ``N grad L = W*^T (W* H - Y) + lambda_H H``
(rows: ``(H W*^T - Y^T) W* + lambda_H H``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nclightning.perturbation._inputs import one_hot

__all__ = ["FlowTrajectory", "central_path_flow", "central_path_loss", "optimal_classifier"]


def _prepare(H: Tensor, labels: Tensor, num_classes: int | None) -> tuple[Tensor, int]:
    if H.ndim != 2 or labels.shape != H.shape[:1]:
        raise ValueError(f"need H[N, d] and labels[N], got {tuple(H.shape)}, {tuple(labels.shape)}")
    K = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    return one_hot(labels.to(device=H.device, dtype=torch.long), K).to(H.dtype), K


def optimal_classifier(
    H: Tensor, labels: Tensor, lambda_W: float, num_classes: int | None = None
) -> Tensor:
    """``W*(H) [K, d]``, the minimiser of Eq. 2 over ``W`` for features ``H[N, d]`` (§2)."""
    y, K = _prepare(H, labels, num_classes)
    N = H.shape[0]
    g = H.T @ H
    g.diagonal().add_(N * lambda_W / K)
    return torch.linalg.solve(g, H.T @ y).T  # (S G^-1)^T = G^-1 S^T, G symmetric


def central_path_loss(
    H: Tensor, labels: Tensor, lambda_W: float, lambda_H: float, num_classes: int | None = None
) -> Tensor:
    """``L(H) = f(W*(H), H; 0)`` (docs/science.md §3) as a differentiable 0-dim tensor."""
    y, K = _prepare(H, labels, num_classes)
    N = H.shape[0]
    W = optimal_classifier(H, labels, lambda_W, K)
    return (
        (H @ W.T - y).square().sum() / (2 * N)
        + lambda_W / (2 * K) * W.square().sum()
        + lambda_H / (2 * N) * H.square().sum()
    )


@dataclass(frozen=True, eq=False)
class FlowTrajectory:
    """Output of :func:`central_path_flow` at the times ``t[T]``.

    ``nc1_tilde = tr_sw / tr_sb`` with ``tr_sw = Tr Sigma_W``, ``tr_sb = Tr Sigma_B``
    (docs/science.md §1; ``Sigma_B`` centred on the mean of class means). ``H[T, N, d]`` if kept.
    """

    t: Tensor
    nc1_tilde: Tensor
    tr_sw: Tensor
    tr_sb: Tensor
    H: Tensor | None
    steps: int
    rejected: int


# Dormand-Prince 5(4) tableau
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (  # 5th-order minus embedded 4th-order weights
    35 / 384 - 5179 / 57600,
    0.0,
    500 / 1113 - 7571 / 16695,
    125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200,
    11 / 84 - 187 / 2100,
    -1 / 40,
)


def _traces(H: Tensor, labels: Tensor, K: int) -> tuple[float, float]:
    counts = torch.bincount(labels, minlength=K).to(H.dtype)
    present = counts > 0
    means = torch.zeros(K, H.shape[1], dtype=H.dtype, device=H.device).index_add_(0, labels, H)
    means = means / counts.clamp_min(1).unsqueeze(1)
    tr_sw = float((H - means[labels]).square().sum()) / H.shape[0]
    mu = means[present]
    tr_sb = float((mu - mu.mean(0)).square().sum()) / mu.shape[0]
    return tr_sw, tr_sb


def central_path_flow(
    H0: Tensor,
    labels: Tensor,
    lambda_W: float,
    lambda_H: float,
    t_end: float,
    *,
    t_eval: Tensor | None = None,
    num_points: int = 101,
    rtol: float = 1e-8,
    atol: float = 1e-12,
    keep_features: bool = False,
    num_classes: int | None = None,
    max_steps: int = 100_000,
) -> FlowTrajectory:
    """Integrate ``dH/dt = -N grad L(H)`` (Eq. 4, docs/science.md §3) from ``H0[N, d]``.

    Adaptive Dormand-Prince 5(4) (error per step ``<= atol + rtol |H|``, RMS norm), landing
    exactly on each output time: ``t_eval`` (increasing, from 0) or ``num_points`` equally
    spaced times in ``[0, t_end]``. Float64. Theorem 3.1 (``lambda_W > 0``,
    ``lambda_H >= 0``, ``Sigma_W(H0) != 0``): ``nc1_tilde`` strictly decreases,
    ``exp(2 lambda_H t) tr_sw`` decreases and ``exp(2 lambda_H t) tr_sb`` increases.
    """
    H = H0.detach().to(torch.float64).clone()
    y_labels = labels.to(device=H.device, dtype=torch.long)
    y, K = _prepare(H, y_labels, num_classes)
    N, d = H.shape
    ridge = N * lambda_W / K
    eye = torch.eye(d, dtype=H.dtype, device=H.device)

    def rhs(x: Tensor) -> Tensor:
        W = torch.linalg.solve(x.T @ x + ridge * eye, x.T @ y).T
        return -((x @ W.T - y) @ W + lambda_H * x)

    if t_eval is None:
        t_eval = torch.linspace(0.0, float(t_end), num_points, dtype=torch.float64)
    times = [float(t) for t in t_eval]
    if any(b <= a for a, b in itertools.pairwise(times)) or times[0] < 0:
        raise ValueError("t_eval must be increasing and non-negative")

    out_h, sw, sb = [], [], []
    t, steps, rejected = 0.0, 0, 0
    k1 = rhs(H)
    h = 0.01 * max(float(H.norm()), 1e-12) / max(float(k1.norm()), 1e-300)
    for target in times:
        while t < target:
            if steps + rejected >= max_steps:
                raise RuntimeError(f"central_path_flow: more than {max_steps} steps")
            step = min(h, target - t)
            clipped = step < h
            ks = [k1]
            for i in range(1, 7):
                xi = H + step * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
                ks.append(rhs(xi))
            H_new = xi  # stage 7 evaluates at the 5th-order solution (FSAL)
            err = step * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
            scale = atol + rtol * torch.maximum(H.abs(), H_new.abs())
            e = float((err / scale).square().mean().sqrt())
            factor = min(5.0, max(0.2, 0.9 * max(e, 1e-10) ** -0.2))
            if e <= 1.0:
                t = target if clipped else t + step
                H, k1 = H_new, ks[6]
                steps += 1
                h = max(h, step * factor) if clipped else step * factor
            else:
                rejected += 1
                h = step * factor
            if not math.isfinite(h) or h <= 0:
                raise RuntimeError("central_path_flow: step size collapsed")
        a, b = _traces(H, y_labels, K)
        sw.append(a)
        sb.append(b)
        if keep_features:
            out_h.append(H.clone())
    sw_t = torch.tensor(sw, dtype=torch.float64)
    sb_t = torch.tensor(sb, dtype=torch.float64)
    return FlowTrajectory(
        t=torch.tensor(times, dtype=torch.float64),
        nc1_tilde=sw_t / sb_t,
        tr_sw=sw_t,
        tr_sb=sb_t,
        H=torch.stack(out_h) if keep_features else None,
        steps=steps,
        rejected=rejected,
    )
