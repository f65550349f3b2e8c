"""A CIFAR-shaped ResNet-18 on one GPU: training speed, and the probe against a bare forward.

Synthetic 3x32x32 inputs (a Gaussian mixture, 10 classes), bf16 autocast and channels_last.
Three configurations train ``--epochs`` epochs each: no callback; the default probe
(``h0``/``penultimate``, exact NC4, the fitted coupling of ``h0 -> penultimate``); and
``layers="all"`` (stem, 8 blocks, pooled features; exact NC4). Each probe covers the whole
training set (un-augmented, fixed order). Printed: training samples/s without the callback,
each probe's time against a bare eval forward over the same samples (probe/bare), and the
epoch-time ratio with/without the callback, then the projected wall time of the paper's
protocol (``--project-epochs`` 350 epochs of ResNet-18/CIFAR-10 with the default probe and
its pair fit on the 50,000 training samples every epoch, ``layers="all"`` every 10 epochs):
``E t_train + E t_probe + E/10 t_all`` from the measured medians (goal on one H100: < 30 min).

    python benchmarks/gpu_epoch.py                        # GPU defaults: 50,000 samples
    python benchmarks/gpu_epoch.py --accelerator cpu --samples 512 --epochs 2 --workers 0
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


def _sync(module) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class Timer(Callback):
    """Epoch times; with a probe callback also each probe and a bare forward after it."""

    def __init__(self, nc: NeuralCollapseCallback | None) -> None:
        self.nc, self.epochs, self.probes, self.bare = nc, [], [], []
        if nc is not None:
            run = nc.probe_now

            def timed(trainer, module, epochs_trained, step=None):
                _sync(module)
                t = time.perf_counter()
                result = run(trainer, module, epochs_trained, step)
                _sync(module)
                self.probes.append(time.perf_counter() - t)
                return result

            nc.probe_now = timed

    def on_train_epoch_start(self, trainer, module) -> None:
        _sync(module)
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:  # listed last: after the probe
        _sync(module)
        self.epochs.append(time.perf_counter() - self._t)
        if self.nc is not None:
            self.bare.append(self._bare_forward(trainer, module))

    def _bare_forward(self, trainer, module) -> float:
        was = module.training
        module.eval()
        _sync(module)
        t = time.perf_counter()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for x, _ in self.nc.probe.loader:
                module(x.to(module.device, non_blocking=True))
        _sync(module)
        module.train(was)
        return time.perf_counter() - t


def run(args, options: dict | None) -> Timer:
    seed_everything(0)
    gpu = args.accelerator != "cpu"
    dm = SyntheticDataModule(
        num_classes=10,
        samples_per_class=args.samples // 10,
        test_samples_per_class=10,
        shape=(3, 32, 32),
        batch_size=args.batch_size,
        eval_batch_size=args.probe_batch_size,
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
    nc = None if options is None else NeuralCollapseCallback(log_figures=False, **options)
    timer = Timer(nc)
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
        callbacks=[*([nc] if nc else []), timer],
    ).fit(model, dm)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--probe-batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--project-epochs", type=int, default=350)
    args = parser.parse_args()
    if args.accelerator != "cpu":
        torch.backends.cudnn.benchmark = True
        print(torch.cuda.get_device_name(0))
    print(f"samples={args.samples} batch={args.batch_size} epochs={args.epochs}")
    bare = run(args, None)
    b = statistics.median(bare.epochs[1:] or bare.epochs)  # epoch 1 includes warm-up
    print(f"without callback: {b:.2f} s/epoch, {args.samples / b:.0f} training samples/s")
    probes = {}
    for name, options in (("default probe + pair fit", {}), ('layers="all"', {"layers": "all"})):
        t = run(args, options)
        p = statistics.median(t.epochs[1:] or t.epochs)
        probe = statistics.median(t.probes[1:] or t.probes)  # [0]: the baseline, with warm-up
        fwd = statistics.median(t.bare)
        print(
            f"{name}: probe {probe:.2f} s vs bare forward {fwd:.2f} s: probe/bare = "
            f"{probe / fwd:.3f}; epoch with/without callback = {p / b:.3f}"
        )
        probes[name] = probe
    project(args, b, probes["default probe + pair fit"], probes['layers="all"'])


def project(args, train_epoch: float, probe: float, probe_all: float) -> None:
    """Print the projected protocol time, scaling the measured medians to 50,000 samples."""
    scale = 50_000 / args.samples
    E = args.project_epochs
    train, every = E * train_epoch * scale, E * probe * scale
    every_all = E // 10 * probe_all * scale
    total = train + every + every_all
    print(
        f"projection ({E} epochs, 50,000 samples): train {train / 60:.1f} min + probe every "
        f"epoch {every / 60:.1f} min ({probe * scale:.2f} s/probe) + layers='all' every 10 "
        f"epochs {every_all / 60:.1f} min = {total / 60:.1f} min (goal < 30 min on one H100)"
    )


if __name__ == "__main__":
    main()
