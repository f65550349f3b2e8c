"""The per-batch work of :class:`~nclightning.metrics.ClassStatistics` (docs/science.md §10).

Owns :class:`Accumulator`: choosing each class's shift, centring a batch on it, and adding
the shifted sums to the views of the packed float64 state (layout in
:mod:`nclightning.metrics.state`), with the float32 buffers that keep the per-batch cost
near one bare ``d x B x d`` GEMM. No torchmetrics here: the metric calls :meth:`add` on
update and :meth:`flush` before anything reads its state.

Float32 buffers: centred rows go to a reused work buffer (a fresh ``[B, d]`` tensor per
batch costs page faults comparable to the subtraction itself); the deviation sums ``t`` and
the scatter products are accumulated in float32 *pending* buffers (at most two products,
eight for the per-class scatter, and :data:`FLUSH_ROWS` rows per class), then added to the
float64 state. Each product spans at most :data:`CHUNK` rows (a large batch is cut), so
every float32 sum has at most ``FLUSH_ROWS`` terms whatever the batch size. The per-class
scatter touches ``K d^2`` numbers per batch: feed it large batches (a cached sweep).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nclightning.metrics.ncc import exact_float32_matmul
from nclightning.metrics.state import Layout, shift_increments

__all__ = ["CHUNK", "FLUSH_ROWS", "MAX_ADDS", "PER_CLASS_ROWS", "Accumulator"]

_F64 = torch.float64
CHUNK = 512
"""Rows centred and multiplied at a time."""
FLUSH_ROWS = 1024
"""Most rows (per class for the per-class scatter) a float32 pending buffer sums before it
is added to the float64 state."""
MAX_ADDS = {"per_class": 8}
"""Most products a pending buffer sums between flushes (2 unless listed): the per-class
scatter gets few rows per class and batch, and its flush costs ``K d^2``."""
PER_CLASS_ROWS = 16_384
"""Rows centred at a time in the per-class mode (one sort, one block per class)."""


class Accumulator:
    """Adds batches to the views of a packed state (see the module docstring).

    Args:
        layout: the state's :class:`~nclightning.metrics.state.Layout`.
        basis: ``[d, r]`` float64 basis of the span mode, else ``None``.
        shift_dtype: precision shifts are stored in (float32 unless the compute precision
            is float64), so that they are exact in the precision they are used in.
        fixed_shift: the shifts were given and never move.
        host_checks: whether shift updates may read device values on the host (re-centring,
            see :meth:`update_shifts`); default ``None``: on CPU only, where it is free.
    """

    def __init__(
        self,
        layout: Layout,
        basis: Tensor | None,
        shift_dtype: torch.dtype,
        fixed_shift: bool,
        host_checks: bool | None = None,
    ) -> None:
        self.layout, self.basis = layout, basis
        self.shift_dtype, self.fixed_shift = shift_dtype, fixed_shift
        self.host_checks = host_checks
        self.scatter_key = {"full": "q", "per_class": "qk", "span": "qs"}.get(layout.mode)
        self.drop()

    def drop(self) -> None:
        """Forget buffers and casts (the state was replaced or moved; flush first)."""
        self._casts: dict[tuple[str, torch.dtype], Tensor] = {}
        self._work: dict[str, Tensor] = {}
        self._pending: dict[str, Tensor] = {}
        self._rows = self._adds = 0
        self._class_rows = [0] * self.layout.num_classes

    # -- buffers ------------------------------------------------------------------------------
    def _cast(self, name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
        key = (name, dtype)
        if key not in self._casts:
            self._casts[key] = t.to(dtype)
        return self._casts[key]

    def _buffer(
        self, store: dict[str, Tensor], name: str, like: Tensor, shape: tuple[int, ...]
    ) -> Tensor:
        buf = store.get(name)
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            buf = store[name] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return buf

    def flush(self, v: dict[str, Tensor]) -> None:
        """Add the pending float32 sums to the float64 state ``v`` and clear them."""
        if not self._rows:
            return
        for name, buf in self._pending.items():
            v[name].add_(buf)
            buf.zero_()
        self._rows = self._adds = 0
        self._class_rows = [0] * self.layout.num_classes

    # -- shifts -------------------------------------------------------------------------------
    def update_shifts(self, v: dict[str, Tensor], x: Tensor, y: Tensor, nb: Tensor) -> None:
        """Set the shift of classes new in this batch; on CPU also re-centre outweighed ones.

        The new shift of class ``k`` is the float64 mean of all its samples so far including
        this batch, rounded to :attr:`shift_dtype`. On CPU this happens whenever the batch
        holds more samples of ``k`` than all earlier ones (at most ``log2 n_k`` times), the
        state moving exactly to the new shift (:func:`shift_increments`). On accelerators
        (``host_checks`` false) only new classes get a shift, by a masked update without
        host synchronisation.
        """
        n, c, t = v["n"], v["c"], v["t"]
        host = self.host_checks if self.host_checks is not None else x.device.type == "cpu"
        grow = (nb > n) if host else (n == 0) & (nb > 0)
        if host:
            if not bool(grow.any()):
                return
            self.flush(v)  # pending sums are taken around the current shifts
            rows = grow.index_select(0, y)  # only the rows of the classes that move
            x, y = x[rows], y[rows]
        sums = torch.zeros(c.shape, dtype=_F64, device=x.device).index_add_(0, y, x.to(_F64))
        total = (n + nb).clamp_min(1).unsqueeze(1)
        mean = ((n.unsqueeze(1) * c + t + sums) / total).to(self.shift_dtype).to(_F64)
        if not host:
            c.copy_(torch.where(grow.unsqueeze(1), mean, c))
        else:
            idx = grow.nonzero().flatten()
            inc = shift_increments(n[idx], t[idx], c[idx] - mean[idx], self.layout.mode, self.basis)
            c.index_copy_(0, idx, mean[idx])
            t.index_add_(0, idx, inc["t"])
            v["r"].index_add_(0, idx, inc["r"])
            key = self.scatter_key
            if key == "qk":
                v[key].index_add_(0, idx, inc[key])
            elif key is not None:
                v[key].add_(inc[key])
        self._casts = {k: val for k, val in self._casts.items() if k[0] != "shift"}

    # -- accumulation -------------------------------------------------------------------------
    def add(self, v: dict[str, Tensor], x: Tensor, y: Tensor, ct: torch.dtype) -> None:
        """Add a batch ``x[B, d]`` (labels ``y[B]``) centred and multiplied in ``ct``."""
        nb = torch.bincount(y, minlength=self.layout.num_classes)
        if not self.fixed_shift:
            self.update_shifts(v, x, y, nb)
        v["n"].add_(nb)
        shift = self._cast("shift", v["c"], ct)
        per_class = self.scatter_key == "qk"
        step = PER_CLASS_ROWS if per_class else CHUNK
        with exact_float32_matmul():
            for xb, yb in zip(x.split(step), y.split(step)):
                if per_class:
                    self._add_per_class(v, xb.to(ct), yb, shift)
                else:
                    self._add_chunk(v, xb.to(ct), yb, shift)

    def _must_flush(self, x: Tensor, over: bool) -> bool:
        pending = next(iter(self._pending.values()), None)
        adds = MAX_ADDS.get(self.layout.mode, 2)
        mismatch = pending is not None and pending.dtype != x.dtype
        return self._adds >= adds or over or mismatch

    def _centre(self, v: dict[str, Tensor], x: Tensor, y: Tensor, shift: Tensor) -> Tensor:
        """``x - c_y`` in a reused buffer; adds the per-sample norms to ``r`` and ``a``."""
        work = self._buffer(self._work, "dev", x, (max(x.shape[0], CHUNK), x.shape[1]))
        if work.shape[0] < x.shape[0]:
            work = self._work["dev"] = torch.empty_like(x)
        dev = torch.sub(x, shift.index_select(0, y), out=work[: x.shape[0]])
        v["r"].index_add_(0, y, torch.linalg.vector_norm(dev, dim=1).to(_F64).square())
        v["a"].index_add_(0, y, torch.linalg.vector_norm(x, dim=1).to(_F64))
        return dev  # centred, so accurate in float32

    def _add_chunk(self, v: dict[str, Tensor], x: Tensor, y: Tensor, shift: Tensor) -> None:
        """Modes "full", "span", "none": at most :data:`CHUNK` rows."""
        B = x.shape[0]
        if self._must_flush(x, self._rows + B > FLUSH_ROWS):
            self.flush(v)
        dev = self._centre(v, x, y, shift)
        self._buffer(self._pending, "t", x, shift.shape).index_add_(0, y, dev)
        key = self.scatter_key
        if key == "q":  # the one d x B x d product
            self._buffer(self._pending, key, x, v[key].shape).addmm_(dev.T, dev)
        elif key == "qs":
            assert self.basis is not None
            e = dev @ self._cast("basis", self.basis.to(x.device), x.dtype)  # [B, r]
            self._buffer(self._pending, key, x, v[key].shape).addmm_(e.T, e)
        self._rows += B
        self._adds += 1

    def _add_per_class(self, v: dict[str, Tensor], x: Tensor, y: Tensor, shift: Tensor) -> None:
        """Mode "per_class": one block per class, multiplied in pieces of :data:`CHUNK` rows;
        the first goes to the pending buffer, further pieces straight to float64."""
        counts = torch.bincount(y, minlength=self.layout.num_classes).tolist()
        over = any(r + min(c, CHUNK) > FLUSH_ROWS for r, c in zip(self._class_rows, counts))
        if self._must_flush(x, over):
            self.flush(v)
        dev = self._centre(v, x, y, shift)
        pending_t = self._buffer(self._pending, "t", x, shift.shape)
        pending_q = self._buffer(self._pending, "qk", x, v["qk"].shape)
        blocks = dev.index_select(0, torch.argsort(y, stable=True)).split(counts)
        for k, block in enumerate(blocks):
            if not block.shape[0]:
                continue
            first = block[:CHUNK]
            pending_q[k].addmm_(first.T, first)
            pending_t[k].add_(first.sum(0))
            for piece in block[CHUNK:].split(CHUNK):
                v["qk"][k].add_(piece.T @ piece)
                v["t"][k].add_(piece.sum(0))
            self._class_rows[k] += first.shape[0]
        self._rows += x.shape[0]
        self._adds += 1
