"""Data modules over torchvision's data sets and their on-disk formats.

Files are read by torchvision's own dataset classes, in torchvision's layout under ``root``.
Integrity: with ``download: false`` torchvision checks each CIFAR/SVHN file's md5 against the
official release, which rejects any re-packed or hand-made file with an unhelpful
"corrupted" message. Here the files are checked for *presence* only (subclasses override
torchvision's ``_check_integrity``), their contents are validated when read (shapes, label
range), and a file that cannot be read raises :class:`DataError`. Downloads still verify the
md5 of the fetched archives (torchvision's download code).

The validation split is each data set's official test split (see :mod:`.base`).
"""

from __future__ import annotations

import os
import pickle
import tarfile
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchvision import datasets as tvd

from nclightning.data.base import ClassificationDataModule, DataError

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "SVHNDataModule",
    "TorchvisionDataModule",
]

# Errors a download can end in: network (URLError is an OSError), torchvision's md5 and
# mirror failures (RuntimeError), broken archives.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, EOFError, tarfile.TarError)
# Errors reading a present but malformed file.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    RuntimeError,
    pickle.UnpicklingError,
)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _exists(path: str) -> bool:
    return os.path.isfile(path)


class _CIFAR10(tvd.CIFAR10):
    """torchvision CIFAR-10 that accepts any present files (no md5 check)."""

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        return all(_exists(os.path.join(folder, f)) for f, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as infile:
            self.classes = pickle.load(infile, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR100(_CIFAR10, tvd.CIFAR100):
    """torchvision CIFAR-100 that accepts any present files (no md5 check)."""


class _SVHN(tvd.SVHN):
    """torchvision SVHN that accepts any present file (no md5 check)."""

    def _check_integrity(self) -> bool:
        return _exists(os.path.join(self.root, self.filename))


class TorchvisionDataModule(ClassificationDataModule):
    """Base of the torchvision-backed modules: file checks, download, error messages."""

    FOLDER: ClassVar[str] = ""  # sub-directory of root holding the files ("" = root itself)
    FILES: ClassVar[tuple[str, ...]] = ()  # every file the module reads, relative to FOLDER
    HOW_TO_PLACE: ClassVar[str] = ""  # how to place files by hand ({root}, {folder}, {urls})

    # -- torchvision glue ----------------------------------------------------------------

    def _torchvision(self, source: str, download: bool) -> Any:
        """The torchvision dataset of stored split ``source`` (``"train"`` or ``"test"``)."""
        raise NotImplementedError

    def _arrays(self, dataset: Any) -> tuple[Tensor, Tensor]:
        """``(uint8 data[N, C, H, W], targets[N])`` of a torchvision dataset."""
        raise NotImplementedError

    def _urls(self) -> list[str]:
        """URLs a download fetches (for messages)."""
        raise NotImplementedError

    def _download(self) -> None:
        """Fetch the missing files with torchvision (which verifies the archives' md5)."""
        self._torchvision("train", download=True)

    # -- files ---------------------------------------------------------------------------

    @property
    def data_dir(self) -> str:
        """Absolute directory expected to hold :attr:`FILES`."""
        return os.path.abspath(os.path.join(os.path.expanduser(self.root), self.FOLDER))

    def missing_files(self) -> list[str]:
        """The expected files that are not present (empty when the data set is in place)."""
        return [f for f in self.FILES if not _exists(os.path.join(self.data_dir, f))]

    def _placement(self, urls: str | None = None) -> str:
        root = os.path.abspath(os.path.expanduser(self.root))
        urls = " ".join(self._urls()) if urls is None else urls
        return self.HOW_TO_PLACE.format(root=root, folder=self.data_dir, urls=urls)

    def _ensure_files(self) -> None:
        """Download missing files when ``download`` is set; else raise :class:`DataError`."""
        missing = self.missing_files()
        if not missing:
            return
        if self.download:
            self._fetch()
            missing = self.missing_files()
            if not missing:
                return
            raise DataError(
                f"{self.NAME} download finished but {', '.join(missing)} are still missing "
                f"from {self.data_dir}; place the files by hand: {self._placement()}"
            )
        where = (
            f"directory {self.data_dir} does not exist (expected {', '.join(self.FILES)})"
            if not os.path.isdir(self.data_dir)
            else f"{self.data_dir} lacks {', '.join(missing)}"
        )
        raise DataError(
            f"{self.NAME} not found: {where}. "
            f"Set `download: true` in the data config to fetch it, or place the files by "
            f"hand: {self._placement()}"
        )

    def _fetch(self) -> None:
        os.makedirs(os.path.expanduser(self.root), exist_ok=True)
        try:
            self._download()
        except _DOWNLOAD_ERRORS as err:
            raise DataError(
                f"{self.NAME} download failed ({' '.join(self._urls())}): "
                f"{type(err).__name__}: {_one_line(err)}. Check the network connection, "
                f"or place the files by hand: {self._placement(urls='the URL(s) above')}"
            ) from err

    def prepare_data(self) -> None:
        """Download the files when missing and ``download`` is set; else check they exist."""
        self._ensure_files()

    def _load_source(self, source: str) -> tuple[Tensor, Tensor]:
        self._ensure_files()
        try:
            data, targets = self._arrays(self._torchvision(source, download=False))
        except _READ_ERRORS as err:
            raise DataError(
                f"could not read {self.NAME} {source} files in {self.data_dir} "
                f"({type(err).__name__}: {_one_line(err)}); they may be incomplete or "
                f"corrupted: delete them and set `download: true`, or place them by hand: "
                f"{self._placement()}"
            ) from err
        if data.dtype != torch.uint8 or tuple(data.shape[1:]) != self.input_shape:
            raise DataError(
                f"{self.NAME} {source} files in {self.data_dir} hold {data.dtype} images of "
                f"shape {tuple(data.shape[1:])}, expected uint8 {self.input_shape}"
            )
        return data, targets


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10: 32x32 RGB, 10 classes; 50,000 train / 10,000 test (the val split).

    Files: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (the
    extracted ``cifar-10-python.tar.gz``). ``augment``: random 32x32 crop of the image
    zero-padded by 4 pixels + horizontal flip.
    """

    NAME = "CIFAR-10"
    CLASS_NAMES: ClassVar[tuple[str, ...]] = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")  # fmt: skip
    INPUT_SHAPE = (3, 32, 32)
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)
    CROP_PADDING = 4
    FLIP = True
    FOLDER = _CIFAR10.base_folder
    FILES = (*(f for f, _ in _CIFAR10.train_list + _CIFAR10.test_list), _CIFAR10.meta["filename"])
    HOW_TO_PLACE = (
        "fetch {urls} elsewhere and extract it into {root} so that {folder} holds data_batch_1..5, "
        "test_batch and batches.meta"
    )
    _TV: ClassVar[Any] = _CIFAR10

    def _torchvision(self, source: str, download: bool) -> Any:
        return self._TV(self.root, train=source == "train", download=download)

    def _arrays(self, dataset: Any) -> tuple[Tensor, Tensor]:
        data = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return data, torch.as_tensor(dataset.targets, dtype=torch.int64)

    def _urls(self) -> list[str]:
        return [self._TV.url]


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels): 32x32 RGB, 100 classes; 50,000 train / 10,000 test (val).

    Files: ``root/cifar-100-python/{train, test, meta}`` (the extracted
    ``cifar-100-python.tar.gz``). ``augment``: as CIFAR-10 (pad-4 crop + horizontal flip).
    """

    NAME = "CIFAR-100"
    CLASS_NAMES = tuple(
        "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge "
        "bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud "
        "cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox "
        "girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
        "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
        "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray "
        "road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel "
        "streetcar sunflower sweet_pepper table tank telephone television tiger tractor "
        "train trout tulip turtle wardrobe whale willow_tree wolf woman worm".split()
    )
    MEAN = (0.5071, 0.4865, 0.4409)
    STD = (0.2673, 0.2564, 0.2762)
    FOLDER = _CIFAR100.base_folder
    FILES = (*(f for f, _ in _CIFAR100.train_list + _CIFAR100.test_list),
             _CIFAR100.meta["filename"])  # fmt: skip
    HOW_TO_PLACE = (
        "fetch {urls} elsewhere and extract it into {root} so that {folder} holds train, test and "
        "meta"
    )
    _TV = _CIFAR100


class MNISTDataModule(TorchvisionDataModule):
    """MNIST: 28x28 grayscale digits, 10 classes; 60,000 train / 10,000 test (val).

    Files: ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (gunzipped idx
    files). ``augment``: random 28x28 crop of the image zero-padded by 2 pixels, no flip
    (flipping changes digits).
    """

    NAME = "MNIST"
    CLASS_NAMES = tuple(str(k) for k in range(10))
    INPUT_SHAPE = (1, 28, 28)
    MEAN = (0.1307,)
    STD = (0.3081,)
    CROP_PADDING = 2
    FLIP = False
    FOLDER = os.path.join("MNIST", "raw")
    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip
    HOW_TO_PLACE = (
        "fetch {urls} elsewhere, gunzip them and put train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte in {folder}"
    )
    _TV: ClassVar[Any] = tvd.MNIST

    def _torchvision(self, source: str, download: bool) -> Any:
        return self._TV(self.root, train=source == "train", download=download)

    def _arrays(self, dataset: Any) -> tuple[Tensor, Tensor]:
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.to(torch.int64)

    def _urls(self) -> list[str]:
        return [f"{self._TV.mirrors[0]}{name}" for name, _ in self._TV.resources]


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST: 28x28 grayscale clothing, 10 classes; 60,000 train / 10,000 test (val).

    Files: ``root/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.
    ``augment``: random 28x28 crop of the image zero-padded by 2 pixels + horizontal flip.
    """

    NAME = "Fashion-MNIST"
    CLASS_NAMES = tuple(tvd.FashionMNIST.classes)
    MEAN = (0.2860,)
    STD = (0.3530,)
    FLIP = True
    FOLDER = os.path.join("FashionMNIST", "raw")
    _TV = tvd.FashionMNIST


class SVHNDataModule(TorchvisionDataModule):
    """SVHN (cropped digits): 32x32 RGB, 10 classes (digit 0 is label 0);
    73,257 train / 26,032 test (val); the ``extra`` split is not used.

    Files: ``root/{train_32x32.mat, test_32x32.mat}`` (directly in ``root``, torchvision's
    layout). ``augment``: random 32x32 crop of the image zero-padded by 4 pixels, no flip
    (flipping changes digits).
    """

    NAME = "SVHN"
    CLASS_NAMES = tuple(str(k) for k in range(10))
    INPUT_SHAPE = (3, 32, 32)
    MEAN = (0.4377, 0.4438, 0.4728)
    STD = (0.1980, 0.2010, 0.1970)
    CROP_PADDING = 4
    FLIP = False
    FOLDER = ""
    FILES = ("train_32x32.mat", "test_32x32.mat")
    HOW_TO_PLACE = "fetch {urls} elsewhere and put train_32x32.mat and test_32x32.mat in {folder}"

    def _torchvision(self, source: str, download: bool) -> Any:
        return _SVHN(self.root, split=source, download=download)

    def _arrays(self, dataset: Any) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(dataset.data).contiguous(), torch.from_numpy(dataset.labels)

    def _urls(self) -> list[str]:
        return [_SVHN.split_list[s][0] for s in ("train", "test")]

    def _download(self) -> None:
        # only the missing files: torchvision re-fetches a present file whose md5 differs
        missing = set(self.missing_files())
        for source in ("train", "test"):
            if _SVHN.split_list[source][1] in missing:
                _SVHN(self.root, split=source, download=True)
