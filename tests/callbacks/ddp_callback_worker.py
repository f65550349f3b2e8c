"""Run the callback on the digits MLP with ``devices`` CPU processes; write the logged rows.

Usage: ``python ddp_callback_worker.py DEVICES OUT_DIR``. Training uses ``lr=0`` so that the
weights (and hence the features) are the same for any number of processes: what differs
between 1 and 2 processes is only the probe's sharding and the cross-rank reduction, which is
what the test compares. The digits training set has 1437 samples: the shards are uneven.
"""

from __future__ import annotations

import json
import sys

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from nclightning import NeuralCollapseCallback
from nclightning.data import DigitsDataModule
from nclightning.models import CollapseClassifier


def main(devices: int, out: str) -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = CollapseClassifier(
        num_classes=10,
        input_shape=(1, 8, 8),
        backbone="mlp",
        backbone_kwargs={"depth": 3, "width": 32, "batch_norm": False},
        lr=0.0,
        momentum=0.0,
        weight_decay=0.0,
        scheduler="none",
    )
    cb = NeuralCollapseCallback(beta=1.0, log_figures_every_n_epochs=0, batch_size=100)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        logger=CSVLogger(out, name="run", version=0),
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, dm)
    if trainer.is_global_zero:
        with open(f"{out}/rows.json", "w") as f:
            json.dump(cb._history, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
