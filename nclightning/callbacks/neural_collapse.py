"""``NeuralCollapseCallback``: the Lightning face of a probe (settings, state, hooks).

The hooks are a thin sequence over the parts: :mod:`.settings` (the validated settings),
:mod:`.sources` (which samples), :mod:`.layers` and :mod:`.taps` (which modules, as feature
rows), :mod:`.passes` (the pass and its synced statistics), :mod:`.analysis` (metrics and
pair fits) and :mod:`.outputs` (loggers, W&B, snapshots). Keys are those of
:mod:`nclightning.record.keys`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from nclightning.callbacks import analysis, outputs
from nclightning.callbacks.passes import PassPlan
from nclightning.callbacks.probe import Probe
from nclightning.callbacks.settings import CallbackSettings, PairFitSettings
from nclightning.errors import ConfigurationError
from nclightning.metrics import ClassMoments
from nclightning.record import keys
from nclightning.record.snapshots import claim_directory

__all__ = ["NeuralCollapseCallback", "duplicate_probes"]


@dataclass
class _ProbeState:
    """What one probe of a callback keeps during a fit (its own, saved in checkpoints)."""

    name: str
    wandb: outputs.WandbOutputs
    probe: Probe | None = None
    subset: Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    couplings: dict[str, float] = field(default_factory=dict)
    last: analysis.ProbeResult | None = None
    last_position: float | None = None  # epochs_trained of ``last``
    snapshots: Path | None = None


class NeuralCollapseCallback(Callback):
    r"""Measure neural collapse in chosen layers every few epochs and fit the perturbation model.

    At fit start (the baseline, ``epochs_trained = 0``), after every ``every_n_epochs``
    epochs and at the end of training however it stops (``max_epochs``, ``max_steps`` in the
    middle of an epoch, ``max_time``, ``EarlyStopping``, ``trainer.should_stop``; a partial
    epoch counts as its fraction of batches), one eval-mode, no-grad pass over a fixed probe
    set collects every chosen layer's features through forward hooks; the class statistics of
    each layer (exact, synced across DDP ranks) give every metric of docs/science.md §1 and
    §8, and each ``(h0, h)`` pair is fitted with the perturbation model of Tirer, Huang &
    Niles-Weed (§2, §7). Every state of the weights is probed once (a resumed run does not
    probe its checkpoint again). Observing changes nothing: every random state the probe
    touches is restored, so training is bit-identical with and without the callback. The same
    measurement runs from ``trainer.validate`` / ``trainer.test`` (once, on the loaded
    weights).

    Logged (every logger, ``trainer.callback_metrics``; keys of
    :mod:`nclightning.record.keys`, with ``epochs_trained`` and Lightning's global step):
    ``nc-{name}/{layer}/{metric}``, ``nc-{name}/accuracy`` and
    ``pm-{name}-{h0}->{h}/{coupling, status, perturbative, predicted/..., residual/...,
    baseline/..., skill/..., ...}``.

    The settings fall into four validated groups (:mod:`nclightning.callbacks.settings`,
    ``callback.settings``); an invalid value is refused here, in one line.

    Args:
        layers: module names (``model.named_modules()``), ``alias -> module name``, or
            ``"all"``: every block (the rule in :mod:`nclightning.callbacks.layers`; a timm
            model's ``feature_info`` where it declares one), filtered by ``include``/
            ``exclude`` (``fnmatch`` patterns). Default: the model's ``feature_layers``
            (CollapseClassifier: ``penultimate`` and ``h0``).
        pairs: ``(h0, h)`` layer aliases fitted by the perturbation model. Default:
            ``[("h0", "penultimate")]`` when both exist.
        lambda_W, lambda_H: the model's regularisation (the classifier's and the feature
            layers' weight decay in the paper's analogy; configs interpolate the model's).
        coupling: ``"fit"`` (the coupling whose ``H*`` has the measured ``nc1_tilde`` of
            ``h``) or a fixed scale-free coupling (beta / lambda_H after normalisation).
        normalization: how ``H0``'s scale is fixed (docs/science.md §7); default: the
            perturbation package's.
        coupling_range: the searched interval ``(low, high)`` of couplings.
        probe: ``"train"`` (the DataModule's training set without augmentation), ``"val"``,
            ``"test"`` or a ``DataLoader`` of ``(x, y)`` batches or of mappings with
            ``labels`` (the other entries go to the model as keyword arguments).
        probes: several probes measured by this one callback (``["train", "val"]``), in
            order; a held-out probe also logs ``nc4_train_means`` against the ``train``
            probe's class means of the same epoch.
        name: the probe's name in keys (required for a DataLoader; letters, digits, ``_``);
            a list for several DataLoader probes. Two callbacks may not measure one probe.
        ood_probe: a ``DataLoader`` of out-of-distribution inputs: adds ``nc5``.
        max_samples: probe a fixed class-balanced subset of about this many samples.
        every_n_epochs: probe after every n-th epoch (and at the end of training).
        num_classes: the number of classes ``K``; default: the classifier's outputs, else the
            DataModule's or the model's ``num_classes`` (never the labels a probe holds: a
            probe lacking a class is measured over the classes it has).
        pool: how positions become one row per sample: ``"avg"`` (all positions), ``"mean"``
            (tokens kept by the batch's ``attention_mask``), ``"cls"`` (token 0), ``"last"``
            (the last unpadded token) or ``"flatten"``; or ``alias -> one of them``.
        output_fmt: the layout of 3-D/4-D outputs: ``"auto"`` (decided by the module and
            printed at start-up), ``"NCHW"``/``"NCL"`` or ``"NLC"``, or ``alias -> one``.
        max_dim: project wider layers onto a fixed random ``max_dim``-dim subspace (metrics
            then describe the projected features).
        batch_size: probe batch size (default: the DataModule's eval batch size, else 256).
        width_mismatch: a pair of unequal widths: ``"error"``, ``"pad"`` (zero-pad a narrower
            ``H0``) or ``"skip"`` (NaN for the pair).
        cache_budget: bytes for the on-device feature cache (``"auto"``: a quarter of the free
            memory); beyond it the probe streams and runs a second pass for NC4. What the
            features leave of it keeps the probe's input batches on the device after the
            first probe, where they never change (an in-memory dataset without augmentation:
            ``sources.replayable``): later probes read no loader.
        log_figures: also log the report's figures to W&B (``figures/{name}``), once, when
            the fit or measurement ends (a few seconds of rendering; off by default: the line
            charts, per-class tables and the snapshot artifact are logged then regardless,
            :mod:`nclightning.callbacks.figures`, and ``nclightning report`` draws the figures).
        snapshot_dir: snapshot folder; default ``{version folder}/snapshots/{name}`` when the
            Trainer has a logger; ``False``: none. A folder of another run is refused.
        snapshot_features: also keep the first n probe samples' raw features in snapshots.
        progress: a progress bar for the pass (default: when the Trainer shows one).
        seed: seed of the ``max_samples`` subset and of ``max_dim`` projections.
        classifier: module name of the final linear classifier, ``"auto"`` or ``None``.

    Example:
        One epoch of a small MLP on synthetic data; the train probe's metrics land in
        ``trainer.callback_metrics`` (and in every logger) under ``nc-train/{layer}/{metric}``.

        >>> from lightning.pytorch import Trainer
        >>> from nclightning import NeuralCollapseCallback
        >>> from nclightning.data.synthetic import SyntheticDataModule
        >>> from nclightning.models import CollapseClassifier
        >>> dm = SyntheticDataModule(num_classes=3, samples_per_class=20, shape=(8,))
        >>> model = CollapseClassifier(
        ...     num_classes=3, input_shape=(8,), backbone_kwargs={"width": 16, "depth": 2})
        >>> callback = NeuralCollapseCallback(every_n_epochs=1)
        >>> trainer = Trainer(max_epochs=1, callbacks=[callback], logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, dm)
        >>> "nc-train/penultimate/nc1" in trainer.callback_metrics
        True
        >>> callback.history[-1]["epochs_trained"]
        1.0
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
        probes: Sequence[str | DataLoader] | None = None,
        name: str | Sequence[str] | None = None,
        ood_probe: DataLoader | None = None,
        max_samples: int | None = None,
        every_n_epochs: int = 1,
        num_classes: int | None = None,
        pool: str | Mapping[str, str] = "avg",
        output_fmt: str | Mapping[str, str] = "auto",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        max_dim: int | None = None,
        batch_size: int | None = None,
        width_mismatch: Literal["error", "pad", "skip"] = "error",
        cache_budget: int | Literal["auto"] = "auto",
        log_figures: bool = False,
        snapshot_dir: str | Literal[False] | None = None,
        snapshot_features: int = 0,
        progress: bool | None = None,
        seed: int = 0,
        classifier: str | None = "auto",
    ) -> None:
        super().__init__()
        flat = dict(locals())
        flat.pop("self")
        flat.pop("__class__", None)
        self.settings = CallbackSettings.build(**flat)
        self._reset()

    # -- identity and public views ------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The names of this callback's probes in keys, in the order they run."""
        return self.settings.probe.names

    @property
    def name(self) -> str:
        """The probe's name (``train``/``val``/``test`` or ``name``); several joined by ``+``."""
        return "+".join(self.names)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(probe=self.name)

    @property
    def pair_settings(self) -> PairFitSettings:
        """The pair-fit settings (:class:`~nclightning.callbacks.settings.PairFitSettings`)."""
        return self.settings.fit

    @property
    def every_n_epochs(self) -> int:
        return self.settings.probe.every_n_epochs

    @property
    def epochs_trained(self) -> float:
        """Epochs completed in this fit (this callback's own count, kept in checkpoints)."""
        return self._epochs_done

    @property
    def history(self) -> list[dict[str, float]]:
        """Every row this callback logged in this fit (a copy), ``epochs_trained`` included;
        with several probes, each probe's rows in turn."""
        return [dict(r) for s in self._states.values() for r in s.history]

    def history_of(self, probe: str) -> list[dict[str, float]]:
        """The rows one probe of this callback logged in this fit (a copy)."""
        state = self._states.get(probe)
        return [dict(r) for r in state.history] if state else []

    def result_at(
        self, trainer: Trainer, pl_module: LightningModule, probe: str, epochs_trained: float
    ) -> analysis.ProbeResult | None:
        """``probe``'s result for the current weights, logged after ``epochs_trained`` epochs:
        measured now if this callback measures that state and has not yet (it runs later in
        the callback list), else ``None``. What a held-out probe of another callback compares
        its features with (``nc4_train_means``)."""
        state = self._states.get(probe)
        if state is None:
            return None
        due = self._due(epochs_trained) if float(epochs_trained).is_integer() else True
        end = trainer.max_epochs is not None and epochs_trained == trainer.max_epochs
        ending = trainer.state.fn == "fit" and trainer.fit_loop.done
        if self._probed_step != trainer.global_step and (due or end or ending):
            self.probe_now(trainer, pl_module, epochs_trained)
        return state.last if state.last_position == epochs_trained else None

    @property
    def plan(self) -> PassPlan | None:
        """How the first probe's latest pass ran (:class:`~nclightning.callbacks.passes.
        PassPlan`: cached or streamed, each layer's width and statistics, their memory)."""
        probe = self._first.probe
        return probe.pass_plan if probe is not None else None

    @property
    def probe(self) -> Probe | None:
        """The first probe, resolved against the model (``None`` before ``setup``)."""
        return self._first.probe

    @property
    def couplings(self) -> dict[str, float]:
        """The first probe's latest fitted coupling of every pair (a copy)."""
        return dict(self._first.couplings)

    @property
    def projections(self) -> dict[str, Tensor]:
        """The fixed ``[d, max_dim]`` projections of layers wider than ``max_dim``."""
        probe = self._first.probe
        return dict(probe.projections) if probe is not None else {}

    @property
    def last_result(self) -> analysis.ProbeResult | None:
        """The latest probe's :class:`~nclightning.callbacks.analysis.ProbeResult`."""
        return self._last

    @property
    def _first(self) -> _ProbeState:
        return next(iter(self._states.values()))

    def _reset(self) -> None:
        """Per-fit state: a new ``fit`` (or measurement) starts from nothing."""
        self._states = {
            n: _ProbeState(n, outputs.WandbOutputs(n)) for n in self.settings.probe.names
        }
        self._epochs_done = 0.0  # whole epochs, and the share of any stopped inside
        self._counted = True  # the current epoch's end was counted (or none is running)
        self._trainer: Trainer | None = None
        self._probed_step: int | None = None  # the global step of the last probed weights
        self._last: analysis.ProbeResult | None = None
        self._token = uuid.uuid4().hex
        self._started = False
        self._fitting = True
        self._loaded = False
        self._ckpt_epoch: int | None = None
        self._ckpt_step: int | None = None
        self._warned: set[str] = set()

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        message = duplicate_probes(getattr(trainer, "callbacks", []))
        if message:
            raise ConfigurationError(message)
        self._reset()
        self._fitting = stage == "fit"
        self._trainer = trainer
        for i, state in enumerate(self._states.values()):
            state.probe = Probe(self.settings, i, trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_outputs(trainer)
        for state in self._states.values():  # an empty or mislabelled probe stops here
            self._subset(state)
        # the baseline; after a resume, nothing when the checkpoint's weights were probed
        if self._probed_step != trainer.global_step and self._due(self._epochs_done):
            self.probe_now(trainer, pl_module, self._epochs_done)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._counted = False

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counted:  # the end of an epoch a resumed checkpoint already counted
            return
        self._counted = True
        self._epochs_done += self._fraction(trainer)
        if not self._epoch_complete(trainer):
            return  # stopped inside the epoch (max_steps): on_train_end probes it
        epoch = self._epochs_done
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs
        if self._probed_step != trainer.global_step and (self._due(epoch) or last):
            self.probe_now(trainer, pl_module, epoch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the final weights, however training stopped, unless they were just probed
        if self._probed_step != trainer.global_step:
            self.probe_now(trainer, pl_module, self._position(trainer))
        if trainer.is_global_zero:
            self._end_outputs(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._measure(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "test":
            self._measure(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs_trained": self._epochs_done + int(self._ending_epoch()),
            "epoch_end_counted": self._counted or self._ending_epoch(),
            "probed_step": self._probed_step,
            "token": self._token,
            "probes": {
                n: {
                    "settings": outputs.settings_record(self.settings.record(n), n),
                    "subset": s.subset,
                    "history": list(s.history),
                    "couplings": dict(s.couplings),
                }
                for n, s in self._states.items()
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = self._upgrade(state_dict)
        saved = state_dict.get("probes", {})
        for n in self._states:
            self._check_settings(n, (saved.get(n) or {}).get("settings") or {})
        for n, state in self._states.items():
            mine = saved.get(n) or {}
            state.subset = mine.get("subset")
            state.history = list(mine.get("history", []))
            state.couplings = dict(mine.get("couplings", {}))
        self._epochs_done = float(state_dict.get("epochs_trained", 0))
        # Lightning replays the end of an epoch saved at validation end: counted already
        self._counted = bool(state_dict.get("epoch_end_counted", True))
        step = state_dict.get("probed_step")
        self._probed_step = None if step is None else int(step)
        self._loaded = True
        if self._fitting:  # a resumed run is the same run; a measurement is a run of its own
            self._token = str(state_dict.get("token") or self._token)

    def _upgrade(self, state: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint of the one-probe layout before ``probes`` (its completed epochs: the
        checkpoint's ``epoch``; its probed step: the checkpoint's when that epoch was probed)."""
        if "probes" in state or "history" not in state:
            return state
        epochs = self._ckpt_epoch or 0
        probed = state.get("last_probed") == epochs and self._ckpt_step is not None
        return {
            "epochs_trained": epochs,
            "probed_step": self._ckpt_step if probed else None,
            "token": state.get("token"),
            "probes": {self.names[0]: state},
        }

    def _check_settings(self, name: str, saved: Mapping[str, Any]) -> None:
        now = outputs.settings_record(self.settings.record(name), name)
        differ = {k: (saved.get(k), v) for k, v in now.items() if k in saved and saved[k] != v}
        if differ:
            what = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ConfigurationError(
                f"NeuralCollapseCallback[{name}] cannot resume this checkpoint: its probe "
                f"settings differ ({what}). Resume with the settings it was made with, or start "
                "a new run"
            )

    def on_load_checkpoint(
        self, trainer: Any, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
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
        # only for a checkpoint saved without this callback's state (or in its old layout):
        # the epochs Lightning's fit loop had processed, else its ``epoch``
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        epoch = loops.get("current", {}).get("processed", checkpoint.get("epoch"))
        step = checkpoint.get("global_step")
        self._ckpt_epoch = int(epoch) if isinstance(epoch, int) else None
        self._ckpt_step = int(step) if isinstance(step, int) else None

    # -- the probe ------------------------------------------------------------------------------
    def probe_now(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        epochs_trained: float,
        step: int | None = None,
    ) -> analysis.ProbeResult | None:
        """Run every probe of this callback now, logged as measured after ``epochs_trained``
        epochs (at ``step``, by default Lightning's global step); returns the last probe's
        ``ProbeResult``."""
        for state in self._states.values():
            self._probe_one(state, trainer, pl_module, epochs_trained, step)
        self._probed_step = trainer.global_step
        return self._last

    def _probe_one(
        self,
        state: _ProbeState,
        trainer: Trainer,
        pl_module: LightningModule,
        epochs_trained: float,
        step: int | None,
    ) -> None:
        assert state.probe is not None, "probe_now() runs between setup() and teardown()"
        subset = self._subset(state)
        reference = self._train_reference(state, trainer, pl_module, epochs_trained)
        result = state.probe.run(subset, reference, state.couplings, self._warn_once)
        for pair, fit in result.fits.items():
            if fit is not None and math.isfinite(fit.coupling):
                state.couplings[pair] = fit.coupling
        row = {**result.row, **self._annotations(trainer, pl_module)}
        step = trainer.global_step if step is None else step
        outputs.log_row(trainer, row, epochs_trained, step)
        state.last, state.last_position, self._last = result, epochs_trained, result
        state.history.append({**row, keys.EPOCHS_TRAINED: float(epochs_trained)})
        if trainer.is_global_zero:
            self._write_outputs(state, trainer, result, row, epochs_trained, step)

    def _subset(self, state: _ProbeState) -> Tensor:
        assert state.probe is not None, "probes run between setup() and teardown()"
        if state.subset is None:
            state.subset = state.probe.subset()
        else:
            state.probe.num_classes  # noqa: B018 (resolves and checks the source)
        return state.subset

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``trainer.validate``/``test``: one probe of the loaded weights, as measured after the
        completed epochs this callback counted (a checkpoint made without it: its ``epoch``;
        weights in memory: the Trainer's). Its ``step`` is the Trainer's."""
        self._start_outputs(trainer)
        if self._loaded:
            epochs = self._epochs_done
        else:
            epochs = self._ckpt_epoch if self._ckpt_epoch is not None else trainer.current_epoch
        self.probe_now(trainer, pl_module, epochs)
        if trainer.is_global_zero:
            self._end_outputs(trainer)

    def _train_reference(
        self,
        state: _ProbeState,
        trainer: Trainer,
        pl_module: LightningModule,
        epochs_trained: float,
    ) -> dict[str, ClassMoments] | None:
        """The train probe's class means of this epoch, for a held-out probe's
        nc4_train_means: this callback's own train probe, else another callback's (public
        :meth:`result_at`) when it has measured the same epoch."""
        if state.name == "train":
            return None
        own = self._states.get("train")
        if own is not None:
            result = own.last if own.last_position == epochs_trained else None
        else:
            other = self._train_owner(trainer)
            result = other.result_at(trainer, pl_module, "train", epochs_trained) if other else None
        return result.moments if result is not None else None

    def _train_owner(self, trainer: Trainer) -> NeuralCollapseCallback | None:
        for cb in getattr(trainer, "callbacks", []):
            if isinstance(cb, NeuralCollapseCallback) and cb is not self and "train" in cb.names:
                return cb
        return None

    def _due(self, epoch: float) -> bool:
        return float(epoch).is_integer() and int(epoch) % self.every_n_epochs == 0

    def _ending_epoch(self) -> bool:
        """A checkpoint saved after an epoch's last batch but before its end was counted (at
        validation end): the resumed run starts after that epoch, so it counts as completed."""
        t = self._trainer
        if t is None or t.state.fn != "fit" or self._counted:
            return False
        return self._epoch_complete(t)

    @staticmethod
    def _epoch_complete(trainer: Trainer) -> bool:
        """Whether the epoch that just ended ran all its batches (not stopped by max_steps)."""
        total = trainer.num_training_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return not (isinstance(total, int) and math.isfinite(total) and done < total)

    @staticmethod
    def _fraction(trainer: Trainer) -> float:
        """The share of the current epoch's batches trained (1 for a whole epoch)."""
        total = trainer.num_training_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if isinstance(total, int) and 0 <= done < total:
            return done / total
        return 1.0

    def _position(self, trainer: Trainer) -> float:
        """Epochs trained now: this callback's count, plus the share of an epoch whose end
        has not been counted (Lightning ends an epoch stopped by max_steps as a whole one;
        here it counts as the share of its batches that ran)."""
        if self._counted:
            return self._epochs_done
        return self._epochs_done + self._fraction(trainer)

    def _annotations(self, trainer: Any, pl_module: LightningModule) -> dict[str, float]:
        """Extra columns other callbacks add to a probe's row (e.g. the layer-wise depth)."""
        row: dict[str, float] = {}
        for cb in trainer.callbacks:
            annotate = getattr(cb, "collapse_annotations", None)
            if callable(annotate):
                row.update({k: float(v) for k, v in annotate(trainer, pl_module).items()})
        return row

    # -- outputs --------------------------------------------------------------------------------
    def _start_outputs(self, trainer: Trainer) -> None:
        """W&B settings and the snapshot folders, once per fit; an error stops every rank."""
        if self._started:
            return
        self._started = True
        error = None
        for state in self._states.values():
            # every rank: trainer.log_dir is collective
            folder = outputs.snapshot_folder(
                self.settings.outputs.snapshot_dir, trainer, state.name
            )
            if not trainer.is_global_zero:
                continue
            record = outputs.settings_record(self.settings.record(state.name), state.name)
            record |= outputs.fit_record(
                self.settings.fit, self.settings.record(state.name), self.every_n_epochs
            )
            state.wandb.setup(trainer, record)
            try:
                state.snapshots = None if folder is None else claim_directory(folder, self._token)
            except ConfigurationError as err:
                error = error or str(err)
        error = trainer.strategy.broadcast(error)
        if error:
            raise ConfigurationError(error)

    def _write_outputs(
        self,
        state: _ProbeState,
        trainer: Trainer,
        result: analysis.ProbeResult,
        row: dict[str, float],
        epochs_trained: float,
        step: int,
    ) -> None:
        probe = state.probe
        assert probe is not None, "outputs are written by a probe run"
        if state.snapshots is not None:
            outputs.snapshot(
                state.snapshots,
                probe=state.name,
                epochs_trained=epochs_trained,
                step=step,
                row=row,
                moments=result.moments,
                fits=result.fits,
                class_names=probe.class_names,
                classifier_weight=probe.weight(),
                feeds=next(iter(probe.feeding), None),
                kept=probe.kept,
            )

    def _end_outputs(self, trainer: Trainer) -> None:
        """W&B at the end of a fit or measurement (rank 0), per probe: the views of the whole
        run, the snapshot artifact, the last values in the summary; off the per-probe path."""
        if not outputs.wandb_runs(trainer):
            return
        from nclightning.callbacks import figures

        for state in self._states.values():
            if not state.history:
                continue
            name, history = state.name, state.history
            rows = outputs.merge_by_epoch(self._train_history(state, trainer), history)
            per_class = state.last.per_class if state.last is not None else {}
            names = state.probe.class_names if state.probe is not None else None
            epochs = int(history[-1][keys.EPOCHS_TRAINED])
            images = {}
            if self.settings.outputs.log_figures:
                images = figures.probe_images(name, rows, per_class, names, epochs)
            state.wandb.views(
                trainer,
                charts=figures.layer_charts(history, name) | figures.pair_charts(history, name),
                tables=figures.class_tables(name, per_class, names),
                images=images,
                epochs_trained=epochs,
            )
            done = [int(r[keys.EPOCHS_TRAINED]) for r in history]
            state.wandb.snapshots(trainer, state.snapshots, done)
            state.wandb.summary(trainer, history[-1])

    def _train_history(self, state: _ProbeState, trainer: Trainer) -> list[dict[str, float]]:
        if state.name == "train":
            return []
        if "train" in self._states:
            return self.history_of("train")
        other = self._train_owner(trainer)
        return other.history_of("train") if other else []

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def duplicate_probes(callbacks: Sequence[Any]) -> str | None:
    """The one-line refusal of two :class:`NeuralCollapseCallback`\\ s measuring one probe,
    or ``None`` when every probe has one owner."""
    owners: dict[str, int] = {}
    for cb in callbacks:
        if isinstance(cb, NeuralCollapseCallback):
            for n in cb.names:
                owners[n] = owners.get(n, 0) + 1
    twice = [n for n, count in owners.items() if count > 1]
    if not twice:
        return None
    n = twice[0]
    return (
        f"two NeuralCollapseCallbacks measure the probe {n!r}; give each probe one callback: "
        f"measure several probes with one (probes=['train', 'val']), or name a DataLoader "
        f"probe apart (probe=loader, name='{n}_2')"
    )
