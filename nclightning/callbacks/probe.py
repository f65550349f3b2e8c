"""A probe of one model on one data source: its settings, its resolved layers, one run.

:class:`Probe` resolves one probe of the callback's settings
(:mod:`nclightning.callbacks.settings`) against a Trainer and a model (layers, classifier,
the number of classes, samples, the pass plan, printed once) and :meth:`Probe.run` does one
probe: the pass (:mod:`.passes`) inside :func:`isolated_rng` and :func:`eval_mode`, then the
analysis (:mod:`.analysis`), the pair fits solved on rank 0 and broadcast so every rank holds
the same row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nclightning.callbacks import analysis, layers, passes
from nclightning.callbacks.settings import CallbackSettings
from nclightning.callbacks.sources import (
    ProbeSource,
    call_model,
    eval_mode,
    inputs_of,
    isolated_rng,
    replayable,
    resolve_source,
    shard,
    split_batch,
)
from nclightning.callbacks.taps import LayerTaps
from nclightning.errors import ConfigurationError
from nclightning.metrics import ClassStatistics

__all__ = ["Probe"]

Warn = Callable[[str, str], None]


class Probe:
    """One probe source on one model, resolved against a Trainer (created in ``setup``)."""

    def __init__(
        self, settings: CallbackSettings, index: int, trainer: Any, module: LightningModule
    ) -> None:
        self.trainer, self.module = trainer, module
        self.features, self.pair_settings = settings.features, settings.fit
        self.probing = settings.probe
        self.spec = settings.probe.probes[index]
        self.name = settings.probe.names[index]
        self.snapshot_features = settings.outputs.snapshot_features
        self.progress = settings.outputs.progress
        self.layers = self._named_layers(module)  # alias -> module; {} until traced for "all"
        self.classifier = self._classifier(module)
        self.pairs = self._pairs() if self.layers else []
        self.source: ProbeSource | None = None
        self.loader: DataLoader | None = None
        self.inputs: Any = None  # the loader, or its Replay (sources.replayable)
        self.pass_plan: passes.PassPlan | None = None
        self.projections: dict[str, Tensor] = {}
        self.feeding: list[str] = []
        self.kept: dict[str, Tensor] | None = None
        self._example = None
        self._layouts: dict[str, str] = {}

    # -- resolution -----------------------------------------------------------------------------
    def _named_layers(self, module: nn.Module) -> dict[str, str]:
        spec = self.features.layers
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
        choice = self.features.classifier
        if choice == "auto":
            K = self.probing.num_classes or _declared_classes(self.trainer, module)
            return layers.find_classifier(module, K)
        if choice is not None:
            layers.resolve_layers(module, [choice])
        return choice

    def _pairs(self) -> list[tuple[str, str]]:
        pairs = self.pair_settings.pairs
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

    @property
    def num_classes(self) -> int:
        """``K``, from the model (docs/science.md §1: classes, not the labels a probe holds)."""
        return self._source().num_classes

    def subset(self) -> Tensor:
        """The fixed indices of the probe set (drawn once per run, kept in the state)."""
        source = self._source()
        return source.subset(self.probing.max_samples, self.probing.seed)

    def _plan(self) -> passes.PassPlan:
        assert self.pass_plan is not None, "the pass plan is made before the first pass"
        return self.pass_plan

    def _source(self) -> ProbeSource:
        if self.source is None:
            K = self.probing.num_classes or self._model_classes()
            self.source = resolve_source(self.spec, self.name, self.trainer, self.module, K)
        return self.source

    def _model_classes(self) -> int:
        """The classifier's outputs, else the DataModule's or the model's ``num_classes``."""
        if self.classifier is not None:
            head = dict(self.module.named_modules())[self.classifier]
            K = getattr(head, "out_features", None)
            if isinstance(K, int) and K > 1:
                return K
        K = _declared_classes(self.trainer, self.module)
        if K is None:
            raise ConfigurationError(
                f"NeuralCollapseCallback[{self.name}] cannot tell the number of classes: the "
                "model has no linear classifier and neither the DataModule nor the model "
                "declares num_classes; pass NeuralCollapseCallback(num_classes=K)"
            )
        return K

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
            batch = self.probing.batch_size or getattr(dm, "eval_batch_size", None) or 256
            workers = getattr(dm, "num_workers", 0) or 0
            self.loader = source.loader(shard(subset, t.global_rank, t.world_size), batch, workers)
            first = torch.utils.data.Subset(source.dataset, subset[:2].tolist())
            example = layers.example_batch(first, source.template)
            self._example = passes._to(split_batch(example)[0], self.device)
            if self.features.layers == "all":
                self._discover(self._example)
        # widths can change between probes (layer-wise training grows the network)
        widths, itemsize = self._widths(self._example)
        plan = self.pass_plan
        if plan is None or {lp.alias: lp.dim for lp in plan.layers} != widths:
            skip = self.pair_settings.width_mismatch == "skip"
            # a pair skipped for its widths is NaN: its H0 needs no full scatter
            h0 = [a for a, b in self.pairs if not (skip and widths.get(a) != widths.get(b))]
            samples = len(self.loader.dataset)  # type: ignore[arg-type]  # a map-style Subset
            # one process holds every row: H*'s per-class spread from H0's rows, for an H0 whose
            # pairs all have equal widths (a zero-padded H0 keeps the per-class scatter)
            padded = {a for a, b in self.pairs if widths.get(a) != widths.get(b)}
            rows = [a for a in h0 if a not in padded]
            self.pass_plan = passes.plan(
                widths, itemsize, samples, source.num_classes, h0, self._budget(), self.device,
                rows=rows if t.world_size == 1 else (),
            )  # fmt: skip
            if t.is_global_zero:
                rank_zero_info(self.pass_plan.describe(self.name, len(subset), self._layouts))
        if self.inputs is None:  # the inputs share the budget with the feature cache
            plan = self._plan()
            left = max(0, self._budget() - plan.cache_bytes) if plan.cached else 0
            replay = replayable(source) and left > 0
            self.inputs = passes.Replay(self.loader, self.device, left) if replay else self.loader

    def _budget(self) -> int:
        """Bytes the feature cache (and the replayed inputs) may take (``cache_budget``)."""
        budget = self.features.cache_budget
        return passes.default_budget(self.device) if budget == "auto" else int(budget)

    def _discover(self, x: Any) -> None:
        f = self.features
        names = layers.declared_blocks(self.module, f.include, f.exclude)
        if names is None:  # no timm feature_info: the block rule on one traced forward pass
            calls = layers.trace_order(self.module, lambda: self._forward(x))
            names = layers.discover_blocks(
                self.module, calls, self.classifier, f.include, f.exclude
            )
        if not names:
            raise ConfigurationError(
                f"layers='all' found no block in {type(self.module).__name__} (include="
                f"{f.include}, exclude={f.exclude})"
            )
        self.layers = {name: name for name in names}
        self.pairs = self._pairs()

    def _forward(self, x: Any) -> Any:
        with self.trainer.precision_plugin.forward_context():
            return call_model(self.module, x)

    def _widths(self, x: Any) -> tuple[dict[str, int], int]:
        """Each layer's width (after ``max_dim``) and the largest itemsize, from ``x``; which
        layers feed the classifier (kept from the last probe when ``x`` gives NaN features)."""
        with self._taps(projections={}) as taps:
            with self.trainer.precision_plugin.forward_context():
                features, _ = taps.forward(x)
            self._layouts = dict(taps.layouts)
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
        k = self.features.max_dim
        out = {}
        for i, (alias, d) in enumerate(widths.items()):
            if k is not None and d > k:
                g = torch.Generator().manual_seed(self.probing.seed * 1_000_003 + i)
                q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
                out[alias] = q.to(torch.float32).to(self.device)
        return out

    def _taps(self, projections: Mapping[str, Tensor] | None = None) -> LayerTaps:
        return LayerTaps(
            self.module,
            self.layers,
            classifier=self.classifier,
            pool=self.features.pool,
            output_fmt=self.features.output_fmt,
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
            self.name,
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
        fits, pair_row = self._fit_pairs(moments, weight, couplings, warn, result.rows)
        result.rows.clear()
        row.update(pair_row)
        per_class = analysis.per_class(moments) if self.trainer.is_global_zero else {}
        return analysis.ProbeResult(row, moments, per_class, fits)

    def _pass(self, reference: Any) -> passes.PassResult:
        t = self.trainer
        keep = self.snapshot_features if t.is_global_zero else 0
        loader = self._progress(self.inputs)
        with self._taps() as taps:
            return passes.run_pass(
                taps,
                loader,
                self._plan(),
                num_classes=self.num_classes,
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
        loader = self.probing.ood_probe
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
                x = inputs_of(batch)
                with t.precision_plugin.forward_context():
                    features, _ = taps.forward(passes._to(x, self.device))
                n = next(iter(features.values())).shape[0]
                zeros = torch.zeros(n, dtype=torch.long, device=self.device)
                for a, st in stats.items():
                    st.update(features[a].float(), zeros)
        return {a: st.moments().means[0] for a, st in stats.items()}

    def _fit_pairs(
        self,
        moments: Any,
        weight: Tensor | None,
        couplings: Mapping[str, float],
        warn: Warn,
        rows: Mapping[str, tuple[Tensor, Tensor]],
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
                    cast(Any, self.pair_settings),  # analysis.fit_pairs reads its fields
                    weight=weight,
                    feeding=self.feeding,
                    near=couplings,
                    notes=notes,
                    rows=rows,
                )
                for note in notes:
                    warn(f"pair-data:{note.split(':')[0]}", f"NeuralCollapseCallback: {note}")
                payload = ("ok", analysis.pair_rows(self.name, fits))
            except Exception as err:  # reaches every rank, then raised everywhere
                payload = ("error", f"{type(err).__name__}: {err}")
        payload = t.strategy.broadcast(payload)
        if payload[0] == "error":
            raise RuntimeError(f"NeuralCollapseCallback[{self.name}] pair fit failed: {payload[1]}")
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
                f"({self.name}); metrics use the present classes",
            )

    def _progress(self, loader: Any) -> Any:
        show = self.progress
        t = self.trainer
        if show is None:
            show = t.progress_bar_callback is not None and len(loader) > 10
        if not show or not t.is_global_zero:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=f"NC probe ({self.name})", leave=False, dynamic_ncols=True)


def _declared_classes(trainer: Any, module: nn.Module) -> int | None:
    """``num_classes`` declared by the DataModule or the model's hyperparameters."""
    for owner in (trainer.datamodule, getattr(module, "hparams", None), module):
        K = getattr(owner, "num_classes", None)
        if isinstance(K, int) and not isinstance(K, bool) and K > 1:
            return K
    return None
