"""scikit-learn's ``digits``: 1,797 real 8x8 grayscale digit images, shipped offline."""

from __future__ import annotations

import torch
from torch import Tensor

from nclightning.data.base import ClassificationDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn ``load_digits`` (UCI optical digits): 1x8x8 images, 10 classes.

    Pixel values ``0..16`` are scaled to ``[0, 1]`` and then normalised with the mean/std of
    all 1,797 images. Train/test: a fixed stratified split (``test_fraction`` of each class
    held out, ``split_seed``; default 20%: 1,437 train / 360 test); the test part is both
    the val and the test split. ``augment``: random 8x8 crop of the image zero-padded by 1
    pixel (one-pixel shifts), no flip. Nothing is downloaded.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of the val/test/probe loaders (``None``: ``batch_size``).
        num_workers: DataLoader worker processes.
        samples_per_class: balanced training subset of this many samples per class (drawn
            with ``seed``); ``None``: the whole training split.
        seed: seed of the subset draw and of the training shuffle.
        augment: one-pixel random shifts on the training loader.
        normalize: subtract the mean and divide by the std (after scaling to ``[0, 1]``).
        test_fraction: fraction of each class held out as the test split.
        split_seed: seed of the train/test split (kept apart from ``seed`` so that the test
            set stays fixed while the training seed varies).
        pin_memory: pin loader memory (``None``: when CUDA is available).
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        drop_last: drop the last incomplete training batch.
    """

    NAME = "digits"
    CLASS_NAMES = tuple(str(k) for k in range(10))
    INPUT_SHAPE = (1, 8, 8)
    MEAN = (0.3053,)  # of load_digits().data / 16, all 1,797 images
    STD = (0.3760,)
    CROP_PADDING = 1
    FLIP = False

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        samples_per_class: int | None = None,
        seed: int = 0,
        augment: bool = False,
        normalize: bool = True,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            samples_per_class=samples_per_class,
            seed=seed,
            augment=augment,
            normalize=normalize,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            drop_last=drop_last,
        )
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)

    def _load_source(self, source: str) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = torch.from_numpy(bunch.images).to(torch.float32).div_(16.0).unsqueeze(1)
        targets = torch.from_numpy(bunch.target).to(torch.int64)
        train_idx, test_idx = train_test_split(
            torch.arange(len(targets)).numpy(),
            test_size=self.test_fraction,
            stratify=bunch.target,
            random_state=self.split_seed,
        )
        idx = torch.from_numpy(train_idx if source == "train" else test_idx).sort().values
        return images[idx], targets[idx]
