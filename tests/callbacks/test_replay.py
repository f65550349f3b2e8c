"""A probe keeps the batches of a fixed in-memory dataset on the device after the first probe
(``passes.Replay``): the same values as reading the loader anew, and the loader read once."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer
from support import RecordingLogger

from nclightning import NeuralCollapseCallback
from nclightning.callbacks import passes, probe
from nclightning.data import SyntheticDataModule
from nclightning.data.base import ArrayDataset, ImageTransform
from nclightning.models import CollapseClassifier

K = 4


class _Counting(SyntheticDataModule):
    """Counts the samples read from the train probe dataset; ``transform`` replaces its own."""

    def __init__(self, transform=None, **kwargs):
        super().__init__(
            num_classes=K, samples_per_class=30, test_samples_per_class=5, shape=(1, 4, 4),
            batch_size=32, seed=0, noise=1.0, separation=3.0, **kwargs,
        )  # fmt: skip
        self.reads, self.transform = 0, transform

    def probe_dataset(self, split="train"):
        base = super().probe_dataset(split)
        owner = self

        class Counted(ArrayDataset):
            def __getitem__(self, index):
                owner.reads += 1
                return super().__getitem__(index)

        return Counted(base.data, base.targets, self.transform or base.transform)


class _InPlace(CollapseClassifier):
    """Changes its input in place, as some user models do: a kept batch must not change."""

    def forward(self, x):
        return super().forward(x.mul_(1.5))


def _run(dm, monkeypatch=None, replay=True, epochs=3, **cb):
    if monkeypatch is not None and not replay:
        monkeypatch.setattr(probe, "replayable", lambda source: False)
    torch.manual_seed(0)
    model = _InPlace(
        num_classes=K, input_shape=(1, 4, 4), backbone="mlp",
        backbone_kwargs={"depth": 3, "width": 16, "batch_norm": False}, lr=0.05,
    )  # fmt: skip
    logger = RecordingLogger()
    nc = NeuralCollapseCallback(batch_size=16, log_figures=False, **cb)
    Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[nc],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    ).fit(model, dm)  # fmt: skip
    return logger.probes("train")


def _same(a, b):
    assert sorted(a) == sorted(b)
    for epoch in a:
        assert a[epoch].keys() == b[epoch].keys()
        for key, value in a[epoch].items():
            other = b[epoch][key]
            assert value == other or (math.isnan(value) and math.isnan(other)), (epoch, key)


def test_replayed_inputs_give_the_values_of_a_loader_read_at_every_probe(monkeypatch):
    dm = _Counting()
    replayed = _run(dm)
    assert dm.reads == 2 + K * 30  # the probe set, read once (and the 2-sample example)
    with monkeypatch.context() as m:
        again = _Counting()
        read = _run(again, m, replay=False)
    assert again.reads == 2 + 4 * K * 30  # four probes (before training, three epochs)
    assert len(replayed) == 4
    _same(replayed, read)


def test_an_augmenting_dataset_is_read_at_every_probe():
    dm = _Counting(transform=ImageTransform(flip=True))
    assert not dm.probe_dataset().deterministic
    _run(dm, epochs=2)
    assert dm.reads == 2 + 3 * K * 30


def test_inputs_over_the_budget_are_read_at_every_probe():
    dm = _Counting()
    features = 120 * (16 + 16) * 4 + 120 * 8  # two layers of width 16, float32, and labels
    _run(dm, epochs=2, cache_budget=features + 100)  # the features fit, the inputs do not
    assert dm.reads == 2 + 3 * K * 30


@pytest.mark.parametrize("limit", [0, 10**9])
def test_replay_yields_the_loader_batches_on_the_device(limit):
    x, y = torch.randn(10, 3), torch.arange(10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    replay = passes.Replay(loader, torch.device("cpu"), limit)
    for _ in range(2):
        got = list(replay)
        assert [len(b[1]) for b in got] == [4, 4, 2]
        assert torch.equal(torch.cat([b[0] for b in got]), x)
        assert torch.equal(torch.cat([b[1] for b in got]), y)
    assert (replay.batches is None) == (limit == 0)


def test_replay_of_mapping_batches_hands_out_copies():
    """Hugging Face style batches (a mapping with ``labels``): replayed as ``(inputs, labels)``
    with the inputs copied, so a model writing into them does not change the kept batch."""
    rows = [{"input_ids": torch.arange(3) + i, "labels": torch.tensor(i % 2)} for i in range(5)]
    replay = passes.Replay(
        torch.utils.data.DataLoader(rows, batch_size=2), torch.device("cpu"), 10**6
    )
    first = [(x["input_ids"].clone(), y) for x, y in replay]
    for x, _ in replay:
        x["input_ids"].mul_(0)  # a model writing into its input
    again = list(replay)
    assert [torch.equal(a[0], b[0]["input_ids"]) for a, b in zip(first, again)] == [True] * 3
    assert [torch.equal(a[1], b[1]) for a, b in zip(first, again)] == [True] * 3
