"""One CIFAR-shaped ResNet-18 training epoch with and without the NeuralCollapseCallback.

Synthetic 3x32x32 inputs (a Gaussian mixture, 10 classes), bf16 autocast and channels_last on
a GPU. Each configuration trains ``--epochs`` epochs; the callback probes the whole training
set (un-augmented, fixed order) after each. Printed: training samples/s without the callback,
wall time per epoch with and without it, and their ratio (the callback's overhead).

    python benchmarks/gpu_epoch.py                        # GPU defaults: 50,000 samples
    python benchmarks/gpu_epoch.py --accelerator cpu --samples 512 --epochs 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from nclightning import NeuralCollapseCallback
from nclightning.data import SyntheticDataModule
from nclightning.models import CollapseClassifier


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._sync(module)
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:  # listed last: after the probe
        self._sync(module)
        self.times.append(time.perf_counter() - self._t)

    @staticmethod
    def _sync(module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)


def run(args, with_callback: bool) -> list[float]:
    seed_everything(0)
    gpu = args.accelerator != "cpu"
    dm = SyntheticDataModule(
        num_classes=10,
        samples_per_class=args.samples // 10,
        test_samples_per_class=10,
        shape=(3, 32, 32),
        batch_size=args.batch_size,
        num_workers=args.workers,
        seed=0,
    )
    model = CollapseClassifier(
        num_classes=10,
        input_shape=(3, 32, 32),
        backbone="resnet18",
        channels_last=gpu,
        lr=0.05,
        scheduler="none",
    )
    timer = EpochTimer()
    callbacks = (
        [NeuralCollapseCallback(log_figures_every_n_epochs=0, batch_size=512)]
        if (with_callback)
        else []
    )
    Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, timer],
    ).fit(model, dm)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    if args.accelerator != "cpu":
        torch.backends.cudnn.benchmark = True
        print(torch.cuda.get_device_name(0))
    bare = run(args, with_callback=False)
    probed = run(args, with_callback=True)
    # the first epoch includes warm-up (cudnn autotuning, worker start); use the others
    b = statistics.median(bare[1:] or bare)
    p = statistics.median(probed[1:] or probed)
    print(f"samples={args.samples} batch={args.batch_size} epochs={args.epochs}")
    print(f"without callback: {b:.2f} s/epoch, {args.samples / b:.0f} training samples/s")
    print(f"with callback (probe of all {args.samples} samples every epoch): {p:.2f} s/epoch")
    print(f"epoch time ratio with/without callback: {p / b:.3f}")


if __name__ == "__main__":
    main()
