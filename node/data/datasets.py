"""Data sets that ship inside installed packages, so nodes work offline.

`digits`: scikit-learn's 1,797 8x8 handwritten digits (10 classes), scaled to [0, 1].
The train/test split is a deterministic function of the seed, identical on every node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, (N, C, H, W)
    y_train: torch.Tensor  # int64, (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
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


def load_dataset(name: str = "digits", *, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    if name != "digits":
        raise ValueError(f"unknown data set {name!r}; available: digits")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise RuntimeError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    return Dataset(name, torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte), 10)
