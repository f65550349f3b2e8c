"""Writers of tiny datasets in each library's own on-disk format (shared by the test suites).

They follow the published formats (CIFAR pickled batches, MNIST idx files, SVHN ``.mat`` with
``X[H, W, C, N]`` and label 10 for digit 0); the data modules read them through torchvision.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io

from nclightning.data import CIFAR100DataModule

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]  # fmt: skip


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, train: tuple, test: tuple) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (x, y) = train
    for b, idx in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        _pickle(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": [int(v) for v in y[idx]],
                "data": x[idx].reshape(len(idx), 3072),
                "filenames": [f"img_{i}.png" for i in idx],
            },
        )
    (x, y) = test
    _pickle(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in y],
         "data": x.reshape(len(y), 3072), "filenames": [f"t_{i}.png" for i in range(len(y))]},
    )  # fmt: skip
    _pickle(
        folder / "batches.meta",
        {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 10, "num_vis": 3072},
    )


def write_cifar100(root: Path, train: tuple, test: tuple) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, (x, y) in (("train", train), ("test", test)):
        _pickle(
            folder / name,
            {
                "filenames": [f"{name}_{i}.png" for i in range(len(y))],
                "batch_label": f"{name} batch",
                "fine_labels": [int(v) for v in y],
                "coarse_labels": [int(v) // 5 for v in y],
                "data": x.reshape(len(y), 3072),
            },
        )
    _pickle(
        folder / "meta",
        {
            "fine_label_names": list(CIFAR100DataModule.CLASS_NAMES),
            "coarse_label_names": [f"super_{k}" for k in range(20)],
        },
    )


def _write_mnist_like(folder: Path, train: tuple, test: tuple) -> None:
    folder.mkdir(parents=True)
    for prefix, (x, y) in (("train", train), ("t10k", test)):
        n = len(y)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x0803, n, 28, 28) + x[:, 0].astype(np.uint8).tobytes()
        )
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, n) + y.astype(np.uint8).tobytes()
        )


def write_mnist(root: Path, train: tuple, test: tuple) -> None:
    _write_mnist_like(root / "MNIST" / "raw", train, test)


def write_fashion_mnist(root: Path, train: tuple, test: tuple) -> None:
    _write_mnist_like(root / "FashionMNIST" / "raw", train, test)


def write_svhn(root: Path, train: tuple, test: tuple) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("train", train), ("test", test)):
        scipy.io.savemat(
            root / f"{name}_32x32.mat",
            {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y).astype(np.uint8)[:, None]},
        )


def random_split(rng: np.random.Generator, counts: list[int], shape: tuple[int, ...]):
    """uint8 images ``[N, *shape]`` and labels with ``counts[k]`` samples of class ``k``."""
    y = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(y)
    x = rng.integers(0, 256, size=(len(y), *shape), dtype=np.uint8)
    return x, y


def write_tiny_cifar10(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """A CIFAR-10 folder with ``per_class`` train and test images per class under ``root``."""
    rng = np.random.default_rng(seed)
    write_cifar10(
        root, random_split(rng, [per_class] * 10, (3, 32, 32)),
        random_split(rng, [per_class] * 10, (3, 32, 32)),
    )  # fmt: skip
    return root
