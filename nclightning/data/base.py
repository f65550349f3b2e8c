"""Shared base of the classification data modules.

Every data set is held in memory as ``data[N, ...]`` (uint8 pixels in ``0..255`` for image
sets, float otherwise) plus ``targets[N]`` (int64 in ``0..K-1``); samples are turned into
float tensors per item by :class:`ImageTransform` (scale to ``[0, 1]``, optional
augmentation, per-channel normalisation). Keeping the raw tensors makes probe labels free
(:meth:`ClassificationDataModule.probe_targets`) and avoids a PIL round trip per sample.

Splits: ``"train"`` is the training set (the balanced ``samples_per_class`` subset when set);
``"val"`` and ``"test"`` are both the held-out set (for torchvision sets their official test
split: collapse studies track the test set alongside training, and no validation split is
carved out of the training set).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from nclightning.errors import DataError

__all__ = [
    "SPLITS",
    "ArrayDataset",
    "ClassificationDataModule",
    "DataError",
    "ImageTransform",
    "balanced_subset",
]

SPLITS = ("train", "val", "test")
# Which stored split each data-module split reads: validation uses the held-out test set.
_SOURCE = {"train": "train", "val": "test", "test": "test"}
_STAGE_SPLITS = {
    "fit": ("train", "test"),
    "validate": ("test",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "test"),
}


class ImageTransform:
    """Per-sample transform of a ``[C, H, W]`` (or any-shape) tensor.

    uint8 input is scaled to ``[0, 1]``; then, when enabled, a random crop of the original
    size from the image zero-padded by ``crop_padding`` pixels and a horizontal flip with
    probability 1/2 (torch's global RNG, seeded per DataLoader worker); finally
    ``(x - mean) / std`` per channel when ``mean`` and ``std`` are given.
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_padding: int = 0,
        flip: bool = False,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)

    @property
    def augments(self) -> bool:
        """Whether the transform is random."""
        return self.crop_padding > 0 or self.flip

    def __call__(self, x: Tensor) -> Tensor:
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        if self.crop_padding > 0:
            p = self.crop_padding
            h, w = x.shape[-2:]
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p, p, p, p))[..., i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x


def crop_flip(x: Tensor, rows: Tensor, cols: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Crops of ``x[B, C, H, W]`` zero-padded by ``padding``, at offsets ``rows[B]``,
    ``cols[B]`` in ``0..2 padding``, mirrored where ``flip[B]``: one gather, any device.

    Sample ``b`` equals :class:`ImageTransform`'s ``pad(x_b)[..., i:i+H, j:j+W]`` (then
    ``.flip(-1)``) with ``i, j = rows[b], cols[b]``.
    """
    B, C, H, W = x.shape
    p = int(padding)
    padded = F.pad(x, (p, p, p, p)) if p else x
    ar_h = torch.arange(H, device=x.device)
    ar_w = torch.arange(W, device=x.device)
    r = rows.view(B, 1) + ar_h  # [B, H]
    c = cols.view(B, 1) + torch.where(flip.view(B, 1), W - 1 - ar_w, ar_w)  # [B, W]
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    ch = torch.arange(C, device=x.device).view(1, C, 1, 1)
    return padded[b, ch, r.view(B, 1, H, 1), c.view(B, 1, 1, W)]


def augment_batch(
    x: Tensor, padding: int, flip: bool, generator: torch.Generator | None = None
) -> Tensor:
    """The random crop and flip of :class:`ImageTransform` for a whole batch ``x[B, C, H, W]``
    on its own device: offsets uniform in ``0..2 padding`` and a flip with probability 1/2,
    independently per sample (the same distribution as the per-sample CPU path)."""
    B, dev = x.shape[0], x.device
    rows = torch.randint(0, 2 * padding + 1, (B,), device=dev, generator=generator)
    cols = torch.randint(0, 2 * padding + 1, (B,), device=dev, generator=generator)
    if flip:
        flips = torch.rand(B, device=dev, generator=generator) < 0.5
    else:
        flips = torch.zeros(B, dtype=torch.bool, device=dev)
    return crop_flip(x, rows, cols, flips, padding)


class _Raw:
    """Per-sample "transform" of the device-augmented training set: the stored sample as is
    (uint8 images travel to the device at a quarter of the float32 size)."""

    def __call__(self, x: Tensor) -> Tensor:
        return x


class ArrayDataset(Dataset):
    """In-memory ``(sample, label)`` pairs from ``data[N, ...]`` and int64 ``targets[N]``."""

    def __init__(
        self, data: Tensor, targets: Tensor, transform: ImageTransform | _Raw | None = None
    ):
        if len(data) != len(targets):
            raise ValueError(f"{len(data)} samples but {len(targets)} targets")
        self.data = data
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def deterministic(self) -> bool:
        """Whether reading a sample draws no random number (no augmentation): a probe then
        keeps its batches on the device after the first probe."""
        return not getattr(self.transform, "augments", False)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.data[index]
        x = self.transform(x) if self.transform is not None else x.float()
        return x, self.targets[index]


def balanced_subset(
    targets: Tensor,
    samples_per_class: int,
    seed: int,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> Tensor:
    """Sorted indices of exactly ``samples_per_class`` samples of each class.

    The draw is a function of ``(targets, samples_per_class, seed)`` only: one seeded random
    permutation of all indices, from which each class keeps its first ``samples_per_class``.
    Raises :class:`DataError` naming the class when one has fewer samples than requested.
    """
    counts = torch.bincount(targets, minlength=num_classes)
    smallest = int(counts.argmin())
    if int(counts[smallest]) < samples_per_class:
        name = f" ({class_names[smallest]!r})" if class_names is not None else ""
        raise DataError(
            f"samples_per_class={samples_per_class} is larger than class {smallest}{name}, "
            f"which has only {int(counts[smallest])} training samples (the smallest class); "
            f"set samples_per_class <= {int(counts[smallest])}"
        )
    perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    permuted = targets[perm]
    chosen = [perm[permuted == k][:samples_per_class] for k in range(num_classes)]
    return torch.sort(torch.cat(chosen)).values


class ClassificationDataModule(LightningDataModule):
    """Base of the image-classification data modules used in collapse studies.

    Subclasses set the class constants below (or the instance attributes ``num_classes``,
    ``input_shape``, ``class_names`` in ``__init__``) and implement :meth:`_load_source`.
    ``num_classes``, ``input_shape`` and ``class_names`` are available right after
    ``__init__``; data are read lazily (in :meth:`setup`, or by the first loader call).

    Args:
        root: directory holding the data files (torchvision layout).
        download: fetch missing files from the data set's URL (in :meth:`prepare_data`).
        batch_size: training batch size.
        eval_batch_size: batch size of the val/test/probe loaders (``None``: ``batch_size``).
        num_workers: DataLoader worker processes.
        samples_per_class: train on a balanced subset with exactly this many samples of each
            class, drawn with ``seed`` (the same subset every time); ``None``: all samples.
        seed: seed of the subset draw and of the training shuffle.
        augment: random crop with zero padding (+ horizontal flip where the data set allows
            it; see each data set) on the training loader. Off by default: collapse studies
            train without augmentation.
        normalize: subtract the data set's per-channel mean and divide by its std.
        pin_memory: pin loader memory (``None``: when CUDA is available).
        persistent_workers: keep train/val/test workers alive between epochs
            (only when ``num_workers > 0``).
        drop_last: drop the last incomplete training batch.
        device_augment: the training loader yields the stored (uint8) images and the
            scaling, the ``augment`` crop and flip and the normalisation run on the batch on
            the training device (``on_after_batch_transfer``: no CPU-side per-sample work,
            no worker processes needed); same distribution as the CPU path
            (:func:`augment_batch`). Evaluation and probe loaders are unchanged.
    """

    NAME: ClassVar[str] = "dataset"
    CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = ()
    MEAN: ClassVar[tuple[float, ...] | None] = None
    STD: ClassVar[tuple[float, ...] | None] = None
    CROP_PADDING: ClassVar[int] = 0  # augmentation: random-crop padding (0: no crop)
    FLIP: ClassVar[bool] = False  # augmentation: random horizontal flip

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        samples_per_class: int | None = None,
        seed: int = 0,
        augment: bool = False,
        normalize: bool = True,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = False,
        device_augment: bool = False,
    ) -> None:
        super().__init__()
        _check_positive("batch_size", batch_size)
        if eval_batch_size is not None:
            _check_positive("eval_batch_size", eval_batch_size)
        if samples_per_class is not None:
            _check_positive("samples_per_class", samples_per_class)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.root = str(root)
        self.download = bool(download)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.samples_per_class = samples_per_class
        self.seed = int(seed)
        self.augment = bool(augment)
        self.normalize = bool(normalize)
        self.pin_memory = pin_memory
        self.persistent_workers = bool(persistent_workers)
        self.drop_last = bool(drop_last)
        self.device_augment = bool(device_augment)
        self.class_names: list[str] = list(self.CLASS_NAMES)
        self.num_classes: int = len(self.class_names)
        self.input_shape: tuple[int, ...] = tuple(self.INPUT_SHAPE)
        self._sources: dict[str, tuple[Tensor, Tensor]] = {}

    # -- subclass hooks ------------------------------------------------------------------

    def _load_source(self, source: str) -> tuple[Tensor, Tensor]:
        """Read stored split ``source`` (``"train"`` or ``"test"``): ``(data, targets)``."""
        raise NotImplementedError

    def _transform(self, augment: bool) -> ImageTransform | None:
        """Per-sample transform for image data (see :class:`ImageTransform`)."""
        mean, std = (self.MEAN, self.STD) if self.normalize else (None, None)
        return ImageTransform(
            mean,
            std,
            crop_padding=self.CROP_PADDING if augment else 0,
            flip=self.FLIP and augment,
        )

    # -- data ----------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load the stored splits ``stage`` needs (all for ``None``)."""
        for source in _STAGE_SPLITS.get(stage, ("train", "test")):
            self._source("train" if source == "train" else "val")

    def _source(self, split: str) -> tuple[Tensor, Tensor]:
        """``(data, targets)`` of ``split``, the training one restricted to the subset."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        source = _SOURCE[split]
        if source not in self._sources:
            data, targets = self._load_source(source)
            targets = targets.to(torch.int64)
            self._check_targets(targets, source)
            if source == "train" and self.samples_per_class is not None:
                keep = balanced_subset(
                    targets, self.samples_per_class, self.seed, self.num_classes, self.class_names
                )
                data, targets = data[keep], targets[keep]
            self._sources[source] = (data, targets)
        return self._sources[source]

    def _check_targets(self, targets: Tensor, source: str) -> None:
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            raise DataError(
                f"{self.NAME} {source} labels span {int(targets.min())}..{int(targets.max())}, "
                f"outside 0..{self.num_classes - 1}; the data files do not match {self.NAME}"
            )

    def _dataset(self, split: str, augment: bool) -> ArrayDataset:
        data, targets = self._source(split)
        return ArrayDataset(data, targets, self._transform(augment))

    def probe_dataset(self, split: str = "train") -> ArrayDataset:
        """``split`` without augmentation, in a fixed order (the training subset for train)."""
        return self._dataset(split, augment=False)

    def probe_targets(self, split: str = "train") -> Tensor:
        """Int64 labels of :meth:`probe_dataset` ``(split)``, in its order, without images."""
        return self._source(split)[1]

    # -- loaders -------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, batch_size: int, persistent: bool = True) -> DataLoader:
        """An ordered loader (evaluation and probing)."""
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=persistent and self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (augmented when ``augment``).

        The order of epoch ``e`` is a permutation drawn from ``seed`` and ``e`` alone
        (:class:`EpochShuffleSampler`; Lightning calls its ``set_epoch``), so a run resumed
        from a checkpoint sees exactly the batches of an uninterrupted one.
        """
        if self.device_augment:
            dataset = ArrayDataset(*self._source("train"), _Raw())
        else:
            dataset = self._dataset("train", self.augment)
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed),
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``device_augment``: scale, augment and normalise a raw training batch on its
        device (:meth:`device_transform`); any other batch passes unchanged."""
        trainer = getattr(self, "trainer", None)
        if not self.device_augment or trainer is None or not trainer.training:
            return batch
        x, y = batch
        return self.device_transform(x), y

    def device_transform(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A raw training batch ``x[B, ...]`` as :meth:`train_dataloader`'s CPU path makes it:
        uint8 scaled to ``[0, 1]``, the ``augment`` crop and flip, then the normalisation."""
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        t = self._transform(self.augment)
        if t is not None and t.augments and x.ndim == 4:
            x = augment_batch(x, t.crop_padding, t.flip, generator)
        if t is not None and t.mean is not None and t.std is not None:
            x = (x - t.mean.to(x.device)) / t.std.to(x.device)
        return x

    def val_dataloader(self) -> DataLoader:
        """Held-out set (the official test split for torchvision sets), in order."""
        return self._loader(self._dataset("val", False), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Held-out test set, in order."""
        return self._loader(self._dataset("test", False), self.eval_batch_size)

    def probe_dataloader(self, split: str = "train", batch_size: int | None = None) -> DataLoader:
        """Loader over :meth:`probe_dataset`: no augmentation, no shuffle, no dropped batch."""
        return self._loader(
            self.probe_dataset(split), batch_size or self.eval_batch_size, persistent=False
        )


class EpochShuffleSampler(DistributedSampler):
    """The training order of epoch ``e``: a permutation of ``range(n)`` drawn from ``(seed, e)``.

    Under DDP (a process group is initialised when the loader is built) rank ``r`` of ``R``
    takes every ``R``-th index of that permutation, starting at ``r``, after the permutation is
    wrapped around to a multiple of ``R`` (``DistributedSampler``'s padding), so the ranks'
    indices interleave to the single-process order. Being a ``DistributedSampler``, Lightning
    neither wraps nor replaces it and calls its ``set_epoch`` itself on every version: epochs
    differ under DDP as they do in one process, and a resumed run sees the same batches.
    """

    def __init__(
        self, n: int, seed: int = 0, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(
            range(int(n)),  # type: ignore[arg-type]  # any Sized works
            num_replicas,
            rank,
            shuffle=True,
            seed=int(seed),
        )
        self.n = int(n)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen)
        if self.total_size > self.n:  # wrap around so every rank gets num_samples indices
            order = order.repeat(-(-self.total_size // self.n))[: self.total_size]
        return iter(order[self.rank : self.total_size : self.num_replicas].tolist())


def _check_positive(name: str, value: int) -> None:
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
