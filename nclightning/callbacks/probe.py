"""A probe of one model on one data source: its settings, its resolved layers, one run.

:class:`ProbeSettings` validates the user's options; :class:`Probe` resolves them against a
Trainer and a model (layers, classifier, samples, the pass plan, printed once) and
:meth:`Probe.run` does one probe: the pass (:mod:`.passes`) inside :func:`isolated_rng` and
:func:`eval_mode`, then the analysis (:mod:`.analysis`), the pair fits solved on rank 0 and
broadcast so every rank holds the same row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nclightning.callbacks import analysis, layers, passes
from nclightning.callbacks.sources import (
    ProbeSource,
    eval_mode,
    isolated_rng,
    resolve_source,
    shard,
    split_batch,
)
from nclightning.callbacks.taps import OUTPUT_FORMATS, LayerTaps
from nclightning.errors import ConfigurationError
from nclightning.metrics import ClassStatistics
from nclightning.record import keys

Warn = Callable[[str, str], None]
"""``warn(key, message)``: warn once per key (the callback's ``_warn_once``)."""

__all__ = ["Probe", "ProbeSettings"]


@dataclass(frozen=True)
class ProbeSettings:
    """The validated options of a probe (see :class:`NeuralCollapseCallback`)."""

    layers: Any
    pairs: tuple[tuple[str, str], ...] | None
    probe: Any
    name: str
    ood_probe: DataLoader | None
    max_samples: int | None
    pool: str
    output_fmt: Any
    include: tuple[str, ...] | None
    exclude: tuple[str, ...] | None
    max_dim: int | None
    batch_size: int | None
    cache_budget: int | str
    snapshot_features: int
    progress: bool | None
    seed: int
    classifier: str | None

    @classmethod
    def build(
        cls,
        *,
        probe: Any,
        name: str | None,
        pairs: Any,
        pool: str,
        output_fmt: Any,
        max_dim: int | None,
        cache_budget: Any,
        **kw: Any,
    ) -> ProbeSettings:
        if isinstance(probe, DataLoader):
            if name is None:
                raise ConfigurationError(
                    "a DataLoader probe needs a name, used in its keys: "
                    "NeuralCollapseCallback(probe=loader, name='cifar10_c')"
                )
        elif probe not in ("train", "val", "test"):
            raise ConfigurationError(
                f"probe must be 'train', 'val', 'test' or a DataLoader, got {probe!r}"
            )
        name = keys.check_probe_name(name if name is not None else probe)
        if pool not in ("avg", "flatten"):
            raise ConfigurationError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        fmts = output_fmt.values() if isinstance(output_fmt, Mapping) else [output_fmt]
        if any(f not in OUTPUT_FORMATS for f in fmts):
            raise ConfigurationError(
                f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}"
            )
        if max_dim is not None and int(max_dim) < 1:
            raise ConfigurationError(f"max_dim must be >= 1, got {max_dim}")
        if cache_budget != "auto" and not (isinstance(cache_budget, int) and cache_budget >= 0):
            raise ConfigurationError(
                f"cache_budget must be 'auto' or bytes >= 0, got {cache_budget!r}"
            )
        if pairs is not None:
            if any(len(p) != 2 for p in pairs):
                raise ConfigurationError(
                    f"pairs must be (h0, h) pairs of layer aliases, got {pairs!r}"
                )
            pairs = tuple((str(a), str(b)) for a, b in pairs)
        for opt in ("include", "exclude"):
            if kw.get(opt) is not None:
                kw[opt] = tuple(kw[opt])
        return cls(
            probe=probe,
            name=name,
            pairs=pairs,
            pool=pool,
            output_fmt=output_fmt,
            max_dim=None if max_dim is None else int(max_dim),
            cache_budget=cache_budget,
            **kw,
        )


class Probe:
    """One probe source on one model, resolved against a Trainer (created in ``setup``)."""

    def __init__(
        self, settings: ProbeSettings, trainer: Any, module: Any, pair_settings: Any
    ) -> None:
        self.settings, self.trainer, self.module = settings, trainer, module
        self.pair_settings = pair_settings
        self.layers = self._named_layers(module)  # alias -> module; {} until traced for "all"
        self.classifier = self._classifier(module)
        self.pairs = self._pairs() if self.layers else []
        self.source: ProbeSource | None = None
        self.loader: DataLoader | None = None
        self.pass_plan: passes.PassPlan | None = None
        self.projections: dict[str, Tensor] = {}
        self.feeding: list[str] = []
        self.kept: dict[str, Tensor] | None = None
        self._example = None

    # -- resolution -----------------------------------------------------------------------------
    def _named_layers(self, module: nn.Module) -> dict[str, str]:
        spec = self.settings.layers
        if spec == "all":
            return {}
        if spec is None:
            spec = getattr(module, "feature_layers", None)
            if not spec:
                raise ConfigurationError(
                    f"{type(module).__name__} declares no `feature_layers`; pass "
                    "NeuralCollapseCallback(layers=[...]) with module names from "
                    "model.named_modules(), or layers='all'"
                )
        return layers.resolve_layers(module, spec)

    def _classifier(self, module: nn.Module) -> str | None:
        choice = self.settings.classifier
        if choice == "auto":
            K = getattr(getattr(module, "hparams", {}), "num_classes", None)
            return layers.find_classifier(module, K)
        if choice is not None:
            layers.resolve_layers(module, [choice])
        return choice

    def _pairs(self) -> list[tuple[str, str]]:
        pairs = self.settings.pairs
        if pairs is None:
            return [("h0", "penultimate")] if {"h0", "penultimate"} <= set(self.layers) else []
        for pair in pairs:
            if not set(pair) <= set(self.layers):
                raise ConfigurationError(
                    f"pair {pair!r} must name two probed layers; probed layers are "
                    f"{', '.join(self.layers)}"
                )
        return list(pairs)

    @property
    def class_names(self) -> list[str] | None:
        return self.source.class_names if self.source else None

    @property
    def device(self) -> torch.device:
        return self.module.device

    def subset(self) -> Tensor:
        """The fixed indices of the probe set (drawn once per run, kept in the state)."""
        return self._source().subset(self.settings.max_samples, self.settings.seed)

    def _plan(self) -> passes.PassPlan:
        assert self.pass_plan is not None, "the pass plan is made before the first pass"
        return self.pass_plan

    def _source(self) -> ProbeSource:
        if self.source is None:
            self.source = resolve_source(self.settings.probe, self.trainer, self.module)
        return self.source

    def weight(self) -> Tensor | None:
        """The classifier's weight ``[K, d]`` (``None`` without a classifier)."""
        if self.classifier is None:
            return None
        w = getattr(dict(self.module.named_modules())[self.classifier], "weight", None)
        return None if w is None else w.detach()

    # -- first probe: samples, loader, trace, plan ---------------------------------------------
    def _prepare(self, subset: Tensor, warn: Warn) -> None:
        """Loader and example batch (first probe), blocks (``"all"``), widths and plan."""
        source, t = self._source(), self.trainer
        if self.loader is None:
            if source.note:
                warn("no-probe-dataset", source.note)
            dm = t.datamodule
            batch = self.settings.batch_size or getattr(dm, "eval_batch_size", None) or 256
            workers = getattr(dm, "num_workers", 0) or 0
            self.loader = source.loader(shard(subset, t.global_rank, t.world_size), batch, workers)
            first = torch.utils.data.Subset(source.dataset, subset[:2].tolist())
            self._example = passes._to(split_batch(layers.example_batch(first))[0], self.device)
            if self.settings.layers == "all":
                self._discover(self._example)
        # widths can change between probes (layer-wise training grows the network)
        widths, itemsize = self._widths(self._example)
        plan = self.pass_plan
        if plan is None or {lp.alias: lp.dim for lp in plan.layers} != widths:
            skip = self.pair_settings.width_mismatch == "skip"
            # a pair skipped for its widths is NaN: its H0 needs no full scatter
            h0 = [a for a, b in self.pairs if not (skip and widths.get(a) != widths.get(b))]
            budget = self.settings.cache_budget
            budget = passes.default_budget(self.device) if budget == "auto" else int(budget)
            samples = len(self.loader.dataset)  # type: ignore[arg-type]  # a map-style Subset
            self.pass_plan = passes.plan(
                widths, itemsize, samples, source.num_classes, h0, budget, self.device
            )
            if t.is_global_zero:
                rank_zero_info(self.pass_plan.describe(self.settings.name, len(subset)))

    def _discover(self, x: Any) -> None:
        calls = layers.trace_order(self.module, lambda: self._forward(x))
        names = layers.discover_blocks(
            self.module, calls, self.classifier, self.settings.include, self.settings.exclude
        )
        if not names:
            raise ConfigurationError(
                f"layers='all' found no block in {type(self.module).__name__} (include="
                f"{self.settings.include}, exclude={self.settings.exclude})"
            )
        self.layers = {name: name for name in names}
        self.pairs = self._pairs()

    def _forward(self, x: Any) -> Any:
        with self.trainer.precision_plugin.forward_context():
            return self.module(x)

    def _widths(self, x: Any) -> tuple[dict[str, int], int]:
        """Each layer's width (after ``max_dim``) and the largest itemsize, from ``x``; which
        layers feed the classifier (kept from the last probe when ``x`` gives NaN features)."""
        with self._taps(projections={}) as taps:
            with self.trainer.precision_plugin.forward_context():
                features, _ = taps.forward(x)
            finite = all(bool(torch.isfinite(h).all()) for h in features.values())
            if finite or not self.feeding:
                self.feeding = taps.feeding(features)
        missing = [a for a in self.layers if a not in features]
        if missing:
            raise ConfigurationError(
                f"layers {missing} produced no output in a forward pass; are these modules "
                "used in forward()?"
            )
        self.projections = self._projections({a: h.shape[1] for a, h in features.items()})
        # a projected layer is no longer the classifier's input: no nc3/unc3 for it
        self.feeding = [a for a in self.feeding if a not in self.projections]
        widths = {
            a: self.projections[a].shape[1] if a in self.projections else h.shape[1]
            for a, h in features.items()
        }
        itemsize = max(h.element_size() for h in features.values())
        return {a: widths[a] for a in self.layers}, itemsize

    def _projections(self, widths: Mapping[str, int]) -> dict[str, Tensor]:
        """Fixed orthonormal ``[d, max_dim]`` maps for layers wider than ``max_dim``."""
        k = self.settings.max_dim
        out = {}
        for i, (alias, d) in enumerate(widths.items()):
            if k is not None and d > k:
                g = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + i)
                q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
                out[alias] = q.to(torch.float32).to(self.device)
        return out

    def _taps(self, projections: Mapping[str, Tensor] | None = None) -> LayerTaps:
        return LayerTaps(
            self.module,
            self.layers,
            classifier=self.classifier,
            pool=self.settings.pool,
            output_fmt=self.settings.output_fmt,
            projections=self.projections if projections is None else projections,
        )

    # -- one probe --------------------------------------------------------------------------------
    def run(
        self, subset: Tensor, reference: Any, couplings: Mapping[str, float], warn: Warn
    ) -> analysis.ProbeResult:
        """One probe of the current weights (every rank calls it; identical results)."""
        with isolated_rng(self.device), eval_mode(self.module):
            self._prepare(subset, warn)
            result = self._pass(reference)
            ood = self._ood_means()
        self.kept = result.kept
        moments = result.moments
        self._warn_about(moments, warn)
        weight = self.weight()
        row = analysis.layer_row(
            self.settings.name,
            moments,
            weight=weight,
            feeding=self.feeding,
            nc4=result.nc4,
            nc4_train_means=result.nc4_train_means,
            ood_means=ood,
            accuracy=result.accuracy,
        )
        for h0, h in self.pairs:  # a width error must stop every rank, not only rank 0
            policy = self.pair_settings.width_mismatch
            if analysis.match_width(moments[h0], moments[h], policy) is None:
                warn(
                    f"width:{h0}->{h}:{moments[h0].dim}",
                    f"NeuralCollapseCallback: pair {h0}->{h}: the layers differ in width (d="
                    f"{moments[h0].dim} vs {moments[h].dim}); its fit is NaN while they do "
                    "(width_mismatch='skip')",
                )
        fits, pair_row = self._fit_pairs(moments, weight, couplings, warn)
        row.update(pair_row)
        per_class = analysis.per_class(moments) if self.trainer.is_global_zero else {}
        return analysis.ProbeResult(row, moments, per_class, fits)

    def _pass(self, reference: Any) -> passes.PassResult:
        t = self.trainer
        keep = self.settings.snapshot_features if t.is_global_zero else 0
        loader = self._progress(self.loader)
        with self._taps() as taps:
            return passes.run_pass(
                taps,
                loader,
                self._plan(),
                num_classes=self._source().num_classes,
                device=self.device,
                forward_context=t.precision_plugin.forward_context,
                reduce_sum=self._reduce_sum,
                reference_means=reference,
                keep=keep,
            )

    def _reduce_sum(self, t: Tensor) -> Tensor:
        if self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(t, reduce_op="sum")
        return t

    def _ood_means(self) -> dict[str, Tensor] | None:
        """Mean features of every layer on the out-of-distribution probe (for nc5)."""
        loader = self.settings.ood_probe
        if loader is None:
            return None
        stats = {
            a: ClassStatistics(1, lp.dim, scatter="none", validate_args=False).to(self.device)
            for a, lp in zip(self.layers, self._plan().layers)
        }
        t = self.trainer
        with self._taps() as taps:
            for i, batch in enumerate(loader):
                if i % t.world_size != t.global_rank:
                    continue
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                with t.precision_plugin.forward_context():
                    features, _ = taps.forward(passes._to(x, self.device))
                zeros = torch.zeros(x.shape[0], dtype=torch.long, device=self.device)
                for a, st in stats.items():
                    st.update(features[a].float(), zeros)
        return {a: st.moments().means[0] for a, st in stats.items()}

    def _fit_pairs(
        self, moments: Any, weight: Tensor | None, couplings: Mapping[str, float], warn: Warn
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Pair fits on rank 0, broadcast (rows, or the error) so every rank agrees."""
        if not self.pairs:
            return {}, {}
        t, fits = self.trainer, {}
        notes: list[str] = []
        payload: tuple[str, Any] | None = None
        if t.is_global_zero:
            try:
                fits = analysis.fit_pairs(
                    moments,
                    self.pairs,
                    self.pair_settings,
                    weight=weight,
                    feeding=self.feeding,
                    near=couplings,
                    notes=notes,
                )
                for note in notes:
                    warn(f"pair-data:{note.split(':')[0]}", f"NeuralCollapseCallback: {note}")
                payload = ("ok", analysis.pair_rows(self.settings.name, fits))
            except Exception as err:  # reaches every rank, then raised everywhere
                payload = ("error", f"{type(err).__name__}: {err}")
        payload = t.strategy.broadcast(payload)
        if payload[0] == "error":
            raise RuntimeError(
                f"NeuralCollapseCallback[{self.settings.name}] pair fit failed: {payload[1]}"
            )
        return fits, payload[1]

    def _warn_about(self, moments: Any, warn: Warn) -> None:
        for alias, m in moments.items():
            if not (torch.isfinite(m.means).all() and torch.isfinite(m.class_ss).all()):
                warn(
                    f"nonfinite:{alias}",
                    f"NeuralCollapseCallback: layer {alias!r} produced NaN/Inf features; its "
                    "collapse metrics are logged as NaN (is training diverging?)",
                )
        absent = next(iter(moments.values())).present.logical_not().nonzero().flatten().tolist()
        if absent:
            names = self.class_names
            named = ", ".join(
                f"{k} ({names[k]})" if names and k < len(names) else str(k) for k in absent
            )
            warn(
                f"absent:{absent}",
                f"NeuralCollapseCallback: class(es) {named} have no sample in the probe set "
                f"({self.settings.name}); metrics use the present classes",
            )

    def _progress(self, loader: Any) -> Any:
        show = self.settings.progress
        t = self.trainer
        if show is None:
            show = t.progress_bar_callback is not None and len(loader) > 10
        if not show or not t.is_global_zero:
            return loader
        from tqdm.auto import tqdm

        return tqdm(
            loader, desc=f"NC probe ({self.settings.name})", leave=False, dynamic_ncols=True
        )
