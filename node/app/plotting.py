"""Figures for files: matplotlib on its file-only backend (servers have no display)."""

from __future__ import annotations


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use (matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
