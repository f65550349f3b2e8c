"""Cost of a NeuralCollapseCallback probe against a bare eval forward over the same samples.

For an MLP (the ``mlp_cifar10`` architecture: 6 hidden layers of width 1024 on 3x32x32 inputs)
and a CIFAR-shaped ResNet-18 (synthetic 32x32 inputs), one process trains a few epochs
(``limit_train_batches=1``) with the callback probing after every epoch. After each probe the
same loader is run once more as a bare ``model(x)`` eval/no-grad forward. Printed per model:
the median probe time, the median bare-forward time and their ratio (target <= 1.15 on CPU),
and the memory the callback holds between epochs (its statistics are freed after each probe;
what persists is the reference means and the history).

    python benchmarks/callback.py [--beta fit|1.0] [--threads 1] [--samples-mlp 8192]
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
    """Times the callback's probe (wrapping its ``_run``) and a bare forward after it."""

    def __init__(self, nc: NeuralCollapseCallback) -> None:
        self.nc, self.probe, self.bare = nc, [], []
        run = nc._run

        def timed(trainer, module, epoch):
            t = time.perf_counter()
            run(trainer, module, epoch)
            self.probe.append(time.perf_counter() - t)

        nc._run = timed

    def on_train_epoch_end(self, trainer, module) -> None:  # after the callback's own hook
        loader = self.nc._loader
        was = module.training
        module.eval()
        t = time.perf_counter()
        with torch.no_grad():
            for x, _ in loader:
                module(x)
        self.bare.append(time.perf_counter() - t)
        module.train(was)


def measure(
    name: str, model: CollapseClassifier, dm: SyntheticDataModule, epochs: int, beta
) -> None:
    nc = NeuralCollapseCallback(beta=beta, log_figures_every_n_epochs=0, batch_size=256)
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
    probe = statistics.median(timer.probe[1:])  # [0] is the baseline at fit start
    bare = statistics.median(timer.bare)
    held = sum(t.numel() * t.element_size() for t in nc._reference.values())
    n = len(nc._subset)
    print(
        f"{name:9s} N={n:5d}  probe {probe:7.3f} s  bare forward {bare:7.3f} s  "
        f"probe/bare = {probe / bare:.3f}  ({len(timer.bare)} pairs)  "
        f"held between epochs: {held / 1024:.1f} KiB reference means + {len(nc._history)} rows"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--samples-mlp", type=int, default=8192)
    parser.add_argument("--samples-resnet", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--beta", default="fit", help='"fit" (the default) or a number')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    K = 10
    torch.manual_seed(0)
    dm = SyntheticDataModule(
        num_classes=K,
        samples_per_class=args.samples_mlp // K,
        shape=(3, 32, 32),
        batch_size=256,
        seed=0,
    )
    mlp = CollapseClassifier(
        num_classes=K,
        input_shape=(3, 32, 32),
        backbone="mlp",
        backbone_kwargs={"depth": 6, "width": 1024, "batch_norm": True},
    )
    beta = args.beta if args.beta == "fit" else float(args.beta)
    print(f"perturbation model: beta={beta}")
    measure("mlp", mlp, dm, args.epochs, beta)
    dm = SyntheticDataModule(
        num_classes=K,
        samples_per_class=args.samples_resnet // K,
        shape=(3, 32, 32),
        batch_size=256,
        seed=0,
    )
    resnet = CollapseClassifier(num_classes=K, input_shape=(3, 32, 32), backbone="resnet18")
    measure("resnet18", resnet, dm, max(3, args.epochs // 2), beta)


if __name__ == "__main__":
    main()
