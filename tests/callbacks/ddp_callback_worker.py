"""Train the digits MLP with the callback on ``DEVICES`` CPU processes; write what each rank saw.

Usage: ``python ddp_callback_worker.py DEVICES OUT_DIR``. The global batch is 64 whatever the
number of processes (``64 // DEVICES`` per rank) over a balanced 1000-sample subset, so one
process and two see the same global batches when the ranks' shards interleave to the
single-process order; training uses a non-zero learning rate, so a wrong order would show.
Each rank writes ``rank{R}.json``: its ``callback_metrics`` (probe keys), the indices its
sampler yields in every epoch, the probe history (rank 0) and the checkpoint a
``ModelCheckpoint`` monitoring a pair-fit key chose.
"""

from __future__ import annotations

import json
import sys

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from nclightning import NeuralCollapseCallback
from nclightning.data import DigitsDataModule
from nclightning.models import CollapseClassifier

MONITOR = "pm-train-h0->penultimate/coupling"


class Orders(Callback):
    """The indices this rank's training sampler yields in each epoch."""

    def __init__(self):
        self.orders = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.orders.append(list(trainer.train_dataloader.sampler))


def main(devices: int, out: str) -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    dm = DigitsDataModule(batch_size=64 // devices, samples_per_class=100)
    model = CollapseClassifier(
        num_classes=10,
        input_shape=(1, 8, 8),
        backbone="mlp",
        backbone_kwargs={"depth": 3, "width": 32, "batch_norm": False},
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        scheduler="none",
    )
    cb = NeuralCollapseCallback(log_figures=False, batch_size=100)
    orders = Orders()
    best = ModelCheckpoint(dirpath=f"{out}/ckpt", monitor=MONITOR, mode="max", save_top_k=1)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=3,
        logger=False,
        callbacks=[cb, orders, best],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, dm)
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("nc-", "pm-"))
    }
    record = {
        "callback_metrics": metrics,
        "orders": orders.orders,
        "history": cb.history,
        "best": best.best_model_path.rsplit("/", 1)[-1],
    }
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump(record, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
