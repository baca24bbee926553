"""The judge: a small CNN classifier trained on the same data set, whose penultimate features
score generated images (node/app/evaluate.py) and cluster the data for the diffusion experts
(node/algo/experts/cluster.py, as the DDM paper clusters DINOv2 features, arXiv 2501.05450).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from node.protocol.models import build_model
from node.protocol.train import evaluate


@dataclass
class Judge:
    """A CNN classifier (nn.Sequential ending in a Linear) and its accuracy on the held-out split (a fraction)."""

    model: nn.Sequential
    accuracy: float  # on the held-out split

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 2048) -> torch.Tensor:
        """Penultimate features (N, F) float32 of `images` (N, C, H, W) in [0, 1]: every layer but the last Linear,
        in eval mode, `batch` images at a time."""
        self.model.eval()
        body = list(self.model)[:-1]  # everything but the last Linear
        out = []
        for i in range(0, len(images), batch):
            h = images[i : i + batch]
            for layer in body:
                h = layer(h)
            out.append(h)
        return torch.cat(out) if out else torch.zeros(0, self.model[-1].in_features)

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes) of `images` (N, C, H, W), in eval mode."""
        self.model.eval()
        return torch.softmax(self.model(images), dim=1)


def train_judge(ds, steps: int = 1500, seed: int = 0) -> Judge:
    """Train a `cnn` classifier (width 32) on `ds`'s training split (a node.protocol.data.Dataset) with Adam (lr
    1e-3, batches of 128) for `steps` steps from `seed`; returns it with its test accuracy. Deterministic for a
    given seed, torch build and thread count."""
    model = build_model("cnn", tuple(ds.x_train.shape[1:]), ds.num_classes, 32, seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(ds.x_train), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return Judge(model, evaluate(model, ds.x_test, ds.y_test))
