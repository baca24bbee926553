"""Offline data sets and deterministic partitioners."""

from node.data.datasets import Dataset, load_dataset
from node.data.partition import partition

__all__ = ["Dataset", "load_dataset", "partition"]
