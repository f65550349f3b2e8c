"""A Gaussian-mixture classification set generated in memory."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from nclightning.data.base import ClassificationDataModule, ImageTransform

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(ClassificationDataModule):
    """Gaussian mixture: class ``k`` samples are ``separation * u_k + noise * z``.

    ``u_k`` are random unit vectors in ``R^D`` (``D = prod(shape)``, nearly orthogonal when
    ``D >> num_classes``; pairwise mean distances about ``separation * sqrt(2)``) and ``z``
    standard normal; samples are reshaped to ``shape`` (``(D,)`` vectors or e.g.
    ``(3, 32, 32)`` images). Means, training and test samples come from three independent
    streams of ``seed`` (numpy ``SeedSequence``), so the test set does not change with
    ``samples_per_class``. Fully deterministic; samples are ordered class by class. There is
    no ``normalize``/``augment`` option (the noise already has unit scale) and no file.

    Args:
        num_classes: number of classes ``K``.
        samples_per_class: training samples per class.
        test_samples_per_class: test (= val) samples per class.
        shape: shape of one sample.
        noise: std of the isotropic within-class noise.
        separation: norm of each class mean.
        seed: seed of the data and of the training shuffle.
        batch_size: training batch size.
        eval_batch_size: batch size of the val/test/probe loaders (``None``: ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: pin loader memory (``None``: when CUDA is available).
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        drop_last: drop the last incomplete training batch.
    """

    NAME = "synthetic"

    def __init__(
        self,
        num_classes: int = 10,
        samples_per_class: int = 100,
        test_samples_per_class: int = 100,
        shape: tuple[int, ...] = (32,),
        noise: float = 1.0,
        separation: float = 4.0,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
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
            augment=False,
            normalize=False,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            drop_last=drop_last,
        )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if test_samples_per_class < 1:
            raise ValueError(f"test_samples_per_class must be >= 1, got {test_samples_per_class}")
        shape = tuple(int(s) for s in shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
        if noise < 0 or separation < 0:
            raise ValueError(f"noise and separation must be >= 0, got {noise}, {separation}")
        self.num_classes = int(num_classes)
        self.class_names = [f"class_{k}" for k in range(self.num_classes)]
        self.input_shape = shape
        self.test_samples_per_class = int(test_samples_per_class)
        self.noise = float(noise)
        self.separation = float(separation)

    def class_means(self) -> Tensor:
        """The mixture's class means ``[K, *shape]`` (float32)."""
        return torch.from_numpy(self._means()).reshape(self.num_classes, *self.input_shape)

    def _streams(self) -> list[np.random.Generator]:
        return [np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(3)]

    def _means(self) -> np.ndarray:
        dim = math.prod(self.input_shape)
        u = self._streams()[0].standard_normal((self.num_classes, dim))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        return (self.separation * u).astype(np.float32)

    def _load_source(self, source: str) -> tuple[Tensor, Tensor]:
        n = self.samples_per_class if source == "train" else self.test_samples_per_class
        assert n is not None  # this module always sets samples_per_class
        rng = self._streams()[1 if source == "train" else 2]
        means = self._means()
        targets = np.repeat(np.arange(self.num_classes), n)
        z = rng.standard_normal((len(targets), means.shape[1])).astype(np.float32)
        x = means[targets] + self.noise * z
        data = torch.from_numpy(x).reshape(len(targets), *self.input_shape)
        return data, torch.from_numpy(targets).to(torch.int64)

    def _transform(self, augment: bool) -> ImageTransform | None:
        return None
