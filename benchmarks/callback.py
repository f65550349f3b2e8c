"""Cost of a NeuralCollapseCallback probe against a bare eval forward over the same samples.

For an MLP (6 hidden layers of width 1024 on 3x32x32 inputs, the ``mlp_cifar10`` shape) and a
CIFAR-shaped ResNet-18 (synthetic 32x32 inputs), one process trains a few epochs
(``limit_train_batches=1``) with the callback probing after every epoch: default layers
(``h0`` and ``penultimate``), exact NC4, the default fitted coupling of the ``h0 ->
penultimate`` pair. After each probe the same loader runs once more as a bare ``model(x)``
eval/no-grad forward. Printed per model: the median probe time, the median bare-forward time,
their ratio (target <= 1.15), the pair fit's share, and the plan (cache or stream, memory).
``--all-layers`` adds the ResNet with ``layers="all"`` (stem, 8 blocks, pooled features);
``--streamed`` adds the MLP with ``cache_budget=0`` (no feature cache: exact NC4 by a second
forward pass), the alternative the cached sweep is measured against.

    python benchmarks/callback.py [--threads 2] [--samples-mlp 8192] [--all-layers] [--streamed]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lightning.pytorch import Callback, Trainer

from nclightning import NeuralCollapseCallback
from nclightning.data import SyntheticDataModule
from nclightning.models import CollapseClassifier


class Timer(Callback):
    """Times every probe (wrapping ``probe_now``) and a bare forward right after it."""

    def __init__(self, nc: NeuralCollapseCallback) -> None:
        self.nc, self.probe, self.bare, self.fits = nc, [], [], []
        run = nc.probe_now

        def timed(trainer, module, epochs_trained, step=None):
            t = time.perf_counter()
            result = run(trainer, module, epochs_trained, step)
            self.probe.append(time.perf_counter() - t)
            return result

        nc.probe_now = timed

    def on_train_epoch_end(self, trainer, module) -> None:  # after the callback's own hook
        loader = self.nc._probe.loader
        was = module.training
        module.eval()
        t = time.perf_counter()
        with torch.no_grad():
            for x, _ in loader:
                module(x)
        self.bare.append(time.perf_counter() - t)
        module.train(was)


def _time_fits(nc: NeuralCollapseCallback, repeats: int = 3) -> float:
    """Median time of the pair fits of the last probe, re-run from its moments."""
    from nclightning.callbacks import analysis

    probe, result = nc._probe, nc.last_result
    if not probe.pairs:
        return 0.0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        analysis.fit_pairs(
            result.moments,
            probe.pairs,
            nc.pair_settings,
            weight=probe.weight(),
            feeding=probe.feeding,
            near=dict(nc._couplings),
        )
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(name: str, model, dm, epochs: int, **options) -> None:
    nc = NeuralCollapseCallback(log_figures=False, batch_size=256, **options)
    timer = Timer(nc)
    Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[nc, timer],
    ).fit(model, dm)
    probe = statistics.median(timer.probe[1:])  # [0] is the baseline (it also traces)
    bare = statistics.median(timer.bare)
    fit = _time_fits(nc)
    plan = nc._probe.pass_plan
    print(
        f"{name:16s} N={len(nc._probe.loader.dataset):5d}  probe {probe:7.3f} s  bare forward "
        f"{bare:7.3f} s  probe/bare = {probe / bare:.3f}  (pair fits {fit:.3f} s = "
        f"{fit / bare:.3f} of a bare forward; median of {len(timer.bare)} probes)\n"
        f"{'':16s} {plan.describe(nc.name, len(nc._probe.loader.dataset))}"
    )


def _data(samples: int, K: int = 10) -> SyntheticDataModule:
    return SyntheticDataModule(
        num_classes=K, samples_per_class=samples // K, shape=(3, 32, 32), batch_size=256, seed=0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--samples-mlp", type=int, default=8192)
    parser.add_argument("--samples-resnet", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--coupling", default="fit", help='"fit" (the default) or a number')
    parser.add_argument("--all-layers", action="store_true", help='also layers="all" (ResNet)')
    parser.add_argument("--streamed", action="store_true", help="also the MLP without a cache")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    coupling = args.coupling if args.coupling == "fit" else float(args.coupling)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; coupling={coupling}"
    )
    K = 10
    torch.manual_seed(0)
    mlp = CollapseClassifier(
        num_classes=K,
        input_shape=(3, 32, 32),
        backbone="mlp",
        backbone_kwargs={"depth": 6, "width": 1024, "batch_norm": True},
    )
    measure("mlp", mlp, _data(args.samples_mlp), args.epochs, coupling=coupling)
    if args.streamed:
        mlp_data = _data(args.samples_mlp)
        measure("mlp (streamed)", mlp, mlp_data, args.epochs, coupling=coupling, cache_budget=0)
    epochs = max(3, args.epochs // 2)
    resnet = CollapseClassifier(num_classes=K, input_shape=(3, 32, 32), backbone="resnet18")
    measure("resnet18", resnet, _data(args.samples_resnet), epochs, coupling=coupling)
    if args.all_layers:
        resnet = CollapseClassifier(num_classes=K, input_shape=(3, 32, 32), backbone="resnet18")
        measure(
            "resnet18 (all)", resnet, _data(args.samples_resnet), epochs, layers="all", pairs=[]
        )


if __name__ == "__main__":
    main()
