"""Central path of the UFM and its gradient flow (docs/science.md §3, Eq. 4, Theorem 3.1).

Owns :func:`central_path_loss`, :func:`optimal_classifier` and :func:`central_path_flow` on raw
features (the paper's small sizes; the traces of the trajectory come from ``ClassMoments``).

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from nclightning.metrics import ClassMoments
from nclightning.perturbation._inputs import one_hot
from nclightning.perturbation._scale import between_energy

__all__ = ["FlowTrajectory", "central_path_flow", "central_path_loss", "optimal_classifier"]


def _prepare(H: Tensor, labels: Tensor, num_classes: int | None) -> tuple[Tensor, int]:
    if H.ndim != 2 or labels.shape != H.shape[:1]:
        raise ValueError(f"need H[N, d] and labels[N], got {tuple(H.shape)}, {tuple(labels.shape)}")
    K = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    return one_hot(labels.to(device=H.device, dtype=torch.long), K).to(H.dtype), K


def _ridge(H: Tensor, y: Tensor, lambda_W: float) -> Tensor:
    """``W*(H) = S (H^T H + N lambda_W/K I)^-1`` for rows ``H[N, d]``, one-hot ``y[N, K]``."""
    N, K = y.shape
    g = H.T @ H
    g.diagonal().add_(N * lambda_W / K)
    return cast(Tensor, torch.linalg.solve(g, H.T @ y)).T  # (S G^-1)^T = G^-1 S^T, G symmetric


def optimal_classifier(
    H: Tensor, labels: Tensor, lambda_W: float, num_classes: int | None = None
) -> Tensor:
    """``W*(H) [K, d]``, the minimiser of Eq. 2 over ``W`` for features ``H[N, d]`` (§2)."""
    y, _ = _prepare(H, labels, num_classes)
    return _ridge(H, y, lambda_W)


def central_path_loss(
    H: Tensor, labels: Tensor, lambda_W: float, lambda_H: float, num_classes: int | None = None
) -> Tensor:
    """``L(H) = f(W*(H), H; 0)`` (docs/science.md §3) as a differentiable 0-dim tensor."""
    y, K = _prepare(H, labels, num_classes)
    N = H.shape[0]
    W = _ridge(H, y, lambda_W)
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
    """``(Tr Sigma_W, Tr Sigma_B)`` of ``H`` (docs/science.md §1, through ``ClassMoments``)."""
    m = ClassMoments.from_features(H, labels, K)
    return float(m.class_ss.sum()) / m.total, between_energy(m)


def _dopri_step(
    rhs: Callable[[Tensor], Tensor], H: Tensor, k1: Tensor, step: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One Dormand-Prince 5(4) step: ``(5th-order solution, its slope (FSAL), error)``."""
    ks = [k1]
    for i in range(1, 7):
        xi = H + step * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
        ks.append(rhs(xi))
    err = step * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
    return xi, ks[6], cast(Tensor, err)  # stage 7 evaluates at the 5th-order solution


def _integrate_to(
    rhs: Callable[[Tensor], Tensor],
    state: dict[str, Any],
    target: float,
    rtol: float,
    atol: float,
    max_steps: int,
) -> None:
    """Advance ``state`` (``H``, ``k1``, ``t``, ``h``, counts) to ``t = target`` exactly."""
    while state["t"] < target:
        if state["steps"] + state["rejected"] >= max_steps:
            raise RuntimeError(f"central_path_flow: more than {max_steps} steps")
        h = state["h"]
        step = min(h, target - state["t"])
        clipped = step < h
        H_new, k_new, err = _dopri_step(rhs, state["H"], state["k1"], step)
        scale = atol + rtol * torch.maximum(state["H"].abs(), H_new.abs())
        e = float((err / scale).square().mean().sqrt())
        factor = min(5.0, max(0.2, 0.9 * max(e, 1e-10) ** -0.2))
        if e <= 1.0:
            state.update(H=H_new, k1=k_new, t=target if clipped else state["t"] + step)
            state["steps"] += 1
            state["h"] = max(h, step * factor) if clipped else step * factor
        else:
            state["rejected"] += 1
            state["h"] = step * factor
        if not math.isfinite(state["h"]) or state["h"] <= 0:
            raise RuntimeError("central_path_flow: step size collapsed")


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

    def rhs(x: Tensor) -> Tensor:
        W = _ridge(x, y, lambda_W)
        return -((x @ W.T - y) @ W + lambda_H * x)

    if t_eval is None:
        t_eval = torch.linspace(0.0, float(t_end), num_points, dtype=torch.float64)
    times = [float(t) for t in t_eval]
    if any(b <= a for a, b in itertools.pairwise(times)) or times[0] < 0:
        raise ValueError("t_eval must be increasing and non-negative")
    k1 = rhs(H)
    h = 0.01 * max(float(H.norm()), 1e-12) / max(float(k1.norm()), 1e-300)
    state: dict[str, Any] = dict(H=H, k1=k1, t=0.0, h=h, steps=0, rejected=0)
    out_h, sw, sb = [], [], []
    for target in times:
        _integrate_to(rhs, state, target, rtol, atol, max_steps)
        a, b = _traces(state["H"], y_labels, K)
        sw.append(a)
        sb.append(b)
        if keep_features:
            out_h.append(state["H"].clone())
    sw_t = torch.tensor(sw, dtype=torch.float64)
    sb_t = torch.tensor(sb, dtype=torch.float64)
    return FlowTrajectory(
        t=torch.tensor(times, dtype=torch.float64),
        nc1_tilde=sw_t / sb_t,
        tr_sw=sw_t,
        tr_sb=sb_t,
        H=torch.stack(out_h) if keep_features else None,
        steps=state["steps"],
        rejected=state["rejected"],
    )
