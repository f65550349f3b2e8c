"""Runs on disk as a Trainer with CSVLogger, LearningRateMonitor and the callback leave them.

Shared by ``tests/record``, ``tests/commands/test_report.py`` and the plotting tests. The
``metrics.csv`` files are written by Lightning's own ``CSVLogger`` (header = union of keys,
empty cells); the rows follow what a ``Trainer.fit`` logs, in its order:

* at the start of epoch ``e``: ``LearningRateMonitor``'s ``lr-SGD`` with ``step`` only;
* mid-epoch: ``train/loss_step`` with Lightning's ``epoch`` = e (a step-level metric);
* at the end of epoch ``e`` (global step ``G``): ``val/acc`` with ``epoch`` = e at step
  ``G - 1``; then the callback's probe row at step ``G``; then Lightning's epoch-end
  ``train/acc`` and ``train/loss`` at step ``G - 1`` (the order and steps a real
  ``Trainer.fit`` writes: the step goes down inside one uninterrupted file);
* the callback's probe rows in the schema of :mod:`nclightning.record.keys`, with
  ``epochs_trained`` (0 = the baseline before training) and ``step``, never ``epoch``.

Logged values come from :func:`value` so tests can compare against them independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nclightning.record import history, keys, snapshots

LAYERS = ("h0", "blocks.0", "penultimate")
METRICS = ("nc1", "nc1_tilde", "cdnv", "nc2_etf", "nc3", "nc4")
PAIR = "h0->penultimate"
STEPS = 10  # optimizer steps per epoch


def value(probe: str, layer: str, metric: str, epoch: int, scale: float = 1.0) -> float:
    """The logged value of a metric: falls with epochs, lower for deeper layers.

    ``nc4`` reaches exactly 0 from epoch 3 on; ``nc3`` of the baseline probe is NaN.
    """
    i, j = LAYERS.index(layer), METRICS.index(metric)
    held_out = 1.3 if probe != "train" else 1.0
    if metric == "nc4":
        return max(0.0, 0.3 - 0.1 * epoch) * held_out
    if metric == "nc3" and epoch == 0:
        return math.nan
    return scale * held_out * (j + 1) * (1.5 - 0.3 * i) * math.exp(-epoch * (0.2 + 0.1 * i))


def accuracy(probe: str, epoch: int, zero_at: int = 4) -> float:
    """Probe accuracy: the train probe reaches 1.0 at ``epochs_trained`` = ``zero_at``."""
    if probe == "train":
        return 1.0 if epoch >= zero_at else 0.4 + 0.5 * epoch / zero_at
    return min(0.9, 0.3 + 0.1 * epoch)


def lr(epoch: int) -> float:
    """The learning rate of epoch ``epoch``: 0.05, divided by 10 from epoch 4 on."""
    return 0.05 if epoch < 4 else 0.005


def coupling(epoch: int) -> float:
    return math.inf if epoch == 0 else 2.5 + epoch


def probe_row(epoch: int, probes=("train",), scale: float = 1.0, pairs=True, zero_at=4) -> dict:
    """One probe's row (``epochs_trained`` = epoch) for each probe in ``probes``."""
    row: dict[str, float] = {keys.EPOCHS_TRAINED: epoch, keys.STEP: STEPS * epoch}
    for probe in probes:
        for layer in LAYERS:
            for m in METRICS:
                if m in ("nc3", "nc4") and layer != "penultimate":
                    continue
                row[keys.layer_key(probe, layer, m)] = value(probe, layer, m, epoch, scale)
        row[keys.accuracy_key(probe)] = accuracy(probe, epoch, zero_at)
        if probe != "train":
            row[keys.layer_key(probe, "penultimate", "nc4_train_means")] = 0.05 * (4 - epoch) ** 2
    if pairs:
        row.update(pair_cells(epoch, scale))
    return row


def pair_cells(epoch: int, scale: float = 1.0) -> dict[str, float]:
    """``pm-train-h0->penultimate/...`` of a fit: not_more_collapsed at epoch 0, then fitted."""
    pk = lambda q: keys.pair_key("train", PAIR, q)  # noqa: E731
    c = coupling(epoch)
    out = {
        pk("coupling"): c,
        pk("beta"): c * 5e-4,
        pk("scale"): 0.7,
        pk("status"): keys.PAIR_STATUS["fitted" if epoch else "not_more_collapsed"],
        pk("perturbative"): 1.0 if c > 4 and math.isfinite(c) else 0.0,
        pk("objective"): 0.1,
        pk("grad_norm"): 1e-9,
        pk("converged"): 1.0,
    }
    for m in ("nc1", "nc1_tilde", "cdnv", "nc2_etf"):
        measured = value("train", "penultimate", m, epoch, scale)
        predicted = measured if m == "nc1_tilde" else 0.9 * measured
        out[pk(f"predicted/{m}")] = predicted
        if m != "nc1_tilde":  # the fitted metric has no residual
            out[pk(f"residual/{m}")] = math.log10(predicted / measured)
    out[pk("predicted/norm_ratio")] = 1.1
    out[pk("residual/norm_ratio")] = math.log10(1.1 / 1.2)
    return out


def training_rows(
    epochs: int, probes=("train",), scale=1.0, every=1, start=0, zero_at=4
) -> list[dict]:
    """The rows of a fit from epoch ``start`` to ``epochs`` (a resumed part: start > 0)."""
    rows = [probe_row(0, probes, scale, zero_at=zero_at)] if start == 0 else []
    for e in range(start, epochs):
        rows.append({"lr-SGD": lr(e), keys.STEP: STEPS * e})
        rows.append({"train/loss_step": 1.0 / (e + 1), "epoch": e, keys.STEP: STEPS * e + 5})
        end = STEPS * (e + 1)  # the global step once the epoch's last batch stepped
        rows.append({"val/acc": 0.5 + 0.04 * e, "epoch": e, keys.STEP: end - 1})
        if (e + 1) % every == 0:  # the callback's on_train_epoch_end, at the global step
            rows.append(probe_row(e + 1, probes, scale, zero_at=zero_at))
        # Lightning's epoch-end training metrics: after the callbacks, one step lower
        train_acc = accuracy("train", e + 1, zero_at) - 0.05 * (e + 1 < zero_at)
        rows.append(
            {"train/acc": train_acc, "train/loss": 2.0 / (e + 1), "epoch": e, "step": end - 1}
        )
    return rows


def layerwise_rows(depths: int, epochs_per_stage: int) -> list[dict]:
    """Probe rows of a layer-wise run (``LayerwiseTraining``): one stage per depth, the
    deepest layer's ``nc1 = 2^-depth - 0.01 e`` and ``nc1_tilde = 3^-depth`` in stage epoch e."""
    rows = []
    for depth in range(1, depths + 1):
        for e in range(epochs_per_stage):
            epoch = epochs_per_stage * (depth - 1) + e
            rows.append(
                {
                    keys.EPOCHS_TRAINED: epoch,
                    keys.STEP: STEPS * epoch,
                    keys.DEPTH: depth,
                    "nc-train/deepest/nc1": 2.0**-depth - 0.01 * e,
                    "nc-train/deepest/nc1_tilde": 3.0**-depth,
                }
            )
    return rows


def write_csv(save_dir: Path, rows: list[dict], name: str = "run", version=None) -> Path:
    """Log ``rows`` with Lightning's CSVLogger (saving in chunks: the header grows)."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(save_dir), name=name, version=version)
    for i, row in enumerate(rows):
        row = dict(row)
        step = int(row.pop(keys.STEP))
        logger.log_metrics(row, step=step)
        if i % 4 == 3:
            logger.save()
    logger.finalize("success")
    return Path(logger.log_dir)


def write_config(folder: Path, seed: int, ckpt_path: str | None = None, wd: float = 5e-4):
    """A LightningCLI-style saved config (seed, model settings, ckpt_path)."""
    import yaml

    config = {
        "seed_everything": seed,
        "trainer": {"max_epochs": 6, "callbacks": [{"init_args": {"seed": seed, "every": 1}}]},
        "model": {"init_args": {"weight_decay": wd}},
        "ckpt_path": ckpt_path,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


@dataclass
class Features:
    """Features of one layer on one probe, with the class moments the callback would save."""

    h: np.ndarray  # [N, d] float64
    y: np.ndarray  # [N]

    def moments(self) -> dict[str, torch.Tensor]:
        """Per-class moments in the snapshot format, with plain numpy operations."""
        K = int(self.y.max()) + 1
        means = np.stack([self.h[self.y == k].mean(0) for k in range(K)])
        dev = self.h - means[self.y]
        return {
            "counts": torch.tensor(np.bincount(self.y, minlength=K), dtype=torch.float64),
            "means": torch.from_numpy(means),
            "class_ss": torch.tensor([np.sum(dev[self.y == k] ** 2) for k in range(K)]),
        }


def features(epoch: int, layer: int, K: int = 4, n=(30, 20, 25, 12), d: int = 6, seed: int = 0):
    """Imbalanced features collapsing with ``epoch``, deeper layers collapsed more."""
    g = np.random.default_rng(1000 * seed + 10 * layer + epoch)
    means = 3.0 * g.standard_normal((K, d))
    y = np.repeat(np.arange(K), n[:K])
    spread = 2.0 * math.exp(-0.5 * epoch) / (1 + layer)
    return Features(means[y] + spread * g.standard_normal((len(y), d)), y)


def write_snapshots(
    version_dir: Path, probe: str, epochs, token: str = "run-a", rows=None, folder=None
):
    """Snapshot files ``snapshots/{probe}/probe-NNNN.pt`` of a version (or in ``folder``);
    returns ``{epoch: {layer: Features}}``."""
    folder = snapshots.claim_directory(folder or version_dir / "snapshots" / probe, token)
    made = {}
    for e in epochs:
        feats = {lay: features(e, i) for i, lay in enumerate(LAYERS)}
        row = rows[e] if rows else probe_row(e, (probe,))
        snapshots.write_snapshot(
            folder,
            {
                "probe": probe,
                "epochs_trained": e,
                "step": STEPS * e,
                "row": {k: v for k, v in row.items() if k not in (keys.STEP, keys.EPOCHS_TRAINED)},
                "class_names": ["cat", "dog", "ship", "frog"],
                "layers": {lay: f.moments() for lay, f in feats.items()},
                "feeds": "penultimate",
                "pairs": {},
            },
        )
        made[e] = feats
    return made


# ---------------------------------------------------------------------------------------------
# comparing and resuming
# ---------------------------------------------------------------------------------------------


def same_rows(a: list[dict], b: list[dict]) -> bool:
    """Row lists equal, NaN equal to NaN."""

    def same(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(
            (math.isnan(x[k]) and math.isnan(y[k])) or x[k] == y[k] for k in x
        )

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def floats(rows: list[dict]) -> list[dict]:
    return [{k: float(v) for k, v in r.items()} for r in rows]


def perturbed(rows: list[dict], after_step: float, factor: float = 1.5) -> list[dict]:
    """The abandoned timeline: every measured value logged after ``after_step`` changed."""
    out = []
    for r in rows:
        if r[keys.STEP] > after_step:
            r = {k: (v if k in history.INDEX_KEYS else v * factor) for k, v in r.items()}
        out.append(r)
    return out


def crashed_part(crash_epoch: int, checkpoint_epoch: int, mid_epoch: bool) -> list[dict]:
    """What a run logged before crashing in (or at the end of) ``crash_epoch``."""
    rows = training_rows(crash_epoch)
    if mid_epoch:  # the crash hit during the next epoch: its LR and a step row are logged
        rows += training_rows(crash_epoch + 1, start=crash_epoch)[:2]
    return perturbed(rows, STEPS * checkpoint_epoch)
