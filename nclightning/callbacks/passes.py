"""One probe's forward pass(es): from a loader to synced class statistics of every layer.

The pass computes no metric; it hands :mod:`nclightning.metrics` what it needs.

Two ways to the same numbers (docs/science.md §10), chosen once per run by :func:`plan`:

* **cached** (default, when the features fit ``cache_budget``): one forward pass keeps each
  layer's features ``[N_rank, d]`` and the classifier's predictions on the device and sums the
  class means (:class:`~nclightning.metrics.ClassStatistics` with ``scatter="none"``); after
  the means are synced across ranks, a sweep over the cache accumulates, around those exact
  means, the full within-class scatter only where the perturbation model needs it (a pair's
  ``H0``; for cdnv of ``H*`` one process keeps ``H0``'s rows for the fit, ``O(N d K)``, and
  several keep the per-class scatter, ``K d^2``) and elsewhere only its projection on the
  span of the centred class means (all that NC1 needs: ``O(N d K)`` instead of ``O(N d^2)``),
  and counts the NCC mismatches against the same probe's means (exact NC4, Papyan's
  definition);
* **streamed** (when they do not fit): one pass of shifted one-pass statistics with the full
  scatter, then a second forward pass for the NC4 counts.

Where the probe's batches never change (``sources.replayable``), :class:`Replay` keeps them on
the device after the first probe, in what the feature cache leaves of ``cache_budget``.

Every rank runs the same collectives in the same order (statistics are built from the widths
known before the first batch), so a rank with an empty shard takes part too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from nclightning.callbacks.sources import split_batch
from nclightning.callbacks.taps import LayerTaps
from nclightning.errors import ConfigurationError
from nclightning.metrics import ClassMoments, ClassStatistics, NCCMismatch

__all__ = ["LayerPlan", "PassPlan", "PassResult", "Replay", "plan", "run_pass"]

_F64 = torch.float64


@dataclass(frozen=True)
class LayerPlan:
    """One layer of a pass: width ``dim`` and what its statistics keep (``scatter``)."""

    alias: str
    dim: int
    scatter: str  # "per_class" | "full" | "span"
    keep_rows: bool = False  # a pair's H0: its cached rows outlive the pass (cdnv of H*)


@dataclass(frozen=True)
class PassPlan:
    """How a probe runs: cached or streamed, and each layer's statistics."""

    layers: tuple[LayerPlan, ...]
    cached: bool
    cache_bytes: int
    stats_bytes: int
    device: str

    def describe(self, probe: str, samples: int, layouts: Mapping[str, str] | None = None) -> str:
        """The start-up line: each layer's width and layout (``BD``: rows; ``NCHW``/``NCL``
        channels first, ``NLC`` tokens, with the pooling), the samples, where they live."""
        layouts = layouts or {}
        widths = ", ".join(
            f"{lp.alias}: {lp.dim}" + (f" ({layouts[lp.alias]})" if lp.alias in layouts else "")
            for lp in self.layers
        )
        how = (
            f"feature cache {_mib(self.cache_bytes)} on {self.device}"
            if self.cached
            else f"streamed (cache of {_mib(self.cache_bytes)} over the budget; NC4 by a "
            "second pass)"
        )
        return (
            f"NeuralCollapseCallback[{probe}]: {len(self.layers)} layer(s) ({widths}), "
            f"{samples} samples per probe: {how}, statistics {_mib(self.stats_bytes)}"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def default_budget(device: torch.device) -> int:
    """A quarter of the free memory of ``device`` (CUDA), or of the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def plan(
    widths: Mapping[str, int],
    itemsize: int,
    samples: int,
    num_classes: int,
    h0_layers: Iterable[str],
    budget: int,
    device: torch.device,
    limit: int | None = None,
    rows: Iterable[str] = (),
) -> PassPlan:
    """The :class:`PassPlan` for layers of ``widths`` over ``samples`` samples on one rank.

    The features are cached when they fit ``budget`` bytes. ``h0_layers`` need the full
    scatter; for cdnv of ``H*`` also the per-class spread: from their cached rows where they
    are among ``rows`` (one process: the rows are all the samples) and cached, kept past the
    pass for the fit (``O(N d K)``); else per class, when ``K d^2`` float64 numbers fit
    ``limit``, the memory the statistics may take (default :func:`default_budget`). A probe
    whose statistics exceed ``limit`` is refused with the ways out.
    """
    K, h0, by_rows = num_classes, set(h0_layers), set(rows)
    limit = default_budget(device) if limit is None else limit
    cache = samples * (sum(widths.values()) * itemsize + 8)
    cached = cache <= budget
    layers, stats = [], 0
    for alias, d in widths.items():
        keep = alias in h0 and alias in by_rows and cached
        if alias in h0:
            scatter = "per_class" if not keep and K * d * d * 8 <= limit // 2 else "full"
        else:
            scatter = "span" if cached else "full"
        stats += 8 * (
            K * (2 * d + 3) + {"per_class": (K + 1) * d * d, "full": d * d}.get(scatter, K * K)
        )
        layers.append(LayerPlan(alias, d, scatter, keep))
    if stats > limit:
        widest = ", ".join(f"{a}: {d}" for a, d in sorted(widths.items(), key=lambda t: -t[1])[:5])
        raise ConfigurationError(
            f"the probe does not fit in memory: its feature cache needs {_mib(cache)} and the "
            f"statistics {_mib(stats)} (d x d per streamed layer), over the {_mib(limit)} "
            f"they may take. Widest layers: {widest}. Set max_dim (a fixed projection of wide "
            "layers), exclude layers, or probe fewer samples (max_samples) so that the "
            "features fit cache_budget"
        )
    return PassPlan(tuple(layers), cached, cache, stats, str(device))


@dataclass
class PassResult:
    """Synced statistics of one probe pass (identical on every rank).

    ``moments[alias]``: :class:`ClassMoments` (float64); ``nc4[alias]``: NCC mismatch against
    this probe's means; ``nc4_train_means[alias]``: against given reference means;
    ``accuracy``: of the classifier (``None`` without one); ``kept``: the first raw features
    (rank 0, for snapshots).
    """

    moments: dict[str, ClassMoments]
    nc4: dict[str, float] = field(default_factory=dict)
    nc4_train_means: dict[str, float] = field(default_factory=dict)
    accuracy: float | None = None
    kept: dict[str, Tensor] | None = None
    rows: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # LayerPlan.keep_rows


@dataclass
class _Batches:
    """What the first pass keeps: cached features, predictions, labels, kept samples."""

    features: dict[str, list[Tensor]]
    preds: list[Tensor]
    labels: list[Tensor]
    correct: Tensor
    seen: Tensor
    kept: dict[str, list[Tensor]]


def run_pass(
    taps: LayerTaps,
    loader: Iterable,
    pass_plan: PassPlan,
    *,
    num_classes: int,
    device: torch.device,
    forward_context: Callable = nullcontext,
    reduce_sum: Callable[[Tensor], Tensor] = lambda t: t,
    reference_means: Mapping[str, ClassMoments] | None = None,
    keep: int = 0,
) -> PassResult:
    """Run one probe (the module docstring); ``taps`` is entered by the caller."""
    K = num_classes
    first = {
        lp.alias: _stats(K, lp.dim, device, "none" if pass_plan.cached else lp.scatter)
        for lp in pass_plan.layers
    }
    batches = _first_pass(taps, loader, first, pass_plan.cached, device, forward_context, keep)
    moments = {alias: st.moments() for alias, st in first.items()}  # synced (every rank)
    refs = {a: m for a, m in (reference_means or {}).items() if a in moments}
    has_head = taps.classifier is not None
    rows: dict[str, tuple[Tensor, Tensor]] = {}
    if pass_plan.cached:
        moments, nc4, nc4_ref = _second_sweep(
            batches, pass_plan, moments, refs, K, device, has_head, rows
        )
    else:
        nc4, nc4_ref = _nc4_pass(taps, loader, moments, refs, device, forward_context, has_head)
    counts = reduce_sum(torch.stack([batches.correct, batches.seen]))
    correct, seen = (float(c) for c in counts)
    # undefined features: an undefined accuracy (docs/science.md §1). A non-finite feature
    # makes its class's float64 mean non-finite (finite float32 sums cannot overflow it), and
    # the means are synced, so every rank agrees without looking at the features again.
    if not all(bool(torch.isfinite(m.means).all()) for m in moments.values()):
        correct = math.nan
    kept = None
    if keep:
        kept = {a: torch.cat(v) for a, v in batches.kept.items() if v}
    return PassResult(
        moments=moments,
        nc4=nc4,
        nc4_train_means=nc4_ref,
        accuracy=(correct / seen if seen > 0 else math.nan) if has_head else None,
        kept=kept,
        rows=rows,
    )


def _stats(K: int, dim: int, device: torch.device, scatter: str, **kwargs: Any) -> ClassStatistics:
    mode = "full" if scatter == "span" else scatter  # span needs a basis: see _second_sweep
    return ClassStatistics(
        K, dim, scatter=mode, allow_missing_classes=True, validate_args=False, **kwargs
    ).to(device)


def _first_pass(
    taps: LayerTaps,
    loader: Iterable[Any],
    stats: dict[str, ClassStatistics],
    cached: bool,
    device: torch.device,
    forward_context: Callable[[], Any],
    keep: int,
) -> _Batches:
    correct, seen = _zeros(device, 2)
    out = _Batches({a: [] for a in stats}, [], [], correct, seen, {})
    kept = 0
    for batch in loader:
        x, y = split_batch(batch)
        x = _to(x, device)
        y = y.to(device=device, dtype=torch.long)
        with forward_context():
            features, logits = taps.forward(x)
        for alias, st in stats.items():
            h = features[alias]
            if cached:  # class sums from the cache below, a chunk at a time
                out.features[alias].append(h)
                continue
            st.update(h.float(), y)
        out.labels.append(y)
        if logits is not None:
            pred = logits.argmax(1)
            out.preds.append(pred)
            out.correct += (pred == y).sum()
        out.seen += y.numel()
        if kept < keep:
            take = min(keep - kept, y.numel())
            for alias in stats:
                out.kept.setdefault(alias, []).append(features[alias][:take].half().cpu())
            out.kept.setdefault("labels", []).append(y[:take].cpu())
            kept += take
    if cached:  # a few large updates instead of one per batch (per-update costs dominate)
        for alias, st in stats.items():
            for h, y, _ in _chunks(out.features[alias], out.labels, []):
                st.update(h.float(), y)
    return out


def _second_sweep(
    batches: _Batches,
    pass_plan: PassPlan,
    means: Mapping[str, ClassMoments],
    refs: Any,
    K: int,
    device: torch.device,
    has_head: bool,
    rows: dict[str, tuple[Tensor, Tensor]],
) -> tuple[Any, ...]:
    """Scatter around the synced means, from the cache; exact NC4 counts; the rows of layers
    that keep them into ``rows``."""
    moments, nc4, nc4_ref = {}, {}, {}
    for lp in pass_plan.layers:
        m = means[lp.alias]
        finite = bool(torch.isfinite(m.means).all())  # NaN features: NaN metrics, same keys
        basis = None
        if lp.scatter == "span":
            basis = m.mean_span() if finite else m.means.new_zeros(lp.dim, 0)
        st = ClassStatistics(
            K,
            lp.dim,
            scatter="span" if basis is not None else lp.scatter,
            scatter_basis=basis,
            shift=m.means if finite else None,
            allow_missing_classes=True,
            validate_args=False,
        ).to(device)
        ncc = NCCMismatch(m.means, m.present).to(device) if has_head and finite else None
        ref = refs.get(lp.alias)
        ncc_ref = NCCMismatch(ref.means, ref.present).to(device) if has_head and ref else None
        if has_head and not finite:
            nc4[lp.alias] = math.nan
        for h, y, pred in _chunks(batches.features[lp.alias], batches.labels, batches.preds):
            h = h.float()
            st.update(h, y)
            if ncc is not None:
                ncc.update(h, pred)
            if ncc_ref is not None:
                ncc_ref.update(h, pred)
        if lp.keep_rows:
            rows[lp.alias] = (torch.cat(batches.features[lp.alias]), torch.cat(batches.labels))
        batches.features[lp.alias].clear()  # free the cache as soon as a layer is done
        moments[lp.alias] = st.moments()
        if ncc is not None:
            nc4[lp.alias] = float(ncc.compute())
        if ncc_ref is not None:
            nc4_ref[lp.alias] = float(ncc_ref.compute())
    return moments, nc4, nc4_ref


class Replay:
    """The batches of a probe loader whose batches never change (``sources.replayable``): read
    and moved to ``device`` at the first probe, kept there while they fit ``limit`` bytes, and
    replayed at every later probe (no collate, no host-to-device copy). Over ``limit`` the
    loader is read anew at every probe, as without it. Yields ``(inputs, labels)``."""

    def __init__(self, loader: Any, device: torch.device, limit: int) -> None:
        self.loader, self.device, self.limit = loader, device, limit
        self.batches: list[tuple[Any, Tensor]] | None = None
        self.too_large = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        if self.batches is not None:  # copies: a model may change its input in place
            for x, y in self.batches:
                yield _clone(x), y
            return
        kept: list[tuple[Any, Tensor]] | None = None if self.too_large else []
        size = 0
        for batch in self.loader:
            x, y = split_batch(batch)
            x = _to(x, self.device)
            y = y.to(device=self.device, dtype=torch.long)
            if kept is not None:
                size += _nbytes(x) + y.numel() * y.element_size()
                if size <= self.limit:
                    kept.append((x, y))
                    x = _clone(x)
                else:
                    kept, self.too_large = None, True
            yield x, y
        self.batches = kept


def _clone(x: Any) -> Any:
    return apply_to_collection(x, Tensor, torch.clone)


def _nbytes(x: Any) -> int:
    sizes: list[int] = []
    apply_to_collection(x, Tensor, lambda t: sizes.append(t.nbytes))
    return sum(sizes)


SWEEP_ROWS = 4096
"""The second sweep updates the statistics with cached batches joined into chunks of about
this many rows: the per-class scatter costs one ``d^2`` pass per class and update."""


def _chunks(
    features: Sequence[Tensor], labels: Sequence[Tensor], preds: Sequence[Tensor]
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """``(features, labels, predictions or None)`` of consecutive cached batches, joined."""

    def join(ts: Sequence[Tensor], group: list[int]) -> Tensor:
        return ts[group[0]] if len(group) == 1 else torch.cat([ts[j] for j in group])

    group: list[int] = []
    rows = 0
    for i, h in enumerate(features):
        group.append(i)
        rows += h.shape[0]
        if rows >= SWEEP_ROWS or i == len(features) - 1:
            yield join(features, group), join(labels, group), join(preds, group) if preds else None
            group, rows = [], 0


def _nc4_pass(
    taps: LayerTaps,
    loader: Iterable[Any],
    moments: Mapping[str, ClassMoments],
    refs: Any,
    device: torch.device,
    forward_context: Callable[[], Any],
    has_head: bool,
) -> tuple[Any, ...]:
    """Streamed mode: a second forward pass counting NCC mismatches against the final means."""
    if not has_head:
        return {}, {}
    finite = {a: bool(torch.isfinite(m.means).all()) for a, m in moments.items()}
    ncc = {a: NCCMismatch(m.means, m.present).to(device) for a, m in moments.items() if finite[a]}
    ncc_ref = {a: NCCMismatch(r.means, r.present).to(device) for a, r in refs.items()}
    for batch in loader:
        x, _ = split_batch(batch)
        with forward_context():
            features, logits = taps.forward(_to(x, device))
        assert logits is not None  # has_head: the classifier ran
        pred = logits.argmax(1)
        for alias, counter in ncc.items():
            counter.update(features[alias].float(), pred)
        for alias, counter in ncc_ref.items():
            counter.update(features[alias].float(), pred)
    return (
        {a: float(ncc[a].compute()) if a in ncc else math.nan for a in moments},
        {a: float(c.compute()) for a, c in ncc_ref.items()},
    )


def _zeros(device: torch.device, n: int) -> list[Tensor]:
    return [torch.zeros((), dtype=_F64, device=device) for _ in range(n)]


def _to(x: Any, device: torch.device) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(x, device)
