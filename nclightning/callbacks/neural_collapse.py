"""``NeuralCollapseCallback``: the Lightning face of a probe (settings, state, hooks).

The hooks are a thin sequence over the parts: :mod:`.sources` (which samples),
:mod:`.layers` and :mod:`.taps` (which modules, as feature rows), :mod:`.passes` (the pass and
its synced statistics), :mod:`.analysis` (metrics and pair fits) and :mod:`.outputs`
(loggers, W&B, snapshots). Keys are those of :mod:`nclightning.record.keys`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from nclightning.callbacks import analysis, outputs
from nclightning.callbacks.probe import Probe, ProbeSettings
from nclightning.errors import ConfigurationError
from nclightning.record import keys
from nclightning.record.snapshots import claim_directory

__all__ = ["NeuralCollapseCallback"]


class NeuralCollapseCallback(Callback):
    r"""Measure neural collapse in chosen layers every few epochs and fit the perturbation model.

    At fit start (the baseline, ``epochs_trained = 0``) and after every ``every_n_epochs``
    epochs (the last one always), one eval-mode, no-grad pass over a fixed probe set collects
    every chosen layer's features through forward hooks; the class statistics of each layer
    (exact, synced across DDP ranks) give every metric of docs/science.md §1 and §8, and each
    ``(h0, h)`` pair is fitted with the perturbation model of Tirer, Huang & Niles-Weed
    (§2, §7). Observing changes nothing: every random state the probe touches is restored, so
    training is bit-identical with and without the callback. The same measurement runs from
    ``trainer.validate`` / ``trainer.test`` (once, on the loaded weights).

    Logged (every logger, ``trainer.callback_metrics``; keys of
    :mod:`nclightning.record.keys`, with ``epochs_trained`` and Lightning's global step):
    ``nc-{name}/{layer}/{metric}``, ``nc-{name}/accuracy`` and
    ``pm-{name}-{h0}->{h}/{coupling, status, perturbative, predicted/..., residual/...,
    baseline/..., skill/..., ...}``.

    Args:
        layers: module names (``model.named_modules()``), ``alias -> module name``, or
            ``"all"``: every block (the rule in :mod:`nclightning.callbacks.layers`), filtered
            by ``include``/``exclude`` (``fnmatch`` patterns). Default: the model's
            ``feature_layers`` (CollapseClassifier: ``penultimate`` and ``h0``).
        pairs: ``(h0, h)`` layer aliases fitted by the perturbation model. Default:
            ``[("h0", "penultimate")]`` when both exist.
        lambda_W, lambda_H: the model's regularisation (the classifier's and the feature
            layers' weight decay in the paper's analogy; configs interpolate the model's).
        coupling: ``"fit"`` (the coupling whose ``H*`` has the measured ``nc1_tilde`` of
            ``h``) or a fixed scale-free coupling (beta / lambda_H after normalisation).
        normalization: how ``H0``'s scale is fixed (docs/science.md §7); default: the
            perturbation package's.
        coupling_range: the searched interval of couplings (default: the package's).
        probe: ``"train"`` (the DataModule's training set without augmentation), ``"val"``,
            ``"test"`` or a ``DataLoader`` of ``(x, y)``; ``name`` names the probe in keys
            (required for a DataLoader; letters, digits, ``_``). Several instances with other
            probes can run in one Trainer; a held-out probe also logs ``nc4_train_means``
            against the ``train`` probe's class means when both probe the same epoch.
        ood_probe: a ``DataLoader`` of out-of-distribution inputs: adds ``nc5``.
        max_samples: probe a fixed class-balanced subset of about this many samples.
        every_n_epochs: probe after every n-th epoch (and after the last).
        pool, output_fmt: how outputs become rows (:mod:`nclightning.callbacks.taps`).
        max_dim: project wider layers onto a fixed random ``max_dim``-dim subspace (metrics
            then describe the projected features).
        batch_size: probe batch size (default: the DataModule's eval batch size, else 256).
        width_mismatch: a pair of unequal widths: ``"error"``, ``"pad"`` (zero-pad a narrower
            ``H0``) or ``"skip"`` (NaN for the pair).
        cache_budget: bytes for the on-device feature cache (``"auto"``: a quarter of the free
            memory); beyond it the probe streams and runs a second pass for NC4.
        log_figures_every_n_probes: W&B figures every n probes (0: never).
        snapshot_dir: snapshot folder; default ``{version folder}/snapshots/{name}`` when the
            Trainer has a logger; ``False``: none. A folder of another run is refused.
        snapshot_features: also keep the first n probe samples' raw features in snapshots.
        progress: a progress bar for the pass (default: when the Trainer shows one).
        seed: seed of the ``max_samples`` subset and of ``max_dim`` projections.
        classifier: module name of the final linear classifier, ``"auto"`` or ``None``.
    """

    def __init__(
        self,
        layers: Sequence[str] | Mapping[str, str] | Literal["all"] | None = None,
        pairs: Sequence[Sequence[str]] | None = None,
        lambda_W: float = 5e-4,
        lambda_H: float = 5e-4,
        coupling: float | Literal["fit"] = "fit",
        normalization: str | None = None,
        coupling_range: tuple[float, float] | None = None,
        probe: Literal["train", "val", "test"] | DataLoader = "train",
        name: str | None = None,
        ood_probe: DataLoader | None = None,
        max_samples: int | None = None,
        every_n_epochs: int = 1,
        pool: Literal["avg", "flatten"] = "avg",
        output_fmt: str | Mapping[str, str] = "auto",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        max_dim: int | None = None,
        batch_size: int | None = None,
        width_mismatch: Literal["error", "pad", "skip"] = "error",
        cache_budget: int | Literal["auto"] = "auto",
        log_figures_every_n_probes: int = 10,
        snapshot_dir: str | Literal[False] | None = None,
        snapshot_features: int = 0,
        progress: bool | None = None,
        seed: int = 0,
        classifier: str | None = "auto",
    ) -> None:
        super().__init__()
        self.settings = ProbeSettings.build(
            layers=layers,
            pairs=pairs,
            probe=probe,
            name=name,
            ood_probe=ood_probe,
            max_samples=max_samples,
            pool=pool,
            output_fmt=output_fmt,
            include=include,
            exclude=exclude,
            max_dim=max_dim,
            batch_size=batch_size,
            cache_budget=cache_budget,
            snapshot_features=snapshot_features,
            progress=progress,
            seed=seed,
            classifier=classifier,
        )
        if coupling != "fit" and not (isinstance(coupling, (int, float)) and coupling > 0):
            raise ConfigurationError(
                f"coupling must be 'fit' or a positive number, got {coupling!r}"
            )
        if every_n_epochs < 1:
            raise ConfigurationError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if width_mismatch not in ("error", "pad", "skip"):
            raise ConfigurationError(
                f"width_mismatch must be 'error', 'pad' or 'skip', got {width_mismatch!r}"
            )
        if coupling_range is not None:
            coupling_range = (float(coupling_range[0]), float(coupling_range[1]))
        self.pair_settings = analysis.PairSettings(
            float(lambda_W),
            float(lambda_H),
            coupling,
            normalization,
            coupling_range,
            width_mismatch,
        )
        self.every_n_epochs = int(every_n_epochs)
        self.log_figures_every_n_probes = int(log_figures_every_n_probes)
        self.snapshot_dir = snapshot_dir
        self._probe: Probe | None = None
        self._wandb = outputs.WandbOutputs(self.name)
        self._reset()

    # -- identity and public views ------------------------------------------------------------
    @property
    def name(self) -> str:
        """The probe's name in keys: ``train``/``val``/``test`` or the given ``name``."""
        return self.settings.name

    @property
    def state_key(self) -> str:
        return self._generate_state_key(probe=self.name)

    @property
    def history(self) -> list[dict[str, float]]:
        """Every row this instance logged in this fit (a copy), ``epochs_trained`` included."""
        return [dict(r) for r in self._history]

    @property
    def plan(self):
        """How the latest probe ran (:class:`~nclightning.callbacks.passes.PassPlan`: cached
        or streamed, each layer's width and statistics, the memory they take)."""
        return self._probe.pass_plan if self._probe is not None else None

    @property
    def projections(self) -> dict:
        """The fixed ``[d, max_dim]`` projections of layers wider than ``max_dim``."""
        return dict(self._probe.projections) if self._probe is not None else {}

    @property
    def last_result(self) -> analysis.ProbeResult | None:
        """The latest probe's :class:`~nclightning.callbacks.analysis.ProbeResult`."""
        return self._last

    def _reset(self) -> None:
        """Per-fit state: a new ``fit`` (or measurement) starts from nothing."""
        self._history: list[dict[str, float]] = []
        self._subset = None
        self._couplings: dict[str, float] = {}
        self._last_probed = -1
        self._last: analysis.ProbeResult | None = None
        self._token = uuid.uuid4().hex
        self._snapshots: Path | None = None
        self._started = False
        self._fitting = True
        self._saved_settings: dict[str, Any] | None = None
        self._ckpt_position: tuple[int] | None = None
        self._warned: set[str] = set()

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._reset()
        self._fitting = stage == "fit"
        self._probe = Probe(self.settings, trainer, pl_module, self.pair_settings)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_outputs(trainer)
        # the baseline; after a resume, the probe the checkpoint was saved before
        epoch = trainer.current_epoch
        if epoch != self._last_probed and self._due(epoch, trainer):
            self.probe_now(trainer, pl_module, epoch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # completed epochs
        if epoch != self._last_probed and self._due(epoch, trainer):
            self.probe_now(trainer, pl_module, epoch)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._measure(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "test":
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self._history:
            self._wandb.summary(trainer, self._history[-1])

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": outputs.settings_record(self.settings, self.name),
            "subset": self._subset,
            "history": list(self._history),
            "couplings": dict(self._couplings),
            "last_probed": self._last_probed,
            "token": self._token,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("settings") or {}
        self._saved_settings = dict(saved)
        differ = {
            k: (saved.get(k), v)
            for k, v in outputs.settings_record(self.settings, self.name).items()
            if k in saved and saved[k] != v
        }
        if differ:
            what = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ConfigurationError(
                f"NeuralCollapseCallback[{self.name}] cannot resume this checkpoint: its probe "
                f"settings differ ({what}). Resume with the settings it was made with, or start "
                "a new run"
            )
        self._subset = state_dict.get("subset")
        self._history = list(state_dict.get("history", []))
        self._couplings = dict(state_dict.get("couplings", {}))
        self._last_probed = int(state_dict.get("last_probed", -1))
        if self._fitting:  # a resumed run is the same run; a measurement is a run of its own
            self._token = str(state_dict.get("token", self._token))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = [
            k for k in checkpoint.get("callbacks", {}) if str(k).startswith(type(self).__qualname__)
        ]
        mine = self.state_key
        if saved and mine not in saved and trainer.state.fn == "fit":
            others = [k for k in saved if not any(cb.state_key == k for cb in trainer.callbacks)]
            if others:
                raise ConfigurationError(
                    f"this checkpoint was made with {', '.join(others)}, but this run has "
                    f"{mine}: the probe differs. Resume with the probe the run was made with"
                )
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        done = loops.get("current", {}).get("processed", checkpoint.get("epoch", 0))
        self._ckpt_position = (int(done),)

    # -- the probe ------------------------------------------------------------------------------
    def probe_now(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        epochs_trained: int,
        step: int | None = None,
    ):
        """Run one probe now, logged as measured after ``epochs_trained`` epochs (at ``step``,
        by default Lightning's global step); returns its ``ProbeResult``."""
        assert self._probe is not None, "probe_now() runs between setup() and teardown()"
        if self._subset is None:
            self._subset = self._probe.subset()
        reference = self._train_reference(trainer, pl_module, epochs_trained)
        result = self._probe.run(self._subset, reference, self._couplings, self._warn_once)
        for name, fit in result.fits.items():
            if fit is not None and math.isfinite(fit.coupling):
                self._couplings[name] = fit.coupling
        row = {**result.row, **self._annotations(trainer, pl_module)}
        step = trainer.global_step if step is None else step
        outputs.log_row(trainer, row, epochs_trained, step)
        self._last_probed, self._last = epochs_trained, result
        self._history.append({**row, keys.EPOCHS_TRAINED: float(epochs_trained)})
        if trainer.is_global_zero:
            self._write_outputs(trainer, result, row, epochs_trained, step)
        return result

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``trainer.validate``/``test``: one probe of the loaded weights, as measured after the
        checkpoint's completed epochs (the Trainer's, for weights in memory). Its ``step`` is
        the Trainer's, as for every other row the measurement logs."""
        self._start_outputs(trainer)
        epochs = self._ckpt_position[0] if self._ckpt_position else trainer.current_epoch
        self.probe_now(trainer, pl_module, epochs)

    def _train_reference(self, trainer, pl_module, epochs_trained: int):
        """The train probe's class means of this epoch, for a held-out probe's nc4_train_means."""
        cb = self._train_sibling(trainer)
        if cb is None:
            return None
        if cb._last_probed != epochs_trained and cb._due(epochs_trained, trainer):
            cb.probe_now(trainer, pl_module, epochs_trained)  # catch up: the same epoch
        if cb._last_probed == epochs_trained and cb._last is not None:
            return cb._last.moments
        return None

    def _train_sibling(self, trainer) -> NeuralCollapseCallback | None:
        """The instance probing ``train`` in the same Trainer (for a held-out probe)."""
        if self.name == "train":
            return None
        for cb in trainer.callbacks:
            if isinstance(cb, NeuralCollapseCallback) and cb is not self and cb.name == "train":
                return cb
        return None

    def _due(self, epoch: int, trainer: Trainer) -> bool:
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    def _annotations(self, trainer, pl_module) -> dict[str, float]:
        """Extra columns other callbacks add to a probe's row (e.g. the layer-wise depth)."""
        row: dict[str, float] = {}
        for cb in trainer.callbacks:
            annotate = getattr(cb, "collapse_annotations", None)
            if callable(annotate):
                row.update({k: float(v) for k, v in annotate(trainer, pl_module).items()})
        return row

    # -- outputs --------------------------------------------------------------------------------
    def _start_outputs(self, trainer: Trainer) -> None:
        """W&B settings and the snapshot folder, once per fit; an error stops every rank."""
        if self._started or self._probe is None:
            return
        self._started = True
        # every rank: trainer.log_dir is collective
        folder = outputs.snapshot_folder(self.snapshot_dir, trainer, self.name)
        error = None
        if trainer.is_global_zero:
            record = outputs.settings_record(self.settings, self.name)
            record |= outputs.fit_record(self.pair_settings, self.settings, self.every_n_epochs)
            self._wandb.setup(trainer, record)
            try:
                self._snapshots = None if folder is None else claim_directory(folder, self._token)
            except ConfigurationError as err:
                error = str(err)
        error = trainer.strategy.broadcast(error)
        if error:
            raise ConfigurationError(error)

    def _write_outputs(self, trainer, result, row, epochs_trained: int, step: int) -> None:
        if self._snapshots is not None:
            outputs.snapshot(
                self._snapshots,
                probe=self.name,
                epochs_trained=epochs_trained,
                step=step,
                row=row,
                moments=result.moments,
                fits=result.fits,
                class_names=self._probe.class_names,
                classifier_weight=self._probe.weight(),
                feeds=next(iter(self._probe.feeding), None),
                kept=self._probe.kept,
            )
        n = self.log_figures_every_n_probes
        last = trainer.max_epochs is not None and epochs_trained == trainer.max_epochs
        if n > 0 and (len(self._history) % n == 0 or last or trainer.state.fn != "fit"):
            from nclightning.callbacks.figures import probe_media

            train = self._train_sibling(trainer)
            images, tables = probe_media(
                self.name,
                outputs.merge_by_epoch(train.history if train else [], self.history),
                result,
                self._probe.class_names,
                epochs_trained,
            )
            self._wandb.media(trainer, images, tables, epochs_trained)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
