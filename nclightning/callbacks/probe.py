"""Plumbing of a feature probe: which samples, which layers, and a safe eval-mode pass.

Nothing here computes a metric; :mod:`nclightning.callbacks.neural_collapse` feeds what the
probe yields into :mod:`nclightning.metrics`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "LayerTaps",
    "balanced_indices",
    "dataset_targets",
    "eval_mode",
    "find_classifier",
    "resolve_layers",
    "shard",
    "split_batch",
    "subset_loader",
]


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------


def resolve_layers(model: nn.Module, layers: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Map ``alias -> module name``, checking every name against ``model.named_modules()``.

    A list of names uses each name as its own alias. An unknown name raises ``ValueError``
    listing close matches and every available module name.
    """
    spec = dict(layers) if isinstance(layers, Mapping) else {name: name for name in layers}
    available = [name for name, _ in model.named_modules() if name]
    unknown = [name for name in spec.values() if name not in available]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown layer {name!r} in {type(model).__name__}.{hint} "
            f"Available module names: {', '.join(available)}"
        )
    return spec


class LayerTaps:
    """Forward hooks that capture the outputs of named modules, reduced to ``[B, d]``.

    4-D (or higher) outputs are reduced by global average pooling over the trailing dims
    (``pool="avg"``) or flattened (``pool="flatten"``); a tuple output uses its first element.
    Use as a context manager: the hooks are removed on exit, also on error. After each forward,
    :meth:`pop` returns ``alias -> features`` and empties the buffer.

    With ``classifier`` (a module name), :attr:`feeding_classifier` tells which taps' outputs
    are, storage for storage, the classifier's input (those whose ``nc3`` is defined).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, str],
        pool: str = "avg",
        classifier: str | None = None,
    ) -> None:
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        self.model, self.layers, self.pool = model, dict(layers), pool
        self.classifier = classifier
        self._modules = dict(model.named_modules())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._out: dict[str, Tensor] = {}
        self._storage: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._classifier_input: tuple[int, tuple[int, ...]] | None = None

    @property
    def feeding_classifier(self) -> list[str]:
        """Aliases whose last output was exactly the classifier's last input."""
        if self._classifier_input is None:
            return []
        return [a for a, key in self._storage.items() if key == self._classifier_input]

    @staticmethod
    def _key(t: Tensor) -> tuple[int, tuple[int, ...]]:
        return t.data_ptr(), (t.shape[0], t[0].numel() if t.shape[0] else 0)

    def _pre_hook(self, module: nn.Module, args) -> None:
        if args and isinstance(args[0], Tensor):
            self._classifier_input = self._key(args[0])

    def _hook(self, alias: str):
        def hook(module: nn.Module, args, output) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            out = out.detach()
            self._storage[alias] = self._key(out)
            if out.ndim == 1:
                out = out.unsqueeze(1)
            elif out.ndim > 2:
                out = out.flatten(2).mean(2) if self.pool == "avg" else out.flatten(1)
            self._out[alias] = out

        return hook

    def __enter__(self) -> LayerTaps:
        for alias, name in self.layers.items():
            self._handles.append(self._modules[name].register_forward_hook(self._hook(alias)))
        if self.classifier is not None:
            module = self._modules[self.classifier]
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._out.clear()

    def pop(self) -> dict[str, Tensor]:
        out, self._out = self._out, {}
        return out


def find_classifier(model: nn.Module, num_classes: int | None = None) -> str | None:
    """Name of the model's final linear classifier: ``classifier`` if that is an ``nn.Linear``,
    else the last ``nn.Linear`` (with ``num_classes`` outputs, when given), else ``None``."""
    modules = dict(model.named_modules())
    if isinstance(modules.get("classifier"), nn.Linear):
        return "classifier"
    linear = [
        name
        for name, m in modules.items()
        if isinstance(m, nn.Linear) and (num_classes is None or m.out_features == num_classes)
    ]
    return linear[-1] if linear else None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; every submodule's own mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------


def dataset_targets(dataset: Dataset) -> Tensor:
    """Labels ``[N]`` of a dataset: from ``.targets``/``.labels`` if present, else one read pass."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices)]
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            return torch.as_tensor(values).long().reshape(-1)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))]).long()


def balanced_indices(targets: Tensor, max_samples: int, seed: int) -> Tensor:
    """A fixed class-balanced subset: ``max_samples // K`` random samples of every class.

    Classes with fewer samples contribute all of theirs. Indices are returned sorted, so the
    probe keeps the dataset's order. Deterministic in ``seed``.
    """
    classes = torch.unique(targets)
    per_class = max(1, int(max_samples) // len(classes))
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    for k in classes.tolist():
        idx = torch.nonzero(targets == k).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s share of ``indices``: every ``world_size``-th one, no padding.

    Unlike ``DistributedSampler`` nothing is repeated, so summed statistics count every sample
    exactly once; shards may differ in size by one.
    """
    return indices[rank::world_size]


def split_batch(batch) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` from a ``(x, y, ...)`` batch or a dict with ``x``/``y`` style keys."""
    if isinstance(batch, Mapping):
        for xk, yk in (("x", "y"), ("input", "target"), ("inputs", "targets"), ("image", "label")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
        raise ValueError(
            f"cannot find inputs and labels in a batch with keys {sorted(batch)}; "
            "use (x, y) tuples or dict keys x/y"
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"a probe batch must be (inputs, labels, ...), got {type(batch).__name__}; "
        "pass a DataLoader yielding (x, y) as `probe`"
    )


def subset_loader(
    dataset: Dataset,
    indices: Tensor,
    batch_size: int,
    template: DataLoader | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """An ordered loader over ``dataset[indices]`` (collate/workers taken from ``template``)."""
    kwargs = {}
    if template is not None:
        kwargs = {"collate_fn": template.collate_fn, "pin_memory": template.pin_memory}
        num_workers = template.num_workers
    return DataLoader(
        Subset(dataset, indices.tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        **kwargs,
    )
