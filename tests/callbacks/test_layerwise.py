"""LayerwiseTraining (the paper's Fig. 2 protocol, docs/science.md §6.2) on any LayerwiseModel.

Every check runs on :class:`CollapseClassifier` (``mlp`` backbone) and on a user's own
LightningModule that implements :class:`nclightning.models.LayerwiseModel` and nothing else
of nclightning. References are independent of the callback: the composition of the active
blocks computed by hand, a head drawn fresh from the documented seed, the parameters' values
before and after a stage.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from support import RecordingLogger
from torch import nn

from nclightning import NeuralCollapseCallback
from nclightning.callbacks import LayerwiseTraining
from nclightning.data import SyntheticDataModule
from nclightning.errors import ConfigurationError
from nclightning.models import CollapseClassifier, LayerwiseModel

WIDTH, K = 12, 3


class Tower(LightningModule):
    """A user's layer-wise network: ``depth`` Linear-BN-tanh blocks, a tap, a head, a scale.

    It implements the LayerwiseModel protocol with its own names and holds one parameter
    (``scale``) in neither the blocks nor the head, which the callback must leave alone.
    """

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.stack = nn.ModuleList(
            nn.Sequential(
                nn.Linear(8 if i == 0 else WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh()
            )
            for i in range(depth)
        )
        self.tap = nn.Identity()  # the deepest active block's output, for the collapse probe
        self.out = nn.Linear(WIDTH, K)
        self.scale = nn.Parameter(torch.ones(()))
        self.running = depth

    def layerwise_blocks(self):
        return self.stack

    def set_layerwise_depth(self, depth: int) -> None:
        self.running = depth

    def get_classifier(self) -> nn.Module:
        return self.out

    def features(self, x):
        for block in self.stack[: self.running]:
            x = block(x)
        return self.tap(x)

    def forward(self, x):
        return self.scale * self.out(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _model(kind: str, depth: int = 3):
    torch.manual_seed(0)
    if kind == "tower":
        return Tower(depth)
    return CollapseClassifier(
        num_classes=K,
        input_shape=(8,),
        backbone="mlp",
        backbone_kwargs={"depth": depth, "width": WIDTH, "batch_norm": True},
        lr=0.1,
        scheduler="none",
    )


KINDS = ["collapse_classifier", "tower"]


def _data():
    return SyntheticDataModule(num_classes=K, samples_per_class=20, shape=(8,), batch_size=20)


def _trainer(callbacks, max_epochs=6, **kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return Trainer(max_epochs=max_epochs, callbacks=callbacks, **{**defaults, **kwargs})


def _composed(blocks, depth: int, x):
    """The first ``depth`` blocks applied by hand, all in eval mode (no BN update)."""
    for block in blocks[:depth]:
        x = block(x)
    return x


class Spy(Callback):
    """What the model looks like at each epoch's first batch, read through the protocol."""

    def __init__(self, layerwise: LayerwiseTraining):
        self.layerwise, self.seen = layerwise, []

    def on_train_batch_start(self, trainer, model, batch, batch_idx):
        if batch_idx:
            return
        blocks, head = model.layerwise_blocks(), model.get_classifier()
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        with torch.no_grad():
            x = batch[0][:5]
            depth = self.layerwise.depth
            runs_depth = torch.equal(model.features(x), _composed(blocks, depth, x))
        for m, training in modes:
            m.training = training
        opt = trainer.optimizers[0]
        self.seen.append(
            {
                "depth": depth,
                "runs_depth": runs_depth,
                "trainable": [all(p.requires_grad for p in b.parameters()) for b in blocks],
                "training": [b.training for b in blocks],
                "head": head.weight.detach().clone(),
                "blocks": [b[0].weight.detach().clone() for b in blocks],
                "momentum": [p in opt.state for p in head.parameters()],
                "scale": getattr(model, "scale", torch.ones(())).detach().clone(),
                "scale_trainable": getattr(model, "scale", torch.ones(())).requires_grad,
            }
        )


@pytest.mark.parametrize("kind", KINDS)
def test_stages_freeze_earlier_blocks_and_refresh_the_head(kind):
    model = _model(kind)
    assert isinstance(model, LayerwiseModel)
    layerwise = LayerwiseTraining(2)
    spy = Spy(layerwise)
    _trainer([layerwise, spy]).fit(model, _data())
    seen = spy.seen
    assert [s["depth"] for s in seen] == [1, 1, 2, 2, 3, 3]
    assert all(s["runs_depth"] for s in seen)  # forward runs exactly the active blocks
    assert seen[0]["trainable"] == [True, False, False]
    assert seen[2]["trainable"] == [False, True, False]
    assert seen[4]["trainable"] == [False, False, True]
    assert seen[4]["training"] == [False, False, True]  # frozen BN stays in eval mode
    # frozen blocks do not move during later stages; the trained one did move
    assert torch.equal(seen[2]["blocks"][0], seen[5]["blocks"][0])
    assert torch.equal(seen[4]["blocks"][1], seen[5]["blocks"][1])
    assert not torch.equal(seen[0]["blocks"][0], seen[2]["blocks"][0])
    # a fresh head (and no stale momentum) at each stage start: the documented seeded draw
    assert not seen[2]["momentum"][0] and seen[1]["momentum"][0]
    for stage_start, depth in ((2, 2), (4, 3)):
        with torch.random.fork_rng():
            torch.manual_seed(0 * 1_000_003 + depth)
            fresh = nn.Linear(WIDTH, K)
        assert torch.equal(seen[stage_start]["head"], fresh.weight)
    if kind == "tower":  # a parameter outside blocks and head: still trained, never frozen
        assert all(s["scale_trainable"] for s in seen)
        assert not torch.equal(seen[0]["scale"], seen[5]["scale"])


def _pair(row: dict[str, float], quantity: str) -> float:
    """The value of the ``h0 -> deepest`` pair's ``quantity`` in a probe row."""
    (value,) = [v for k, v in row.items() if k.endswith(f"h0->deepest/{quantity}")]
    return value


@pytest.mark.parametrize("kind", KINDS)
def test_rows_carry_the_probed_depth(kind):
    logger = RecordingLogger()
    if kind == "tower":
        layers, pairs = {"deepest": "tap"}, []
    else:
        layers, pairs = {"h0": "backbone.h0", "deepest": "backbone"}, [("h0", "deepest")]
    cb = NeuralCollapseCallback(
        layers=layers,
        pairs=pairs,
        every_n_epochs=2,
        width_mismatch="skip",
        coupling=1.0,
        log_figures=False,
    )
    trainer = _trainer([LayerwiseTraining(2), cb], logger=logger)
    if pairs:
        with pytest.warns(UserWarning, match="differ in width"):
            trainer.fit(_model(kind), _data())
    else:
        trainer.fit(_model(kind), _data())
    probes = logger.probes()
    assert {e: r["depth"] for e, r in probes.items()} == {0: 1.0, 2: 1.0, 4: 2.0, 6: 3.0}
    if pairs:  # stage 1: H0 is the 8-wide input, H 12-wide: skipped (NaN); then fitted
        assert math.isnan(_pair(probes[2], "coupling"))
        assert _pair(probes[4], "coupling") == 1.0


def _running_depth(model) -> int:
    """The number of blocks ``model.features`` runs, found by composing blocks by hand."""
    blocks, x = model.layerwise_blocks(), torch.randn(4, 8)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model.features(x)
        (depth,) = [
            d for d in range(1, len(blocks) + 1) if torch.equal(out, _composed(blocks, d, x))
        ]
    for m, training in modes:
        m.training = training
    return depth


class DepthAt(Callback):
    """The depth the network runs (and the callback reports) when a probe would start."""

    def __init__(self, layerwise: LayerwiseTraining):
        self.layerwise, self.seen = layerwise, {}

    def _record(self, hook, model):
        self.seen[hook] = (_running_depth(model), self.layerwise.depth)

    def on_train_start(self, trainer, model):
        self._record("train", model)

    def on_validation_start(self, trainer, model):
        if not trainer.sanity_checking:
            self._record("validate", model)


def _four_epochs_then_checkpoint(kind, tmp_path):
    """Four epochs at two per stage: the last ran depth 2 of 3 (the next epoch would run 3)."""
    layerwise, model = LayerwiseTraining(2), _model(kind)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer([layerwise, ckpt], max_epochs=4, enable_checkpointing=True).fit(model, _data())
    return layerwise, model, tmp_path / "last.ckpt"


@pytest.mark.parametrize("kind", KINDS)
def test_a_resumed_run_probes_at_the_depth_it_stopped(kind, tmp_path):
    """Before the first epoch of a resumed run the depth is the checkpoint's, not start_depth."""
    _, _, path = _four_epochs_then_checkpoint(kind, tmp_path)
    layerwise = LayerwiseTraining(2)
    spy = DepthAt(layerwise)
    resumed = ModelCheckpoint(dirpath=tmp_path / "resumed", save_last=True)
    _trainer([spy, layerwise, resumed], max_epochs=5, enable_checkpointing=True).fit(
        _model(kind), _data(), ckpt_path=str(path)
    )
    assert spy.seen["train"] == (2, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_validate_measures_the_network_at_its_trained_depth(kind, tmp_path):
    """After fit, and from a checkpoint in a fresh process, validate runs depth 2, not 3 or 1."""
    layerwise, model, path = _four_epochs_then_checkpoint(kind, tmp_path)
    spy = DepthAt(layerwise)
    _trainer([layerwise, spy], limit_val_batches=1.0).validate(model, _data())
    assert spy.seen["validate"] == (2, 2)
    fresh = LayerwiseTraining(2)
    spy = DepthAt(fresh)
    _trainer([fresh, spy], limit_val_batches=1.0).validate(_model(kind), _data(), ckpt_path=path)
    assert spy.seen["validate"] == (2, 2)


class NotLayerwise(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, K)

    def get_classifier(self):
        return self.net

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_model_without_the_protocol_gets_a_clear_error():
    with pytest.raises(ConfigurationError, match="layerwise_blocks, set_layerwise_depth"):
        _trainer([LayerwiseTraining(1)], max_epochs=1).fit(NotLayerwise(), _data())


def test_needs_an_mlp_backbone():
    model = CollapseClassifier(
        num_classes=3, input_shape=(3, 8, 8), backbone="vgg11_bn", backbone_kwargs={"width": 4}
    )
    with pytest.raises(ValueError, match="'mlp' backbone"):
        _trainer([LayerwiseTraining(1)], max_epochs=1).fit(
            model, SyntheticDataModule(num_classes=3, samples_per_class=4, shape=(3, 8, 8))
        )


def test_start_depth_beyond_the_blocks_is_refused():
    with pytest.raises(ConfigurationError, match="start_depth 4 exceeds the model's 3 blocks"):
        _trainer([LayerwiseTraining(1, start_depth=4)], max_epochs=1).fit(_model("tower"), _data())
