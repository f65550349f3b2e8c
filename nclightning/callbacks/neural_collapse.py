"""``NeuralCollapseCallback``: per-epoch collapse metrics and perturbation-model fits.

The callback composes :mod:`nclightning.metrics` (docs/science.md §1) and
:mod:`nclightning.perturbation` (docs/science.md §2); it adds no maths of its own.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from nclightning.callbacks.probe import (
    LayerTaps,
    balanced_indices,
    dataset_targets,
    eval_mode,
    find_classifier,
    resolve_layers,
    shard,
    split_batch,
    subset_loader,
)
from nclightning.metrics import METRIC_KEYS, ClassMoments, ClassStatistics

__all__ = ["NeuralCollapseCallback", "atomic_torch_save"]

ALL_METRICS = (*METRIC_KEYS, "nc3", "nc4")


class NeuralCollapseCallback(Callback):
    r"""Measure neural collapse in chosen layers every few epochs and fit the perturbation model.

    Every ``every_n_epochs`` training epochs (and once at fit start, the epoch-0 baseline; never
    during the sanity check) the callback runs **one** eval-mode, no-grad pass over a fixed
    probe set, collects the outputs of all ``layers`` through forward hooks, and accumulates
    their class statistics (:class:`~nclightning.metrics.ClassStatistics`: O(K d + d^2) memory
    per layer, exact in the collapsed regime, summed across DDP ranks). From them it logs, for
    each layer, every metric of docs/science.md §1, and for each ``(h0_layer, h_layer)`` pair it
    solves the perturbation model of Tirer, Huang & Niles-Weed (docs/science.md §2) with the
    ``h0_layer``'s features as ``H0``, logging the metrics the model predicts for ``H*``.

    Logged keys (through every logger of the Trainer, with ``epoch`` = completed training
    epochs, 0 for the baseline, and ``step`` = the global step):

    * ``nc/{split}/{layer}/{metric}`` for ``metric`` in ``nc1, nc1_tilde, cdnv, nc2_etf,
      nc2_equinorm, nc2_equiangle, nc2_maxangle``, plus ``nc3`` for the layer that feeds the
      classifier and ``nc4`` (from the second probe on; see below);
    * ``nc/{split}/accuracy``: the network's accuracy on the probe set at that point;
    * ``pm/{h0_layer}->{h_layer}/{metric}``: the model's prediction for ``H*``, and
      ``.../beta``, ``.../objective``, ``.../grad_norm``, ``.../converged``.

    ``nc4`` (NCC mismatch, docs/science.md §1) compares, for every probe sample, the nearest class
    mean of the layer with the network's prediction (for the classifier's input layer this is
    exactly ``argmax(W h + b)``). A single pass cannot know the class means before it ends, so
    the means are those of the **previous probe** (stored, and restored on resume); the first
    probe logs no ``nc4``.

    Args:
        layers: module names (``model.named_modules()``), or ``alias -> module name``; the
            alias (else the name) is the ``{layer}`` in logged keys. Default: the model's
            ``feature_layers`` (``CollapseClassifier``: ``penultimate`` and ``h0``, the input of
            the last same-width block), else an error asking for ``layers``.
        pairs: ``(h0_layer, h_layer)`` pairs of layer aliases for the perturbation model.
            Default: ``[("h0", "penultimate")]`` when both aliases exist, else none.
        lambda_W, lambda_H: the model's regularisation (docs/science.md §2; in the paper's analogy
            the classifier's and the feature layers' weight decay). Default 5e-4 each, the
            weight decay of the paper's baseline (configs interpolate the model's values).
        beta: the coupling to ``H0``; a number, or ``"fit"`` (default) for the beta whose
            minimiser matches the ``h_layer``'s measured ``nc1_tilde`` (searched in
            ``beta_range``; logged as ``.../beta``; when no beta reaches the measured value,
            ``.../reachable`` is 0 and the predictions are NaN).
        probe: ``"train"`` (default: the DataModule's training set without augmentation, in a
            fixed order), ``"val"``, ``"test"``, or a ``DataLoader`` yielding ``(x, y)``.
        max_samples: probe a fixed class-balanced subset of about this many samples
            (``max_samples // K`` per class), drawn once with ``seed`` and kept across resume.
        every_n_epochs: probe after every n-th training epoch (the last epoch is always probed).
        pool: how outputs with spatial dims become ``[B, d]``: ``"avg"`` (global average pool)
            or ``"flatten"``.
        batch_size: probe batch size (default: the DataModule's eval batch size, else 256).
        width_mismatch: when a pair's layers differ in width: ``"error"`` (default),
            ``"pad"``, which embeds a narrower ``H0`` in the wider space by zero padding (a
            wider ``H0`` is still an error), or ``"skip"``: log NaN for that probe (e.g. the
            first stage of layer-wise training, whose ``H0`` is the raw input).
        beta_range: search interval of ``beta="fit"``. Collapse of ``H*`` in the directions
            the classifier does not use needs ``beta`` of the order of ``lambda_H`` or below
            (``H* = A (W^T Y + beta H0)``, docs/science.md §2), hence the wide default.
        log_figures_every_n_epochs: figures to W&B loggers every n probed epochs (0: never).
        snapshot_dir: if set, each probe saves ``epoch_XXXX.pt`` there (written atomically;
            ``torch.load(..., weights_only=True)``): the layers' class moments and the pairs'
            results; with ``snapshot_features > 0`` also the raw features (float16) of the
            first ``snapshot_features`` probe samples (of rank 0's shard under DDP).
        progress: show a progress bar for the probe pass (default: when the Trainer shows one
            and the pass has more than 10 batches).
        seed: seed of the ``max_samples`` subset.
        classifier: module name of the final linear classifier, ``"auto"`` (default: the
            model's ``classifier`` attribute, else its last ``nn.Linear``) or ``None``. ``nc3``
            is logged for the probed layer whose output *is* the classifier's input.
    """

    def __init__(
        self,
        layers: Sequence[str] | Mapping[str, str] | None = None,
        pairs: Sequence[Sequence[str]] | None = None,
        lambda_W: float = 5e-4,
        lambda_H: float = 5e-4,
        beta: float | Literal["fit"] = "fit",
        probe: Literal["train", "val", "test"] | DataLoader = "train",
        max_samples: int | None = None,
        every_n_epochs: int = 1,
        pool: Literal["avg", "flatten"] = "avg",
        batch_size: int | None = None,
        width_mismatch: Literal["error", "pad", "skip"] = "error",
        beta_range: tuple[float, float] = (1e-8, 1e8),
        log_figures_every_n_epochs: int = 10,
        snapshot_dir: str | None = None,
        snapshot_features: int = 0,
        progress: bool | None = None,
        seed: int = 0,
        classifier: str | None = "auto",
    ) -> None:
        super().__init__()
        if not (isinstance(probe, DataLoader) or probe in ("train", "val", "test")):
            raise ValueError(f"probe must be 'train', 'val', 'test' or a DataLoader, got {probe!r}")
        if beta != "fit" and not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"beta must be a positive number or 'fit', got {beta!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if width_mismatch not in ("error", "pad", "skip"):
            raise ValueError(
                f"width_mismatch must be 'error', 'pad' or 'skip', got {width_mismatch!r}"
            )
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        self.layers = layers
        self.pairs = [tuple(p) for p in pairs] if pairs is not None else None
        self.lambda_W, self.lambda_H = float(lambda_W), float(lambda_H)
        self.beta = beta
        self.probe = probe
        self.max_samples = max_samples
        self.every_n_epochs = int(every_n_epochs)
        self.pool = pool
        self.batch_size = batch_size
        self.width_mismatch = width_mismatch
        self.beta_range = (float(beta_range[0]), float(beta_range[1]))
        self.log_figures_every_n_epochs = int(log_figures_every_n_epochs)
        self.snapshot_dir = snapshot_dir
        self.snapshot_features = int(snapshot_features)
        self.progress = progress
        self.seed = int(seed)
        self.classifier = classifier
        # resolved at setup
        self._layers: dict[str, str] = {}
        self._pairs: list[tuple[str, str]] = []
        self._classifier: str | None = None
        self._loader: DataLoader | None = None
        self._num_classes: int | None = None
        self._label_names: list[str] | None = None
        # state kept across epochs and checkpoints (state_dict)
        self._subset: Tensor | None = None
        self._reference: dict[str, Tensor] = {}
        self._history: list[dict[str, float]] = []
        self._betas: dict[str, float] = {}  # pair -> last fitted beta (starts the next search)
        self._last_probed: int = -1
        self._warned: set[str] = set()

    @property
    def split(self) -> str:
        return self.probe if isinstance(self.probe, str) else "custom"

    # -----------------------------------------------------------------------------------------
    # Lightning hooks
    # -----------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = self.layers
        if layers is None:
            layers = getattr(pl_module, "feature_layers", None)
            if not layers:
                raise ValueError(
                    f"{type(pl_module).__name__} declares no `feature_layers`; pass "
                    "NeuralCollapseCallback(layers=[...]) with module names from "
                    "model.named_modules()"
                )
        self._layers = resolve_layers(pl_module, layers)
        if self.pairs is None:
            pairs = [("h0", "penultimate")] if {"h0", "penultimate"} <= set(self._layers) else []
        else:
            pairs = self.pairs
        for pair in pairs:
            if len(pair) != 2 or not set(pair) <= set(self._layers):
                raise ValueError(
                    f"pair {tuple(pair)!r} must name two probed layers; probed layers are "
                    f"{', '.join(self._layers)}"
                )
        self._pairs = [(str(a), str(b)) for a, b in pairs]
        if self.classifier == "auto":
            num_classes = getattr(pl_module.hparams, "num_classes", None)
            self._classifier = find_classifier(pl_module, num_classes)
        elif self.classifier is not None:
            resolve_layers(pl_module, [self.classifier])
            self._classifier = self.classifier

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._setup_wandb(trainer)
        # The baseline at fit start; after a resume, the probe the checkpoint was saved before
        # (ModelCheckpoint saves at validation end, before train-epoch-end hooks).
        epoch = trainer.current_epoch
        if epoch != self._last_probed and self._due(epoch, trainer):
            self._run(trainer, pl_module, epoch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # completed epochs
        if self._due(epoch, trainer):
            self._run(trainer, pl_module, epoch)

    def _due(self, epoch: int, trainer: Trainer) -> bool:
        return epoch % self.every_n_epochs == 0 or self._is_last(trainer, epoch)

    @staticmethod
    def _is_last(trainer: Trainer, epoch: int) -> bool:
        return trainer.max_epochs is not None and epoch == trainer.max_epochs

    def state_dict(self) -> dict[str, Any]:
        return {
            "subset": self._subset,
            "reference": dict(self._reference),
            "history": list(self._history),
            "betas": dict(self._betas),
            "last_probed": self._last_probed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._subset = state_dict.get("subset")
        self._reference = dict(state_dict.get("reference", {}))
        self._history = list(state_dict.get("history", []))
        self._betas = dict(state_dict.get("betas", {}))
        self._last_probed = int(state_dict.get("last_probed", -1))

    # -----------------------------------------------------------------------------------------
    # the probe
    # -----------------------------------------------------------------------------------------

    def _run(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        stats, accuracy, features = self._collect(trainer, pl_module)
        row: dict[str, float] = {"epoch": float(epoch)}
        moments: dict[str, ClassMoments | None] = {}
        for alias, st in stats.items():
            m, metrics = self._layer_metrics(alias, st, epoch)
            moments[alias] = m
            row.update({f"nc/{self.split}/{alias}/{k}": v for k, v in metrics.items()})
            if m is not None:
                self._reference[alias] = m.means.cpu()  # float64 [K, d]: the next NC4
        row[f"nc/{self.split}/accuracy"] = accuracy
        for callback in trainer.callbacks:  # e.g. LayerwiseTraining adds the probed depth
            annotate = getattr(callback, "collapse_annotations", None)
            if callable(annotate):
                row.update({k: float(v) for k, v in annotate(trainer, pl_module).items()})
        # H0 in H's space, on every rank: a width error must stop all ranks, not only rank 0
        h0_inputs = {(h0, h): self._match_width(moments[h0], moments[h]) for h0, h in self._pairs}
        pair_results: dict[str, dict[str, float]] = {}
        if trainer.is_global_zero:  # the solver is deterministic: rank 0 alone solves and logs
            for (h0, h), m0 in h0_inputs.items():
                measured = row.get(f"nc/{self.split}/{h}/nc1_tilde", math.nan)
                result = self._solve_pair(f"{h0}->{h}", m0, measured)
                pair_results[f"{h0}->{h}"] = result
                row.update({f"pm/{h0}->{h}/{k}": v for k, v in result.items()})
        self._last_probed = epoch
        self._log(trainer, row)
        if trainer.is_global_zero:
            self._history.append(row)
            if self.snapshot_dir is not None:
                self._snapshot(epoch, moments, pair_results, features)
            n = self.log_figures_every_n_epochs
            probes = len(self._history)
            if n > 0 and (probes % n == 0 or self._is_last(trainer, epoch)):
                self._log_figures(trainer, epoch)

    def _collect(self, trainer: Trainer, pl_module: LightningModule):
        """One eval-mode pass: per-layer statistics, probe accuracy, optional raw features."""
        loader = self._probe_loader(trainer, pl_module)
        K = self._num_classes
        device = pl_module.device
        stats: dict[str, ClassStatistics] = {}
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen = torch.zeros((), dtype=torch.float64, device=device)
        keep = self.snapshot_features if trainer.is_global_zero else 0
        features: dict[str, list[Tensor]] = {a: [] for a in self._layers} if keep else {}
        labels_kept: list[Tensor] = []
        kept = 0
        bar = self._progress_bar(trainer, loader)
        taps = LayerTaps(pl_module, self._layers, self.pool, self._classifier)
        with eval_mode(pl_module), taps:
            for batch in bar if bar is not None else loader:
                x, y = split_batch(batch)
                x = move_data_to_device(x, device)
                y = y.to(device)
                with trainer.precision_plugin.forward_context():
                    out = pl_module(x)
                preds = out.argmax(1) if isinstance(out, Tensor) and out.ndim == 2 else None
                outputs = taps.pop()
                for alias, h in outputs.items():
                    if alias not in stats:
                        stats[alias] = self._new_statistics(alias, K, h.shape[1], device)
                    stats[alias].update(h, y, predictions=preds)
                if preds is not None:
                    correct += (preds == y).sum()
                seen += y.numel()
                if kept < keep:
                    take = min(keep - kept, y.numel())
                    for alias, h in outputs.items():
                        features[alias].append(h[:take].half().cpu())
                    labels_kept.append(y[:take].cpu())
                    kept += take
            feeding = taps.feeding_classifier
        if self._classifier is not None:
            weight = dict(pl_module.named_modules())[self._classifier].weight.detach()
            for alias in feeding:
                if alias in stats and tuple(weight.shape) == (K, stats[alias].dim):
                    stats[alias].set_classifier(weight)
        missing = [a for a in self._layers if a not in stats]
        if missing:
            raise RuntimeError(
                f"layers {missing} produced no output during the probe pass; are these "
                "modules used in forward()?"
            )
        correct, seen = self._sum_across_ranks(trainer, torch.stack([correct, seen]))
        accuracy = float(correct / seen) if seen > 0 else math.nan
        raw = None
        if keep:
            raw = {a: torch.cat(v) for a, v in features.items()}
            raw["labels"] = torch.cat(labels_kept)
        return stats, accuracy, raw

    def _new_statistics(self, alias: str, K: int, dim: int, device) -> ClassStatistics:
        st = ClassStatistics(K, dim, allow_missing_classes=True, validate_args=False).to(device)
        ref = self._reference.get(alias)
        if ref is not None and tuple(ref.shape) == (K, dim):
            st.set_reference(ref.to(device), source="previous_probe")
        return st

    @staticmethod
    def _sum_across_ranks(trainer: Trainer, t: Tensor) -> Tensor:
        if trainer.world_size > 1:
            t = trainer.strategy.reduce(t, reduce_op="sum")
        return t

    def _layer_metrics(
        self, alias: str, st: ClassStatistics, epoch: int
    ) -> tuple[ClassMoments | None, dict[str, float]]:
        m, metrics = st.moments_and_metrics()  # one sync across ranks; NaN on NaN features
        if not (torch.isfinite(m.means).all() and torch.isfinite(m.scatter).all()):
            self._warn_once(
                f"nonfinite:{alias}",
                f"NeuralCollapseCallback: layer {alias!r} produced NaN/Inf features at epoch "
                f"{epoch}; its collapse metrics are logged as NaN (is training diverging?)",
            )
            return None, metrics
        absent = torch.nonzero(~m.present).flatten().tolist()
        if absent:
            names = self._class_names(absent)
            self._warn_once(
                f"absent:{absent}",
                f"NeuralCollapseCallback: class(es) {names} have no sample in the probe set "
                f"({self.split}); metrics use the {int(m.present.sum())} present classes",
            )
        return m, metrics

    def _fit_beta(self, pair: str, m0: ClassMoments, measured: float):
        """``fit_beta`` searching first within a decade of the pair's previous beta.

        Features move little between probes, so the previous beta usually brackets the new
        one: a few solves instead of a scan of ``beta_range``; the full range otherwise.
        """
        from nclightning import perturbation

        kwargs = {"metric": "nc1_tilde", "lambda_W": self.lambda_W, "lambda_H": self.lambda_H}
        lo, hi = self.beta_range
        prev = self._betas.get(pair)
        if prev is not None and lo <= prev <= hi:
            near = (max(lo, prev / 10), min(hi, prev * 10))
            fit = perturbation.fit_beta(m0, measured, beta_range=near, **kwargs)
            if fit.reachable:
                return fit
        return perturbation.fit_beta(m0, measured, beta_range=self.beta_range, **kwargs)

    def _solve_pair(self, pair: str, m0: ClassMoments | None, measured: float) -> dict[str, float]:
        """The model's ``H*`` for ``H0 = m0`` (already in ``H``'s space; None: all NaN)."""
        from nclightning import perturbation

        nan = dict.fromkeys(
            (*METRIC_KEYS, "beta", "objective", "grad_norm", "converged", "reachable"), math.nan
        )
        if m0 is None:
            return nan
        if self.beta == "fit":
            if not math.isfinite(measured):
                return nan
            fit = self._fit_beta(pair, m0, measured)
            if not fit.reachable:
                return {**nan, "reachable": 0.0}
            beta, result = fit.beta, fit.result
            self._betas[pair] = beta
        else:
            beta = float(self.beta)
            result = perturbation.solve(
                m0, lambda_W=self.lambda_W, lambda_H=self.lambda_H, beta=beta, warn=False
            )
        out = {k: float(v) for k, v in result.metrics.items() if k in ALL_METRICS}
        out.update(
            beta=beta,
            objective=float(result.objective),
            grad_norm=float(result.grad_norm),
            converged=float(bool(result.converged)),
            reachable=1.0,
        )
        return out

    def _match_width(self, m0: ClassMoments | None, m: ClassMoments | None) -> ClassMoments | None:
        """``H0``'s moments in ``H``'s space (``width_mismatch``); None when not available."""
        if m0 is None or m is None:
            return None
        dim = m.dim
        if m0.dim == dim:
            return m0
        if self.width_mismatch == "skip":
            self._warn_once(
                f"width:{m0.dim}->{dim}",
                f"NeuralCollapseCallback: a pair's layers differ in width (d={m0.dim} vs "
                f"{dim}); its predictions are NaN while they do (width_mismatch='skip')",
            )
            return None
        if self.width_mismatch == "pad" and m0.dim < dim:
            return m0.pad(dim)
        raise ValueError(
            f"perturbation pair layers differ in width (H0 has d={m0.dim}, H has d={dim}): the "
            "model needs H0 and H in one space. Pick layers of equal width (e.g. the input and "
            "output of a same-width block)"
            + (", or set width_mismatch='pad' to zero-pad H0" if m0.dim < dim else "")
        )

    # -----------------------------------------------------------------------------------------
    # probe data
    # -----------------------------------------------------------------------------------------

    def _probe_loader(self, trainer: Trainer, pl_module: LightningModule) -> DataLoader:
        if self._loader is not None:
            return self._loader
        dataset, targets, template = self._probe_source(trainer)
        dm = trainer.datamodule
        self._label_names = getattr(dm, "class_names", None)
        K = getattr(dm, "num_classes", None) or getattr(pl_module.hparams, "num_classes", None)
        self._num_classes = int(K) if K else int(targets.max()) + 1
        if self._subset is None:
            if self.max_samples is not None and self.max_samples < len(targets):
                self._subset = balanced_indices(targets, self.max_samples, self.seed)
            else:
                self._subset = torch.arange(len(targets))
        indices = shard(self._subset, trainer.global_rank, trainer.world_size)
        batch_size = self.batch_size or getattr(dm, "eval_batch_size", None) or 256
        workers = getattr(dm, "num_workers", 0) or 0
        self._loader = subset_loader(dataset, indices, batch_size, template, workers)
        return self._loader

    def _probe_source(self, trainer: Trainer):
        """``(dataset, targets, template_loader)`` for the probe split."""
        if isinstance(self.probe, DataLoader):
            return self.probe.dataset, dataset_targets(self.probe.dataset), self.probe
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "probe_dataset"):
            dataset = dm.probe_dataset(self.probe)
            targets = (
                dm.probe_targets(self.probe)
                if hasattr(dm, "probe_targets")
                else dataset_targets(dataset)
            )
            return dataset, targets, None
        attr = {"train": "train_dataloader", "val": "val_dataloaders", "test": "test_dataloaders"}
        loader = getattr(trainer, attr[self.probe])  # the loaders Lightning already built
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None and hasattr(dm, f"{self.probe}_dataloader"):
            loader = getattr(dm, f"{self.probe}_dataloader")()
        if loader is None:
            raise ValueError(
                f"NeuralCollapseCallback(probe={self.probe!r}) found no {self.probe} data; "
                "pass probe=<DataLoader> or use a DataModule with probe_dataset()"
            )
        self._warn_once(
            "no-probe-dataset",
            "NeuralCollapseCallback: the DataModule has no probe_dataset(); probing the "
            f"{self.probe} loader's dataset in index order (any augmentation it applies stays)",
        )
        return loader.dataset, dataset_targets(loader.dataset), loader

    def _progress_bar(self, trainer: Trainer, loader: DataLoader):
        show = self.progress
        if show is None:
            show = trainer.progress_bar_callback is not None and len(loader) > 10
        if not show or not trainer.is_global_zero:
            return None
        from tqdm.auto import tqdm

        return tqdm(loader, desc="NC probe", leave=False, dynamic_ncols=True)

    def _class_names(self, classes: list[int]) -> str:
        """``3 (cat), 5 (dog)`` when the DataModule names its classes, else ``3, 5``."""
        names = self._label_names
        return ", ".join(
            f"{k} ({names[k]})" if names is not None and k < len(names) else str(k) for k in classes
        )

    # -----------------------------------------------------------------------------------------
    # output
    # -----------------------------------------------------------------------------------------

    def _log(self, trainer: Trainer, row: dict[str, float]) -> None:
        for name, value in row.items():
            if name != "epoch":
                trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(row, step=trainer.global_step)

    def _snapshot(self, epoch, moments, pair_results, features) -> None:
        payload: dict[str, Any] = {"epoch": epoch, "split": self.split, "layers": {}}
        for alias, m in moments.items():
            if m is not None:
                payload["layers"][alias] = {
                    "counts": m.counts,
                    "means": m.means,
                    "scatter": m.scatter,
                    "class_ss": m.class_ss,
                }
        if pair_results:
            payload["pairs"] = {
                name: {"beta": r["beta"], "metrics": {k: r[k] for k in ALL_METRICS if k in r}}
                for name, r in pair_results.items()
            }
        if features:
            payload["labels"] = features.pop("labels")
            payload["features"] = features
        path = Path(self.snapshot_dir) / f"epoch_{epoch:04d}.pt"
        atomic_torch_save(payload, path)

    def config(self) -> dict[str, Any]:
        """The callback's settings as plain values (logged to W&B runs' config)."""
        return {
            "layers": dict(self._layers),
            "pairs": [list(p) for p in self._pairs],
            "lambda_W": self.lambda_W,
            "lambda_H": self.lambda_H,
            "beta": self.beta,
            "probe": self.split,
            "max_samples": self.max_samples,
            "every_n_epochs": self.every_n_epochs,
            "pool": self.pool,
            "classifier": self._classifier,
        }

    def _setup_wandb(self, trainer: Trainer) -> None:
        """Epoch as the x-axis of every ``nc/``, ``pm/`` and figure key; the settings in config."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                run.define_metric("epoch")
                for pattern in ("nc/*", "pm/*", "figures/*"):
                    run.define_metric(pattern, step_metric="epoch")
                run.config.update({"neural_collapse": self.config()}, allow_val_change=True)

    def _log_figures(self, trainer: Trainer, epoch: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        # figures are built in nclightning.plotting (shared with `nclightning report`)
        from nclightning.callbacks.figures import collapse_figures

        images = collapse_figures(self._history, self.split, self._pairs)
        for logger in wandb_loggers:
            logger.experiment.log({**images, "epoch": epoch})

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
