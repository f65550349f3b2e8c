"""Streaming, distributed, collapse-exact class statistics: :class:`ClassStatistics`.

Owns the one-pass accumulation of ``features[B, d]`` (rows; docs/science.md writes columns)
and ``labels[B]`` into :class:`~nclightning.metrics.ClassMoments` (docs/science.md §1, §10),
with torchmetrics' cross-process sync. :func:`~nclightning.metrics.collapse_metrics` runs
the same code on in-memory features.

Accumulation scheme (why one pass stays exact when collapse is strong)
---------------------------------------------------------------------
``E[hh^T] - mu mu^T`` cancels catastrophically: with within-class spread ``s`` and mean norm
``m`` it loses ``(m/s)^2`` in relative precision (``1e8`` at ``s/m = 1e-4``: every digit of
float32). Instead each class ``k`` has a *shift* ``c_k`` close to its mean and the state
sums the shifted deviations ``e = h - c_k`` (layout in :mod:`nclightning.metrics.state`).

* The shift is either given (``shift=``, e.g. exact means from a first sweep: the merge is
  then a plain sum) or set from the data when a class first appears: the float64 mean of
  its rows in that batch, rounded to float32 (float64 with ``compute_dtype=float64``), so
  ``e = h - c_k`` is exact in float32 (Sterbenz). A shift never moves afterwards (no
  per-class re-centring, the same on CPU and accelerators; on accelerators the update is a
  masked one, without host synchronisation): ``|mean(e)|`` is at most about one
  within-class deviation (a shift from a single row), which costs a factor of about two in
  the float32 rounding of the scatter, never a factor ``(m/s)^2``.
* Deviations are formed and multiplied in the compute precision (float32 for
  float16/bfloat16/float32 features; float64 for float64 features or
  ``compute_dtype=torch.float64``); float32 products span at most
  :data:`~nclightning.metrics.accumulate.CHUNK` rows and are summed in float32 over at most
  :data:`~nclightning.metrics.accumulate.GROUP` rows before they join the float64 state
  inside the same ``update`` (no pending sums between calls: the state is complete
  whenever torchmetrics reads, syncs or saves it). ``t`` and the per-sample norms are
  summed in float64.
* Results (float64): ``mu_k = c_k + t_k / n_k``, scatter ``= q - sum_k t_k t_k^T / n_k``,
  ``class_ss_k = r_k - ||t_k||^2 / n_k``.

What holds: every statistic, hence every metric, carries only float32 rounding relative to
the within-class spread, never to the mean. Measured against a float64 two-pass reference
on the same float32 features (mean norm 10, within-class RMS deviation 1e-4, 1e-5 and 2e-6
of it, d = 256, K = 10, N = 50,000): every scalar of :func:`metrics_from_moments` agrees to
<= 1e-6 relative (worst 6.9e-7: NC1 at 1e-5, 100 single-row batches then one large
batch; 2.2e-7 for one 50,000-row batch or batches of 512) for one 50,000-row batch,
batches of random sizes 1..200, 100 single-row batches then one large batch, and batches
of 512 (``tests/metrics/test_collapse_accuracy.py``; docs/science.md §10). Features that
drift by much more than their spread within one pass lose that margin: pass a ``shift``.

Scatter modes: ``"full"`` (``d x d``), ``"per_class"`` (``K d x d``, also the pooled one),
``"none"`` (means, ``class_ss``, norm sums: no GEMM), and the span mode selected by
``scatter_basis=B[d, r]``: only ``B^T scatter B`` (what NC1 needs when ``B`` spans the
centred class means; ``O(B d r)`` per batch instead of ``O(B d^2)``).

Distributed reduction: states of different ranks (or of ``merge_state``) carry different
shifts, so the packed state's ``dist_reduce_fx`` is the exact pairwise (Chan et al.) merge
:func:`~nclightning.metrics.state.merge_packed_states`; torchmetrics' own sync gathers the
states and applies it.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from nclightning.errors import ConfigurationError
from nclightning.metrics.accumulate import Accumulator
from nclightning.metrics.formulas import (
    EIG_RTOL,
    metrics_from_moments,
    metrics_with_nc1,
    nc1_from_quadratic,
)
from nclightning.metrics.moments import ClassMoments
from nclightning.metrics.state import (
    CentredStateMeans,
    Float64States,
    Layout,
    merge_packed_states,
    state_moments,
    state_within_quadratic,
)

__all__ = ["ClassStatistics"]

_F64 = torch.float64


def _check_basis(basis: Tensor, dim: int) -> Tensor:
    b = basis.detach().to(_F64)
    if b.ndim != 2 or b.shape[0] != dim or b.shape[1] > dim:
        raise ConfigurationError(
            f"scatter_basis must be [d, r] with d={dim} and r <= d, got {tuple(basis.shape)}"
        )
    eye = torch.eye(b.shape[1], dtype=_F64, device=b.device)
    if b.shape[1] and float((b.T @ b - eye).abs().max()) > 1e-6:
        raise ConfigurationError(
            "scatter_basis must have orthonormal columns (e.g. ClassMoments.mean_span())"
        )
    return b


def _scatter_mode(scatter: str, basis: Tensor | None, per_class_scatter: bool) -> str:
    if per_class_scatter:  # the keyword of earlier versions
        scatter = "per_class"
    if scatter not in ("full", "per_class", "none", "span"):
        raise ConfigurationError(
            f"scatter must be 'full', 'per_class' or 'none' (or a scatter_basis), got {scatter!r}"
        )
    if basis is None:
        if scatter == "span":
            raise ConfigurationError("scatter='span' needs scatter_basis=[d, r]")
        return scatter
    if scatter not in ("full", "span"):
        raise ConfigurationError(
            f"scatter_basis selects the span mode; it cannot be combined with scatter={scatter!r}"
        )
    return "span"


class ClassStatistics(Float64States, Metric):
    """Streaming per-class moments and the collapse metrics of docs/science.md §1, §8.

    ``update(features[B, d], labels[B])`` with features as rows. State: one packed float64
    tensor (``K (2d + 3)`` numbers plus the scatter: ``d^2``, ``K d^2``, ``r^2`` or nothing),
    never per-sample storage; see the module docstring for the accumulation scheme, its
    accuracy and the exact cross-process merge. Accumulates on the features' device (the
    metric moves there on ``update``); states stay float64 whatever ``.to(dtype)`` is applied.

    Args:
        num_classes: ``K``; labels are ints in ``0..K-1``.
        dim: ``d``, the feature dimension.
        scatter: ``"full"`` (default), ``"per_class"`` (adds ``ClassMoments.class_scatter``)
            or ``"none"`` (no scatter matrix: nc1 is not reported).
        scatter_basis: ``[d, r]`` orthonormal columns: accumulate only
            ``basis^T scatter basis`` (``ClassMoments.span_basis/span_scatter``); nc1 then
            needs the class means to lie in its span (``ClassMoments.mean_span()`` of a first
            sweep's moments).
        shift: ``[K, d]`` fixed per-class shift (e.g. the exact class means of a first
            sweep); default: set from the first batch holding each class.
        compute_dtype: precision of the per-batch centring and products: ``None`` (float32,
            or float64 for float64 features), ``torch.float32`` or ``torch.float64``.
        allow_missing_classes: if ``False`` (default), a class with no sample in the whole
            pass makes :meth:`compute` / :meth:`moments` raise ``ValueError`` naming it; if
            ``True``, metrics use the present classes only.
        eig_rtol: relative eigenvalue cut-off of ``Sigma_B^+`` in NC1.
        validate_args: check label range on every update (one device sync per batch).
        per_class_scatter: ``True`` is the earlier spelling of ``scatter="per_class"``.
        kwargs: ``torchmetrics.Metric`` options (``process_group``, ``sync_on_compute``...).

    :meth:`compute` returns ``dict[str, Tensor]`` of 0-dim float64 tensors: the keys of
    :func:`~nclightning.metrics.metrics_from_moments` (``nc3``, ``unc3`` once
    :meth:`set_classifier` was called). ``forward`` only accumulates and returns ``None``.

    Example:
        Three tight classes in one streaming pass; the result equals the in-memory one.

        >>> import torch
        >>> from nclightning.metrics import ClassStatistics, collapse_metrics
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat(20)
        >>> h = 4 * torch.eye(3, dtype=torch.float64)[y] + 0.5 * torch.randn(
        ...     60, 3, generator=g, dtype=torch.float64)
        >>> stats = ClassStatistics(num_classes=3, dim=3)
        >>> for hb, yb in zip(h.split(16), y.split(16)):
        ...     stats.update(hb, yb)
        >>> out = stats.compute()
        >>> round(float(out["nc1"]), 4)
        0.0324
        >>> bool(torch.allclose(out["nc1"], collapse_metrics(h, y)["nc1"]))
        True
        >>> stats.moments().counts.tolist()
        [20.0, 20.0, 20.0]
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _F64_STATES = ("packed",)
    packed: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        scatter: str = "full",
        scatter_basis: Tensor | None = None,
        shift: Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        allow_missing_classes: bool = False,
        eig_rtol: float = EIG_RTOL,
        validate_args: bool = True,
        per_class_scatter: bool = False,
        **kwargs: Any,
    ) -> None:
        # compute() depends on set_classifier too: never serve a cached result
        kwargs.setdefault("compute_with_cache", False)
        self._sync_on_compute = bool(kwargs.get("sync_on_compute", True))
        super().__init__(**kwargs)
        if int(num_classes) < 1 or int(dim) < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, float32 or float64, got {compute_dtype}")
        K, d = self.num_classes, self.dim = int(num_classes), int(dim)
        self.scatter_mode = _scatter_mode(scatter, scatter_basis, per_class_scatter)
        self._basis = None if scatter_basis is None else _check_basis(scatter_basis, d)
        self.compute_dtype = compute_dtype
        self.allow_missing_classes = bool(allow_missing_classes)
        self.eig_rtol = float(eig_rtol)
        self.validate_args = bool(validate_args)
        rank = 0 if self._basis is None else self._basis.shape[1]
        self._layout = Layout(K, d, self.scatter_mode, rank)
        # shifts are stored exactly as used: float32 values unless compute_dtype is float64
        shift_dtype = _F64 if compute_dtype == _F64 else torch.float32
        default = torch.zeros(self._layout.size, dtype=_F64)
        self.fixed_shift = shift is not None
        if shift is not None:
            if tuple(shift.shape) != (K, d) or not bool(torch.isfinite(shift).all()):
                raise ConfigurationError(
                    f"shift must be a finite [K, d] = ({K}, {d}) tensor, got {tuple(shift.shape)}"
                )
            c = shift.detach().cpu().to(shift_dtype).to(_F64)
            self._layout.views(default)["c"].copy_(c)
        merge = functools.partial(merge_packed_states, layout=self._layout, basis=self._basis)
        # torchmetrics keeps a copy of a state's default for reset(): registered with an
        # empty default (no second state-sized tensor), the state is set here and rebuilt by
        # reset() (zeros and the fixed shift, the only non-zero part)
        self.add_state("packed", torch.zeros(0, dtype=_F64), dist_reduce_fx=merge)
        self.packed = default
        self._fixed_c = self._layout.views(default)["c"].clone() if shift is not None else None
        self._accumulator = Accumulator(self._layout, self._basis, shift_dtype, self.fixed_shift)
        self._weight: Tensor | None = None

    def reset(self) -> None:
        """Back to the empty state (keeping a given ``shift``)."""
        super().reset()
        self.packed = torch.zeros(self._layout.size, dtype=_F64, device=self.packed.device)
        if self._fixed_c is not None:
            self._layout.views(self.packed)["c"].copy_(self._fixed_c)

    # -- classifier ---------------------------------------------------------------------------
    def set_classifier(self, weight: Tensor | None) -> None:
        """Classifier ``weight[K, d]`` used by ``nc3`` and ``unc3`` (``None`` to clear)."""
        if weight is not None and tuple(weight.shape) != (self.num_classes, self.dim):
            raise ValueError(
                f"classifier weight must be [K, d] = ({self.num_classes}, {self.dim}), "
                f"got {tuple(weight.shape)}"
            )
        self._weight = None if weight is None else weight.detach().to(_F64).clone()

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

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Accumulate a batch: ``features[B, d]`` (rows), ``labels[B]`` in ``0..K-1``."""
        x, y = self._check_batch(features, labels)
        if x.shape[0] == 0:
            return
        self._accumulator.add(self.packed, x, y, self._dtype_for(x.dtype))

    def forward(self, features: Tensor, labels: Tensor) -> None:
        """Same as :meth:`update`; returns ``None`` (no per-batch metrics)."""
        self.update(features, labels)

    # -- results ------------------------------------------------------------------------------
    def _check_present(self) -> None:
        missing = (self._layout.views(self.packed)["n"] == 0).nonzero().flatten().tolist()
        if missing and not self.allow_missing_classes:
            raise ValueError(
                f"class {missing[0]} has no sample in the whole pass (classes without samples: "
                f"{missing}); pass allow_missing_classes=True to use the present classes only"
            )

    def _moments(self) -> ClassMoments:
        self._check_present()
        self._accumulator.drop()  # the pass is over: free the batch buffers (made again)
        return state_moments(self._layout.views(self.packed), self._layout, self._basis)

    def _synced(self) -> AbstractContextManager[None]:
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            process_group=self.process_group,
            should_sync=self._sync_on_compute,
        )

    def moments(self) -> ClassMoments:
        """Float64 :class:`ClassMoments` of everything seen (synced across processes).

        Raises ``ValueError`` naming a class without samples unless
        ``allow_missing_classes``.
        """
        with self._synced():
            return self._moments()

    def local_moments(self) -> ClassMoments:
        """:class:`ClassMoments` of this process's samples only (no synchronisation)."""
        return self._moments()

    def compute(self) -> dict[str, Tensor]:
        """Collapse metrics (docs/science.md §1, §8) as 0-dim float64 tensors.

        With the full scatter, nc1's quadratic forms come from the state itself
        (:func:`~nclightning.metrics.state.state_within_quadratic`: no ``d x d`` copy of the
        scatter) and comes last, after the other metrics have released the class means
        (the centred means are made again a block of rows at a time); the batch buffers are
        freed first (made again by the next update). Same values as
        ``metrics_from_moments(moments())`` up to rounding.
        """
        if self.scatter_mode != "full":
            return self._metrics(self._moments())
        self._check_present()
        self._accumulator.drop()
        v = self._layout.views(self.packed)
        centred = CentredStateMeans(v)

        def nc1() -> float:
            within = functools.partial(state_within_quadratic, v)
            total = float(v["n"].sum())
            return nc1_from_quadratic(centred.full, within, total, self.eig_rtol, centred.rows)

        def moments() -> ClassMoments:
            return state_moments(v, self._layout, self._basis, full_scatter=False)

        values = metrics_with_nc1(moments, nc1, self._weight, eig_rtol=self.eig_rtol)
        return self._tensors(values)

    def moments_and_metrics(self) -> tuple[ClassMoments, dict[str, Tensor]]:
        """:meth:`moments` and :meth:`compute` together, under one cross-process sync."""
        with self._synced():
            m = self._moments()
            return m, self._metrics(m)

    def _metrics(self, m: ClassMoments) -> dict[str, Tensor]:
        return self._tensors(metrics_from_moments(m, self._weight, eig_rtol=self.eig_rtol))

    def _tensors(self, values: dict[str, float]) -> dict[str, Tensor]:
        dev = self.packed.device
        return {k: torch.tensor(val, dtype=_F64, device=dev) for k, val in values.items()}
