"""Data sets that ship inside installed packages, so nodes work offline.

- `digits`: scikit-learn's 1,797 8x8 handwritten digits (10 classes), scaled to [0, 1], read
  from the table scikit-learn ships (or `path`); the train/test split is a deterministic
  function of the seed, identical on every node.
- `fashion-mnist`: the 70,000 28x28 images of the Debian package `dataset-fashion-mnist`
  (IDX files in /usr/share/datasets/fashion-mnist, or `path`), with its own test split.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist")


class DatasetMissing(RuntimeError):
    """A data set that is not installed on this machine; the message says how to get it."""


@dataclass(frozen=True)
class Dataset:
    """A data set in memory: float32 images (N, C, H, W) in [0, 1] and int64 labels (N,) for the train and test splits,
    and the class count."""

    name: str
    x_train: torch.Tensor  # float32, (N, C, H, W)
    y_train: torch.Tensor  # int64, (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    test_idx, train_idx = [], []
    for c in np.unique(y):  # stratified: every class in both splits
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(round(len(idx) * test_fraction)))
        test_idx.extend(idx[:k])
        train_idx.extend(idx[k:])
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def load_dataset(
    name: str = "digits", *, test_fraction: float = 0.25, seed: int = 0, path: str | os.PathLike | None = None
) -> Dataset:
    """The data set `name`: `digits` split stratified by `test_fraction` and `seed`, or `fashion-mnist` from `path`
    with its own test split. Raises ValueError for an unknown name or inconsistent files, DatasetMissing when its
    files are absent."""
    if name == "digits":
        return _digits(test_fraction, seed, Path(path) if path else None)
    if name == "fashion-mnist":
        return _fashion_mnist(Path(path) if path else FASHION_MNIST_DIR)
    raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")


def _digits(test_fraction: float, seed: int, path: Path | None) -> Dataset:
    x, y = read_digits(path)
    xtr, ytr, xte, yte = _split((x / 16.0)[:, None, :, :], y, test_fraction, seed)
    return Dataset(
        "digits", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte), 10
    )


def digits_file() -> Path:
    """Where scikit-learn's digits table (digits.csv.gz) lies, found without importing scikit-learn (its import
    costs a node 0.5 s). Raises DatasetMissing without scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissing(
            "the digits data set ships with scikit-learn, which is not installed: pip install scikit-learn"
        )
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def read_digits(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 images (1797, 8, 8) with values 0..16 and int64 labels (1797,), from `path`
    (default: the file scikit-learn ships, see digits_file). Raises DatasetMissing when the file is absent,
    ValueError for a file that is not the digits table."""
    path = path or digits_file()
    if not path.is_file():
        raise DatasetMissing(f"the digits table {path} is missing: reinstall scikit-learn or set data.path")
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not scikit-learn's digits table: {e}") from None
    if table.ndim != 2 or table.shape[1] != 65 or not np.isin(table[:, -1], np.arange(10)).all():
        raise ValueError(f"{path} is not scikit-learn's digits table (rows of 64 pixels and a label)")
    if table[:, :-1].min() < 0 or table[:, :-1].max() > 16:
        raise ValueError(f"{path} has pixel values outside 0..16")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _fashion_mnist(root: Path) -> Dataset:
    files = {
        k: root / f"{k}-ubyte.gz"
        for k in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    }
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): install the Debian package "
            f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set data.path"
        )
    xtr, ytr = read_idx(files["train-images-idx3"], 3), read_idx(files["train-labels-idx1"], 1)
    xte, yte = read_idx(files["t10k-images-idx3"], 3), read_idx(files["t10k-labels-idx1"], 1)
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        if len(x) != len(y) or x.shape[1:] != (28, 28) or y.max(initial=0) > 9:
            raise ValueError(
                f"Fashion-MNIST {split} files in {root} are inconsistent: {x.shape} images, {y.shape} labels"
            )
    prep = lambda x: torch.from_numpy(x.astype(np.float32)[:, None] / 255.0)  # noqa: E731
    return Dataset(
        "fashion-mnist",
        prep(xtr),
        torch.from_numpy(ytr.astype(np.int64)),
        prep(xte),
        torch.from_numpy(yte.astype(np.int64)),
        10,
    )


_IDX_MAX_BYTES = 1 << 30


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (the MNIST format), validated before use."""
    with gzip.open(path, "rb") as f:
        head = f.read(4)
        if len(head) != 4 or head[:2] != b"\x00\x00" or head[2] != 0x08 or head[3] != ndim:
            raise ValueError(f"{path} is not an IDX file of {ndim}-d unsigned bytes")
        dims = np.frombuffer(f.read(4 * ndim), dtype=">u4").astype(np.int64)
        if len(dims) != ndim or int(np.prod(dims)) > _IDX_MAX_BYTES:
            raise ValueError(f"{path}: bad or oversized dimensions {dims.tolist()}")
        data = f.read(int(np.prod(dims)) + 1)
    if len(data) != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} data bytes, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(tuple(int(d) for d in dims))
