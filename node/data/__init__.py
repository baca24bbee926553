"""Offline data sets and deterministic partitioners."""

from node.data.datasets import Dataset, DatasetMissing, load_dataset
from node.data.partition import partition

__all__ = ["Dataset", "DatasetMissing", "load_dataset", "partition"]
