"""How many CPU threads a node's torch uses."""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(wanted: int | None) -> int:
    """Set torch's intra-op threads to `wanted` and return the number. By default: what
    OMP_NUM_THREADS says where it is set, else the usable cores. Several nodes on one host
    must not each use every core (see docs/benchmarks and issue 16 for the cost)."""
    n = wanted or (torch.get_num_threads() if "OMP_NUM_THREADS" in os.environ else usable_cores())
    torch.set_num_threads(n)
    return n
