"""Images -> one PNG grid (matplotlib on the file-only backend)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: Path, cols: int | None = None, title: str | None = None) -> Path:
    """images (N, C, H, W) in [0, 1]; writes a grid, grayscale for one channel."""
    from node.app.plotting import pyplot

    plt = pyplot()
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
