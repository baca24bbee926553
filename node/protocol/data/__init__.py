"""Offline data sets and deterministic partitioners."""

from node.protocol.data.datasets import Dataset, DatasetMissing, load_dataset
from node.protocol.data.partition import partition

__all__ = ["Dataset", "DatasetMissing", "load_dataset", "partition"]
