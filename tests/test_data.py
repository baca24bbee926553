"""Data: partitions (IID, Dirichlet, shards), the stratified split, digits and Fashion-MNIST readers."""

import numpy as np
import pytest
import torch
from sysdeps import needs

from node.protocol.data import load_dataset, partition


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partitions_cover_everything_once_and_are_deterministic(kind):
    y = load_dataset().y_train.numpy()
    parts = partition(y, 8, kind, alpha=0.3, seed=4)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert min(len(p) for p in parts) >= 10
    again = partition(y, 8, kind, alpha=0.3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_skew_follows_alpha():
    y = load_dataset().y_train.numpy()

    def mean_classes_per_node(alpha):  # classes holding >= 5% of a node's data
        return np.mean(
            [
                (np.bincount(y[p], minlength=10) / len(p) >= 0.05).sum()
                for p in partition(y, 8, "dirichlet", alpha=alpha)
            ]
        )

    assert mean_classes_per_node(0.1) < mean_classes_per_node(100.0)


def test_partition_refuses_impossible_requests():
    with pytest.raises(ValueError):
        partition(np.zeros(50, dtype=int), 10)


def test_split_is_stratified_and_shared():
    a, b = load_dataset(seed=3), load_dataset(seed=3)
    assert torch.equal(a.y_test, b.y_test) and set(a.y_test.tolist()) == set(range(10))


def test_digits_read_without_sklearn_equal_sklearn_loader():
    # a node reads the file scikit-learn ships instead of importing scikit-learn (0.5 s, 30 MB)
    import subprocess
    import sys

    code = "import sys; from node.protocol.data import load_dataset; load_dataset(); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    from sklearn.datasets import load_digits

    from node.protocol.data.datasets import read_digits

    x, y = read_digits()
    d = load_digits()
    assert np.array_equal(x, d.images.astype(np.float32)) and np.array_equal(y, d.target)


def test_digits_path_names_the_table(tmp_path):
    import gzip

    from node.protocol.data import DatasetMissing

    with pytest.raises(DatasetMissing, match="missing"):
        load_dataset("digits", path=tmp_path / "nope.csv.gz")
    junk = tmp_path / "junk.csv.gz"
    junk.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(ValueError, match="not scikit-learn's digits table"):
        load_dataset("digits", path=junk)


def _write_idx(path, arr):
    import gzip
    import struct

    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes())


def test_fashion_mnist_reader_on_small_idx_files(tmp_path):
    from node.protocol.data.datasets import DatasetMissing

    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", path=tmp_path)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    ds = load_dataset("fashion-mnist", path=tmp_path)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (12, 1, 28, 28)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    # a truncated file and a wrong magic number are refused with a reason
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 11, dtype=np.uint8))
    with pytest.raises(ValueError, match="inconsistent"):
        load_dataset("fashion-mnist", path=tmp_path)
    import gzip

    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX"):
        load_dataset("fashion-mnist", path=tmp_path)


@needs("dataset-fashion-mnist")
def test_real_fashion_mnist_when_installed():
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
