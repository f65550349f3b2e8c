"""Digits, synthetic data, the registry, jsonargparse construction and a Lightning run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from sklearn.datasets import load_digits

from nclightning.data import (
    DATAMODULES,
    CIFAR10DataModule,
    DataError,
    DigitsDataModule,
    FashionMNISTDataModule,
    SyntheticDataModule,
    build_datamodule,
)


def _stack(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])


# ---------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def sk_digits():
    bunch = load_digits()
    return bunch.images, bunch.target


def test_digits_split_sizes_and_content(sk_digits):
    images, target = sk_digits
    dm = DigitsDataModule(normalize=False)
    assert (dm.num_classes, dm.input_shape, dm.class_names[7]) == (10, (1, 8, 8), "7")
    xtr, ytr = _stack(dm.probe_dataset("train"))
    xte, yte = _stack(dm.probe_dataset("test"))
    assert len(ytr) + len(yte) == 1797 == len(target)
    assert (len(ytr), len(yte)) == (1437, 360)  # ceil(0.2 * 1797) held out
    assert xtr.shape == (1437, 1, 8, 8) and xtr.dtype == torch.float32
    assert ytr.dtype == torch.int64
    # stratified: each class keeps ~20% in the test split, and no sample is lost
    all_counts = np.bincount(target)
    test_counts = np.bincount(yte.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)
    assert np.array_equal(np.bincount(ytr.numpy(), minlength=10) + test_counts, all_counts)
    # pixels are the scikit-learn images / 16, with their labels: match rows as multisets
    ref = sorted(zip(target.tolist(), images.astype(int).reshape(1797, -1).tolist()))
    got = torch.cat([xtr, xte]).mul(16).round().to(torch.int64).reshape(1797, -1).tolist()
    assert sorted(zip(torch.cat([ytr, yte]).tolist(), got)) == ref
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0
    assert torch.equal(dm.probe_targets("val"), yte)


def test_digits_normalisation(sk_digits):
    images, _ = sk_digits
    scaled = images / 16.0
    mean, std = float(scaled.mean()), float(scaled.std())
    assert DigitsDataModule.MEAN[0] == pytest.approx(mean, abs=1e-4)
    assert DigitsDataModule.STD[0] == pytest.approx(std, abs=1e-4)
    raw = _stack(DigitsDataModule(normalize=False).probe_dataset())[0]
    norm = _stack(DigitsDataModule().probe_dataset())[0]
    torch.testing.assert_close(norm, (raw - 0.3053) / 0.3760)
    x, _ = next(iter(DigitsDataModule(batch_size=2000).train_dataloader()))
    assert x.shape == (1437, 1, 8, 8) and abs(float(x.mean())) < 0.05
    assert abs(float(x.std()) - 1) < 0.05


def test_digits_split_is_fixed_and_subset_is_seeded():
    base = DigitsDataModule()
    assert torch.equal(base.probe_targets("test"), DigitsDataModule(seed=5).probe_targets("test"))
    resplit = DigitsDataModule(split_seed=1)
    assert not torch.equal(_stack(base.probe_dataset("test"))[0],
                           _stack(resplit.probe_dataset("test"))[0])  # fmt: skip
    a, b = DigitsDataModule(samples_per_class=20), DigitsDataModule(samples_per_class=20)
    c = DigitsDataModule(samples_per_class=20, seed=1)
    xa, ya = _stack(a.probe_dataset())
    assert np.bincount(ya.numpy()).tolist() == [20] * 10
    assert torch.equal(xa, _stack(b.probe_dataset())[0])
    assert not torch.equal(xa, _stack(c.probe_dataset())[0])
    counts = np.bincount(base.probe_targets().numpy())
    k = int(counts.argmin())
    with pytest.raises(DataError, match=rf"larger than class {k} \('{k}'\), which has only "
                       rf"{counts[k]} training samples"):  # fmt: skip
        DigitsDataModule(samples_per_class=int(counts[k]) + 1).setup("fit")


def test_digits_augmentation_shifts_by_one_pixel():
    dm = DigitsDataModule(normalize=False, augment=True)
    raw = dm.probe_dataset()[10][0][0].numpy()
    padded = np.pad(raw, 1)
    shifts = [padded[i : i + 8, j : j + 8] for i in range(3) for j in range(3)]
    torch.manual_seed(0)
    train_set = dm.train_dataloader().dataset
    seen = set()
    for _ in range(60):
        got = train_set[10][0][0].numpy()
        matches = [s for s, ref in enumerate(shifts) if np.array_equal(got, ref)]
        assert matches
        seen.update(matches)
    assert len(seen) > 3


# ---------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("shape", [(32,), (3, 32, 32)])
def test_synthetic_shapes_and_determinism(shape):
    kw = {"num_classes": 3, "samples_per_class": 4, "test_samples_per_class": 2, "shape": shape}
    dm = SyntheticDataModule(**kw, seed=7)
    assert (dm.num_classes, dm.input_shape, len(dm.class_names)) == (3, shape, 3)
    x, y = _stack(dm.probe_dataset())
    assert x.shape == (12, *shape) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    xt, yt = _stack(dm.probe_dataset("val"))
    assert xt.shape == (6, *shape) and np.bincount(yt.numpy()).tolist() == [2, 2, 2]
    same = SyntheticDataModule(**kw, seed=7)
    assert torch.equal(_stack(same.probe_dataset())[0], x)
    assert torch.equal(_stack(same.probe_dataset("test"))[0], xt)
    assert not torch.equal(_stack(SyntheticDataModule(**kw, seed=8).probe_dataset())[0], x)
    xb, yb = next(iter(dm.train_dataloader()))
    xb2, yb2 = next(iter(same.train_dataloader()))
    assert xb.shape == (12, *shape) and torch.equal(xb, xb2) and torch.equal(yb, yb2)
    # the test set does not depend on the training-set size
    more = SyntheticDataModule(**{**kw, "samples_per_class": 9}, seed=7)
    assert torch.equal(_stack(more.probe_dataset("test"))[0], xt)


def test_synthetic_mixture_statistics():
    n, dim = 4000, 6
    dm = SyntheticDataModule(num_classes=4, samples_per_class=n, shape=(dim,), noise=0.5,
                             separation=3.0, seed=2)  # fmt: skip
    means = dm.class_means()
    assert means.shape == (4, dim)
    torch.testing.assert_close(means.norm(dim=1), torch.full((4,), 3.0))
    x, y = dm.probe_dataset().data, dm.probe_targets()
    for k in range(4):
        xk = x[y == k].double()
        err = (xk.mean(0) - means[k].double()).abs().max()
        assert err < 5 * 0.5 / math.sqrt(n)
        assert abs(float(xk.std(0).mean()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        SyntheticDataModule(num_classes=1)
    with pytest.raises(ValueError, match="shape"):
        SyntheticDataModule(shape=())


# ---------------------------------------------------------------------------- registry & CLI


def test_registry_and_unknown_name(tmp_path):
    assert set(DATAMODULES) == {"cifar10", "cifar100", "mnist", "fashion_mnist", "svhn",
                                "digits", "synthetic"}  # fmt: skip
    dm = build_datamodule("cifar10", root=str(tmp_path), batch_size=7)
    assert isinstance(dm, CIFAR10DataModule) and dm.batch_size == 7
    assert isinstance(build_datamodule("Fashion-MNIST"), FashionMNISTDataModule)
    assert build_datamodule("synthetic", num_classes=5).num_classes == 5
    with pytest.raises(ValueError) as info:
        build_datamodule("imagenet")
    msg = str(info.value)
    assert "'imagenet'" in msg and all(name in msg for name in DATAMODULES)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="samples_per_class must be a positive integer"):
        CIFAR10DataModule(samples_per_class=0)
    with pytest.raises(ValueError, match="unknown split 'train2'"):
        DigitsDataModule().probe_dataset("train2")


@pytest.mark.parametrize("name", list(DATAMODULES))
def test_jsonargparse_builds_every_module(name, tmp_path):
    cls = DATAMODULES[name]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    args = ["--data.batch_size", "5"]
    if "root" in parser.get_defaults()["data"]:
        args += ["--data.root", str(tmp_path)]
    if name == "synthetic":
        args += ["--data.shape", "[1, 4, 4]"]
    cfg = parser.parse_args(args)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    dm = instantiate(cfg).data
    assert isinstance(dm, cls) and dm.batch_size == 5 and dm.eval_batch_size == 5
    if name == "synthetic":
        assert dm.input_shape == (1, 4, 4)


class _Linear(LightningModule):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(dim, classes)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("workers", [0, 1])
def test_lightning_fit_and_workers(workers):
    dm = DigitsDataModule(batch_size=64, num_workers=workers, samples_per_class=10)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(_Linear(64, dm.num_classes), datamodule=dm)
    assert trainer.state.finished and len(dm.probe_dataset()) == 100
    passes = [torch.cat([b[0] for b in dm.probe_dataloader()]) for _ in range(2)]
    assert torch.equal(passes[0], passes[1])
    assert torch.equal(passes[0], _stack(DigitsDataModule(samples_per_class=10).probe_dataset())[0])


def test_training_order_is_a_function_of_seed_and_epoch():
    """Resumed runs see the batches of uninterrupted ones: epoch e's order depends on (seed, e)."""
    from nclightning.data.base import EpochShuffleSampler

    def order(seed, epoch):
        sampler = EpochShuffleSampler(50, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(0, 3)) == list(range(50))
    assert order(0, 3) == order(0, 3)  # a fresh sampler (a resumed run) reproduces it
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    dm = DigitsDataModule(batch_size=64, seed=7)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)  # what Lightning does at each epoch start
    first = torch.cat([y for _, y in loader])
    again = dm.train_dataloader()
    again.sampler.set_epoch(2)
    assert torch.equal(first, torch.cat([y for _, y in again]))
    targets = dm.probe_targets("train")
    expected = EpochShuffleSampler(len(targets), 7)
    expected.set_epoch(2)
    assert torch.equal(first, targets[torch.tensor(list(expected))])
