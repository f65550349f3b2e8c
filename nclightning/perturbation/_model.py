"""Eq. 2 with ``H`` eliminated, in the eigenbasis of ``Sw0`` (docs/science.md §2, §10).

Owns ``g(W) = min_H f(W, H)``, its gradient, its exact Hessian-vector products and two
preconditioners, for ``H0`` given as a :class:`~._spectral.Spectrum` (``Sw0 = diag(s)``; rows
of ``W[K, d]`` and of the class means ``mu[K, d]`` in that basis). With ``c = lambda_H + beta``,
``M = W W^T + c I_K`` and ``A = (W^T W + c I_d)^-1`` (push-through: ``W A = M^-1 W``), the
minimiser ``H*(W)`` has class means ``m_k = A (w_k + beta mu_k)`` and within-class deviations
``beta A (h0_i - mu_k)`` (docs/science.md §2). Every term of ``g`` is a function of three
``K x K`` aggregates, ``Gamma = W W^T``, ``W mu^T`` and ``T = W S W^T``, and::

    grad g(W) = E0 W + F mu + E1 W S,
    E1 = beta^2/(c N) M^-1,  F = beta/(c N) R^T D_n,  R = (beta (mu W^T - I) - lambda_H I) M^-1,
    E0 = F/beta (I - (Gamma + beta mu W^T) M^-1) - beta^2/(c N) M^-1 T M^-1 + lambda_W/K I

(rows ``r_k`` of ``R`` are the class-mean residuals ``W m_k - e_k``). The Hessian is the part
``V -> E0 V + E1 V S`` (one ``K x K`` matrix ``E0 + s_j E1`` per coordinate ``j``) plus the change
of the multipliers ``(E0, F, E1)`` with the aggregates. Costs: ``O(K^2 d)`` per evaluation and
per Hessian-vector product.

Preconditioners (:mod:`._newton` picks one per iteration):

* *block*: ``(E0 + s_j E1)^-1`` per coordinate, applied in ``O(K^2 d)`` by diagonalising the
  pencil ``(E0, E1)`` once (valid when ``beta > 0`` and every ``E0 + s_j E1`` is positive
  definite): exact at small ``beta``, where the features nearly collapse;
* *fixed-H*: the Hessian in ``W`` at fixed ``H = H*(W)``, ``V -> V (H H^T/N + lambda_W/K I)``,
  diagonal plus rank ``3K`` in this basis (Woodbury; where ``3K >= d`` the ``d x d`` matrix is
  formed and factorised instead, ``O(K d^2 + d^3)`` once and ``O(K d^2)`` per application):
  exact as ``beta -> inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from nclightning.perturbation._linesearch import Evaluation
from nclightning.perturbation._newton import Factory, Operator
from nclightning.perturbation._spectral import Spectrum

__all__ = ["Model", "State", "check_parameters"]


def check_parameters(lambda_W: float, lambda_H: float, beta: float) -> None:
    """Eq. 2 needs ``lambda_W > 0``, ``lambda_H, beta >= 0`` and ``lambda_H + beta > 0``."""
    if not lambda_W > 0:
        raise ValueError(f"lambda_W must be > 0, got {lambda_W}")
    if not (lambda_H >= 0 and beta >= 0 and lambda_H + beta > 0):
        raise ValueError(
            f"need lambda_H >= 0, beta >= 0, lambda_H + beta > 0; got {lambda_H}, {beta}"
        )


@dataclass
class State:
    """Quantities of one point ``W`` shared by the objective, gradient and Hessian."""

    W: Tensor
    gram: Tensor  # Gamma = W W^T
    m_inv: Tensor  # M^-1
    m_inv_w: Tensor  # M^-1 W = W A
    w_mu: Tensor  # mu W^T, [k, j] = w_j . mu_k
    ws: Tensor  # W S
    t: Tensor  # T = W S W^T
    means: Tensor  # rows m_k
    r: Tensor  # rows W m_k - e_k


class Model:
    """``g(W)`` for one ``(lambda_W, lambda_H, beta)`` (module docstring)."""

    def __init__(self, spec: Spectrum, lambda_W: float, lambda_H: float, beta: float) -> None:
        check_parameters(lambda_W, lambda_H, beta)
        self.spec = spec
        self.s, self.mu, self.n = spec.s, spec.means, spec.counts
        self.N = float(self.n.sum())
        self.K, self.d = self.mu.shape
        self.lw, self.lh, self.beta = float(lambda_W), float(lambda_H), float(beta)
        self.c = self.lh + self.beta
        self.gamma = self.lw / self.K
        self.tr_s = float(self.s.sum())
        self.eye = torch.eye(self.K, dtype=torch.float64, device=self.mu.device)

    # -- one point -----------------------------------------------------------------------------
    def state(self, W: Tensor, like: State | None = None) -> State:
        """The quantities of ``W`` at this model's ``beta``; ``like``: a state of the same ``W``
        (at another ``beta``), whose ``beta``-free products are reused (the same numbers)."""
        b, c = self.beta, self.c
        if like is not None and (like.W is W or torch.equal(like.W, W)):
            gram, w_mu, ws, t = like.gram, like.w_mu, like.ws, like.t
        else:
            gram, w_mu, ws = W @ W.T, self.mu @ W.T, W * self.s
            t = ws @ W.T
        chol = torch.linalg.cholesky(gram + c * self.eye)
        m_inv_w = torch.cholesky_solve(W, chol)
        m_inv = torch.cholesky_inverse(chol)
        x = W + b * self.mu
        means = (x - (gram + b * w_mu) @ m_inv_w) / c  # x W^T = Gamma + beta mu W^T
        r = (b * (w_mu - self.eye) - self.lh * self.eye) @ m_inv
        return State(W, gram, m_inv, m_inv_w, w_mu, ws, t, means, r)

    def objective(self, W: Tensor) -> float:
        """``g(W)`` alone (to compare starting points)."""
        return self.objective_at(self.state(W))

    def objective_at(self, st: State) -> float:
        """``g(W)`` at the state of ``W``."""
        W, b, c, lh, N = st.W, self.beta, self.c, self.lh, self.N
        dev = (self.eye - st.w_mu) @ W - lh * self.mu  # rows of (m_k - mu_k) before A
        dev_w = (self.eye - st.w_mu) @ st.gram - lh * st.w_mu  # dev W^T, from K x K factors
        dev = (dev - dev_w @ st.m_inv_w) / c
        between = self.n * (
            st.r.square().sum(1) + lh * st.means.square().sum(1) + b * dev.square().sum(1)
        )
        within = b * ((b / c) * float((st.m_inv * st.t).sum()) + (lh / c) * self.tr_s)
        return (float(between.sum()) + within) / (2 * N) + 0.5 * self.gamma * float(
            W.square().sum()
        )

    def evaluate(self, W: Tensor) -> Evaluation:
        """Objective, gradient and relative gradient norm (``solver`` module docstring)."""
        return self.evaluation(self.state(W))

    def evaluation(self, st: State, f: float | None = None) -> Evaluation:
        """:meth:`evaluate` at a point whose state (and objective ``f``) is known."""
        W, b, c, N = st.W, self.beta, self.c, self.N
        within_g = (b * b / c) * (st.m_inv @ st.ws - (st.m_inv @ st.t) @ st.m_inv_w)
        nm = self.n.unsqueeze(1) * st.means  # Y H^T
        whh_y = st.r.T @ nm + within_g  # (W H - Y) H^T
        grad = whh_y / N + self.gamma * W
        f = self.objective_at(st) if f is None else f
        whh = whh_y + nm  # W H H^T
        norm = torch.linalg.vector_norm
        scale = float(norm(whh)) / N + float(norm(nm)) / N + self.gamma * float(norm(W))
        gn = float(norm(grad))
        rel = gn / scale if scale > 0 else (0.0 if gn == 0 else math.inf)
        return Evaluation(f, grad, rel, st)

    # -- second order --------------------------------------------------------------------------
    def multipliers(self, st: State) -> tuple[Tensor, Tensor, Tensor]:
        """``(E0, F, E1)`` at ``st`` (module docstring)."""
        b, cn = self.beta, self.c * self.N
        rn = st.r.T * self.n
        p1 = self.eye - (st.gram + b * st.w_mu) @ st.m_inv
        e0 = rn @ p1 / cn - (b * b / cn) * (st.m_inv @ st.t @ st.m_inv) + self.gamma * self.eye
        return e0, (b / cn) * rn, (b * b / cn) * st.m_inv

    BLOCK, FIXED_H = 0, 1
    """Indices of the preconditioner factories of :meth:`hessian`."""

    def hessian(self, W: Tensor, ev: Evaluation) -> tuple[Operator, list[Factory]]:
        """``(hvp, preconditioner factories)`` at ``W`` for :func:`._newton.minimize`: the
        block one (``None`` where not positive definite), then the fixed-H one."""
        st: State = ev.ctx
        e0, _, e1 = self.multipliers(st)
        return self.hvp(st, e0, e1), [
            lambda: self._block_preconditioner(self._pencil(e0, e1)),
            lambda: self._fixed_h_preconditioner(st),
        ]

    def hvp(self, st: State, e0: Tensor, e1: Tensor) -> Operator:
        """``V -> (Hessian of g at st.W) V``, ``O(K^2 d)`` per product (module docstring)."""
        W = st.W
        b, lh, cn = self.beta, self.lh, self.c * self.N
        a0 = b * (st.w_mu - self.eye) - lh * self.eye
        rn = st.r.T * self.n
        p1 = self.eye - (st.gram + b * st.w_mu) @ st.m_inv
        mi, t = st.m_inv, st.t

        g_wmu = st.gram + b * st.w_mu
        tm = t @ mi
        fixed = torch.cat([W, self.mu, st.ws])  # [3K, d]
        e01 = torch.cat([e0, e1])  # [2K, K]
        K, s, n = self.K, self.s, self.n
        bb = b * b / cn

        def hvp(V: Tensor) -> Tensor:
            vf = V @ fixed.T  # [V W^T | V mu^T | V S W^T], one product
            d_gram = vf[:, :K] + vf[:, :K].T
            z = d_gram @ mi
            y = vf[:, K : 2 * K].T @ mi  # d(mu W^T) M^-1
            d_mi = -mi @ z  # -M^-1 dGamma M^-1
            d_rn = (a0 @ d_mi).add_(y, alpha=b).T * n
            d_p1 = (g_wmu @ d_mi).add_(z).add_(y, alpha=b).neg_()
            # d(M^-1 T M^-1) = d_mi T M^-1 + M^-1 dT M^-1 + M^-1 T d_mi, dT = X + X^T
            u = (mi @ vf[:, 2 * K :] @ mi).addmm_(d_mi, tm)
            d_e0 = (d_rn @ p1).addmm_(rn, d_p1).div_(cn).sub_(u + u.T, alpha=bb)
            d_all = torch.cat([d_e0, (b / cn) * d_rn, bb * d_mi], 1)  # [K, 3K]
            ev = e01 @ V  # E0 V and E1 V; (E1 V) S = E1 (V S)
            return torch.addcmul(ev[:K], ev[K:], s).addmm_(d_all, fixed)

        return hvp

    def _pencil(self, e0: Tensor, e1: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(C, den[K, d])`` with ``E0 + s_j E1 = C^-T diag(den[:, j]) C^-1`` (``beta > 0``)."""
        if self.beta <= 0:
            return None
        chol, info = torch.linalg.cholesky_ex(0.5 * (e1 + e1.T))
        if int(info) != 0:
            return None
        li = torch.linalg.solve_triangular(chol, self.eye, upper=False)
        lam, vec = torch.linalg.eigh(li @ (0.5 * (e0 + e0.T)) @ li.T)
        return li.T @ vec, lam.unsqueeze(1) + self.s.unsqueeze(0)

    def _block_preconditioner(self, pencil: tuple[Tensor, Tensor] | None) -> Operator | None:
        """``q -> (E0 + s_j E1)^-1 q_j`` per column, or ``None`` where not positive definite."""
        if pencil is None:
            return None
        c, den = pencil
        if not float(den.min()) > 1e-12 * float(den.abs().max()):
            return None
        inv = 1.0 / den  # (E0 + s_j E1)^-1 = C diag(1 / den_j) C^T
        return lambda q: c @ (inv * (c.T @ q))

    def escape(self, W: Tensor, ev: Evaluation) -> Tensor | None:
        """A direction of negative curvature at a stationary ``W``, or ``None``.

        Coordinates where ``H0`` has neither spread nor class signal (``s_j = mu_j = 0``, e.g.
        a zero-padded ``H0`` or ``N < d``) are an invariant subspace of the iteration: ``W`` that
        starts with no component there keeps none, even where moving into them lowers ``f``
        (a saddle). There the Hessian is the block ``E0 + s_j E1``; its most negative
        generalised eigenvector, checked with an exact Hessian-vector product, is returned.
        """
        tiny = 1e-8
        empty = (W.abs().amax(0) <= tiny * float(W.abs().max())) & (
            self.mu.abs().amax(0) <= tiny * float(self.mu.abs().max())
        )  # [d]: coordinates of the invariant subspace
        if not bool(empty.any()):  # (checked first: it needs no K x K decomposition)
            return None
        e0, _, e1 = self.multipliers(ev.ctx)
        pencil = self._pencil(e0, e1)
        if pencil is None or not float(pencil[1].min()) < 0:
            return None
        c, den = pencil
        hvp = self.hvp(ev.ctx, e0, e1)
        flat = torch.where(empty.unsqueeze(0), den, torch.inf).flatten()
        for idx in torch.argsort(flat)[: self.K].tolist():  # the most negative blocks first
            if not float(flat[idx]) < 0:
                break
            k, j = divmod(idx, self.d)
            V = torch.zeros_like(W)
            V[:, j] = c[:, k] / c[:, k].norm()
            if float((V * hvp(V)).sum()) < 0:
                return V
        return None

    def _fixed_h_preconditioner(self, st: State) -> Operator:
        """``q -> q (H H^T/N + lambda_W/K I)^-1``: diagonal + rank 3K, by Woodbury; where
        ``3K >= d`` the ``d x d`` matrix is formed and inverted instead (cheaper than the
        ``3K x 3K`` Woodbury core, and one ``O(K d^2)`` product per application; where ``3K < d``
        the operator and its rounding are unchanged)."""
        K, N, a = self.K, self.N, (self.beta / self.c) ** 2
        diag = self.gamma + (a / N) * self.s  # [d]
        if 3 * K >= self.d:  # H H^T / N + gamma I formed densely: O(K d^2 + d^3)
            b = st.m_inv @ st.W
            mtm = st.m_inv @ st.t @ st.m_inv
            p = (st.means.T * (self.n / N)) @ st.means + (a / N) * (
                st.W.T @ (mtm @ st.W) - st.ws.T @ b - b.T @ st.ws
            )
            p = 0.5 * (p + p.T)
            p.diagonal().add_(diag)
            chol, info = torch.linalg.cholesky_ex(p)
            if int(info) == 0:
                inv = torch.cholesky_inverse(chol)
                return lambda q: q @ inv
        lt = torch.cat([st.means, st.ws, st.W])  # L^T [3K, d]: H H^T / N = D + L C L^T
        core = torch.zeros(3 * K, 3 * K, dtype=torch.float64, device=st.W.device)
        core[:K, :K] = torch.diag(self.n) / N
        core[K : 2 * K, 2 * K :] = -(a / N) * st.m_inv
        core[2 * K :, K : 2 * K] = -(a / N) * st.m_inv
        core[2 * K :, 2 * K :] = (a / N) * (st.m_inv @ st.t @ st.m_inv)
        ltd = lt / diag
        eye = torch.eye(3 * K, dtype=torch.float64, device=st.W.device)
        z = core @ torch.linalg.inv(eye + (ltd @ lt.T) @ core)  # C (I + L^T D^-1 L C)^-1
        z = 0.5 * (z + z.T)
        return lambda q: q / diag - ((q @ ltd.T) @ z) @ ltd

    # -- starting point and fast metric --------------------------------------------------------
    def initial(self) -> Tensor:
        """Ridge regression of ``Y`` on ``H0`` (the ``beta -> inf`` minimiser), by Woodbury."""
        present = self.n > 0
        u = self.mu[present]
        diag = self.gamma + self.s / self.N  # G0/N + lambda_W/K I = D + U^T diag(n/N) U
        x = (self.n.unsqueeze(1) * self.mu / self.N) / diag
        ud = u / diag
        core = torch.diag(self.N / self.n[present]) + ud @ u.T
        return x - (x @ u.T) @ cast(Tensor, torch.linalg.solve(core, ud))

    def summary(self, st: State) -> tuple[float, Tensor]:
        """``(sum_i ||h*_i - m_k||^2, means m_k [K, d])`` of ``H*(W)`` at the state of ``W``.

        From the eigendecomposition ``W W^T = U diag(sigma^2) U^T`` (``K x K``; the rows
        ``w~_r = u_r^T W`` are ``sigma_r`` times ``W``'s right singular vectors), with
        ``A = (W^T W + c I)^-1``: ``A x = x / c - sum_r w~_r (w~_r . x) / (c (sigma_r^2 + c))``
        and ``Tr(A^2 S) = (Tr S - sum_r (sigma_r^2 + 2c) / (sigma_r^2 + c)^2 (U^T T U)_rr) / c^2``
        (``T = W S W^T``). No ``sigma_r`` divides anything, so a rank-deficient ``W`` needs no
        cut-off; the rounding is that of the SVD form (the part of ``x`` or of ``S`` outside
        ``W``'s row space is a difference in both). ``O(K^3)`` beyond the state, and one
        ``[K, K] x [K, d]`` product.
        """
        b, c = self.beta, self.c
        sig2, u = torch.linalg.eigh(st.gram)
        sig2 = sig2.clamp_min(0.0)
        xw = st.gram + b * st.w_mu  # [k, j] = (w_k + beta mu_k) . w_j
        coef = ((xw @ u) / (c * (sig2 + c))) @ u.T
        means = (st.W + b * self.mu) / c - coef @ st.W
        tut = ((u.T @ st.t) * u.T).sum(1)  # (U^T T U)_rr
        inside = float(((sig2 + 2.0 * c) / (sig2 + c).square() * tut).sum())
        return (b / c) ** 2 * (self.tr_s - inside), means

    def nc1_tilde(self, st: State) -> float:
        """``Tr Sigma_W(H*) / Tr Sigma_B(H*)`` (docs/science.md §1) at the state of ``W``."""
        within, means = self.summary(st)
        mu = means[self.n > 0]
        tr_b = float((mu - mu.mean(0)).square().sum()) / mu.shape[0]
        return within / self.N / tr_b if tr_b > 0 else math.nan

    def rms(self, st: State) -> float:
        """RMS feature norm of ``H*(W)``, ``sqrt((1/N) sum_i ||h*_i||^2)``, at ``W``'s state."""
        within, means = self.summary(st)
        return math.sqrt((within + float((self.n * means.square().sum(1)).sum())) / self.N)
