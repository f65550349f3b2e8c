"""Central path and its gradient flow: Eq. 4, Theorem 3.1 (docs/science.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from nclightning.perturbation import central_path_flow, central_path_loss, optimal_classifier

LW = math.sqrt(2)


def test_central_path_loss_is_eq2_at_the_optimal_classifier(ref):
    """L(H) = f(W*(H), H; 0) and W*(H) minimises f over W (autograd gradient vanishes)."""
    h0, labels = ref.random_features(0, [4, 6, 5], 5)
    W = optimal_classifier(h0, labels, LW).requires_grad_(True)
    f = ref.eq2(W, h0.T, torch.zeros_like(h0.T), ref.onehot_columns(labels, 3), LW, 0.2, 0.0)
    (gw,) = torch.autograd.grad(f, W)
    assert float(gw.norm()) <= 1e-13
    assert float(central_path_loss(h0, labels, LW, 0.2)) == pytest.approx(
        float(f.detach()), rel=1e-14
    )


def _rk4_reference(H0, labels, lambda_H, t_end, steps):
    """Fixed-step RK4 on dH/dt = -N grad L(H), gradient by autograd of the loss."""
    N = H0.shape[0]

    def rhs(H):
        x = H.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(central_path_loss(x, labels, LW, lambda_H), x)
        return -N * g

    H, h = H0.clone(), t_end / steps
    for _ in range(steps):
        k1 = rhs(H)
        k2 = rhs(H + h / 2 * k1)
        k3 = rhs(H + h / 2 * k2)
        k4 = rhs(H + h * k3)
        H = H + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return H


def test_flow_matches_independent_rk4(ref):
    h0, labels = ref.random_features(1, [3, 4, 3], 4, between=1.0)
    tr = central_path_flow(
        h0,
        labels,
        LW,
        0.1,
        2.0,
        t_eval=torch.tensor([0.0, 1.0, 2.0]),
        keep_features=True,
        rtol=1e-11,
        atol=1e-14,
    )
    assert torch.equal(tr.H[0], h0)
    expected = _rk4_reference(h0, labels, 0.1, 2.0, 400)
    assert float((tr.H[-1] - expected).abs().max()) <= 1e-8
    assert tr.t.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("lambda_H", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_theorem_3_1_monotonicity(ref, lambda_H, seed):
    """nc1_tilde strictly decreases, e^{2 lH t} Tr Sw decreases, e^{2 lH t} Tr Sb increases."""
    h0, labels = ref.random_features(seed, [6, 6, 6, 6], 8, between=1.0, within=1.0)
    tr = central_path_flow(h0, labels, LW, lambda_H, 8.0, num_points=81, rtol=1e-10)
    assert tr.nc1_tilde[-1] < 0.9 * tr.nc1_tilde[0]  # the flow moves appreciably
    assert bool((tr.nc1_tilde.diff() < 0).all())
    scale = torch.exp(2 * lambda_H * tr.t)
    sw, sb = scale * tr.tr_sw, scale * tr.tr_sb
    assert bool((sw.diff() <= 1e-12 * sw[:-1]).all())
    assert bool((sb.diff() > 0).all())
    # the traces are those of docs/science.md §1 (nc1_tilde = Tr Sw / Tr Sb)
    assert torch.allclose(tr.nc1_tilde, tr.tr_sw / tr.tr_sb)


def test_traces_are_the_collapse_definitions(ref):
    h0, labels = ref.random_features(2, [3, 5, 4], 4)
    tr = central_path_flow(h0, labels, LW, 0.1, 0.0, t_eval=torch.tensor([0.0]))
    mu = torch.stack([h0[labels == k].mean(0) for k in range(3)])
    tr_sw = sum(float((h0[labels == k] - mu[k]).square().sum()) for k in range(3)) / len(h0)
    tr_sb = float((mu - mu.mean(0)).square().sum()) / 3
    assert float(tr.tr_sw[0]) == pytest.approx(tr_sw, rel=1e-13)
    assert float(tr.tr_sb[0]) == pytest.approx(tr_sb, rel=1e-13)


def test_flow_rejects_bad_times(ref):
    h0, labels = ref.random_features(3, [2, 2], 3)
    with pytest.raises(ValueError, match="increasing"):
        central_path_flow(h0, labels, LW, 0.1, 1.0, t_eval=torch.tensor([0.0, 1.0, 0.5]))
