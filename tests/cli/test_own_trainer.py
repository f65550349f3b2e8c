"""The loggers helpers in a user's own script (no CLI): resume into the same folder and rows."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from nclightning.data import DigitsDataModule
from nclightning.loggers import AtomicCheckpointIO, CSVLogger, RunRecord, resume_loggers
from nclightning.models import CollapseClassifier


def _fit(root: Path, epochs: int, ckpt: str | None = None) -> Path:
    seed_everything(0)
    model = CollapseClassifier(10, (1, 8, 8), backbone_kwargs={"depth": 2, "width": 32})
    logger = CSVLogger(root, name="mine")
    trainer = Trainer(
        max_epochs=epochs, logger=logger, limit_train_batches=3, limit_val_batches=1,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(filename="last", every_n_epochs=1), RunRecord()],
        plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    if ckpt:
        assert "resuming in" in " ".join(resume_loggers(trainer, ckpt))
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt)
    return Path(logger.log_dir)


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_loggers_continues_the_same_folder(tmp_path):
    reference = _rows(_fit(tmp_path / "ref", epochs=3))
    first = _fit(tmp_path / "run", epochs=2)
    resumed = _fit(tmp_path / "run", epochs=3, ckpt=str(first / "checkpoints" / "last.ckpt"))
    assert resumed == first and [p.name for p in first.parent.iterdir()] == ["version_0"]
    assert _rows(resumed) == reference
