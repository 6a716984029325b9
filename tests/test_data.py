"""metatele.data: the offline digits, MNIST / FashionMNIST / CIFAR-10 through torchvision's real loaders on
files written in their own formats, splits, teleport batches, and the missing-files message."""
import numpy as np
import pytest
import torch

from _fake_datasets import skip_cifar_md5, write_cifar10, write_mnist
from metatele.data import (DatasetNotFoundError, Split, TeleportBatches, iterate_minibatches, load_dataset)


def test_digits_offline_splits():
    d = load_dataset("digits")
    assert d.n_features == 64 and d.n_classes == 10
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert d.train.X.dtype == torch.float32 and 0 <= float(d.train.X.min()) and float(d.train.X.max()) <= 1
    assert not d.val_is_test
    d2 = load_dataset("digits")
    assert torch.equal(d.train.X, d2.train.X) and torch.equal(d.val.y, d2.val.y)
    d3 = load_dataset("digits", split_seed=2)
    assert not torch.equal(d.val.X, d3.val.X)
    paper = load_dataset("digits", test_as_val=True)
    assert paper.val_is_test and torch.equal(paper.val.X, paper.test.X)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_through_torchvision(tmp_path, name, folder):
    written = write_mnist(str(tmp_path), folder, n_train=100, n_test=30)
    d = load_dataset(name, str(tmp_path))
    img, lab = written["train"]
    assert d.n_features == 784
    assert len(d.train) == 80 and len(d.val) == 20 and len(d.test) == 30
    # every training + validation row is one written image scaled like ToTensor, with its label
    rows = torch.cat([d.train.X, d.val.X])
    labels = torch.cat([d.train.y, d.val.y])
    ref = torch.from_numpy(img.reshape(100, -1).astype(np.float32) / 255)
    match = (rows[:, None, :] == ref[None]).all(-1)   # (80+20, 100)
    idx = match.float().argmax(1)
    assert bool(match.any(1).all()) and len(set(idx.tolist())) == 100
    assert torch.equal(labels, torch.from_numpy(lab.astype(np.int64))[idx])
    ti, tl = written["t10k"]
    assert torch.equal(d.test.X, torch.from_numpy(ti.reshape(30, -1).astype(np.float32) / 255))
    assert torch.equal(d.test.y, torch.from_numpy(tl.astype(np.int64)))


def test_cifar10_batches_through_torchvision(tmp_path, monkeypatch):
    written = write_cifar10(str(tmp_path), n_per_batch=20, n_test=15)
    skip_cifar_md5(monkeypatch)
    d = load_dataset("cifar10", str(tmp_path), test_as_val=True)
    assert d.n_features == 3072 and len(d.test) == 15 and d.val_is_test
    # CIFAR rows are stored channel-major (R plane, G plane, B plane): our features keep that order
    data, labels = written["test"]
    assert torch.equal(d.test.X, torch.from_numpy(data.astype(np.float32) / 255))
    assert torch.equal(d.test.y, torch.from_numpy(labels.astype(np.int64)))
    assert len(d.train) + 20 == 100  # 20 % of 100 training images moved to validation


@pytest.mark.parametrize("name,needle", [("mnist", "train-images-idx3-ubyte"),
                                         ("fashion_mnist", "FashionMNIST"),
                                         ("cifar10", "data_batch_1")])
def test_missing_files_message(tmp_path, name, needle):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert needle in msg and "--download" in msg and "digits" in msg


def test_unknown_dataset_and_bad_sizes():
    with pytest.raises(ValueError, match="allowed"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=0)


def test_teleport_batches_stream():
    split = Split(torch.arange(50.0).reshape(25, 2), torch.arange(25))
    tb = TeleportBatches(split, 10, torch.Generator().manual_seed(0))
    a, b = tb(), tb()
    assert a[0].shape == (10, 2)
    assert not set(a[1].tolist()) & set(b[1].tolist())   # without replacement within a pass
    c = tb()                                              # 5 left < 10: a new pass
    assert c[0].shape == (10, 2)
    tb2 = TeleportBatches(split, 10, torch.Generator().manual_seed(0))
    assert torch.equal(tb2()[1], a[1])
    big = TeleportBatches(split, 2000)
    assert big.batch_size == 25 and big()[0].shape == (25, 2)


def test_minibatches_sequential_and_shuffled():
    split = Split(torch.arange(14.0).reshape(7, 2), torch.arange(7))
    seq = list(iterate_minibatches(split, 3))
    assert [len(y) for _, y in seq] == [3, 3, 1] and torch.equal(torch.cat([y for _, y in seq]), torch.arange(7))
    sh = torch.cat([y for _, y in iterate_minibatches(split, 3, shuffle=True,
                                                         generator=torch.Generator().manual_seed(1))])
    assert sorted(sh.tolist()) == list(range(7))
