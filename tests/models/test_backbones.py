"""Backbones: output shapes, feature layers (hooked), architecture facts, registry errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from nclightning.models import BACKBONES, CollapseClassifier, build_backbone

# (name, input_shape, kwargs, expected out_dim, expected next block after h0 or None)
CASES = [
    ("resnet18", (3, 32, 32), {}, 512, "layer4.1"),
    ("resnet18", (1, 28, 28), {"width": 8}, 64, "layer4.1"),
    ("resnet18", (3, 8, 8), {"width": 4}, 32, "layer4.1"),
    ("resnet18_imagenet", (3, 64, 64), {}, 512, "layer4.1"),
    ("resnet18_imagenet", (1, 28, 28), {}, 512, "layer4.1"),
    ("vgg11_bn", (3, 32, 32), {}, 512, "features.4.1"),
    ("vgg11_bn", (1, 8, 8), {"width": 8}, 64, "features.4.1"),
    ("mlp", (64,), {"depth": 1, "width": 16}, 16, None),
    ("mlp", (64,), {"depth": 2, "width": 16}, 16, "blocks.1"),
    ("mlp", (1, 28, 28), {"depth": 4, "width": 32, "batch_norm": True}, 32, "blocks.3"),
    ("mlp", (3, 8, 8), {}, 512, "blocks.2"),
]
IDS = [f"{n}-{'x'.join(map(str, s))}-{k}" for n, s, k, _, _ in CASES]


def _pool(t: torch.Tensor) -> torch.Tensor:
    """Global average pool 4-D maps ``[B, C, h, w] -> [B, C]``; vectors unchanged."""
    return t.mean(dim=(2, 3)) if t.dim() == 4 else t


@pytest.mark.parametrize(("name", "shape", "kwargs", "out_dim", "next_block"), CASES, ids=IDS)
def test_output_shape_and_feature_layers(name, shape, kwargs, out_dim, next_block):
    torch.manual_seed(0)
    net = build_backbone(name, shape, **kwargs).eval()
    x = torch.randn(3, *shape)
    modules = dict(net.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        modules[layer].register_forward_hook(
            lambda _m, _i, out, alias=alias: captured.__setitem__(alias, out)
        )
        for alias, layer in net.feature_layers.items()
    ]
    if next_block is not None:
        hooks.append(
            modules[next_block].register_forward_pre_hook(
                lambda _m, inp: captured.__setitem__("next_input", inp[0])
            )
        )
    with torch.no_grad():
        out = net(x)
    for h in hooks:
        h.remove()

    assert net.out_dim == out_dim
    assert out.shape == (3, out_dim)
    assert set(net.feature_layers) == ({"penultimate", "h0"} if next_block else {"penultimate"})
    assert torch.equal(captured["penultimate"], out)
    if next_block is not None:
        # h0 is exactly the input of the last same-width block, and has the penultimate width.
        assert torch.equal(captured["h0"], captured["next_input"])
        assert _pool(captured["h0"]).shape == (3, out_dim)


@pytest.mark.parametrize(("name", "shape", "kwargs", "out_dim", "next_block"), CASES[::3])
def test_classifier_prefixes_feature_layers(name, shape, kwargs, out_dim, next_block):
    model = CollapseClassifier(5, shape, backbone=name, backbone_kwargs=kwargs)
    names = dict(model.named_modules())
    assert model.feature_layers["penultimate"] == "backbone"
    for alias, layer in model.backbone.feature_layers.items():
        full = model.feature_layers[alias]
        assert full == ("backbone." + layer if layer else "backbone")
        assert names[full] is dict(model.backbone.named_modules())[layer]


def test_cifar_resnet18_matches_torchvision_layout():
    net = build_backbone("resnet18", (3, 32, 32))
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.padding == (1, 1)
    # torchvision resnet18: same parameter names and shapes except the 7x7 stem and the fc.
    ref = torchvision.models.resnet18(weights=None).state_dict()
    ours = net.state_dict()
    expected = {k for k in ref if not k.startswith("fc.")}
    assert set(ours) == expected
    for k in expected - {"conv1.weight"}:
        assert ours[k].shape == ref[k].shape, k
    assert ours["conv1.weight"].shape == (64, 3, 3, 3)
    # The well-known CIFAR ResNet-18 count (11,173,962 with a 10-way fc) minus the fc.
    assert sum(p.numel() for p in net.parameters()) == 11_173_962 - (512 * 10 + 10)
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        assert [type(b).__name__ for b in layer] == ["BasicBlock", "BasicBlock"]


def test_cifar_resnet18_spatial_sizes():
    net = build_backbone("resnet18", (3, 32, 32), width=4).eval()
    sizes = {}
    for n in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        getattr(net, n).register_forward_hook(
            lambda _m, _i, out, n=n: sizes.__setitem__(n, tuple(out.shape[1:]))
        )
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
    assert sizes == {
        "conv1": (4, 32, 32),
        "layer1": (4, 32, 32),
        "layer2": (8, 16, 16),
        "layer3": (16, 8, 8),
        "layer4": (32, 4, 4),
    }


def test_imagenet_resnet18_is_torchvision_without_fc():
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    ref.fc = nn.Identity()
    net = build_backbone("resnet18_imagenet", (3, 32, 32)).eval()
    net.load_state_dict(ref.state_dict())  # identical names and shapes (strict)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))
    assert any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    gray = build_backbone("resnet18_imagenet", (1, 28, 28))
    assert gray.conv1.in_channels == 1
    assert (gray.conv1.kernel_size, gray.conv1.stride) == ((7, 7), (2, 2))


def test_vgg11_bn_matches_torchvision_convs():
    net = build_backbone("vgg11_bn", (3, 32, 32))
    vgg = torchvision.models.vgg
    ref = vgg.make_layers(vgg.cfgs["A"], batch_norm=True)  # == vgg11_bn(weights=None).features
    ours_convs = [m.weight.shape for m in net.modules() if isinstance(m, nn.Conv2d)]
    ref_convs = [m.weight.shape for m in ref.modules() if isinstance(m, nn.Conv2d)]
    assert ours_convs == ref_convs  # 8 convs: 64, 128, 256x2, 512x4
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert n_bn == sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules()) == 8
    # Same parameters as torchvision's feature extractor, up to the conv biases we drop (BN).
    conv_biases = sum(m.bias.numel() for m in ref.modules() if isinstance(m, nn.Conv2d))
    assert sum(p.numel() for p in net.parameters()) == (
        sum(p.numel() for p in ref.parameters()) - conv_biases
    )


def test_mlp_structure_and_activations():
    net = build_backbone("mlp", (2, 3), depth=3, width=7, activation="tanh", batch_norm=True)
    assert [type(m).__name__ for m in net.blocks[0]] == ["Linear", "BatchNorm1d", "Tanh"]
    assert net.blocks[0][0].in_features == 6 and net.blocks[0][0].bias is None
    assert all(b[0].out_features == 7 for b in net.blocks)
    plain = build_backbone("mlp", (5,), depth=2, width=4, activation="gelu")
    assert [type(m).__name__ for m in plain.blocks[1]] == ["Linear", "GELU"]
    assert plain.blocks[1][0].bias is not None


def test_mlp_identity_activation_is_affine():
    torch.manual_seed(0)
    net = build_backbone("mlp", (6,), depth=3, width=5, activation="identity").double()
    x, y, zero = torch.randn(4, 6).double(), torch.randn(4, 6).double(), torch.zeros(4, 6).double()
    with torch.no_grad():
        f = lambda t: net(t) - net(zero)  # noqa: E731
        torch.testing.assert_close(f(2.0 * x - 3.0 * y), 2.0 * f(x) - 3.0 * f(y))
        weight = net.blocks[2][0].weight @ net.blocks[1][0].weight @ net.blocks[0][0].weight
        torch.testing.assert_close(f(x), x @ weight.T)


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'") as info:
        build_backbone("resnet50", (3, 32, 32))
    for name in BACKBONES:
        assert name in str(info.value)
    assert set(BACKBONES) == {"resnet18", "resnet18_imagenet", "mlp", "vgg11_bn"}


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dept'\].*depth, width"):
        build_backbone("mlp", (4,), dept=3)


@pytest.mark.parametrize("name", ["resnet18", "resnet18_imagenet", "vgg11_bn"])
def test_conv_nets_need_image_shapes(name):
    with pytest.raises(ValueError, match=rf"{name}.*\(C, H, W\).*\(64,\)"):
        build_backbone(name, (64,))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"depth": 0}, "depth >= 1"), ({"activation": "sigmoid"}, "relu.*tanh")],
)
def test_mlp_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone("mlp", (4,), **kwargs)


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("resnet18", (3, 8, 8), {"width": 4}),
        ("resnet18_imagenet", (1, 32, 32), {}),
        ("vgg11_bn", (3, 8, 8), {"width": 4}),
        ("mlp", (3, 8, 8), {"depth": 3, "width": 8, "batch_norm": True}),
    ],
)
def test_every_parameter_gets_a_gradient(name, shape, kwargs):
    """No dead module: a loss on the features reaches every backbone parameter."""
    torch.manual_seed(0)
    net = build_backbone(name, shape, **kwargs).train()
    out = net(torch.randn(4, *shape))
    (out * torch.randn_like(out)).sum().backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
