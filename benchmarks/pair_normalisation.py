"""Which normalisation of H0 makes the perturbation model predict best? (docs/science.md §7).

Run: ``python benchmarks/pair_normalisation.py [--epochs 100] [--out docs/figures/...]``
(one command, CPU, about ten minutes on 2 cores). It trains three networks of the project:

* ``digits_mlp``: ``CollapseClassifier`` (mlp, depth 4, width 128, batch norm) on
  ``DigitsDataModule``, cross-entropy, SGD lr 0.05, momentum 0.9, weight decay 5e-4, the
  multistep schedule of ``configs/digits_mlp.yaml`` scaled to ``--epochs``;
* ``layerwise_digits``: the same data, mlp depth 6 width 128 without batch norm, grown one
  layer per stage by ``LayerwiseTraining`` (``configs/layerwise_mlp_digits.yaml``, stages of
  ``--epochs / 6`` epochs);
* ``resnet_synthetic``: ``resnet18`` with ``width=16`` (``d = 128``) on a CIFAR-shaped
  ``SyntheticDataModule`` (shape ``(3, 32, 32)``, 10 classes, 50 samples per class, noise 2).

It reads ``H0`` (the ``h0`` tap; for the ResNet the output of ``layer4.0``, average-pooled)
and ``H`` (penultimate features) of the training set with plain forward hooks, as
``ClassMoments`` with per-class scatter, plus the classifier weight, and fits the pair with
every normalisation of ``fit_pair``. Printed per network and normalisation: the coupling, the
regime flag and the residual ``log10(predicted / measured)`` of every metric not fitted; the
figure shows the residuals. The score of a normalisation is the mean ``|residual|`` over the
metrics every normalisation predicts (the norm ratio is a measured scale, never compared,
docs/science.md §7.6). The baseline rows are the fit's model-free baselines
(``PairFit.baselines``): ``h0`` predicts every metric of ``H`` by ``H0``'s, ``ratio`` scales
``H0``'s by the measured ``nc1_tilde`` ratio, ``etf`` predicts ``cdnv`` alone.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from types import SimpleNamespace

import torch
from lightning.pytorch import Trainer, seed_everything

from nclightning.callbacks import LayerwiseTraining
from nclightning.data import DigitsDataModule, SyntheticDataModule
from nclightning.metrics import ClassMoments
from nclightning.models import CollapseClassifier
from nclightning.perturbation import NORMALIZATIONS, fit_pair

LAMBDA = 5e-4
COMMON = ("nc1", "nc2_etf", "nc2_equinorm", "nc3", "cdnv")
BASELINE_ROWS = tuple(f"baseline {b}" for b in ("h0", "ratio", "etf"))


def _trainer(epochs: int, callbacks=()) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def _model(dm, backbone: str, kwargs: dict, epochs: int, scheduler: str) -> CollapseClassifier:
    return CollapseClassifier(
        num_classes=dm.num_classes,
        input_shape=dm.input_shape,
        backbone=backbone,
        backbone_kwargs=kwargs,
        loss="ce",
        lr=0.05,
        momentum=0.9,
        weight_decay=LAMBDA,
        scheduler=scheduler,
        milestones=[int(epochs * 2 / 3), int(epochs * 13 / 15)],
    )


def train_digits_mlp(epochs: int) -> tuple[CollapseClassifier, object, str]:
    dm = DigitsDataModule(batch_size=128)
    model = _model(dm, "mlp", {"depth": 4, "width": 128, "batch_norm": True}, epochs, "multistep")
    _trainer(epochs).fit(model, dm)
    return model, dm, "backbone.h0"


def train_layerwise(epochs: int) -> tuple[CollapseClassifier, object, str]:
    dm = DigitsDataModule(batch_size=128)
    depth, per_stage = 6, max(1, epochs // 6)
    model = _model(dm, "mlp", {"depth": depth, "width": 128, "batch_norm": False}, 0, "none")
    _trainer(depth * per_stage, [LayerwiseTraining(per_stage)]).fit(model, dm)
    return model, dm, "backbone.h0"


def train_resnet(epochs: int) -> tuple[CollapseClassifier, object, str]:
    dm = SyntheticDataModule(
        num_classes=10, samples_per_class=50, shape=(3, 32, 32), noise=2.0, batch_size=100
    )
    n = max(10, epochs // 3)
    model = _model(dm, "resnet18", {"width": 16}, n, "multistep")
    _trainer(n).fit(model, dm)
    return model, dm, "backbone.layer4.0"


@torch.no_grad()
def pair_moments(model: CollapseClassifier, dm, h0_name: str):
    """``(H0, H, W)``: train-set moments of the two layers (forward hooks) and the classifier."""
    feats: dict[str, list] = {"h0": [], "h": []}
    modules = dict(model.named_modules())

    def hook(key):
        def fn(_module, _inp, out):
            x = out.detach().to(torch.float64)
            feats[key].append(x.mean((2, 3)) if x.ndim == 4 else x.flatten(1))

        return fn

    handles = [
        modules[h0_name].register_forward_hook(hook("h0")),
        modules["backbone"].register_forward_hook(hook("h")),
    ]
    labels = []
    model.eval()
    try:
        for x, y in dm.probe_dataloader("train"):
            model(x)
            labels.append(y)
    finally:
        for h in handles:
            h.remove()
    y = torch.cat(labels)
    K = dm.num_classes
    h0, h = (
        ClassMoments.from_features(torch.cat(feats[k]), y, K, per_class_scatter=True)
        for k in ("h0", "h")
    )
    return h0, h, model.classifier.weight.detach().to(torch.float64)


def compare(name: str, h0, h, weight) -> dict[str, object]:
    """Every normalisation's fit, plus the baseline that predicts ``H`` by ``H0`` (no model)."""
    rows = {}
    for norm in NORMALIZATIONS:
        t = time.perf_counter()
        fit = fit_pair(h0, h, lambda_W=LAMBDA, lambda_H=LAMBDA, weight=weight, normalization=norm)
        rows[norm] = (fit, time.perf_counter() - t)
    first = rows[NORMALIZATIONS[0]][0]
    for row in BASELINE_ROWS:
        residuals = first.baselines[row.removeprefix("baseline ")]
        rows[row] = (
            SimpleNamespace(
                status="baseline",
                coupling=math.inf,
                perturbative=True,
                scale=1.0,
                residuals=residuals,
                measured=first.measured,
            ),
            0.0,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/figures/pair_normalisation.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    print(f"torch {torch.__version__}, threads {args.threads}, loadavg {os.getloadavg()[0]:.2f}")
    results = {}
    for name, train in (
        ("digits_mlp", train_digits_mlp),
        ("layerwise_digits", train_layerwise),
        ("resnet_synthetic", train_resnet),
    ):
        seed_everything(0, workers=True, verbose=False)
        t = time.perf_counter()
        model, dm, h0_name = train(args.epochs)
        h0, h, weight = pair_moments(model, dm, h0_name)
        print(f"\n{name}: trained in {time.perf_counter() - t:.0f} s; d = {h.dim}")
        results[name] = compare(name, h0, h, weight)
        report(name, results[name])
    summary(results)
    markdown(results)
    figure(results, args.out)


def report(name: str, rows: dict) -> None:
    keys = COMMON
    head = (
        f"{'normalisation':>13} {'status':>8} {'coupling':>9} {'pert.':>5} {'s':>9} {'time s':>6}"
    )
    print(head + "".join(f" {k:>12}" for k in keys))
    for norm, (fit, secs) in rows.items():
        cells = "".join(f" {fit.residuals.get(k, math.nan):>+12.3f}" for k in keys)
        print(
            f"{norm:>13} {fit.status[:8]:>8} {fit.coupling:>9.3g} {int(fit.perturbative):>5d} "
            f"{fit.scale:>9.3g} {secs:>6.2f}{cells}"
        )
    fit = next(iter(rows.values()))[0]
    print(f"{'measured':>13}" + " " * 44 + "".join(f" {fit.measured[k]:>12.4g}" for k in keys))
    print(f"{'':>13} measured RMS ||H|| / ||H0|| = {fit.measured['norm_ratio']:.4g} (a scale)")


def summary(results: dict) -> None:
    print("\nmean |residual| over " + ", ".join(COMMON) + " (lower is better)")
    for norm in (*NORMALIZATIONS, *BASELINE_ROWS[:2]):
        per_net = []
        for rows in results.values():
            res = rows[norm][0].residuals
            per_net.append(sum(abs(res[k]) for k in COMMON) / len(COMMON))
        cells = " ".join(f"{v:.3f}" for v in per_net)
        print(f"{norm:>13}: {cells}  (all: {sum(per_net) / len(per_net):.3f})")


def markdown(results: dict) -> None:
    """The comparison as a markdown table (for docs/science.md §7)."""
    keys = COMMON
    print("\n| network | normalisation | coupling | perturbative | " + " | ".join(keys) + " |")
    print("|---|---|---|---|" + "---|" * len(keys))
    for name, rows in results.items():
        for norm, (fit, _) in rows.items():
            cells = " | ".join(
                "-" if k not in fit.residuals else f"{fit.residuals[k]:+.2f}" for k in keys
            )
            coupling = "-" if norm in BASELINE_ROWS else f"{fit.coupling:.3g}"
            pert = "-" if norm in BASELINE_ROWS else ("yes" if fit.perturbative else "no")
            print(f"| {name} | {norm} | {coupling} | {pert} | {cells} |")


def figure(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = COMMON
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), sharey=True)
    names = (*NORMALIZATIONS, *BASELINE_ROWS)
    width = 0.8 / len(names)
    for ax, (name, rows) in zip(axes, results.items()):
        for i, norm in enumerate(names):
            fit = rows[norm][0]
            vals = [fit.residuals.get(k, math.nan) for k in keys]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
            base = norm in BASELINE_ROWS
            label = norm if base else f"{norm} (coupling {fit.coupling:.2g})"
            ax.bar(xs, vals, width, label=label, hatch="//" if base else None)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(keys)), keys, rotation=30)
        ax.set_title(name)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("log10(predicted / measured)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"\nfigure: {out}")


if __name__ == "__main__":
    main()
