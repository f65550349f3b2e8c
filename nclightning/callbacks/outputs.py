"""Where a probe's results go: the Trainer's loggers, W&B extras, snapshot files.

* :func:`log_row`: every scalar into ``trainer.callback_metrics`` (all ranks, identical) and
  through every logger (rank 0), at Lightning's global step, with ``epochs_trained``;
* :class:`WandbOutputs`: W&B only: ``epochs_trained`` as the x-axis of every probe key, the
  callback's settings in the run config; at the end of a fit or measurement the views of
  :mod:`nclightning.callbacks.figures` (line charts, per-class tables, figures), the snapshot
  folder as a versioned artifact and the last probe's values in the run summary;
* :func:`snapshot`: the snapshot file of a probe (:mod:`nclightning.record.snapshots`), in
  :func:`snapshot_folder`;
* :func:`settings_record`, :func:`fit_record`: the settings kept in checkpoints (checked on
  resume) and in the W&B run config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer

from nclightning.perturbation import DEFAULT_NORMALIZATION
from nclightning.record import keys
from nclightning.record.snapshots import write_snapshot

__all__ = [
    "SNAPSHOT_ARTIFACT_TYPE",
    "WandbOutputs",
    "fit_record",
    "log_row",
    "merge_by_epoch",
    "settings_record",
    "snapshot",
    "snapshot_artifact_name",
    "snapshot_folder",
]


def log_row(trainer: Trainer, row: Mapping[str, float], epochs_trained: float, step: int) -> None:
    """``row`` into ``callback_metrics`` on every rank and through every logger on rank 0."""
    for name, value in row.items():
        trainer.callback_metrics[name] = torch.tensor(float(value))
    if trainer.is_global_zero:
        record = {**row, keys.EPOCHS_TRAINED: float(epochs_trained)}
        for logger in trainer.loggers:
            logger.log_metrics(record, step=step)


def wandb_runs(trainer: Trainer) -> list[Any]:
    """The W&B runs of the Trainer's W&B loggers, leaving out disabled ones
    (``WANDB_MODE=disabled``: nothing to render or upload for them)."""
    from lightning.pytorch.loggers import WandbLogger

    runs = [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    return [run for run in runs if not getattr(run, "disabled", False)]


class WandbOutputs:
    """W&B extras of one callback instance (probe ``probe``); all methods run on rank 0."""

    def __init__(self, probe: str) -> None:
        self.probe = probe

    def setup(self, trainer: Trainer, settings: Mapping[str, Any]) -> None:
        for run in wandb_runs(trainer):
            run.define_metric(keys.EPOCHS_TRAINED)
            for pattern in (f"nc-{self.probe}/*", f"pm-{self.probe}-*", "figures/*", "tables/*"):
                run.define_metric(pattern, step_metric=keys.EPOCHS_TRAINED)
            run.config.update(
                {f"neural_collapse/{self.probe}": dict(settings)}, allow_val_change=True
            )

    def views(
        self,
        trainer: Trainer,
        *,
        charts: Mapping[str, Any],
        tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence]]],
        images: Mapping[str, Any],
        epochs_trained: int,
    ) -> None:
        """Line charts (:class:`nclightning.callbacks.figures.Chart`), tables and figures, in one
        W&B history row (figures and tables at ``epochs_trained``)."""
        runs = wandb_runs(trainer)
        if not runs or not (charts or tables or images):
            return
        import wandb

        payload: dict[str, Any] = {k: _line_chart(wandb, c) for k, c in charts.items()}
        for key, (columns, rows) in tables.items():
            payload[key] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        payload.update({k: _image(wandb, fig) for k, fig in images.items()})
        payload[keys.EPOCHS_TRAINED] = epochs_trained
        for run in runs:
            run.log(payload)

    def snapshots(self, trainer: Trainer, folder: Path | None, epochs: Sequence[int]) -> None:
        """The snapshot folder as the artifact ``snapshots-{run id}-{probe}`` (type
        :data:`SNAPSHOT_ARTIFACT_TYPE`): a new version each time its files change."""
        if folder is None or not any(Path(folder).glob("*")):
            return
        runs = wandb_runs(trainer)
        if not runs:
            return
        import wandb

        for run in runs:
            artifact = wandb.Artifact(
                snapshot_artifact_name(run.id, self.probe),
                type=SNAPSHOT_ARTIFACT_TYPE,
                description=f"nclightning snapshots of probe {self.probe!r}",
                metadata={"probe": self.probe, "epochs_trained": [int(e) for e in epochs]},
            )
            artifact.add_dir(str(folder))
            run.log_artifact(artifact)

    def summary(self, trainer: Trainer, row: Mapping[str, float]) -> None:
        for run in wandb_runs(trainer):
            for key, value in row.items():
                if math.isfinite(value):
                    run.summary[key] = value


SNAPSHOT_ARTIFACT_TYPE = "nc-snapshots"
"""W&B artifact type of a probe's snapshot folder."""


def snapshot_artifact_name(run_id: str, probe: str) -> str:
    """``snapshots-{run id}-{probe}``: one artifact per run and probe, versioned by W&B."""
    return f"snapshots-{run_id}-{probe}"


def _line_chart(wandb: Any, chart: Any) -> Any:
    names = list(chart.lines)
    return wandb.plot.line_series(
        xs=[[x for x, _ in chart.lines[n]] for n in names],
        ys=[[y for _, y in chart.lines[n]] for n in names],
        keys=names,
        title=chart.title,
        xname=keys.EPOCHS_TRAINED,
    )


def _image(wandb: Any, fig: Any) -> Any:
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    return wandb.Image(Image.open(buf).convert("RGB"))


def snapshot(
    directory: Path,
    *,
    probe: str,
    epochs_trained: float,
    step: int,
    row: Mapping[str, float],
    moments: Mapping[str, Any],
    fits: Mapping[str, Any],
    class_names: Sequence[str] | None,
    classifier_weight: torch.Tensor | None,
    feeds: str | None,
    kept: Mapping[str, torch.Tensor] | None,
) -> None:
    """Write the snapshot of one probe (the layout of :mod:`nclightning.record.snapshots`)."""
    layers = {}
    for alias, m in moments.items():
        entry = {"counts": m.counts.cpu(), "means": m.means.cpu(), "class_ss": m.class_ss.cpu()}
        for name in ("norm_sums", "scatter", "span_basis", "span_scatter"):
            value = getattr(m, name, None)
            if value is not None:
                entry[name] = value.cpu()
        layers[alias] = entry
    payload: dict[str, Any] = {
        "probe": probe,
        "epochs_trained": int(epochs_trained)
        if float(epochs_trained).is_integer()
        else float(epochs_trained),
        "step": int(step),
        "row": {k: float(v) for k, v in row.items()},
        "class_names": list(class_names) if class_names else None,
        "layers": layers,
        "feeds": feeds,
        "pairs": {name: _fit_entry(fit) for name, fit in fits.items() if fit is not None},
    }
    if classifier_weight is not None:
        payload["classifier"] = {"weight": classifier_weight.detach().double().cpu()}
    if kept:
        kept = dict(kept)
        payload["labels"] = kept.pop("labels")
        payload["features"] = kept
    write_snapshot(directory, payload)


def _fit_entry(fit: Any) -> dict[str, Any]:
    return {
        "status": fit.status,
        "normalization": fit.normalization,
        "coupling": float(fit.coupling),
        "scale": float(fit.scale),
        "predicted": dict(fit.predicted),
        "measured": dict(fit.measured),
        "residuals": dict(fit.residuals),
        "baselines": {name: dict(r) for name, r in fit.baselines.items()},
        "skill": dict(fit.skill),
        "linearisation_error": float(fit.linearisation_error),
    }


def snapshot_folder(
    snapshot_dir: str | Path | Literal[False] | None, trainer: Trainer, name: str
) -> Path | None:
    """``snapshot_dir``, else ``{version folder}/snapshots/{name}`` when the Trainer logs.

    Calls ``trainer.log_dir``, a collective under DDP: call it on every rank.
    """
    if snapshot_dir is False:
        return None
    if snapshot_dir is not None:
        return Path(snapshot_dir)
    log_dir = trainer.log_dir if trainer.loggers else None
    return None if log_dir is None else Path(log_dir) / "snapshots" / name


def merge_by_epoch(
    train_rows: Sequence[Mapping[str, float]], rows: Sequence[Mapping[str, float]]
) -> list[dict[str, float]]:
    """A held-out probe's rows merged with the train probe's of the same epochs (split figures)."""
    by_epoch = {r[keys.EPOCHS_TRAINED]: dict(r) for r in train_rows}
    for r in rows:
        by_epoch.setdefault(r[keys.EPOCHS_TRAINED], {}).update(r)
    return [by_epoch[e] for e in sorted(by_epoch)]


def settings_record(settings: Any, name: str) -> dict[str, Any]:
    """The probe settings that make a probe's state meaningful (checked on resume)."""
    layers = settings.layers if not isinstance(settings.layers, Mapping) else dict(settings.layers)
    return {
        "probe": name,
        "layers": list(layers) if isinstance(layers, (list, tuple)) else layers,
        "include": list(settings.include or []),
        "exclude": list(settings.exclude or []),
        "pairs": [list(p) for p in settings.pairs] if settings.pairs is not None else None,
        "max_samples": settings.max_samples,
        "seed": settings.seed,
    }


def fit_record(pair_settings: Any, settings: Any, every_n_epochs: int) -> dict[str, Any]:
    """The pair-fit and schedule settings, for the W&B run config."""
    return {
        "lambda_W": pair_settings.lambda_W,
        "lambda_H": pair_settings.lambda_H,
        "coupling": pair_settings.coupling,
        "normalization": pair_settings.normalization or DEFAULT_NORMALIZATION,
        "every_n_epochs": every_n_epochs,
        "pool": settings.pool,
    }
