"""CollapseClassifier: losses, weight-decay groups, optimisers/schedules, logging, a tiny fit."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from nclightning.models import CollapseClassifier
from nclightning.models.classifier import EpochLR, mse_loss


def _trainer(**kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kwargs})


def _blobs(k: int = 4, n: int = 24, d: int = 8, seed: int = 0) -> TensorDataset:
    """Linearly separable Gaussian blobs: class c centred at 3 e_c, std 0.3."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n)
    x = 3.0 * torch.eye(k, d)[y] + 0.3 * torch.randn(k * n, d, generator=g)
    return TensorDataset(x, y)


# -- forward and losses -------------------------------------------------------------------------
def test_forward_is_linear_map_of_features():
    torch.manual_seed(0)
    model = CollapseClassifier(3, (2, 4), backbone_kwargs={"depth": 2, "width": 5}).eval()
    x = torch.randn(6, 2, 4)
    h = model.features(x)
    assert h.shape == (6, 5)
    torch.testing.assert_close(h, model.backbone(x))
    W, b = model.classifier.weight, model.classifier.bias
    torch.testing.assert_close(model(x), h @ W.T + b)
    assert CollapseClassifier(3, (8,), bias=False).classifier.bias is None


def _ce_by_hand(z: list[list[float]], y: list[int]) -> float:
    return sum(math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(z, y)) / len(y)


def _mse_by_hand(z: list[list[float]], y: list[int], M: float, k: float) -> float:
    total = 0.0
    for row, t in zip(z, y):
        for c, v in enumerate(row):
            total += k * (v - M) ** 2 if c == t else v**2
    return total / (2 * len(y))


Z = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75], [-2.0, 0.0, 1.0], [0.1, 0.2, 0.3]]
Y = [2, 0, 1, 1]


@pytest.mark.parametrize(("M", "k"), [(1.0, 1.0), (3.0, 2.0), (0.5, 0.1)])
def test_mse_loss_matches_hand_computation(M, k):
    got = mse_loss(torch.tensor(Z, dtype=torch.float64), torch.tensor(Y), M, k)
    assert got.item() == pytest.approx(_mse_by_hand(Z, Y, M, k), rel=1e-12)


def test_mse_is_paper_data_term():
    """M = k = 1: 1/(2N) ||W H + b 1^T - Y||_F^2, features as columns (docs/science.md §9.8)."""
    torch.manual_seed(1)
    model = CollapseClassifier(3, (4,), loss="mse", backbone_kwargs={"depth": 1, "width": 6})
    model = model.double()
    x, y = torch.randn(5, 4).double(), torch.tensor([0, 1, 2, 2, 1])
    H = model.features(x).T  # d x N
    W, b = model.classifier.weight, model.classifier.bias
    Yoh = torch.eye(3, dtype=torch.float64)[:, y]  # K x N one-hot
    expected = ((W @ H + b[:, None] - Yoh) ** 2).sum() / (2 * 5)
    torch.testing.assert_close(model.loss_fn(model(x), y), expected)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_model_loss_fn_uses_configured_loss(loss):
    model = CollapseClassifier(3, (4,), loss=loss, mse_target_scale=2.0, mse_true_class_weight=3.0)
    got = model.loss_fn(torch.tensor(Z, dtype=torch.float64), torch.tensor(Y)).item()
    ref = _ce_by_hand(Z, Y) if loss == "ce" else _mse_by_hand(Z, Y, 2.0, 3.0)
    assert got == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "hinge"}, "unknown loss 'hinge'; valid choices: ce, mse"),
        ({"optimizer": "adam"}, "valid choices: sgd, adamw"),
        ({"scheduler": "step"}, "valid choices: multistep, cosine, none"),
        ({"backbone": "vit"}, "unknown backbone 'vit'; valid choices: resnet18"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CollapseClassifier(**{"num_classes": 3, "input_shape": (4,), **kwargs})


# -- weight-decay groups ------------------------------------------------------------------------
def _group_names(model: CollapseClassifier, groups) -> dict[str, list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}


@pytest.mark.parametrize(("cwd", "expected_cwd"), [(None, 5e-4), (0.0, 0.0), (1e-3, 1e-3)])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_decay_groups(cwd, expected_cwd, bias):
    model = CollapseClassifier(
        10,
        (3, 8, 8),
        backbone="resnet18",
        backbone_kwargs={"width": 4},
        bias=bias,
        weight_decay=5e-4,
        classifier_weight_decay=cwd,
    )
    groups = model.parameter_groups()
    names = _group_names(model, groups)
    all_names = [n for n, _ in model.named_parameters()]
    backbone_names = [n for n in all_names if n.startswith("backbone.")]
    assert names["features"] == backbone_names
    # BN affine parameters and biases are decayed with the features (docs/science.md §6.1).
    assert "backbone.bn1.weight" in names["features"] and "backbone.bn1.bias" in names["features"]
    assert names["classifier"] == (
        ["classifier.weight", "classifier.bias"] if bias else ["classifier.weight"]
    )
    flat = names["features"] + names["classifier"]
    assert len(flat) == len(set(flat)) and sorted(flat) == sorted(all_names)
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay == {"features": 5e-4, "classifier": expected_cwd}
    # The optimizer receives exactly these groups.
    opt = model.configure_optimizers()["optimizer"]
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        (g["name"], g["weight_decay"], len(g["params"])) for g in groups
    ]


def test_frozen_parameters_are_left_out():
    model = CollapseClassifier(3, (4,), backbone_kwargs={"depth": 3, "width": 5})
    for p in model.backbone.blocks[:2].parameters():
        p.requires_grad_(False)
    names = _group_names(model, model.parameter_groups())
    assert names == {
        "features": ["backbone.blocks.2.0.weight", "backbone.blocks.2.0.bias"],
        "classifier": ["classifier.weight", "classifier.bias"],
    }
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert [g["name"] for g in model.parameter_groups()] == ["classifier"]


def test_weight_decay_is_applied_per_group():
    """With zero gradients, one SGD step shrinks each group by exactly (1 - lr * wd)."""
    model = CollapseClassifier(
        3,
        (4,),
        backbone_kwargs={"depth": 1, "width": 2},
        weight_decay=0.1,
        classifier_weight_decay=0.0,
        lr=0.5,
        momentum=0.0,
        scheduler="none",
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = model.configure_optimizers()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1.0 - 0.5 * 0.1 if n.startswith("backbone.") else 1.0
        torch.testing.assert_close(p.detach(), factor * before[n])


# -- optimizers and schedules -------------------------------------------------------------------
def test_sgd_and_adamw_settings():
    model = CollapseClassifier(3, (4,), lr=0.2, momentum=0.8, nesterov=True, scheduler="none")
    opt = model.configure_optimizers()
    assert type(opt) is torch.optim.SGD
    assert all(
        (g["lr"], g["momentum"], g["nesterov"]) == (0.2, 0.8, True) for g in opt.param_groups
    )
    model = CollapseClassifier(3, (4,), optimizer="adamw", lr=1e-3, classifier_weight_decay=0.0)
    conf = model.configure_optimizers()
    assert type(conf["optimizer"]) is torch.optim.AdamW
    assert [g["weight_decay"] for g in conf["optimizer"].param_groups] == [5e-4, 0.0]
    assert conf["lr_scheduler"]["interval"] == "epoch"


def _lrs(scheduler, epochs: int) -> list[float]:
    out = []
    for _ in range(epochs):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_multistep_matches_torch_multisteplr():
    model = CollapseClassifier(3, (4,), lr=0.05, milestones=[3, 5], gamma=0.1)
    ours = _lrs(model.configure_optimizers()["lr_scheduler"]["scheduler"], 8)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    ref = _lrs(torch.optim.lr_scheduler.MultiStepLR(ref_opt, [3, 5], gamma=0.1), 8)
    assert ours == pytest.approx(ref, rel=1e-12)
    assert ours == pytest.approx([0.05] * 3 + [0.005] * 2 + [0.0005] * 3, rel=1e-12)


def test_cosine_matches_torch_and_needs_max_epochs():
    model = CollapseClassifier(3, (4,), lr=0.1, scheduler="cosine")
    with pytest.raises(ValueError, match="max_epochs"):
        model.configure_optimizers()
    model.trainer = _trainer(max_epochs=10)
    ours = _lrs(model.configure_optimizers()["lr_scheduler"]["scheduler"], 10)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = _lrs(torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=10), 10)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_warmup_and_none_schedules():
    assert [EpochLR("none", warmup_epochs=3)(e) for e in range(5)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0]
    )
    cos = EpochLR("cosine", warmup_epochs=2, max_epochs=6)
    c = math.cos(math.pi / 4)  # cosine over the 4 epochs after warm-up
    expected = [1 / 3, 2 / 3, 1.0, 0.5 * (1 + c), 0.5, 0.5 * (1 - c), 0.0]
    assert [cos(e) for e in range(7)] == pytest.approx(expected)
    assert CollapseClassifier(3, (4,), scheduler="none").configure_optimizers().__class__ is (
        torch.optim.SGD
    )


# -- channels_last, hyper-parameters, CLI signature ---------------------------------------------
def test_channels_last_gives_same_logits():
    torch.manual_seed(0)
    kw = dict(
        num_classes=4, input_shape=(3, 8, 8), backbone="vgg11_bn", backbone_kwargs={"width": 4}
    )
    ref = CollapseClassifier(**kw).eval()
    cl = CollapseClassifier(**kw, channels_last=True).eval()
    cl.load_state_dict(ref.state_dict())
    conv = cl.backbone.features[0][0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(cl(x), ref(x))
    assert not CollapseClassifier(4, (12,), channels_last=True).use_channels_last


def test_hparams_and_jsonargparse_signature():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CollapseClassifier, "model")
    cfg = parser.parse_args(
        [
            "--model.num_classes=10",
            "--model.input_shape=[1, 8, 8]",
            "--model.backbone_kwargs={depth: 2, width: 16}",
            "--model.milestones=[40, 80, 120]",
            "--model.classifier_weight_decay=0.0",
        ]
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # < 4.49
    model = instantiate(cfg).model
    assert model.hparams.num_classes == 10 and tuple(model.hparams.milestones) == (40, 80, 120)
    assert model.backbone.out_dim == 16 and model.hparams.classifier_weight_decay == 0.0
    with pytest.raises(Exception, match="loss"):
        parser.parse_args(["--model.num_classes=10", "--model.input_shape=[4]", "--model.loss=l1"])


# -- training -----------------------------------------------------------------------------------
class _RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("loss", "bias"), [("ce", True), ("mse", False)], ids=["ce-bias", "mse-nobias"]
)
def test_fit_reaches_full_train_accuracy_and_logs(loss, bias):
    torch.manual_seed(0)
    data = _blobs()
    model = CollapseClassifier(
        4,
        (8,),
        backbone_kwargs={"depth": 2, "width": 32},
        loss=loss,
        bias=bias,
        lr=0.05,
        milestones=[6],
        gamma=0.5,
    )
    record = _RecordLR()
    trainer = _trainer(max_epochs=8, callbacks=[record], limit_val_batches=0)
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True))
    assert trainer.callback_metrics["train/acc"].item() == 1.0
    assert "train/loss" in trainer.callback_metrics
    assert record.lrs == pytest.approx([0.05] * 6 + [0.025] * 2)
    with torch.no_grad():
        assert (model.eval()(data.tensors[0]).argmax(1) == data.tensors[1]).all()


def test_validate_and_test_log_sample_weighted_epoch_metrics():
    """val/test metrics equal accuracy and mean loss over all samples (uneven last batch)."""
    torch.manual_seed(0)
    data = _blobs(n=13, seed=1)  # 52 samples -> batches of 16, 16, 16, 4
    model = CollapseClassifier(4, (8,), backbone_kwargs={"depth": 1, "width": 8}).eval()
    with torch.no_grad():
        logits = model(data.tensors[0]).double()
    y = data.tensors[1]
    acc = (logits.argmax(1) == y).double().mean().item()
    loss = _ce_by_hand(logits.tolist(), y.tolist())
    assert 0.0 < acc < 1.0  # untrained: a non-trivial value to compare
    loader = DataLoader(data, batch_size=16)
    trainer = _trainer()
    (val,) = trainer.validate(model, loader, verbose=False)
    (test,) = trainer.test(model, loader, verbose=False)
    for res, stage in ((val, "val"), (test, "test")):
        assert res[f"{stage}/acc"] == pytest.approx(acc, abs=1e-6)
        assert res[f"{stage}/loss"] == pytest.approx(loss, rel=1e-5)
