"""Where a probe's samples come from, and the guarantees of a probe pass.

* :class:`ProbeSource`: the dataset, labels and loader of one probe (a DataModule's
  ``probe_dataset(split)``, the Trainer's own loaders, or a named user ``DataLoader``), its
  fixed class-balanced subset, and each rank's shard of it;
* :func:`isolated_rng`: every random state the probe could touch (torch CPU and CUDA,
  NumPy, Python) is saved and restored, so training after a probe is bit-identical to training
  without one (the probe's loader also draws from its own generator);
* :func:`eval_mode`: eval mode and no grad for the pass, each submodule's mode restored.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from nclightning.errors import ConfigurationError

__all__ = [
    "ProbeSource",
    "balanced_indices",
    "call_model",
    "dataset_targets",
    "eval_mode",
    "inputs_of",
    "isolated_rng",
    "resolve_source",
    "shard",
    "split_batch",
]

SPLITS = ("train", "val", "test")


@contextmanager
def isolated_rng(device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the random states of torch (CPU and ``device``), NumPy and Python
    restored afterwards, whatever the block draws."""
    devices = [device] if device is not None and device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 (global)
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


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


def dataset_targets(dataset: Any) -> Tensor:
    """Labels ``[N]`` of a dataset: from ``.targets``/``.labels`` if present, else one read pass."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices)]
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            return torch.as_tensor(values).long().reshape(-1)
    return torch.as_tensor([int(split_batch(dataset[i])[1]) for i in range(len(dataset))]).long()


def balanced_indices(targets: Tensor, max_samples: int, seed: int) -> Tensor:
    """A fixed class-balanced subset: ``max_samples // K`` random samples of every class.

    Classes with fewer samples contribute all of theirs. Sorted, so the probe keeps the
    dataset's order. Deterministic in ``seed``; drawn from its own generator.
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
    """Rank ``rank``'s share of ``indices``: every ``world_size``-th one, no padding (unlike
    ``DistributedSampler``), so summed statistics count every sample exactly once."""
    return indices[rank::world_size]


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """``(inputs, labels)`` of a batch.

    A ``(x, y, ...)`` tuple gives ``x``; a mapping with ``labels`` (the Hugging Face
    convention) gives the mapping of its other entries, which :func:`call_model` passes to
    the model as keyword arguments; a mapping with ``x``/``y`` style keys gives ``x``.
    """
    if isinstance(batch, Mapping):
        if "labels" in batch:
            return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
        for xk, yk in (("x", "y"), ("input", "target"), ("inputs", "targets"), ("image", "label")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
        raise ConfigurationError(
            f"cannot find inputs and labels in a batch with keys {sorted(batch)}; "
            "use (x, y) tuples or a mapping with `labels` (other entries go to the model)"
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigurationError(
        f"a probe batch must be (inputs, labels, ...) or a mapping with `labels`, got "
        f"{type(batch).__name__}; pass a DataLoader yielding such batches as `probe`"
    )


def inputs_of(batch: Any) -> Any:
    """The model inputs of a batch that may have no labels (an out-of-distribution probe)."""
    if isinstance(batch, Mapping):
        return split_batch(batch)[0] if "labels" in batch or "x" in batch else dict(batch)
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping of inputs, ``model(inputs)`` otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


@dataclass
class ProbeSource:
    """The samples of one probe: ``dataset`` with ``targets[N]``, a ``template`` loader whose
    collate/workers to reuse, the class count and names."""

    dataset: Dataset
    targets: Tensor
    template: DataLoader | None
    num_classes: int
    class_names: list[str] | None
    note: str | None = None  # said once when the source is a fallback

    def subset(self, max_samples: int | None, seed: int) -> Tensor:
        """The probe's fixed indices: all samples, or a balanced subset of ``max_samples``."""
        if max_samples is not None and max_samples < len(self.targets):
            return balanced_indices(self.targets, max_samples, seed)
        return torch.arange(len(self.targets))

    def loader(self, indices: Tensor, batch_size: int, num_workers: int = 0) -> DataLoader[Any]:
        """An ordered loader over ``dataset[indices]`` with its own generator."""
        kwargs: dict[str, Any] = {}
        if self.template is not None:
            kwargs = {
                "collate_fn": self.template.collate_fn,
                "pin_memory": self.template.pin_memory,
            }
            num_workers = self.template.num_workers
        return DataLoader(
            Subset(self.dataset, indices.tolist()),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )


def replayable(source: ProbeSource) -> bool:
    """Whether the probe's batches are the same at every probe, so that its inputs can be kept
    on the device after the first probe (:class:`~nclightning.callbacks.passes.Replay`): an
    in-memory dataset with a fixed transform (a ``TensorDataset``; a dataset whose
    ``deterministic`` attribute is true, as nclightning's ``ArrayDataset`` without
    augmentation), read through the default collate. A user's own dataset or collate may draw
    random numbers: its loader is read anew at every probe."""
    from torch.utils.data import TensorDataset, default_collate

    dataset = source.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    fixed = isinstance(dataset, TensorDataset) or getattr(dataset, "deterministic", False) is True
    collate = None if source.template is None else source.template.collate_fn
    return fixed and collate in (None, default_collate)


def resolve_source(
    probe: Any, name: str, trainer: Any, pl_module: Any, num_classes: int
) -> ProbeSource:
    """The :class:`ProbeSource` of ``probe`` (a split name or a ``DataLoader``) over
    ``num_classes`` classes (the model's). An empty probe, or labels outside ``0..K-1``,
    are refused here, before a probe runs."""
    dm = trainer.datamodule
    names = getattr(dm, "class_names", None)
    if isinstance(probe, DataLoader):
        dataset, template, note = probe.dataset, probe, None
        targets = dataset_targets(dataset)
    elif dm is not None and hasattr(dm, "probe_dataset"):
        dataset, template, note = dm.probe_dataset(probe), None, None
        get = getattr(dm, "probe_targets", None)
        targets = get(probe) if callable(get) else dataset_targets(dataset)
    else:
        template = _trainer_loader(trainer, dm, probe)
        dataset, targets = template.dataset, dataset_targets(template.dataset)
        note = (
            f"NeuralCollapseCallback: no probe_dataset() to use; probing the {probe} loader's "
            "dataset in index order (any augmentation it applies stays)"
        )
    targets = torch.as_tensor(targets).long().reshape(-1)
    if targets.numel() == 0:
        raise ConfigurationError(
            f"NeuralCollapseCallback[{name}]: the probe set is empty; give it samples or "
            "leave this probe out"
        )
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_classes:
        raise ConfigurationError(
            f"NeuralCollapseCallback[{name}]: labels {lo}..{hi} do not fit the model's "
            f"{num_classes} classes (0..{num_classes - 1}); pass num_classes= or fix the labels"
        )
    shown = list(names) if names and len(names) == num_classes else None
    return ProbeSource(dataset, targets, template, num_classes, shown, note)


def _trainer_loader(trainer: Any, dm: Any, split: str) -> DataLoader[Any]:
    attr = {"train": "train_dataloader", "val": "val_dataloaders", "test": "test_dataloaders"}
    loader = getattr(trainer, attr[split], None)  # the loaders Lightning already built
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None:  # not built yet (e.g. check_val_every_n_epoch > 1): the fit's source
        loader = _fit_source(trainer, split)
    if loader is None and dm is not None and hasattr(dm, f"{split}_dataloader"):
        loader = getattr(dm, f"{split}_dataloader")()
    if loader is None:
        lm = trainer.lightning_module
        hook = getattr(lm, f"{split}_dataloader", None) if lm is not None else None
        if callable(hook):
            try:
                loader = hook()
            except Exception:  # Lightning's default hooks raise when not implemented
                loader = None
    if not isinstance(loader, DataLoader):
        raise ConfigurationError(
            f"NeuralCollapseCallback(probe={split!r}) found no {split} data; pass "
            "probe=<DataLoader> with name=..., or use a DataModule with probe_dataset()"
        )
    return loader


def _fit_source(trainer: Any, split: str) -> Any:
    """The loader given to ``trainer.fit``/``validate``/``test`` for ``split``, built now."""
    loops = {"train": ("fit_loop",), "val": ("fit_loop", "epoch_loop", "val_loop")}
    loops["test"] = ("test_loop",)
    loop = trainer
    for attr in loops[split]:
        loop = getattr(loop, attr, None)
    source = getattr(loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    try:
        loader = source.dataloader()
    except Exception:  # Lightning's default hooks raise when not implemented
        return None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return loader
