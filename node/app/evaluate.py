"""Measuring generated images with a classifier trained on the same data set in the same run.

- ``frechet``: the Fréchet distance between Gaussian fits of the classifier's penultimate
  features on generated and on held-out real images. It is *not* Inception FID (no Inception
  net, 8x8 or 28x28 images): compare numbers only within one run.
- ``confidence``: mean max-softmax of the classifier on the samples (do they look like some digit);
- ``coverage``: share of classes that are the classifier's top guess for at least 2% of samples.
"""

from __future__ import annotations

import numpy as np
import torch

from node.protocol.judge import Judge, train_judge

__all__ = ["Judge", "frechet", "score", "train_judge"]


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
