"""Which modules a probe taps: named layers, every block (``layers="all"``), the classifier.

Nothing here runs a probe; :mod:`.taps` hooks the modules chosen here.

The ``layers="all"`` rule (:func:`discover_blocks`), applied to one traced forward pass in
execution order (docs/science.md §8, depth profiles):

* a *block* is a module with children whose parent is a plain container
  (``nn.Sequential``/``nn.ModuleList``/``nn.ModuleDict``) and which holds no smaller such
  module: a residual ``BasicBlock`` in ``layer1``, a ``TransformerEncoderLayer`` in
  ``layers``, an MLP stage ``Sequential(Linear, BatchNorm1d, ReLU)`` in ``blocks``; its
  output is tapped and its insides are not;
* leaves outside blocks form *stages*: a stage starts at a weight layer (``nn.Linear``, any
  ``nn.Conv*``) or at the first leaf after a block, and is tapped at its last leaf; a stem
  ``conv1, bn1, relu, maxpool`` is one layer (tapped at ``maxpool``), the global pool before
  the classifier another; when a stage is exactly the leaves of one module, that module is
  tapped (same tensor, better name);
* other modules with children (a backbone, a patch embedding) are transparent, and a stage
  of reshaping leaves only (``Flatten``, ``Identity``, ``Dropout``) is not a layer;
* left out: the classifier and everything after it, a module that runs more than once per
  forward pass (its output is ambiguous), and a module whose output is the very tensor of the
  layer before it (an ``nn.Identity`` tap);
* ``include`` / ``exclude`` (``fnmatch`` patterns on module names) then filter the list.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric

from nclightning.errors import ConfigurationError
from nclightning.record.keys import check_layer_alias

__all__ = [
    "discover_blocks",
    "example_batch",
    "find_classifier",
    "resolve_layers",
    "trace_order",
    "unknown_module_message",
]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)
_PASSIVE = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
"""Leaves that only reshape or pass features on: a stage of these alone is not a layer."""


def resolve_layers(model: nn.Module, layers: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``alias -> module name``, every name checked against ``model.named_modules()``.

    A list of names uses each name as its own alias. An unknown name raises
    :class:`~nclightning.errors.ConfigurationError` with close matches and the module names.
    """
    if isinstance(layers, str):
        layers = [layers]
    spec = dict(layers) if isinstance(layers, Mapping) else {name: name for name in layers}
    available = [name for name, _ in model.named_modules() if name]
    shown = [name for name, m in model.named_modules() if name and not isinstance(m, Metric)]
    for alias, name in spec.items():
        check_layer_alias(alias)
        if name not in available:
            raise ConfigurationError(unknown_module_message(model, name, shown))
    return spec


def unknown_module_message(model: nn.Module, name: str, available: Sequence[str]) -> str:
    """``unknown layer 'x' in Model. Did you mean 'y'? Available: ...`` (the list shortened)."""
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(available[:40]) + (
        f", ... ({len(available)} in all)" if len(available) > 40 else ""
    )
    return f"unknown layer {name!r} in {type(model).__name__}.{hint} Available: {shown}"


def find_classifier(model: nn.Module, num_classes: int | None = None) -> str | None:
    """Module name of the model's final linear classifier, or ``None``.

    In order: the module returned by ``model.get_classifier()`` (timm's accessor), the
    ``classifier`` attribute if it is an ``nn.Linear``, else the last ``nn.Linear`` (with
    ``num_classes`` outputs, when given).
    """
    names = {id(m): name for name, m in model.named_modules() if name}
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module) and id(head) in names:
            return names[id(head)]
    modules = dict(model.named_modules())
    if isinstance(modules.get("classifier"), nn.Linear):
        return "classifier"
    linear = [
        name
        for name, m in modules.items()
        if isinstance(m, nn.Linear) and (num_classes is None or m.out_features == num_classes)
    ]
    return linear[-1] if linear else None


def trace_order(model: nn.Module, run_forward: Callable[[], object]) -> list[tuple[str, int]]:
    """``(module name, output storage pointer)`` for every module call, in the order calls end.

    ``run_forward()`` runs one forward pass of ``model`` (the caller handles eval mode, no grad
    and the random state). Only calls whose output is a tensor (or a tuple starting with one)
    count.
    """
    calls: list[tuple[str, int]] = []
    handles: list[RemovableHandle] = []

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, Tensor):
                calls.append((name, out.data_ptr()))

        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        run_forward()
    finally:
        for h in handles:
            h.remove()
    return calls


class _Tree:
    """Parent/children facts of ``model.named_modules()`` for the block rule."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.leaves = {n for n, m in self.modules.items() if not any(True for _ in m.children())}

    def parent(self, name: str) -> nn.Module:
        return self.modules[name.rpartition(".")[0]]

    def candidate(self, name: str) -> bool:
        return bool(name) and name not in self.leaves and isinstance(self.parent(name), _CONTAINERS)

    def is_block(self, name: str) -> bool:
        prefix = name + "."
        return self.candidate(name) and not any(
            n.startswith(prefix) and self.candidate(n) for n in self.modules
        )

    def leaves_of(self, name: str) -> set[str]:
        prefix = name + "."
        return {n for n in self.leaves if n == name or n.startswith(prefix)}

    def smallest_owner(self, stage: list[str]) -> str:
        """The module whose leaves are exactly ``stage`` (else the stage's last leaf)."""
        names = set(stage)
        owner = stage[-1]
        parts = owner.split(".")
        for i in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:i])
            if self.leaves_of(name) == names:
                owner = name
            else:
                break
        return owner


def discover_blocks(
    model: nn.Module,
    calls: Sequence[tuple[str, int]],
    classifier: str | None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Module names of every block, in execution order (the rule of the module docstring)."""
    tree = _Tree(model)
    blocks = {n for n in tree.modules if tree.is_block(n)}
    count: dict[str, int] = {}
    for name, _ in calls:
        count[name] = count.get(name, 0) + 1
    chosen: list[tuple[str, int]] = []  # (name, output pointer)
    stage: list[tuple[str, int]] = []

    def close_stage() -> None:
        if stage and not all(isinstance(tree.modules[n], _PASSIVE) for n, _ in stage):
            chosen.append((tree.smallest_owner([n for n, _ in stage]), stage[-1][1]))
        stage.clear()

    for name, ptr in calls:
        if name == classifier or (classifier and name.startswith(classifier + ".")):
            break
        if count[name] != 1 or _ancestor_in(name, blocks):
            continue
        if name in blocks:
            close_stage()
            chosen.append((name, ptr))
        elif name in tree.leaves:
            if isinstance(tree.modules[name], _WEIGHT_LAYERS):
                close_stage()
            stage.append((name, ptr))
    close_stage()
    return _filter(_dedupe(chosen), include, exclude)


def _ancestor_in(name: str, names: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def _dedupe(chosen: list[tuple[str, int]]) -> list[str]:
    """Drop a layer whose output is the same tensor as the layer before it."""
    out: list[str] = []
    last = None
    for name, ptr in chosen:
        if ptr != last:
            out.append(name)
        last = ptr
    return out


def _filter(
    names: list[str], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[str]:
    if include:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    if exclude:
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    return names


def example_batch(dataset: Any, size: int = 2) -> Any:
    """The first ``size`` samples of ``dataset`` collated into a batch ``(x, y)``."""
    from torch.utils.data import default_collate

    return default_collate([dataset[i] for i in range(min(size, len(dataset)))])
