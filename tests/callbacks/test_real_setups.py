"""The callback in setups nobody on the project wrote: a user's own LightningModule with plain
DataLoaders, probes lacking classes, runs stopped every way Lightning stops them, 1-D CNNs,
mapping batches, and real timm / Hugging Face models built from tiny configs (random weights).
Values are checked against float64 brute force on independently extracted features."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, Timer
from support import RecordingLogger, reference_metrics
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nclightning import NeuralCollapseCallback
from nclightning.errors import ConfigurationError
from nclightning.record.keys import accuracy_key, layer_key

K, DIM = 5, 8


class UserNet(LightningModule):
    """A user's own module: a body of two Linear+ReLU and a Linear head with ``K`` outputs."""

    def __init__(self, classes=K, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.head = nn.Linear(width, classes)
        self.steps = 0

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _tensors(classes, per_class=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(per_class)
    centres = torch.randn(K, DIM, generator=g) * 3
    return centres[y] + torch.randn(len(y), DIM, generator=g), y


def _loader(classes=range(K), per_class=12, seed=0, batch_size=10, shuffle=False):
    x, y = _tensors(list(classes), per_class, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def _trainer(callbacks, logger=None, **kw):
    kw.setdefault("max_epochs", 1)
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger or False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _features(model, x, module):
    store = {}
    handle = module.register_forward_hook(lambda m, a, o: store.__setitem__("h", o))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    return store["h"].double().numpy(), logits.argmax(1).numpy()


def _rows_at_steps(logger, probe):
    return [
        (step, row)
        for step, row in logger.rows
        if "epochs_trained" in row and accuracy_key(probe) in row
    ]


# -- 1. the number of classes comes from the model ------------------------------------------------
def test_a_probe_lacking_the_highest_class_is_measured_over_the_classes_it_has():
    """K = 5 from the head; the held-out probe has classes 0..3 only (docs/science.md §9.5)."""
    logger, model = RecordingLogger(), UserNet()
    held = _loader(classes=range(4), seed=1)
    cb = NeuralCollapseCallback(layers={"h": "body.3"}, probe=held, name="held", pairs=[])
    with pytest.warns(UserWarning, match=r"class\(es\) 4 have no sample"):
        _trainer([cb], logger).fit(model, _loader(shuffle=True))
    x, y = held.dataset.tensors
    h, pred = _features(model, x, model.body[3])
    ref = reference_metrics(h, y.numpy(), 4, weight=model.head.weight.detach()[:4])
    row = logger.probes()[1]
    for metric in ("nc1", "nc1_tilde", "nc2_etf", "cdnv", "nc3"):
        assert row[layer_key("held", "h", metric)] == pytest.approx(ref[metric], rel=1e-6), metric
    # the classifier still votes over all 5 outputs
    assert row[accuracy_key("held")] == pytest.approx(float(np.mean(pred == y.numpy())))


def test_an_empty_probe_is_refused_before_training():
    model = UserNet()
    empty = DataLoader(TensorDataset(torch.zeros(0, DIM), torch.zeros(0, dtype=torch.long)))
    cb = NeuralCollapseCallback(layers=["body.3"], probe=empty, name="empty", pairs=[])
    with pytest.raises(ConfigurationError, match=r"\[empty\]: the probe set is empty"):
        _trainer([cb]).fit(model, _loader())
    assert model.steps == 0


def test_labels_beyond_the_models_classes_are_refused_in_one_line():
    cb = NeuralCollapseCallback(layers=["body.3"], pairs=[])
    with pytest.raises(ConfigurationError, match=r"labels 0\.\.4 do not fit the model's 3 classes"):
        _trainer([cb]).fit(UserNet(classes=3), _loader())


# -- 2. the whole run ---------------------------------------------------------------------
class StopAfter(Callback):
    """``trainer.should_stop`` after a number of batches (a user's own stopping rule)."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.batches:
            trainer.should_stop = True


class StepClock(Timer):
    """Lightning's ``max_time`` Timer on a clock that ticks one second per training step."""

    def __init__(self, seconds: int) -> None:
        super().__init__(duration={"seconds": seconds}, interval="step")
        self.now = 0.0

    def on_train_batch_end(self, trainer, *args, **kwargs):
        self.now = float(trainer.global_step)
        super().on_train_batch_end(trainer, *args, **kwargs)

    def time_elapsed(self, *args, **kwargs) -> float:
        return self.now


class Constant(Callback):
    """Logs a metric that never improves, for EarlyStopping."""

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.log("flat", 1.0)


@pytest.mark.parametrize(
    ("trainer_kw", "extra", "every", "expected"),
    [
        (dict(max_epochs=7), [], 5, [0, 5, 7]),
        (dict(max_epochs=5, max_steps=14), [], 1, [0, 1, 2, 2 + 2 / 6]),  # 6 per epoch
        (dict(max_epochs=5), [StopAfter(9)], 2, [0, 1.5]),
        (
            dict(max_epochs=20),
            [Constant(), EarlyStopping("flat", patience=1, check_on_train_epoch_end=True)],
            5,
            [0, 2],
        ),
        (dict(max_epochs=5), [StepClock(seconds=8)], 5, [0, 1 + 2 / 6]),
    ],
    ids=["max_epochs", "max_steps-mid-epoch", "should_stop", "early-stopping", "max_time"],
)
def test_the_final_weights_are_probed_once_however_training_stops(
    trainer_kw, extra, every, expected
):
    logger, model = RecordingLogger(), UserNet()
    cb = NeuralCollapseCallback(layers={"h": "body.3"}, pairs=[], every_n_epochs=every)
    trainer = _trainer([*extra, cb], logger, **trainer_kw)
    trainer.fit(model, _loader(shuffle=True))
    rows = _rows_at_steps(logger, "train")
    assert [r["epochs_trained"] for _, r in rows] == pytest.approx(expected)
    steps = [s for s, _ in rows]
    assert len(set(steps)) == len(steps) and steps[-1] == trainer.global_step
    x, y = _loader().dataset.tensors
    _, pred = _features(model, x, model.body[3])  # the final weights
    assert rows[-1][1][accuracy_key("train")] == pytest.approx(float(np.mean(pred == y.numpy())))


def test_a_resumed_run_does_not_probe_its_checkpoint_again(tmp_path):
    logger = RecordingLogger()
    cb = NeuralCollapseCallback(layers={"h": "body.3"}, pairs=[])
    seed_everything(0)
    trainer = _trainer([cb], logger, max_epochs=3, max_steps=9)
    trainer.fit(UserNet(), _loader())
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    assert [r["epochs_trained"] for _, r in _rows_at_steps(logger, "train")] == [0, 1, 1.5]
    again, cb2 = (
        RecordingLogger(),
        NeuralCollapseCallback(layers={"h": "body.3"}, pairs=[]),
    )
    _trainer([cb2], again, max_epochs=3).fit(
        UserNet(), _loader(), ckpt_path=tmp_path / "stopped.ckpt"
    )
    resumed = _rows_at_steps(again, "train")
    # Lightning starts the next epoch after a checkpoint stopped inside one (steps 9..15):
    # the half epoch is counted as such, and step 9 is not probed again
    assert [s for s, _ in resumed] == [15]
    assert [r["epochs_trained"] for _, r in resumed] == [2.5]
    assert cb2.epochs_trained == 2.5
    assert [r["epochs_trained"] for r in cb2.history] == [0, 1, 1.5, 2.5]


def test_val_probe_with_a_sparse_validation_schedule_and_plain_loaders():
    logger, model = RecordingLogger(), UserNet()
    cb = NeuralCollapseCallback(layers={"h": "body.3"}, probe="val", pairs=[])
    val = _loader(seed=2)
    _trainer([cb], logger, max_epochs=3, check_val_every_n_epoch=2).fit(model, _loader(), val)
    assert sorted(logger.probes("val")) == [0, 1, 2, 3]
    x, y = val.dataset.tensors
    _, pred = _features(model, x, model.body[3])
    assert logger.probes()[3][accuracy_key("val")] == pytest.approx(np.mean(pred == y.numpy()))


# -- 3. settings typed and validated at construction --------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(max_samples=0), "max_samples"),
        (dict(normalization="bogus"), "normalization"),
        (dict(coupling_range=(5.0, 1.0)), "coupling_range"),
        (dict(coupling=-1.0), "coupling"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(pool="max"), "pool"),
        (dict(pool={"h": "median"}), "pool"),
        (dict(output_fmt="NHWC"), "output_fmt"),
        (dict(width_mismatch="crop"), "width_mismatch"),
        (dict(cache_budget=-1), "cache_budget"),
        (dict(lambda_W=-1e-4), "lambda_W"),
        (dict(lambda_W=2.0, lambda_H=1.0), "lambda_W * lambda_H"),
        (dict(layers="penultimate"), "layers"),
        (dict(probe="holdout"), "probe"),
        (dict(probes=["train", "train"]), "probes"),
        (dict(num_classes=1), "num_classes"),
        (dict(log_figures="yes"), "log_figures"),
        (dict(snapshot_features=-1), "snapshot_features"),
        (dict(max_dim=0), "max_dim"),
        (dict(batch_size=0), "batch_size"),
        (dict(name="a b"), "name"),
    ],
)
def test_every_invalid_setting_is_refused_at_construction_in_one_line(kwargs, argument):
    with pytest.raises(ConfigurationError) as err:
        NeuralCollapseCallback(**kwargs)
    message = str(err.value)
    assert "\n" not in message and f"invalid {argument}=" in message and "valid:" in message


def test_settings_are_four_typed_groups_with_one_owner_each():
    cb = NeuralCollapseCallback(probes=["train", "val"], pool={"h": "cls"}, coupling=2, seed=3)
    s = cb.settings
    assert s.probe.names == ("train", "val") and s.probe.seed == 3
    assert s.features.pool_of("h") == "cls" and s.features.pool_of("other") == "avg"
    assert s.fit.coupling == 2.0 and isinstance(s.fit.coupling, float)
    assert s.outputs.log_figures is False
    with pytest.raises(AttributeError):
        s.fit.coupling = 3.0  # frozen


# -- 4. several probes, one owner -----------------------------------------------------------------
def test_one_callback_measures_several_probes_and_two_on_one_probe_are_refused():
    logger, model = RecordingLogger(), UserNet()
    cb = NeuralCollapseCallback(layers={"h": "body.3"}, probes=["train", "val"], pairs=[])
    train, val = _loader(), _loader(seed=3)
    _trainer([cb], logger).fit(model, train, val)
    row = logger.probes()[1]
    h, _ = _features(model, train.dataset.tensors[0], model.body[3])
    yt = train.dataset.tensors[1].numpy()
    means = np.stack([h[yt == k].mean(0) for k in range(K)])
    hv, pred = _features(model, val.dataset.tensors[0], model.body[3])
    nearest = ((hv[:, None] - means[None]) ** 2).sum(2).argmin(1)
    assert row[layer_key("val", "h", "nc4_train_means")] == pytest.approx(np.mean(pred != nearest))
    assert [r["epochs_trained"] for r in cb.history_of("val")] == [0, 1]
    twins = [cb, NeuralCollapseCallback(layers={"h": "body.3"}, probe="val", pairs=[])]
    with pytest.raises(ConfigurationError, match="two NeuralCollapseCallbacks measure the probe"):
        _trainer(twins).fit(UserNet(), train, val)


def test_the_cli_refuses_bad_settings_and_twin_callbacks_in_one_line(tmp_path, monkeypatch, capsys):
    from nclightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    quick = ["fit", "--config", "digits_mlp.yaml", "--trainer.max_epochs", "1"]
    for extra, expected in (
        (["--trainer.callbacks.init_args.normalization", "bogus"], "invalid normalization="),
        (["--trainer.callbacks+=nclightning.callbacks.NeuralCollapseCallback"], "two Neural"),
    ):
        assert main([*quick, *extra]) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("nclightning: error:")]
        assert "Traceback" not in err and len(lines) == 1 and expected in lines[0]


# -- 5. layouts decided by the module --------------------------------------------------------------
class Signal1d(LightningModule):
    """A 1-D CNN: a channels-first block ``Sequential(Conv1d, BatchNorm1d, ReLU)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU())
        self.swap = Swap()
        self.head = nn.Linear(6, K)

    def forward(self, x):
        h = self.block(x)
        return self.head(self.swap(h).mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Swap(nn.Module):
    """A parameterless leaf turning ``[B, C, L]`` into ``[B, L, C]``: its layout is unknowable."""

    def forward(self, h):
        return h.transpose(1, 2)


def _signals():
    x, y = _tensors(list(range(K)), 8)
    return DataLoader(TensorDataset(x.reshape(-1, 2, 4), y), batch_size=10)


def test_a_channels_first_1d_block_is_read_as_ncl_and_said(caplog):
    logger, model = RecordingLogger(), Signal1d()
    cb = NeuralCollapseCallback(
        layers={"b": "block", "s": "swap"}, output_fmt={"s": "NLC"}, pairs=[],
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        _trainer([cb], logger).fit(model, _signals())
    assert "b: 6 (NCL, avg)" in caplog.text and "s: 6 (NLC, avg)" in caplog.text
    x, y = _signals().dataset.tensors
    h, _ = _features(model, x, model.block)
    ref = reference_metrics(h.mean(2), y.numpy(), K)  # channels, averaged over the length
    row = logger.probes()[1]
    for alias in ("b", "s"):  # the same features read through both layouts
        assert row[layer_key("train", alias, "nc1_tilde")] == pytest.approx(ref["nc1_tilde"])


def test_an_undecidable_layout_asks_for_output_fmt():
    cb = NeuralCollapseCallback(layers={"s": "swap"}, pairs=[])
    with pytest.raises(ConfigurationError, match=r"output_fmt=\{'s': 'NCL'\}"):
        _trainer([cb]).fit(Signal1d(), _signals())


# -- 6. transformers and mapping batches -----------------------------------------------
class Sentences(Dataset):
    """Hugging Face style samples: ``input_ids``, ``attention_mask`` (right padding), ``labels``."""

    def __init__(self, n=24, length=7, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.ids = torch.randint(5, 40, (n, length), generator=g)
        self.ids[:, 0] = 1  # [CLS]
        self.ids[:, 1] = 10 + 5 * self.labels  # a class word
        lengths = 3 + torch.randint(0, length - 2, (n,), generator=g)
        self.mask = (torch.arange(length)[None] < lengths[:, None]).long()
        self.ids = self.ids * self.mask

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TextClassifier(LightningModule):
    """A user's LightningModule around ``BertForSequenceClassification`` (tiny, random)."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=48, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, num_labels=3,
        )  # fmt: skip
        self.model = BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_bert_with_mapping_batches_and_mask_aware_token_pools():
    # transformers and timm are test dependencies (the `models` extra): no skip when absent
    logger, model = RecordingLogger(), TextClassifier()
    layer = "model.bert.encoder.layer.1"
    cb = NeuralCollapseCallback(
        layers={"mean": layer, "cls": layer, "last": layer},
        pool={"mean": "mean", "cls": "cls", "last": "last"},
        pairs=[],
    )  # fmt: skip
    data = Sentences()
    _trainer([cb], logger).fit(model, DataLoader(data, batch_size=8, shuffle=True))
    model.eval()
    with torch.no_grad():
        out = model.model(input_ids=data.ids, attention_mask=data.mask, output_hidden_states=True)
    hidden = out.hidden_states[2].double()  # layer 1's output [N, T, d]
    mask = data.mask.double()
    last = data.mask.sum(1) - 1
    features = {
        "mean": (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
        "cls": hidden[:, 0],
        "last": hidden[torch.arange(len(data)), last],
    }
    row, y = logger.probes()[1], data.labels.numpy()
    for alias, h in features.items():
        ref = reference_metrics(h.numpy(), y, 3)
        assert row[layer_key("train", alias, "nc1_tilde")] == pytest.approx(ref["nc1_tilde"])
    accuracy = float((out.logits.argmax(1) == data.labels).double().mean())
    assert row[accuracy_key("train")] == pytest.approx(accuracy)


class ImageNet(LightningModule):
    """A user's LightningModule around a timm model."""

    def __init__(self, name, **kw):
        super().__init__()
        import timm

        torch.manual_seed(0)
        self.model = timm.create_model(name, pretrained=False, num_classes=K, **kw)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _images(size):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(20) % K
    return DataLoader(TensorDataset(torch.randn(20, 3, size, size, generator=g), y), batch_size=10)


@pytest.mark.parametrize(
    ("name", "kw", "size", "expected"),
    [
        (
            "vit_tiny_patch16_224",
            dict(img_size=16, patch_size=8, depth=2, embed_dim=16, num_heads=2),
            16,
            {"model.blocks.0": 16, "model.blocks.1": 16},
        ),
        (
            "convnext_atto",
            dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16)),
            32,
            {"model.stages.0": 8, "model.stages.1": 8, "model.stages.2": 16, "model.stages.3": 16},
        ),
    ],
    ids=["vit", "convnext"],
)
def test_timm_models_are_probed_at_the_blocks_their_feature_info_declares(name, kw, size, expected):
    logger, model = RecordingLogger(), ImageNet(name, **kw)
    pool = "cls" if "vit" in name else "avg"
    cb = NeuralCollapseCallback(layers="all", pool=pool, pairs=[])
    loader = _images(size)
    _trainer([cb], logger).fit(model, loader)
    assert {lp.alias: lp.dim for lp in cb.plan.layers} == expected
    first = next(iter(expected))
    h, pred = _features(model, loader.dataset.tensors[0], dict(model.named_modules())[first])
    h = h[:, 0] if "vit" in name else h.mean((2, 3))  # token 0 / average over space
    ref = reference_metrics(h, loader.dataset.tensors[1].numpy(), K)
    row = logger.probes()[1]
    assert row[layer_key("train", first, "nc1_tilde")] == pytest.approx(ref["nc1_tilde"], rel=1e-5)
    y = loader.dataset.tensors[1].numpy()
    assert row[accuracy_key("train")] == pytest.approx(float(np.mean(pred == y)))
    assert math.isfinite(row[layer_key("train", first, "nc1")])


def test_a_checkpoint_of_the_one_probe_layout_still_resumes():
    """State saved before ``probes`` existed: its history, subset and couplings carry over;
    the completed epochs come from the checkpoint, and its probed weights are not probed again."""
    from nclightning.callbacks import outputs

    cb = NeuralCollapseCallback(layers={"h": "body.3"}, pairs=[])
    old = {
        "settings": outputs.settings_record(cb.settings.record("train"), "train"),
        "subset": torch.arange(5),
        "history": [{"epochs_trained": 0.0}, {"epochs_trained": 2.0}],
        "couplings": {"h0->h": 3.0},
        "last_probed": 2,
        "token": "abc",
    }
    progress = {"fit_loop": {"epoch_progress": {"current": {"processed": 2}}}}
    cb.on_load_checkpoint(None, None, {"epoch": 1, "global_step": 12, "loops": progress})
    cb.load_state_dict(old)
    state = cb.state_dict()
    assert cb.epochs_trained == 2 and state["probed_step"] == 12 and state["token"] == "abc"
    assert torch.equal(state["probes"]["train"]["subset"], torch.arange(5))
    assert [r["epochs_trained"] for r in cb.history] == [0, 2] and cb.couplings == {"h0->h": 3.0}
