"""LightningDataModules for collapse studies: torchvision on-disk sets, digits, synthetic.

``build_datamodule("cifar10", root=..., ...)`` builds one by name (``DATAMODULES`` lists the
names); every module exposes ``num_classes``, ``input_shape`` and ``class_names`` right
after ``__init__``, and ``probe_dataset``/``probe_dataloader``/``probe_targets`` for
feature probing (no augmentation, fixed order). Data problems raise :class:`DataError`.
"""

from __future__ import annotations

from typing import Any

from nclightning.data.base import (
    ArrayDataset,
    ClassificationDataModule,
    DataError,
    ImageTransform,
    balanced_subset,
)
from nclightning.data.digits import DigitsDataModule
from nclightning.data.synthetic import SyntheticDataModule
from nclightning.data.vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "DATAMODULES",
    "ArrayDataset",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DataError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageTransform",
    "MNISTDataModule",
    "SVHNDataModule",
    "SyntheticDataModule",
    "TorchvisionDataModule",
    "balanced_subset",
    "build_datamodule",
]

DATAMODULES: dict[str, type[ClassificationDataModule]] = {
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "svhn": SVHNDataModule,
    "digits": DigitsDataModule,
    "synthetic": SyntheticDataModule,
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def build_datamodule(name: str, **kwargs: Any) -> ClassificationDataModule:
    """Build the data module registered as ``name`` (case, ``-`` and ``_`` ignored)."""
    for key, cls in DATAMODULES.items():
        if _key(key) == _key(name):
            return cls(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATAMODULES)}")
