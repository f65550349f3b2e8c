"""Where does the perturbation model predict? Its skill against baselines (docs/science.md §7.8).

Run: ``python benchmarks/pair_skill.py [--epochs 40] [--threads 2]`` (one command, CPU, a few
minutes on 2 cores). It trains five small networks on the bundled digits data
(``DigitsDataModule``; MLP of width 64 and depth 4, SGD lr 0.05, momentum 0.9, weight decay
``5e-4`` on every layer, the multistep schedule scaled to ``--epochs``):

* ``ce_bn`` / ``ce``: cross-entropy with and without BatchNorm;
* ``mse_bn`` / ``mse``: MSE (bias-free classifier) with and without BatchNorm;
* ``layerwise``: cross-entropy without BatchNorm, grown one block per stage
  (``LayerwiseTraining``, ``--epochs / 4`` epochs per stage).

At the training phases ``init`` (epoch 0), ``early`` (``epochs / 10``), ``mid`` (``epochs /
3``) and ``end`` it reads the training set's moments of two pairs of equal width with forward
hooks: ``h0 -> penultimate`` (the last block, the pair feeding the classifier) and
``blocks.0 -> penultimate`` (three blocks), and fits each with ``fit_pair`` (default
normalisation, ``lambda_W = lambda_H = 5e-4``, the classifier ``W`` for ``nc3``). Printed per
network, pair and phase: status, coupling, linearisation error, the ``perturbative`` flag,
and per compared metric the model's ``|residual|`` minus each baseline's (``h0``, ``ratio``,
``etf``) and ``skill`` (minus the best baseline; negative: the model predicts better than
every baseline). A summary counts, per metric, the fits where the model beats every baseline.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from nclightning.callbacks import LayerwiseTraining
from nclightning.data import DigitsDataModule
from nclightning.metrics import ClassMoments
from nclightning.models import CollapseClassifier
from nclightning.perturbation import BASELINES, fit_pair

LAMBDA = 5e-4
METRICS = ("nc1", "cdnv", "nc2_etf", "nc2_equinorm", "nc3")
PAIRS = {"h0->penultimate": "backbone.h0", "blocks.0->penultimate": "backbone.blocks.0"}
NETWORKS = {  # name: (loss, batch norm, layer-wise)
    "ce_bn": ("ce", True, False),
    "ce": ("ce", False, False),
    "mse_bn": ("mse", True, False),
    "mse": ("mse", False, False),
    "layerwise": ("ce", False, True),
}


@torch.no_grad()
def moments(model: CollapseClassifier, dm) -> tuple[dict[str, ClassMoments], torch.Tensor]:
    """Train-set moments of every layer the pairs need (forward hooks), and ``W``."""
    feats: dict[str, list] = {name: [] for name in (*PAIRS.values(), "backbone")}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: feats[name].append(out.detach().double())
        )
        for name in feats
    ]
    labels = []
    was_training = model.training
    model.eval()
    try:
        for x, y in dm.probe_dataloader("train"):
            model(x)
            labels.append(y)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    y, K = torch.cat(labels), dm.num_classes
    out = {
        name: ClassMoments.from_features(torch.cat(f), y, K, per_class_scatter=True)
        for name, f in feats.items()
    }
    return out, model.classifier.weight.detach().double()


class Phases(Callback):
    """Fits both pairs at the given completed epochs (observing only: eval mode, no grad)."""

    def __init__(self, dm, at: dict[int, str]) -> None:
        self.dm, self.at, self.fits = dm, at, []

    def _fit(self, model, phase: str) -> None:
        m, weight = moments(model, self.dm)
        for pair, h0_name in PAIRS.items():
            if m[h0_name].dim != m["backbone"].dim or not m[h0_name].means.abs().sum() > 0:
                continue
            fit = fit_pair(
                m[h0_name], m["backbone"], lambda_W=LAMBDA, lambda_H=LAMBDA, weight=weight
            )
            self.fits.append((pair, phase, fit))

    def on_train_start(self, trainer, pl_module) -> None:
        if 0 in self.at:
            self._fit(pl_module, self.at[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        done = trainer.current_epoch + 1
        if done in self.at:
            self._fit(pl_module, self.at[done])


def train(name: str, epochs: int) -> list:
    loss, bn, layerwise = NETWORKS[name]
    dm = DigitsDataModule(batch_size=128)
    depth = 4
    total = depth * max(1, epochs // depth) if layerwise else epochs
    model = CollapseClassifier(
        num_classes=dm.num_classes, input_shape=dm.input_shape, backbone="mlp",
        backbone_kwargs={"depth": depth, "width": 64, "batch_norm": bn}, loss=loss,
        bias=loss == "ce", lr=0.05, momentum=0.9, weight_decay=LAMBDA,
        scheduler="none" if layerwise else "multistep",
        milestones=[int(total * 2 / 3), int(total * 13 / 15)],
    )  # fmt: skip
    phases = Phases(dm, {0: "init", max(1, total // 10): "early", total // 3: "mid", total: "end"})
    callbacks = [phases] + ([LayerwiseTraining(total // depth)] if layerwise else [])
    Trainer(
        max_epochs=total, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    ).fit(model, dm)  # fmt: skip
    return phases.fits


def _cell(x: float) -> str:
    return f" {x:+5.2f}" if math.isfinite(x) else "    --"


def report(name: str, fits: list, tally: dict) -> None:
    print(
        f"\n{name}: per metric the residuals log10(prediction / measured) of the model and of the "
        "baselines h0, ratio, etf, then skill = |model| - min |baseline| (< 0: model better)"
    )
    head = "".join(f" {m:^30}" for m in METRICS)
    print(f"{'pair':>21} {'phase':>5} {'status':>8} {'coupling':>8} {'lin.err':>7} pert{head}")
    sub = "".join(f"  {'model    h0 ratio   etf skill':>29}" for _ in METRICS)
    print(f"{'':>21} {'':>5} {'':>8} {'':>8} {'':>7}     {sub}")
    for pair, phase, fit in fits:
        cells = []
        for m in METRICS:
            values = [fit.residuals.get(m, math.nan)]
            values += [fit.baselines[b].get(m, math.nan) for b in BASELINES]
            best = fit.skill.get(m, math.nan)
            cells.append(" " + "".join(_cell(v) for v in [*values, best]))
            if math.isfinite(best):
                t = tally.setdefault((m, fit.status == "fitted"), [0, 0])
                t[0] += best < 0
                t[1] += 1
        print(
            f"{pair:>21} {phase:>5} {fit.status[:8]:>8} {fit.coupling:>8.3g} "
            f"{fit.linearisation_error:>7.2g} {'yes' if fit.perturbative else 'no':>4}"
            + "".join(cells)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    print(f"torch {torch.__version__}, threads {args.threads}, loadavg {os.getloadavg()[0]:.2f}")
    tally: dict = {}
    fits_all = []
    for name in args.only:
        seed_everything(0, workers=True, verbose=False)
        t = time.perf_counter()
        fits = train(name, args.epochs)
        print(f"\n{name}: trained and fitted in {time.perf_counter() - t:.0f} s")
        report(name, fits, tally)
        fits_all += fits
    print("\nModel better than every baseline (skill < 0), fits with a finite coupling / H* = H0:")
    for m in METRICS:
        fitted, limit = tally.get((m, True), [0, 0]), tally.get((m, False), [0, 0])
        print(f"  {m:>13}: {fitted[0]}/{fitted[1]} fitted, {limit[0]}/{limit[1]} at H* = H0")
    pert = sum(f.perturbative for _, _, f in fits_all if f.status == "fitted")
    n_fitted = sum(f.status == "fitted" for _, _, f in fits_all)
    print(f"perturbative (Eq. 5 within 10 %) among fitted pairs: {pert}/{n_fitted}")


if __name__ == "__main__":
    main()
