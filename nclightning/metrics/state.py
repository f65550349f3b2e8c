"""The packed float64 state of :class:`~nclightning.metrics.ClassStatistics` and its exact merge.

Owns the layout of the one state tensor (so that torchmetrics' sync gathers it in one
collective) and :func:`merge_packed_states`, the exact pairwise (Chan et al.) merge used as
its ``dist_reduce_fx`` and by ``merge_state`` (docs/science.md §10).

Parts (float64), per class ``k`` with shift ``c_k`` and shifted deviations ``e = h - c_k``:
``n[K]`` counts, ``c[K, d]`` shifts, ``t[K, d] = sum e``, ``r[K] = sum ||e||^2``,
``a[K] = sum ||h||`` and, by scatter mode, ``q[d, d] = sum e e^T`` ("full"),
``qk[K, d, d]`` per class ("per_class"), ``qs[r, r] = B^T (sum e e^T) B`` ("span", basis
``B[d, r]``) or nothing ("none").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from nclightning.metrics.moments import ClassMoments

__all__ = [
    "SCATTER_MODES",
    "CentredStateMeans",
    "Float64States",
    "Layout",
    "merge_packed_states",
    "shift_increments",
    "state_means",
    "state_moments",
    "state_within_quadratic",
]

SCATTER_MODES = ("full", "per_class", "span", "none")


class Layout:
    """Offsets of the parts of the packed state for ``K`` classes, ``d`` dims, a scatter mode."""

    def __init__(self, num_classes: int, dim: int, mode: str, rank: int = 0) -> None:
        if mode not in SCATTER_MODES:
            raise ValueError(f"scatter mode must be one of {SCATTER_MODES}, got {mode!r}")
        K, d = num_classes, dim
        shapes = {"n": (K,), "c": (K, d), "t": (K, d), "r": (K,), "a": (K,)}
        if mode == "full":
            shapes["q"] = (d, d)
        elif mode == "per_class":
            shapes["qk"] = (K, d, d)
        elif mode == "span":
            shapes["qs"] = (rank, rank)
        self.num_classes, self.dim, self.mode = K, d, mode
        self.shapes = shapes
        self.slices: dict[str, slice] = {}
        off = 0
        for name, shape in shapes.items():
            size = 1
            for s in shape:
                size *= s
            self.slices[name] = slice(off, off + size)
            off += size
        self.size = off

    def views(self, packed: Tensor) -> dict[str, Tensor]:
        """Views of ``packed[..., size]`` shaped ``[..., *shape]`` (writable for 1-D input)."""
        lead = packed.shape[:-1]
        return {k: packed[..., self.slices[k]].reshape(*lead, *self.shapes[k]) for k in self.shapes}


def _sym(a: Tensor) -> Tensor:
    return a + a.transpose(-1, -2)


def shift_increments(
    n: Tensor, t: Tensor, e: Tensor, mode: str, basis: Tensor | None = None
) -> dict[str, Tensor]:
    """Exact float64 increments of ``t``, ``r`` and the scatter part when shifts move.

    ``n[..., K]``, ``t[..., K, d]`` of a state and ``e[..., K, d] = c_old - c_new``: the
    deviations become ``h - c_new = (h - c_old) + e``, so ``t += n e``,
    ``r += 2 e.t + n ||e||^2``, ``q += sum_k (e_k t_k^T + t_k e_k^T + n_k e_k e_k^T)``
    (as ``A + A^T``, ``A = E^T (T + N E / 2)``; per class for ``qk``; in the coordinates
    ``E B``, ``T B`` of the basis for ``qs``). ``e`` is of the order of the within-class
    spread, so nothing cancels. Leading dimensions broadcast (one per merged state).
    """
    ne = n.unsqueeze(-1) * e
    half = t + 0.5 * ne
    out = {"t": ne, "r": (e * (2 * t + ne)).sum(-1)}
    if mode == "full":
        out["q"] = _sym(e.transpose(-1, -2) @ half)
    elif mode == "per_class":
        out["qk"] = _sym(e.unsqueeze(-1) * half.unsqueeze(-2))
    elif mode == "span":
        assert basis is not None
        b = basis.to(device=e.device, dtype=e.dtype)
        out["qs"] = _sym((e @ b).transpose(-1, -2) @ (half @ b))
    return out


def merge_packed_states(stacked: Tensor, layout: Layout, basis: Tensor | None = None) -> Tensor:
    """Exact merge of packed states ``stacked[R, size]`` -> ``[size]``.

    For each class the common shift ``c*_k`` is the shift of the first state holding samples
    of ``k``; every state moves to it (:func:`shift_increments` with ``e = c^r - c*``), then
    all parts add. With a common fixed shift every ``e`` is 0 and the merge is a plain sum.
    Commutative and associative up to rounding.
    """
    if stacked.ndim == 1:
        return stacked
    if stacked.shape[0] == 1:
        return stacked[0].clone()
    K = layout.num_classes
    v = layout.views(stacked)
    n, c, t = v["n"], v["c"], v["t"]  # [R, K], [R, K, d], [R, K, d]
    has = n > 0
    first = has.to(torch.int8).argmax(0)  # first state holding class k (0 if none)
    c_star = c[first, torch.arange(K, device=c.device)]  # [K, d]
    e = torch.where(has.unsqueeze(-1), c - c_star, 0.0)  # [R, K, d]
    inc = shift_increments(n, t, e, layout.mode, basis)
    out = torch.empty_like(stacked[0])
    o = layout.views(out)
    o["c"].copy_(c_star)
    for name in layout.shapes:
        if name != "c":
            o[name].copy_((v[name] + inc[name] if name in inc else v[name]).sum(0))
    return out


def _half_sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _half_sym_(a: Tensor, block: int = 512) -> Tensor:
    """``a <- (a + a^T) / 2`` in place for a square matrix, a block pair at a time."""
    d = a.shape[0]
    for i in range(0, d, block):
        for j in range(i, d, block):
            upper, lower = a[i : i + block, j : j + block], a[j : j + block, i : i + block]
            mean = (upper + lower.T).mul_(0.5)
            upper.copy_(mean)
            lower.copy_(mean.T)
    return a


def _means_(off: Tensor, c: Tensor, present: Tensor) -> Tensor:
    return off.add_(c).masked_fill_(~present.unsqueeze(1), 0.0)


def state_means(v: dict[str, Tensor]) -> Tensor:
    """The class means ``c_k + t_k / n_k`` of the state views ``v`` (absent classes: 0),
    ``[K, d]``: the numbers of :func:`state_moments`' means."""
    n = v["n"]
    return _means_(v["t"] / n.clamp_min(1).unsqueeze(1), v["c"], n > 0)


def state_moments(
    v: dict[str, Tensor],
    layout: Layout,
    basis: Tensor | None = None,
    *,
    full_scatter: bool = True,
) -> ClassMoments:
    """:class:`ClassMoments` of the state views ``v`` (float64, absent classes: mean 0).

    ``mu_k = c_k + t_k / n_k``, scatter ``= q - sum_k t_k t_k^T / n_k`` (per class for
    ``qk``, in basis coordinates for ``qs``), ``class_ss_k = r_k - ||t_k||^2 / n_k``.
    ``full_scatter=False`` leaves the full scatter out (mode "full": its quadratic forms come from
    :func:`state_within_quadratic` instead, without a ``d x d`` copy).
    """
    n, c, t = v["n"], v["c"], v["t"]
    present = n > 0
    off = t / n.clamp_min(1).unsqueeze(1)  # mu_k - c_k
    class_ss = (v["r"] - (off.unsqueeze(1) @ t.unsqueeze(2)).flatten()).clamp_min(0.0)
    scatter = class_scatter = span_basis = span = None
    if layout.mode == "full" and full_scatter:  # no d x d temporaries beyond the result
        scatter = _half_sym_(torch.addmm(v["q"], off.T, t, alpha=-1.0))
    elif layout.mode == "per_class":
        class_scatter = torch.baddbmm(v["qk"], off.unsqueeze(2), t.unsqueeze(1), alpha=-1.0)
        for block in class_scatter:  # in place: no further K d^2 temporaries
            _half_sym_(block)
        scatter = class_scatter.sum(0)
    elif layout.mode == "span":
        assert basis is not None
        span_basis = basis.to(device=n.device, dtype=n.dtype)
        span = _half_sym(v["qs"] - (off @ span_basis).T @ (t @ span_basis))
    means = _means_(off, c, present)  # in off's memory (no further K x d temporary)
    norm_sums = v["a"].clone()
    return ClassMoments(
        n.clone(), means, scatter, class_ss, class_scatter, span_basis, span, norm_sums
    )


class CentredStateMeans:
    """The centred class means ``M^T [K', d]`` of a state's views ``v`` (present classes),
    made on demand: whole (:meth:`full`) or a block of rows (:meth:`rows`, after
    :meth:`full`, which fixes the centre): the numbers of
    ``state_moments(v, ...).centered_means``."""

    def __init__(self, v: dict[str, Tensor]) -> None:
        self.v = v
        present = v["n"] > 0
        self.index = None if bool(present.all()) else present.nonzero().flatten()
        self.centre: Tensor | None = None

    def full(self) -> Tensor:
        means = state_means(self.v)
        if self.index is not None:
            means = means.index_select(0, self.index)
        self.centre = means.mean(0)
        return means.sub_(self.centre)

    def rows(self, start: int, stop: int) -> Tensor:
        if self.centre is None:
            raise RuntimeError("CentredStateMeans.rows needs the centre: call full() first")
        n, c, t = self.v["n"], self.v["c"], self.v["t"]
        if self.index is None:
            n, c, t = n[start:stop], c[start:stop], t[start:stop]
        else:
            at = self.index[start:stop]
            n, c, t = n.index_select(0, at), c.index_select(0, at), t.index_select(0, at)
        return (t / n.clamp_min(1).unsqueeze(1)).add_(c).sub_(self.centre)


_QUAD_ROWS = 128  # directions per block in state_within_quadratic


def state_within_quadratic(v: dict[str, Tensor], directions: Tensor) -> Tensor:
    """``u^T scatter u`` for each row ``u`` of ``directions[r, d]`` from the views ``v`` of a
    "full" state, without forming the scatter: ``u^T q u - sum_k (t_k . u)^2 / n_k``.

    The same cancellation as in the scatter of :func:`state_moments` (the shifted sums
    ``t_k / n_k`` are of the order of the within-class spread, so nothing large cancels);
    :data:`_QUAD_ROWS` directions at a time (``[128, d]`` and ``[128, K]`` temporaries).
    """
    q, t, n = v["q"], v["t"], v["n"].clamp_min(1)
    u = directions.to(device=q.device, dtype=q.dtype)
    parts = [((b @ q) * b).sum(1) - (b @ t.T).square_().div_(n).sum(1) for b in u.split(_QUAD_ROWS)]
    return torch.cat(parts) if parts else u.new_zeros(0)


class Float64States:
    """Mixin for a ``torchmetrics.Metric``: the states named in ``_F64_STATES`` stay float64
    under dtype casts (``.to(torch.half)``, ``set_dtype``); they still follow devices.

    Uses only torchmetrics' documented ``exclude_state`` argument of ``Metric._apply`` (the
    hook behind ``.to``/``.cuda``): the excluded states are moved to the device that the
    cast sends a float64 probe tensor to, never to another dtype. ``reset()`` puts defaults
    on the current state's device, so the defaults need not move.
    """

    _F64_STATES: tuple[str, ...] = ()

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = ()) -> Any:
        this = super()._apply(fn, exclude_state=(*exclude_state, *self._F64_STATES))  # type: ignore[misc]
        for key in self._F64_STATES:
            value = getattr(this, key)
            device = fn(torch.zeros((), dtype=torch.float64, device=value.device)).device
            setattr(this, key, value.to(device=device, dtype=torch.float64))
        return this
