"""The model accessors callbacks rely on: ``feature_info``, ``get_classifier``, LayerwiseModel.

``feature_info`` is checked against what a forward pass actually produces (hooks on every
listed module): widths, spatial reductions, distinctness of the entries, and the aliases'
claim to be the same tensors as ``feature_layers``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nclightning.errors import ConfigurationError
from nclightning.models import CollapseClassifier, LayerwiseModel, build_backbone

# (name, input_shape, kwargs, number of entries)
CASES = [
    ("resnet18", (3, 32, 32), {"width": 8}, 9),  # stem + 7 blocks + pooled (= layer4.1 pooled)
    ("resnet18_imagenet", (3, 64, 64), {}, 9),
    ("vgg11_bn", (3, 32, 32), {"width": 8}, 9),  # 8 convs + pooled
    ("mlp", (64,), {"depth": 1, "width": 16}, 1),
    ("mlp", (64,), {"depth": 4, "width": 16}, 4),  # blocks.0-2 + penultimate
]
IDS = [f"{n}-{k.get('depth', '')}" for n, _, k, _ in CASES]


def _pool(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(2, 3)) if t.dim() == 4 else t


def _outputs(net: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of every named module of ``net`` on ``x`` (cloned: some ReLUs are in place)."""
    modules = dict(net.named_modules())
    got: dict[str, torch.Tensor] = {}
    hooks = [
        modules[n].register_forward_hook(lambda _m, _i, o, n=n: got.__setitem__(n, o.clone()))
        for n in names
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize(("name", "shape", "kwargs", "entries"), CASES, ids=IDS)
def test_feature_info_matches_a_forward_pass(name, shape, kwargs, entries):
    torch.manual_seed(0)
    net = build_backbone(name, shape, **kwargs).eval()
    info = net.feature_info
    assert len(info) == entries
    assert info[-1] == {
        "module": "",
        "num_chs": net.out_dim,
        "reduction": None,
        "alias": "penultimate",
    }
    names = [e["module"] for e in info]
    x = torch.randn(2, *shape)
    out = _outputs(net, [*names, *net.feature_layers.values()], x)
    for e in info:
        h = out[e["module"]]
        assert _pool(h).shape == (2, e["num_chs"]), e
        if e["reduction"] is None:
            assert h.dim() == 2, e
        else:
            assert h.dim() == 4 and shape[1] // h.shape[2] == e["reduction"], e
        if e["alias"] is not None:  # the alias's features, exactly
            assert torch.equal(_pool(h), _pool(out[net.feature_layers[e["alias"]]])), e
    pooled = [_pool(out[n]) for n in names]
    for i in range(len(pooled)):
        for j in range(i):
            same = pooled[i].shape == pooled[j].shape and torch.allclose(pooled[i], pooled[j])
            assert not same, (names[j], names[i])


@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_the_block_left_out_is_the_penultimate_feature(name):
    """ResNet: pooled layer4.1 = penultimate; MLP: the last block's output = penultimate."""
    kwargs = {"width": 4} if name == "resnet18" else {"depth": 3, "width": 8}
    shape = (3, 16, 16) if name == "resnet18" else (10,)
    last = "layer4.1" if name == "resnet18" else "blocks.2"
    net = build_backbone(name, shape, **kwargs).eval()
    assert last not in {e["module"] for e in net.feature_info}
    out = _outputs(net, [last, ""], torch.randn(3, *shape))
    torch.testing.assert_close(_pool(out[last]), out[""], rtol=1e-6, atol=1e-7)


def test_classifier_accessors():
    model = CollapseClassifier(5, (3, 16, 16), backbone="resnet18", backbone_kwargs={"width": 4})
    assert model.get_classifier() is model.classifier
    assert isinstance(model.get_classifier(), nn.Linear)
    names = dict(model.named_modules())
    info = model.feature_info
    assert info[-1]["module"] == "backbone" and info[-1]["alias"] == "penultimate"
    assert info[0]["module"] == "backbone.relu"
    widths = [e["num_chs"] for e in model.backbone.feature_info]
    assert [e["num_chs"] for e in info] == widths
    assert all(e["module"] in names for e in info)
    assert model.get_classifier().in_features == info[-1]["num_chs"]


def test_collapse_classifier_is_a_layerwise_model_with_the_mlp():
    model = CollapseClassifier(3, (6,), backbone_kwargs={"depth": 3, "width": 5}).eval()
    assert isinstance(model, LayerwiseModel)
    blocks = model.layerwise_blocks()
    assert blocks is model.backbone.blocks and len(blocks) == 3
    x = torch.randn(4, 6)
    for depth in (1, 2, 3):
        model.set_layerwise_depth(depth)
        expected = x
        for block in blocks[:depth]:
            expected = block(expected)
        torch.testing.assert_close(model(x), model.get_classifier()(expected))
    with pytest.raises(ConfigurationError, match=r"active_depth must be in 1\.\.3"):
        model.set_layerwise_depth(4)


def test_other_backbones_refuse_layerwise_growth_clearly():
    model = CollapseClassifier(3, (3, 8, 8), backbone="vgg11_bn", backbone_kwargs={"width": 4})
    for call in (model.layerwise_blocks, lambda: model.set_layerwise_depth(1)):
        with pytest.raises(ConfigurationError, match=r"'mlp' backbone.*LayerwiseModel"):
            call()
