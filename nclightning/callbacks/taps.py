"""Forward hooks that turn module outputs into feature rows ``[B, d]`` during a probe.

Each tapped module's output is reduced *inside its hook*: a later in-place change of that
tensor (``nn.ReLU(inplace=True)`` after a ``Linear``, torchvision's ``out += identity`` after a
``BatchNorm2d``) cannot reach the features, which are always the module's own output.

Layouts (``output_fmt``, as timm's): ``"NCHW"`` puts channels on dim 1 and any trailing dims
are spatial (``[B, C, *spatial]``); ``"NLC"`` puts channels last and dims ``1..-2`` are
positions (``[B, T, d]`` tokens). ``"auto"`` reads a 2-D output as ``[B, d]``, a 4-D or larger
output as NCHW, and a 3-D output as NLC unless the module is a channels-first 1-D layer (a
``Conv1d``, ``BatchNorm1d``, 1-D pooling or instance norm: NCL). ``pool="avg"`` averages over
the spatial dims or positions; ``pool="flatten"`` keeps them (``d = C * prod(spatial)``).
Optionally a fixed projection ``P [d, max_dim]`` maps wide layers to ``max_dim`` features.

The classifier module is hooked too: its output (the logits) gives the predictions that
accuracy and NC4 use, and its input tells which tapped layer feeds it (``nc3``, ``unc3``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nclightning.errors import ConfigurationError

__all__ = ["OUTPUT_FORMATS", "LayerTaps", "features_of"]

OUTPUT_FORMATS = ("auto", "NCHW", "NLC")
_CHANNELS_FIRST_1D = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)


def features_of(output: Any, module: nn.Module, fmt: str = "auto", pool: str = "avg") -> Tensor:
    """Rows ``[B, d]`` of one module output (a tensor, or a tuple starting with one)."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, Tensor):
        raise ConfigurationError(
            f"a tapped {type(module).__name__} returned {type(out).__name__}, not a tensor; "
            "tap a module whose output is a feature tensor"
        )
    out = out.detach()
    if out.ndim == 1:
        return out.unsqueeze(1).clone()
    if out.ndim == 2:
        return out.clone()
    if fmt == "auto":
        fmt = "NCHW" if out.ndim >= 4 or isinstance(module, _CHANNELS_FIRST_1D) else "NLC"
    if fmt == "NLC":
        out = out.movedim(-1, 1)  # [B, d, *positions]
    if pool == "avg":
        return out.flatten(2).mean(2)  # a new tensor: the module's own values
    return out.flatten(1).clone()


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
        pool: str = "avg",
        output_fmt: str | Mapping[str, str] = "auto",
        projections: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.model, self.layers = model, dict(layers)
        self.classifier, self.pool = classifier, pool
        self._fmt = output_fmt
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

    def _hook(self, alias: str) -> Callable[[nn.Module, Any, Any], None]:
        fmt, proj = self.fmt(alias), self._projections.get(alias)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            h = features_of(output, module, fmt, self.pool)
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
        """Run the model on ``x``; ``(features, logits)`` of this batch.

        A model whose ``forward`` returns embeddings without calling its classifier gets the
        classifier applied to that output (when the widths match), so predictions always come
        from the classifier.
        """
        out = self.model(x)
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
