"""Forward hooks that turn module outputs into feature rows ``[B, d]`` during a probe.

Each tapped module's output is reduced *inside its hook*: a later in-place change of that
tensor (``nn.ReLU(inplace=True)`` after a ``Linear``, torchvision's ``out += identity`` after a
``BatchNorm2d``) cannot reach the features, which are always the module's own output. An
output object (Hugging Face) is read at its ``last_hidden_state`` (or ``logits``); a tuple
at its first entry.

Layouts (``output_fmt``, as timm's): ``"NCHW"``/``"NCL"`` put channels on dim 1 and any
trailing dims are positions (``[B, C, *spatial]``); ``"NLC"`` puts channels last and dims
``1..-2`` are positions (``[B, T, d]`` tokens). ``"auto"`` reads a 2-D output as ``[B, d]``, a
4-D or larger output as NCHW, and decides a 3-D output by the module (:func:`layout_of`):
NCL when it is, or its last feature-producing layer is, a channels-first 1-D layer
(``Conv1d``, ``BatchNorm1d``, 1-D pooling, instance or group norm), NLC when that layer is
any other layer with weights (``Linear``, ``LayerNorm``, attention); with no such layer (an
activation, a custom leaf) the layout cannot be decided and ``output_fmt`` is asked for.

Pooling over the positions (``pool``, per layer if a mapping): ``"avg"`` averages every
position; ``"mean"`` averages the tokens the batch's ``attention_mask`` keeps (every position
without a mask); ``"cls"`` takes token 0; ``"last"`` the last unpadded token (causal models);
``"flatten"`` keeps them all (``d = C * prod(spatial)``). Optionally a fixed projection
``P [d, max_dim]`` maps wide layers to ``max_dim`` features.

The classifier module is hooked too: its output (the logits) gives the predictions that
accuracy and NC4 use, and its input tells which tapped layer feeds it (``nc3``, ``unc3``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nclightning.callbacks.layers import first_tensor
from nclightning.callbacks.settings import OUTPUT_FORMATS, POOLS
from nclightning.callbacks.sources import call_model
from nclightning.errors import ConfigurationError

__all__ = ["OUTPUT_FORMATS", "LayerTaps", "features_of", "layout_of"]

_CHANNELS_FIRST_1D = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.GroupNorm,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
    nn.LPPool1d,
)


def layout_of(module: nn.Module, ndim: int, fmt: str = "auto", name: str = "") -> str:
    """The layout of a ``ndim``-dim output of ``module``: ``"BD"`` (rows), ``"NCHW"``,
    ``"NCL"`` or ``"NLC"`` (the module docstring's rule for ``"auto"``)."""
    if ndim <= 2:
        return "BD"
    if fmt != "auto":
        return "NCL" if fmt == "NCHW" and ndim == 3 else fmt
    if ndim >= 4:
        return "NCHW"
    deciding = [
        m
        for m in module.modules()
        if isinstance(m, _CHANNELS_FIRST_1D)
        or (not any(True for _ in m.children()) and any(True for _ in m.parameters(False)))
    ]
    if not deciding:
        raise ConfigurationError(
            f"the layout of layer {name or type(module).__name__!r} ({type(module).__name__}, "
            "a 3-D output) cannot be decided from its layers; pass output_fmt={"
            f"{name!r}: 'NCL'}} (channels first) or 'NLC' (tokens, channels last)"
        )
    return "NCL" if isinstance(deciding[-1], _CHANNELS_FIRST_1D) else "NLC"


def features_of(
    output: Any,
    module: nn.Module,
    fmt: str = "auto",
    pool: str = "avg",
    mask: Tensor | None = None,
    name: str = "",
) -> Tensor:
    """Rows ``[B, d]`` of one module output (a tensor, a tuple starting with one, or an output
    object); ``mask [B, T]`` (1: a real token) is used by ``pool="mean"``/``"last"``."""
    out = first_tensor(output)
    if not isinstance(out, Tensor):
        raise ConfigurationError(
            f"a tapped {type(module).__name__} returned {type(output).__name__}, not a tensor; "
            "tap a module whose output is a feature tensor"
        )
    out = out.detach()
    if out.ndim == 1:
        return out.unsqueeze(1).clone()
    if out.ndim == 2:
        return out.clone()
    if layout_of(module, out.ndim, fmt, name) == "NLC":
        out = out.movedim(-1, 1)  # [B, d, *positions]
    out = out.flatten(2)  # [B, d, P]
    if pool == "flatten":
        return out.flatten(1).clone()
    if pool == "cls":
        return out[:, :, 0].clone()
    keep = None
    if mask is not None and mask.ndim == 2 and mask.shape == (out.shape[0], out.shape[2]):
        keep = mask.to(device=out.device) != 0
    if pool == "last":
        if keep is None:
            return out[:, :, -1].clone()
        positions = torch.arange(out.shape[2], device=out.device).expand_as(keep)
        last = torch.where(keep, positions, -1).amax(1).clamp(min=0)
        return out[torch.arange(out.shape[0], device=out.device), :, last].clone()
    if pool == "mean" and keep is not None:
        w = keep.to(out.dtype).unsqueeze(1)  # [B, 1, T]
        return (out * w).sum(2) / w.sum(2).clamp(min=1)
    return out.mean(2)  # a new tensor: the module's own values


class LayerTaps:
    """Hooks on the tapped modules (``alias -> module name``) and on the classifier.

    Use as a context manager (hooks removed on exit, also on error). After each forward,
    :meth:`pop` returns ``(features, logits)``: ``alias -> [B, d]`` (the output dtype, e.g.
    bfloat16 under autocast) and the classifier's ``[B, K]`` output, or ``None``.
    :meth:`feeding` names the aliases whose features equal the classifier's input.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, str],
        *,
        classifier: str | None = None,
        pool: str | Mapping[str, str] = "avg",
        output_fmt: str | Mapping[str, str] = "auto",
        projections: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.model, self.layers = model, dict(layers)
        self.classifier, self._pool = classifier, pool
        self._fmt = output_fmt
        self._mask: Tensor | None = None
        self.layouts: dict[str, str] = {}
        self._projections = dict(projections or {})
        self._modules = dict(model.named_modules())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._features: dict[str, Tensor] = {}
        self._logits: Tensor | None = None
        self._classifier_input: Tensor | None = None

    def fmt(self, alias: str) -> str:
        fmt = self._fmt.get(alias, "auto") if isinstance(self._fmt, Mapping) else self._fmt
        if fmt not in OUTPUT_FORMATS:
            raise ConfigurationError(
                f"output_fmt {fmt!r} for {alias!r}: choose from {OUTPUT_FORMATS}"
            )
        return fmt

    def pool(self, alias: str) -> str:
        pool = self._pool.get(alias, "avg") if isinstance(self._pool, Mapping) else self._pool
        if pool not in POOLS:
            raise ConfigurationError(f"pool {pool!r} for {alias!r}: choose from {POOLS}")
        return pool

    def _hook(self, alias: str) -> Callable[[nn.Module, Any, Any], None]:
        fmt, pool, proj = self.fmt(alias), self.pool(alias), self._projections.get(alias)
        name = alias  # errors name the layer as the user's settings do

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if alias not in self.layouts:
                out = first_tensor(output)
                ndim = out.ndim if isinstance(out, Tensor) else 2
                layout = layout_of(module, ndim, fmt, name)
                self.layouts[alias] = layout if layout == "BD" else f"{layout}, {pool}"
            h = features_of(output, module, fmt, pool, self._mask, name)
            if proj is not None:
                h = h.to(proj.dtype) @ proj.to(h.device)
            self._features[alias] = h

        return hook

    def _classifier_pre_hook(self, module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], Tensor):
            self._classifier_input = args[0].detach().clone()

    def _classifier_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            self._logits = output.detach()

    def __enter__(self) -> LayerTaps:
        for alias, name in self.layers.items():
            self._handles.append(self._modules[name].register_forward_hook(self._hook(alias)))
        if self.classifier is not None:
            head = self._modules[self.classifier]
            self._handles.append(head.register_forward_pre_hook(self._classifier_pre_hook))
            self._handles.append(head.register_forward_hook(self._classifier_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._features.clear()
        self._logits = self._classifier_input = None

    def forward(self, x: Any) -> tuple[dict[str, Tensor], Tensor | None]:
        """Run the model on ``x`` (a mapping goes in as keyword arguments); ``(features,
        logits)`` of this batch.

        A model whose ``forward`` returns embeddings without calling its classifier gets the
        classifier applied to that output (when the widths match), so predictions always come
        from the classifier.
        """
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        self._mask = mask if isinstance(mask, Tensor) else None
        try:
            out = call_model(self.model, x)
        finally:
            self._mask = None
        if self.classifier is not None and self._logits is None:
            head = self._modules[self.classifier]
            width = getattr(head, "in_features", None)
            if isinstance(out, Tensor) and out.ndim == 2 and out.shape[1] == width:
                head(out)
        return self.pop()

    def pop(self) -> tuple[dict[str, Tensor], Tensor | None]:
        features, logits = self._features, self._logits
        self._features, self._logits = {}, None
        return features, logits

    def feeding(self, features: Mapping[str, Tensor]) -> list[str]:
        """Aliases whose features of the last batch equal the classifier's last input."""
        x = self._classifier_input
        if x is None or x.ndim != 2:
            return []
        return [a for a, h in features.items() if h.shape == x.shape and torch.equal(h, x)]
