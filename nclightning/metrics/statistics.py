"""Streaming, distributed, collapse-exact class statistics (docs/science.md §1).

:class:`ClassStatistics` is a ``torchmetrics.Metric`` that turns one pass over
``features[B, d]`` (rows, the PyTorch convention; docs/science.md writes columns) and
``labels[B]`` into :class:`~nclightning.metrics.ClassMoments` and every collapse metric.
:func:`collapse_metrics` runs the same code on in-memory features.

Accumulation scheme (why one pass stays exact when collapse is strong)
---------------------------------------------------------------------
``E[hh^T] - mu mu^T`` cancels catastrophically: with within-class std ``s`` and mean norm
``m`` it loses ``(m/s)^2`` in relative precision (``1e8`` at ``s/m = 1e-4``: every digit of
float32). Instead each state keeps, per class ``k``, a fixed *shift* ``c_k`` (the class mean
of the first batch containing ``k``, rounded to the compute precision) and sums of the
shifted deviations ``e = h - c_k``:

* ``n_k``; ``t_k = sum e`` [K, d]; ``r_k = sum ||e||^2`` [K];
* ``q = sum e e^T`` [d, d], pooled over classes (optionally ``q_k`` per class [K, d, d]).

Per batch this is one ``d x B x d`` product of *centred* data in the compute precision
(float32 for float16/bfloat16/float32 inputs; float64 for float64 inputs or
``compute_dtype=torch.float64``) plus ``O(B d)`` work and an ``O(d^2)`` float64
accumulation. Because ``|mu_k - c_k|`` is of the order of the within-class spread, rounding
errors are relative to the spread, not to the mean: float32 mode stays at ~1e-7 relative
(measured vs a float64 two-pass reference at ``s/m = 1e-4``) whatever ``m/s``. Results
(float64): ``mu_k = c_k + t_k / n_k``, scatter ``= q - sum_k t_k t_k^T / n_k``,
``class_ss_k = r_k - ||t_k||^2 / n_k``. The shift is fixed for the pass: features that drift
by much more than their spread within one pass lose that advantage (use float64).

Distributed reduction (why a custom ``dist_reduce_fx``)
-------------------------------------------------------
States of different ranks (or of ``merge_state``) carry different shifts, so a plain sum is
wrong; converting them to a common zero shift in float64 before summing would reintroduce the
cancellation (error ``~1e-16 (m/s)^2``). All of the above is packed into one float64 state
tensor whose ``dist_reduce_fx`` is the exact pairwise (Chan et al.) merge
:func:`merge_packed_states`: it moves every rank's sums to a common shift with
``e -> e + (c^r - c^*)`` (a small vector, so no cancellation) and then sums. torchmetrics'
own sync gathers the states and applies it; it equals a plain sum when the shifts agree and
is commutative and associative up to rounding. The NC4 counters are plain ``"sum"`` states.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from nclightning.metrics.formulas import EIG_RTOL, METRIC_KEYS, metrics_from_moments
from nclightning.metrics.moments import ClassMoments
from nclightning.metrics.ncc import NCCReference, exact_float32_matmul

__all__ = ["ClassStatistics", "collapse_metrics", "merge_packed_states"]

_F64 = torch.float64


class _Layout:
    """Offsets of ``n[K], c[K, d], t[K, d], r[K], q[d, d], (q_k[K, d, d])`` in the packed state."""

    def __init__(self, num_classes: int, dim: int, per_class_scatter: bool) -> None:
        K, d = num_classes, dim
        shapes = {"n": (K,), "c": (K, d), "t": (K, d), "r": (K,), "q": (d, d)}
        if per_class_scatter:
            shapes["qk"] = (K, d, d)
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


def merge_packed_states(
    stacked: Tensor, num_classes: int, dim: int, per_class_scatter: bool
) -> Tensor:
    """Exact merge of packed :class:`ClassStatistics` states ``stacked[R, size]`` -> ``[size]``.

    For each class the common shift ``c^*_k`` is the shift of the first state holding samples
    of ``k``; state ``r`` is moved to it with ``e_k = c^r_k - c^*_k``:
    ``t += n e``, ``r += 2 e.t + n ||e||^2``, ``q += sum_k (e_k t_k^T + t_k e_k^T + n_k e_k e_k^T)``
    (the last as ``A + A^T``, ``A = E^T (T + N E / 2)``: one ``d x K x d`` float64 product per
    state). Used as ``dist_reduce_fx`` by torchmetrics' sync and by ``merge_state``.
    """
    if stacked.ndim == 1:
        return stacked
    if stacked.shape[0] == 1:
        return stacked[0].clone()
    lay = _Layout(num_classes, dim, per_class_scatter)
    v = lay.views(stacked)
    n, c, t = v["n"], v["c"], v["t"]  # [R, K], [R, K, d], [R, K, d]
    has = n > 0
    first = has.to(torch.int8).argmax(0)  # first state holding class k (0 if none)
    c_star = c[first, torch.arange(num_classes, device=c.device)]  # [K, d]
    e = torch.where(has.unsqueeze(-1), c - c_star, 0.0)  # [R, K, d]
    ne = n.unsqueeze(-1) * e
    out = torch.empty_like(stacked[0])
    o = lay.views(out)
    o["n"].copy_(n.sum(0))
    o["c"].copy_(c_star)
    o["t"].copy_((t + ne).sum(0))
    o["r"].copy_((v["r"] + (e * (2 * t + ne)).sum(-1)).sum(0))
    a = e.transpose(1, 2) @ (t + 0.5 * ne)  # [R, d, d]
    o["q"].copy_((v["q"] + a + a.transpose(1, 2)).sum(0))
    if per_class_scatter:
        ak = e.unsqueeze(-1) * (t + 0.5 * ne).unsqueeze(-2)  # [R, K, d, d]
        o["qk"].copy_((v["qk"] + ak + ak.transpose(-1, -2)).sum(0))
    return out


class ClassStatistics(Metric):
    """Streaming per-class moments and all collapse metrics of docs/science.md §1, in one pass.

    ``update(features[B, d], labels[B])`` with features as rows. State: one packed float64
    tensor of ``K (2d + 2) + d^2`` numbers (plus ``K d^2`` with ``per_class_scatter``), never
    per-sample storage; see the module docstring for the accumulation scheme and the exact
    cross-process merge run by torchmetrics' sync. Accumulates on the features' device (the
    metric moves there on ``update``); states stay float64 whatever ``.to(dtype)`` is applied.

    Args:
        num_classes: ``K``; labels are ints in ``0..K-1``.
        dim: ``d``, the feature dimension.
        compute_dtype: precision of the per-batch centring and product: ``None`` (float32,
            or float64 for float64 features), ``torch.float32`` or ``torch.float64``
            (batch splits and process counts then agree to ~1e-15; used by the
            distributed-exactness test). float16/bfloat16 inputs are upcast.
        allow_missing_classes: if ``False`` (default), a class with no sample in the whole
            pass makes :meth:`compute` / :meth:`moments` raise ``ValueError`` naming it; if
            ``True``, metrics use the present classes only (``K`` = number present).
        per_class_scatter: also accumulate per-class scatter matrices (``K d^2`` memory),
            returned as ``ClassMoments.class_scatter``.
        eig_rtol: relative eigenvalue cut-off of ``Sigma_B^+`` in NC1
            (:data:`~nclightning.metrics.EIG_RTOL`).
        validate_args: check label range on every update (one device sync per batch).
        kwargs: ``torchmetrics.Metric`` options (``process_group``, ``sync_on_compute``...).

    :meth:`compute` returns ``dict[str, float]`` with :data:`~nclightning.metrics.METRIC_KEYS`,
    plus ``nc3`` when a classifier was set (:meth:`set_classifier` / :meth:`set_reference`)
    and ``nc4`` when reference means were set (:meth:`set_reference`); :attr:`nc4_reference`
    then says which means ``nc4`` used (``"previous_pass"`` by default, ``"exact"`` from
    :func:`collapse_metrics`). Without a reference, ``nc4`` is absent. ``forward`` only
    accumulates (per-batch collapse metrics are not meaningful) and returns ``None``.

    Conventions (docs/science.md §1, see :mod:`nclightning.metrics.formulas`): ``Sigma_B``, ``M``
    (NC2) and NC3 centre on the unweighted mean of class means (the sample mean for balanced
    classes); stds are unbiased (``ddof=1``); the NC1 pseudo-inverse drops eigenvalues of
    ``Sigma_B`` below ``eig_rtol`` times the largest.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    _F64_STATES = ("packed", "nc4_mismatches", "nc4_samples")

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        compute_dtype: torch.dtype | None = None,
        allow_missing_classes: bool = False,
        per_class_scatter: bool = False,
        eig_rtol: float = EIG_RTOL,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(num_classes) < 1 or int(dim) < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, float32 or float64, got {compute_dtype}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.compute_dtype = compute_dtype
        self.allow_missing_classes = bool(allow_missing_classes)
        self.per_class_scatter = bool(per_class_scatter)
        self.eig_rtol = float(eig_rtol)
        self.validate_args = bool(validate_args)
        self._layout = _Layout(self.num_classes, self.dim, self.per_class_scatter)
        merge = functools.partial(
            merge_packed_states,
            num_classes=self.num_classes,
            dim=self.dim,
            per_class_scatter=self.per_class_scatter,
        )
        self.add_state("packed", torch.zeros(self._layout.size, dtype=_F64), dist_reduce_fx=merge)
        self.add_state("nc4_mismatches", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("nc4_samples", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self._views_cache: tuple[Tensor, dict[str, Tensor]] | None = None
        self._weight: Tensor | None = None
        self._reference: NCCReference | None = None
        self.nc4_reference: str | None = None
        """Which class means ``nc4`` uses (``"previous_pass"``, ``"exact"``...), or ``None``."""

    # -- classifier / reference ---------------------------------------------------------------
    def set_classifier(self, weight: Tensor | None, bias: Tensor | None = None) -> None:
        """Classifier ``weight[K, d]`` used by ``nc3`` (bias is irrelevant to NC3)."""
        del bias
        if weight is not None and tuple(weight.shape) != (self.num_classes, self.dim):
            raise ValueError(
                f"classifier weight must be [K, d] = ({self.num_classes}, {self.dim}), "
                f"got {tuple(weight.shape)}"
            )
        self._weight = None if weight is None else weight.detach().to(_F64).clone()
        self._computed = None

    def set_reference(
        self,
        means: Tensor | ClassMoments,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        *,
        present: Tensor | None = None,
        source: str = "previous_pass",
    ) -> None:
        """Enable streaming NC4 (docs/science.md §1) for the samples of subsequent updates.

        Args:
            means: reference class means ``[K, d]``, usually ``moments().means`` of the
                previous pass (identical on all ranks after a synced compute), or that
                :class:`ClassMoments` itself (its ``present`` mask is then used).
            weight, bias: the classifier ``W[K, d]``, ``b[K]`` whose ``argmax`` is compared
                with the nearest reference mean; also used for ``nc3``. Without a classifier,
                every :meth:`update` must pass the ``predictions`` to compare with.
            present: classes eligible as nearest centre (default: all finite rows).
            source: label stored in :attr:`nc4_reference`.

        ``nc4`` is then the mismatch fraction over the samples seen while a reference was
        set (``nan`` if none). The reference survives :meth:`reset`; see
        :meth:`clear_reference`.
        """
        if isinstance(means, ClassMoments):
            present = means.present if present is None else present
            means = means.means
        if tuple(means.shape) != (self.num_classes, self.dim):
            raise ValueError(
                f"reference means must be [K, d] = ({self.num_classes}, {self.dim}), "
                f"got {tuple(means.shape)}"
            )
        if weight is not None:
            self.set_classifier(weight)
            weight = weight.to(self.device)
        self._reference = NCCReference(means.detach().to(self.device), weight, bias, present)
        self.nc4_reference = source

    def clear_reference(self) -> None:
        """Disable streaming NC4 (the classifier for ``nc3`` is kept)."""
        self._reference = None
        self.nc4_reference = None
        self._computed = None

    # -- accumulation -------------------------------------------------------------------------
    def _dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return _F64 if dtype == _F64 else torch.float32

    def _check_batch(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must be [B, d] with d={self.dim} (rows), got {tuple(features.shape)}"
            )
        if not features.is_floating_point():
            raise TypeError(f"features must be floating point, got {features.dtype}")
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"labels must be [B] with B={features.shape[0]}, got {tuple(labels.shape)}"
            )
        if features.device != self.device:
            self.to(features.device)
        x = features.detach()
        y = labels.detach().to(device=x.device, dtype=torch.long)
        if self.validate_args and y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(f"label {bad} outside 0..{self.num_classes - 1}")
        return x, y

    def update(self, features: Tensor, labels: Tensor, predictions: Tensor | None = None) -> None:
        """Accumulate a batch: ``features[B, d]`` (rows), ``labels[B]`` in ``0..K-1``.

        ``predictions[B]`` (optional): the class each sample is assigned by the network; with a
        reference set, NC4 then counts disagreements between it and the nearest reference mean
        (for any layer, not only the classifier's input), instead of the classifier's argmax.
        """
        x, y = self._check_batch(features, labels)
        if x.shape[0] == 0:
            return
        ct = self._dtype_for(x.dtype)
        self._accumulate(x, y, ct)
        if self._reference is not None:
            self._count_nc4(x, ct, predictions)

    def forward(self, features: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        """Same as :meth:`update`; returns ``None`` (no per-batch metrics)."""
        self.update(features, labels)

    def _views(self) -> dict[str, Tensor]:
        """Writable views of the packed state (cached while ``self.packed`` is the same tensor)."""
        cache = self._views_cache
        if cache is None or cache[0] is not self.packed:
            cache = self._views_cache = (self.packed, self._layout.views(self.packed))
        return cache[1]

    def _accumulate(self, x: Tensor, y: Tensor, ct: torch.dtype) -> None:
        K = self.num_classes
        v = self._views()
        n, c = v["n"], v["c"]
        nb = torch.bincount(y, minlength=K)  # [K]
        xc = x.to(ct)
        new = (n == 0) & (nb > 0)
        if x.device.type != "cpu" or bool(new.any()):  # no host sync on accelerators
            # a class seen for the first time gets its batch mean (compute precision) as shift;
            # any value near the class mean works, since t, r, q are taken around this c exactly
            sums = torch.zeros(K, self.dim, dtype=ct, device=x.device).index_add_(0, y, xc)
            first = (sums / nb.clamp_min(1).unsqueeze(1).to(ct)).to(_F64)
            c.copy_(torch.where(new.unsqueeze(1), first, c))
        dev = xc - c.to(ct).index_select(0, y)  # [B, d]: centred, so accurate in float32
        v["t"].add_(torch.zeros(K, self.dim, dtype=ct, device=x.device).index_add_(0, y, dev))
        v["r"].index_add_(0, y, torch.linalg.vector_norm(dev, dim=1).to(_F64).square())
        n.add_(nb)
        with exact_float32_matmul():
            if not self.per_class_scatter:
                v["q"].add_(dev.T @ dev)  # the one d x B x d product; accumulated in float64
                return
            order = torch.argsort(y, stable=True)
            for k, block in enumerate(dev[order].split(nb.tolist())):
                if block.shape[0]:
                    gk = block.T @ block
                    v["qk"][k].add_(gk)
                    v["q"].add_(gk)

    def _count_nc4(self, x: Tensor, ct: torch.dtype, predictions: Tensor | None = None) -> None:
        assert self._reference is not None
        self.nc4_mismatches += self._reference.mismatches(x, ct, predictions)
        self.nc4_samples += x.shape[0]

    # -- results ------------------------------------------------------------------------------
    def _moments(self) -> ClassMoments:
        v = self._views()
        n, c, t = v["n"], v["c"], v["t"]
        present = n > 0
        missing = (~present).nonzero().flatten().tolist()
        if missing and not self.allow_missing_classes:
            raise ValueError(
                f"class {missing[0]} has no sample in the whole pass (classes without samples: "
                f"{missing}); pass allow_missing_classes=True to use the present classes only"
            )
        off = t / n.clamp_min(1).unsqueeze(1)  # mu_k - c_k
        means = torch.where(present.unsqueeze(1), c + off, 0.0)
        scatter = v["q"] - off.T @ t
        scatter = 0.5 * (scatter + scatter.T)
        class_ss = (v["r"] - (off * t).sum(1)).clamp_min(0.0)
        class_scatter = None
        if self.per_class_scatter:
            cs = v["qk"] - off.unsqueeze(2) * t.unsqueeze(1)
            class_scatter = 0.5 * (cs + cs.transpose(1, 2))
        return ClassMoments(n.clone(), means, scatter, class_ss, class_scatter)

    def moments(self) -> ClassMoments:
        """Float64 :class:`ClassMoments` of everything seen (synced across processes).

        ``means``, ``global_mean``, ``mean_of_means``, ``sigma_w``, ``sigma_b``, ``gram``...
        are properties of the result. Raises ``ValueError`` naming a class without samples
        unless ``allow_missing_classes``.
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            return self._moments()

    def compute(self) -> dict[str, float]:
        """Collapse metrics (docs/science.md §1) as ``dict[str, float]``."""
        return self._metrics(self._moments())

    def moments_and_metrics(self) -> tuple[ClassMoments, dict[str, float]]:
        """:meth:`moments` and :meth:`compute` together, under one cross-process sync."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            m = self._moments()
            return m, self._metrics(m)

    def _metrics(self, m: ClassMoments) -> dict[str, float]:
        if not (torch.isfinite(m.means).all() and torch.isfinite(m.scatter).all()):
            # NaN/Inf features (a diverging run): every metric is NaN, nothing raises
            keys = (*METRIC_KEYS, *(("nc3",) if self._weight is not None else ()))
            out = dict.fromkeys(keys, float("nan"))
        else:
            out = metrics_from_moments(m, self._weight, eig_rtol=self.eig_rtol)
        if self._reference is not None:
            seen = float(self.nc4_samples)
            out["nc4"] = float(self.nc4_mismatches) / seen if seen > 0 else float("nan")
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_views_cache"] = None  # views are rebuilt on the copy's own state
        return state

    # -- keep float64 states float64 under module-wide dtype casts ----------------------------
    def _apply(self, fn: Any, exclude_state: Sequence[str] = ()) -> Any:
        this = super()._apply(fn, exclude_state=(*exclude_state, *self._F64_STATES))
        dev = this.device
        for key in self._F64_STATES:
            this._defaults[key] = this._defaults[key].to(dev)
            setattr(this, key, getattr(this, key).to(dev))
        return this


def collapse_metrics(
    features: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    num_classes: int | None = None,
    *,
    allow_missing_classes: bool = False,
    compute_dtype: torch.dtype | None = None,
    eig_rtol: float = EIG_RTOL,
    chunk_size: int = 8192,
) -> dict[str, float]:
    """All collapse metrics of in-memory ``features[N, d]`` (rows) with ``labels[N]``.

    Runs :class:`ClassStatistics` over chunks of ``chunk_size`` rows (same code, same
    numbers as streaming). Given the classifier ``weight[K, d]`` (and ``bias[K]``), adds
    ``nc3`` and the *exact* ``nc4``: a second sweep classifies every row against the final
    class means (NCC over the present classes). ``num_classes`` defaults to
    ``labels.max() + 1``. Never synchronises across processes.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, d] (rows), got shape {tuple(features.shape)}")
    if num_classes is None:
        if labels.numel() == 0:
            raise ValueError("num_classes is required for empty labels")
        num_classes = int(labels.max()) + 1
    stats = ClassStatistics(
        num_classes,
        features.shape[1],
        compute_dtype=compute_dtype,
        allow_missing_classes=allow_missing_classes,
        eig_rtol=eig_rtol,
        sync_on_compute=False,
    ).to(features.device)
    chunks = list(zip(features.split(chunk_size), labels.split(chunk_size)))
    for x, y in chunks:
        stats.update(x, y)
    if weight is not None:
        stats.set_reference(stats.moments(), weight, bias, source="exact")
        for x, _ in chunks:
            stats._count_nc4(x.detach(), stats._dtype_for(x.dtype))
    return stats.compute()
