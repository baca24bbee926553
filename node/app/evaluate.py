"""Measuring generated images with a classifier trained on the same data set in the same run.

- ``frechet``: the Fréchet distance between Gaussian fits of the classifier's penultimate
  features on generated and on held-out real images. It is *not* Inception FID (no Inception
  net, 8x8 or 28x28 images): compare numbers only within one run.
- ``confidence``: mean max-softmax of the classifier on the samples (do they look like some digit);
- ``coverage``: share of classes that are the classifier's top guess for at least 2% of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from node.protocol.models import build_model
from node.protocol.train import evaluate


@dataclass
class Judge:
    """The classifier that scores generated images: a CNN (nn.Sequential ending in a Linear) and its accuracy on the
    held-out split (a fraction)."""

    model: nn.Sequential
    accuracy: float  # on the held-out split

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, F) of `images` (N, C, H, W): every layer but the last Linear, in eval mode."""
        self.model.eval()
        out = images
        for layer in list(self.model)[:-1]:  # everything but the last Linear
            out = layer(out)
        return out

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes) of `images` (N, C, H, W), in eval mode."""
        self.model.eval()
        return torch.softmax(self.model(images), dim=1)


def train_judge(ds, steps: int = 1500, seed: int = 0) -> Judge:
    """Train a `cnn` classifier (width 32) on `ds`'s training split with Adam (lr 1e-3, batches of 128) for `steps`
    steps from `seed`; returns it with its test accuracy."""
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


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a and b (rows = samples)."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    ca, cb = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    # tr sqrt(ca cb) = sum of sqrt of the eigenvalues of ca cb, which are real and >= 0 for
    # PSD ca, cb (up to rounding): no matrix square root needed
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)


def score(judge: Judge, samples: torch.Tensor, real: torch.Tensor, num_classes: int) -> dict:
    """samples and real: images (N, C, H, W) in [0, 1]."""
    p = judge.probs(samples)
    share = torch.bincount(p.argmax(dim=1), minlength=num_classes).float() / len(samples)
    return dict(
        frechet=frechet(judge.features(samples), judge.features(real)),
        confidence=float(p.max(dim=1).values.mean()),
        coverage=float((share >= 0.02).float().mean()),
    )
