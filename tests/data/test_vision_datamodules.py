"""torchvision-backed data modules, on tiny files written in each library's own on-disk format.

The writers below follow the published formats (CIFAR pickled batches, MNIST idx files,
SVHN ``.mat`` with ``X[H, W, C, N]`` and label 10 for digit 0); the data modules read them
through torchvision's dataset classes.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from ondisk import (
    CIFAR10_NAMES,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_mnist,
    write_svhn,
)
from torchvision import datasets as tvd

from nclightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataError,
    FashionMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
)

# ---------------------------------------------------------------------------- specs


@dataclass
class Spec:
    cls: type
    write: Callable[[Path, tuple, tuple], None]
    shape: tuple[int, ...]
    mean: tuple[float, ...]  # the standard constants, restated independently of the library
    std: tuple[float, ...]
    padding: int
    flip: bool
    num_classes: int
    small_class_name: str  # name of class 3, the deliberately smallest class
    urls: list[str]  # what a download fetches, from torchvision's class attributes
    missing_file: str  # a file the module must name when it is absent (relative to root)


SPECS = {
    "cifar10": Spec(
        CIFAR10DataModule, write_cifar10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616), 4, True, 10, "cat", [tvd.CIFAR10.url],
        "cifar-10-batches-py/test_batch",
    ),
    "cifar100": Spec(
        CIFAR100DataModule, write_cifar100, (3, 32, 32), (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762), 4, True, 100, "bear", [tvd.CIFAR100.url],
        "cifar-100-python/train",
    ),
    "mnist": Spec(
        MNISTDataModule, write_mnist, (1, 28, 28), (0.1307,), (0.3081,), 2, False, 10, "3",
        [tvd.MNIST.mirrors[0] + r[0] for r in tvd.MNIST.resources],
        "MNIST/raw/t10k-labels-idx1-ubyte",
    ),
    "fashion_mnist": Spec(
        FashionMNISTDataModule, write_fashion_mnist, (1, 28, 28), (0.2860,), (0.3530,), 2,
        True, 10, "Dress", [tvd.FashionMNIST.mirrors[0] + r[0] for r in tvd.FashionMNIST.resources],
        "FashionMNIST/raw/train-images-idx3-ubyte",
    ),
    "svhn": Spec(
        SVHNDataModule, write_svhn, (3, 32, 32), (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970), 4, False, 10, "3",
        [tvd.SVHN.split_list["train"][0], tvd.SVHN.split_list["test"][0]], "test_32x32.mat",
    ),
}  # fmt: skip

CONSTANT = 128  # pixel value of the constant image stored at train index 0


def make_split(rng: np.random.Generator, counts: list[int], shape: tuple[int, ...]):
    """Random uint8 images with shuffled labels, ``counts[k]`` of class ``k``."""
    y = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    x = rng.integers(0, 256, size=(len(y), *shape), dtype=np.uint8)
    return x, y.astype(np.int64)


@dataclass
class Written:
    spec: Spec
    root: Path
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


@pytest.fixture(params=list(SPECS))
def written(request, tmp_path) -> Written:
    spec = SPECS[request.param]
    rng = np.random.default_rng(12345)
    k = spec.num_classes
    counts = [5] * k
    counts[3] = 3  # the smallest class
    counts[0] = 6
    train = make_split(rng, counts, spec.shape)
    train[0][0] = CONSTANT
    test = make_split(rng, [2 if k == 10 else 1] * k, spec.shape)
    root = tmp_path / "data"
    spec.write(root, train, test)
    return Written(spec, root, train, test)


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])


def _as_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).float() / 255.0


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(SPECS))
def test_attributes_before_setup(name, tmp_path):
    spec = SPECS[name]
    dm = spec.cls(root=str(tmp_path / "absent"))
    assert dm.num_classes == spec.num_classes
    assert dm.input_shape == spec.shape
    assert len(dm.class_names) == spec.num_classes
    assert dm.class_names[3] == spec.small_class_name
    assert not (tmp_path / "absent").exists()


def test_round_trip(written):
    spec, (x_tr, y_tr), (x_te, y_te) = written.spec, written.train, written.test
    dm = spec.cls(root=str(written.root), normalize=False)
    dm.prepare_data()
    dm.setup("fit")
    x, y = _stack(dm.probe_dataset("train"))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (len(y_tr), *spec.shape)
    torch.testing.assert_close(x, _as_float(x_tr), rtol=0, atol=0)
    assert torch.equal(y, torch.from_numpy(y_tr))
    assert torch.equal(dm.probe_targets("train"), torch.from_numpy(y_tr))
    for split in ("val", "test"):  # both are the official test split
        xv, yv = _stack(dm.probe_dataset(split))
        torch.testing.assert_close(xv, _as_float(x_te), rtol=0, atol=0)
        assert torch.equal(yv, torch.from_numpy(y_te))
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (len(y_te), *spec.shape) and yb.dtype == torch.int64


def test_cifar_class_names():
    assert CIFAR10DataModule(root="unused").class_names == CIFAR10_NAMES
    names = CIFAR100DataModule(root="unused").class_names
    assert len(set(names)) == 100 and names == sorted(names)  # fine labels are alphabetical
    expected = ("apple", "aquarium_fish", "pickup_truck", "worm")
    assert (names[0], names[1], names[58], names[99]) == expected


def test_normalisation(written):
    spec = written.spec
    dm = spec.cls(root=str(written.root))
    x0, _ = dm.probe_dataset("train")[0]
    for c, (m, s) in enumerate(zip(spec.mean, spec.std)):
        expected = (CONSTANT / 255.0 - m) / s
        assert torch.allclose(x0[c], torch.full_like(x0[c], expected), atol=1e-6)
        assert abs(x0[c].mean().item() - expected) < 1e-6 and x0[c].std().item() < 1e-6
    xb, _ = next(iter(dm.val_dataloader()))
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    torch.testing.assert_close(xb, (_as_float(written.test[0]) - mean) / std)


def test_samples_per_class(written):
    spec, (x_tr, y_tr) = written.spec, written.train
    root = str(written.root)
    first = spec.cls(root=root, samples_per_class=3, seed=0, normalize=False)
    again = spec.cls(root=root, samples_per_class=3, seed=0, normalize=False)
    other = spec.cls(root=root, samples_per_class=3, seed=1, normalize=False)
    x, y = _stack(first.probe_dataset("train"))
    assert np.bincount(y.numpy(), minlength=spec.num_classes).tolist() == [3] * spec.num_classes
    # every kept sample is an original (image, label) pair, in the original order
    index = {img.tobytes(): i for i, img in enumerate(x_tr)}
    where = [index[img.tobytes()] for img in (x * 255).round().to(torch.uint8).numpy()]
    assert where == sorted(where) and len(set(where)) == len(where)
    assert torch.equal(y, torch.from_numpy(y_tr[where]))
    assert torch.equal(first.probe_targets(), again.probe_targets())
    assert torch.equal(_stack(again.probe_dataset())[0], x)
    assert not torch.equal(_stack(other.probe_dataset())[0], x)
    # the held-out split is never subset
    assert len(first.probe_dataset("val")) == len(written.test[1])
    too_many = int(np.bincount(y_tr)[3]) + 1
    dm = spec.cls(root=root, samples_per_class=too_many)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "class 3" in msg and repr(spec.small_class_name) in msg
    assert f"only {too_many - 1} training samples" in msg and "\n" not in msg


def _shift_candidates(img: np.ndarray, padding: int, flip: bool) -> list[np.ndarray]:
    """Every image a pad-and-crop (and flip) augmentation can produce, computed with numpy."""
    h, w = img.shape[-2:]
    padded = np.pad(img, ((0, 0), (padding, padding), (padding, padding)))
    out = []
    for i in range(2 * padding + 1):
        for j in range(2 * padding + 1):
            crop = padded[:, i : i + h, j : j + w]
            out.append(crop)
            if flip:
                out.append(crop[:, :, ::-1])
    return out


def test_augmentation_and_probe(written):
    spec, (x_tr, y_tr) = written.spec, written.train
    root = str(written.root)
    plain = spec.cls(root=root, batch_size=16, normalize=False, seed=3)
    aug = spec.cls(root=root, batch_size=16, normalize=False, seed=3, augment=True)
    # same seeded shuffle, different pixels
    xp, yp = next(iter(plain.train_dataloader()))
    torch.manual_seed(0)
    xa, ya = next(iter(aug.train_dataloader()))
    assert torch.equal(yp, ya) and not torch.equal(yp, torch.from_numpy(y_tr[:16]))
    assert not torch.equal(xp, xa)
    # each augmented sample is a padded crop (a flip only where documented) of its source
    train_set = aug.train_dataloader().dataset
    torch.manual_seed(0)
    flips = 0
    for i in range(1, 6):
        unflipped = _shift_candidates(x_tr[i], spec.padding, flip=False)
        allowed = _shift_candidates(x_tr[i], spec.padding, flip=spec.flip)
        for _ in range(20):
            got = (train_set[i][0] * 255).round().to(torch.uint8).numpy()
            assert any(np.array_equal(got, c) for c in allowed)
            flips += not any(np.array_equal(got, c) for c in unflipped)
    assert (flips > 0) == spec.flip
    # the probe loader ignores augmentation, keeps the order, and repeats exactly
    passes = [torch.cat([b[0] for b in aug.probe_dataloader(batch_size=7)]) for _ in range(2)]
    torch.testing.assert_close(passes[0], _as_float(x_tr), rtol=0, atol=0)
    assert torch.equal(passes[0], passes[1])
    labels = torch.cat([b[1] for b in aug.probe_dataloader()])
    assert torch.equal(labels, aug.probe_targets()) and torch.equal(labels, torch.from_numpy(y_tr))


def test_missing_directory(written, tmp_path):
    spec = written.spec
    dm = spec.cls(root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "\n" not in msg and "does not exist" in msg and "download: true" in msg
    assert str(tmp_path / "nowhere") in msg and Path(spec.missing_file).name in msg
    with pytest.raises(DataError, match="not found"):
        dm.setup("fit")
    # one file gone: the message names it
    (written.root / spec.missing_file).unlink()
    with pytest.raises(DataError) as info:
        spec.cls(root=str(written.root)).setup("test")
    assert f"lacks {Path(spec.missing_file).name}" in str(info.value)


def test_failed_download(written, tmp_path, monkeypatch):
    spec = written.spec
    calls = []

    def offline(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm = spec.cls(root=str(tmp_path / "fresh"), download=True)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert calls, "torchvision never tried the network"
    assert "download failed" in msg and "no network (test)" in msg and "by hand" in msg
    assert all(url in msg for url in spec.urls) and "\n" not in msg
    assert isinstance(info.value.__cause__, (urllib.error.URLError, RuntimeError))
    # files already in place: download=True does not touch the network (no md5 re-check)
    calls.clear()
    present = spec.cls(root=str(written.root), download=True)
    present.prepare_data()
    present.setup("fit")
    assert calls == [] and len(present.probe_dataset()) == len(written.train[1])


def test_unreadable_and_mislabelled_files(tmp_path):
    rng = np.random.default_rng(0)
    train, test = make_split(rng, [5] * 10, (3, 32, 32)), make_split(rng, [1] * 10, (3, 32, 32))
    write_cifar10(tmp_path / "bad", train, test)
    (tmp_path / "bad" / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="could not read CIFAR-10 train files"):
        CIFAR10DataModule(root=str(tmp_path / "bad")).setup("fit")
    write_cifar10(tmp_path / "labels", train, (test[0], test[1] + 5))
    with pytest.raises(DataError, match=r"labels span 5\.\.14, outside 0\.\.9"):
        CIFAR10DataModule(root=str(tmp_path / "labels")).setup("test")
