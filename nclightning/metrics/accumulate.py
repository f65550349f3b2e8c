"""The per-batch work of :class:`~nclightning.metrics.ClassStatistics` (docs/science.md §10).

Owns :class:`Accumulator`: setting the shift of each class the first time it is seen,
centring a batch on the shifts, and adding the shifted sums to the packed float64 state
(layout in :mod:`nclightning.metrics.state`). No torchmetrics here and no state of its own
beyond reusable buffers: every batch lands in the float64 state before :meth:`add`
returns, so the metric needs no flush before its state is read, synced or saved.

Cost (docs/science.md §10): a batch is cut into groups of at most :data:`GROUP` rows; per
group one gather and subtraction (the centring, into a reused buffer, since a fresh
``[B, d]`` tensor per batch costs page faults comparable to the subtraction), two row
norms, one ``index_add`` of the deviations in float64 (the shifted class sums ``t``: exact
terms, summed in float64, :data:`WIDE_ROWS` rows widened at a time) and float32
``d x B x d`` GEMMs of :data:`CHUNK` rows, summed in float32, then added to the float64
scatter; for ``d >= 2 QBLOCK`` only the column blocks on and above the diagonal are
multiplied (:data:`QBLOCK`), each added to both of its places (the state stays symmetric).
Everything but the GEMM is ``O(B d)``, so a pass costs about one bare GEMM of the same rows.
Every float32 sum has at most :data:`GROUP` terms, whatever the batch size.
Shifts never move once set, so there is no per-class re-centring and no per-class loop
outside the per-class scatter mode (whose ``K`` products are what that mode asks for).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nclightning.metrics.ncc import exact_float32_matmul
from nclightning.metrics.state import Layout

__all__ = ["CHUNK", "GROUP", "PER_CLASS_ROWS", "QBLOCK", "Accumulator"]

_F64 = torch.float64
GROUP = 1024
"""Most rows centred at a time, and whose float32 products are summed in float32 before
they join the float64 state."""
CHUNK = 512
"""Rows per float32 product (the most terms of one GEMM's float32 sums)."""
PER_CLASS_ROWS = 16_384
"""Rows sorted by class at a time in the per-class mode (one sort, one block per class)."""
QBLOCK = 512
"""Column block of the symmetric float32 products: only the blocks on and above the diagonal
are multiplied (``nb (nb + 1) / 2`` of ``nb^2``), each mirrored into the state."""
WIDE_ROWS = 128
"""Rows widened to float64 at a time for the float64 class sums (no float64 copy of a group)."""
ADD_BLOCK = 1 << 17
"""Numbers widened to float64 at a time when a float32 product joins the state (1 MiB)."""


class Accumulator:
    """Adds batches to a packed state (see the module docstring).

    Args:
        layout: the state's :class:`~nclightning.metrics.state.Layout`.
        basis: ``[d, r]`` float64 basis of the span mode, else ``None``.
        shift_dtype: precision shifts are stored in (float32 unless the compute precision
            is float64), so that they are exact in the precision they are used in.
        fixed_shift: the shifts were given and never move.
        host_checks: whether the host may look at the batch's class counts to skip the
            shift update when no class is new (default ``None``: on CPU only, where reading
            a device value is free); without it the update is a masked one (no
            synchronisation per batch, what runs on accelerators).
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
        """Forget buffers and casts (rebuilt on the next batch)."""
        self._casts: dict[tuple[str, torch.dtype], Tensor] = {}
        self._casts_of: Tensor | None = None
        self._work: dict[str, Tensor] = {}

    # -- buffers ------------------------------------------------------------------------------
    def _cast(self, packed: Tensor, name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t`` in ``dtype`` on ``packed``'s device, cached while ``packed`` is the state."""
        if self._casts_of is not packed:
            self._casts, self._casts_of = {}, packed
        key = (name, dtype)
        if key not in self._casts:
            self._casts[key] = t.to(device=packed.device, dtype=dtype)
        return self._casts[key]

    def _refresh(self, packed: Tensor, name: str, t: Tensor) -> None:
        """Copy ``t`` into its cached casts, in place (no new ``[K, d]`` tensor per batch)."""
        if self._casts_of is packed:
            for (key, _), cast in self._casts.items():
                if key == name:
                    cast.copy_(t)

    def _buffer(self, name: str, like: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A reused uninitialised buffer of at least ``shape[0]`` rows (view of ``shape``)."""
        buf = self._work.get(name)
        if (
            buf is None
            or buf.dtype != like.dtype
            or buf.device != like.device
            or buf.shape[0] < shape[0]
            or tuple(buf.shape[1:]) != tuple(shape[1:])
        ):
            buf = self._work[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf[: shape[0]]

    # -- shifts -------------------------------------------------------------------------------
    def set_new_shifts(self, v: dict[str, Tensor], x: Tensor, y: Tensor, nb: Tensor) -> bool:
        """Give each class seen for the first time the float64 mean of its rows in this batch,
        rounded to :attr:`shift_dtype`; returns whether a shift may have changed.

        With host checks only the new classes' rows are summed; without, a masked update of
        every class (no host synchronisation).
        """
        new = (v["n"] == 0) & (nb > 0)
        host = self.host_checks if self.host_checks is not None else x.device.type == "cpu"
        c = v["c"]
        if host:
            idx = new.nonzero().flatten()
            if not idx.numel():
                return False
            # WIDE_ROWS new classes and rows at a time: no [new, d] or float64 [B, d] matrix
            for part_idx in idx.split(WIDE_ROWS):
                pos = torch.full_like(nb, -1).index_copy_(
                    0, part_idx, torch.arange(part_idx.numel(), device=nb.device)
                )
                sums = torch.zeros(part_idx.numel(), c.shape[1], dtype=_F64, device=x.device)
                which = (pos.index_select(0, y) >= 0).nonzero().flatten()
                for part in which.split(WIDE_ROWS):
                    at = pos.index_select(0, y.index_select(0, part))
                    sums.index_add_(0, at, x.index_select(0, part).to(_F64))
                mean = sums.div_(nb.index_select(0, part_idx).unsqueeze(1))  # in place
                c.index_copy_(0, part_idx, mean.copy_(mean.to(self.shift_dtype)))
            return True
        sums = torch.zeros(c.shape, dtype=_F64, device=x.device).index_add_(0, y, x.to(_F64))
        mean = (sums / nb.clamp_min(1).unsqueeze(1)).to(self.shift_dtype).to(_F64)
        c.copy_(torch.where(new.unsqueeze(1), mean, c))
        return True

    # -- accumulation -------------------------------------------------------------------------
    def add(self, packed: Tensor, x: Tensor, y: Tensor, ct: torch.dtype) -> None:
        """Add a batch ``x[B, d]`` (labels ``y[B]``) centred and multiplied in ``ct``."""
        v = self.layout.views(packed)
        nb = torch.bincount(y, minlength=self.layout.num_classes)
        if not self.fixed_shift and self.set_new_shifts(v, x, y, nb):
            self._refresh(packed, "shift", v["c"])
        v["n"].add_(nb)
        shift = self._cast(packed, "shift", v["c"], ct)
        with exact_float32_matmul():
            if self.scatter_key == "qk":
                for xb, yb in zip(x.split(PER_CLASS_ROWS), y.split(PER_CLASS_ROWS)):
                    self._add_per_class(v, xb, yb, shift, ct)
            else:
                for xb, yb in zip(x.split(GROUP), y.split(GROUP)):
                    self._add_group(packed, v, xb, yb, shift, ct)

    def _centre(self, v: dict[str, Tensor], x: Tensor, y: Tensor, shift: Tensor) -> Tensor:
        """``x - c_y`` in a reused buffer; adds the per-sample norms to ``r`` and ``a`` and
        the deviations (in float64) to ``t``."""
        dev = self._buffer("dev", x, tuple(x.shape))
        torch.index_select(shift, 0, y, out=dev)
        torch.sub(x, dev, out=dev)
        v["r"].index_add_(0, y, torch.linalg.vector_norm(dev, dim=1).to(_F64).square())
        v["a"].index_add_(0, y, torch.linalg.vector_norm(x, dim=1).to(_F64))
        for start in range(0, dev.shape[0], WIDE_ROWS):
            part = dev[start : start + WIDE_ROWS]
            wide = self._buffer("wide_t", v["t"], tuple(part.shape))
            v["t"].index_add_(0, y[start : start + WIDE_ROWS], wide.copy_(part))
        return dev  # centred, so accurate in float32

    def _product(self, name: str, target: Tensor, a: Tensor) -> None:
        """``target += a^T a``: in place for float64 ``a``; else float32 products of
        :data:`CHUNK` rows summed in a reused float32 buffer, then added to ``target``."""
        if a.dtype == _F64:
            target.addmm_(a.T, a)
            return
        d = a.shape[1]
        pieces = a.split(CHUNK)
        if d < 2 * QBLOCK:
            buf = self._buffer(name, a, (d, d))
            self._gram(buf, pieces, slice(0, d), slice(0, d))
            self.add_exact(target, buf)
            return
        # symmetric: the blocks on and above the diagonal, each mirrored below it
        flat = self._buffer(name + "_block", a, (QBLOCK * QBLOCK,))
        for i in range(0, d, QBLOCK):
            rows = slice(i, min(d, i + QBLOCK))
            for j in range(i, d, QBLOCK):
                cols = slice(j, min(d, j + QBLOCK))
                out = flat[: (rows.stop - i) * (cols.stop - j)].view(rows.stop - i, cols.stop - j)
                self._gram(out, pieces, rows, cols)
                self.add_exact(target[rows, cols], out)
                if j != i:
                    self.add_exact(target[cols, rows], out.T)

    @staticmethod
    def _gram(out: Tensor, pieces: tuple[Tensor, ...], rows: slice, cols: slice) -> None:
        """``out = sum_p piece_p[:, rows]^T piece_p[:, cols]`` in ``out``'s precision."""
        for i, piece in enumerate(pieces):
            if i:
                out.addmm_(piece[:, rows].T, piece[:, cols])
            else:
                torch.mm(piece[:, rows].T, piece[:, cols], out=out)

    def add_exact(self, target: Tensor, src: Tensor) -> None:
        """``target += src`` for float64 ``target``, float32 ``src`` ``[m, d]``: widened a
        block of rows at a time into a small float64 buffer (a mixed-dtype ``add_`` runs
        at half the speed; widening all of ``src`` at once costs memory)."""
        step = max(1, ADD_BLOCK // max(1, src.shape[-1]))
        wide = self._buffer("wide", target, (min(step, src.shape[0]), *src.shape[1:]))
        for start in range(0, src.shape[0], step):
            block = src[start : start + step]
            target[start : start + step].add_(wide[: block.shape[0]].copy_(block))

    def _add_group(
        self,
        packed: Tensor,
        v: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        shift: Tensor,
        ct: torch.dtype,
    ) -> None:
        """Modes "full", "span", "none": at most :data:`GROUP` rows."""
        dev = self._centre(v, x.to(ct), y, shift)
        if self.scatter_key == "q":  # the one d x B x d product
            self._product("q", v["q"], dev)
        elif self.scatter_key == "qs":
            assert self.basis is not None
            self._product("qs", v["qs"], dev @ self._cast(packed, "basis", self.basis, ct))

    def _add_per_class(
        self, v: dict[str, Tensor], x: Tensor, y: Tensor, shift: Tensor, ct: torch.dtype
    ) -> None:
        """Mode "per_class": rows sorted by class, one product per class and group of at
        most :data:`GROUP` rows."""
        counts = torch.bincount(y, minlength=self.layout.num_classes).tolist()
        order = torch.argsort(y, stable=True)
        dev = self._centre(v, x.index_select(0, order).to(ct), y.index_select(0, order), shift)
        qk = v["qk"]
        start = 0
        for k, count in enumerate(counts):
            for piece in dev[start : start + count].split(GROUP):
                self._product("qk", qk[k], piece)
            start += count
