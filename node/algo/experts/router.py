"""The router: a classifier p(cluster | x_t, t) trained on noisy samples of the whole data set.

Near t = 0 (pure noise) it cannot tell clusters apart and its output tends to the cluster
priors, so the ensemble averages experts there; near t = 1 it is confident and one expert
dominates. That is the DDM paper's router, in small.

Paper: McAllister et al., "Decentralized Diffusion Models", arXiv 2501.05450.
"""

from __future__ import annotations

import torch

from node.algo.experts.flow import fit, noisy


def train_router(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int, *, batch_size: int = 128, **kw
) -> float:
    """Cross-entropy on (x_t, t) -> cluster of x_1; see flow.fit for the other arguments."""

    def batch_loss(gen):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        xt, t, _ = noisy(x[idx], gen)
        return torch.nn.functional.cross_entropy(model(xt, t), labels[idx])

    return fit(model, batch_loss, steps, **kw)


@torch.no_grad()
def router_accuracy(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, t: float, seed: int = 0) -> float:
    """How often the router names the right cluster of noisy samples at time t."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(x.shape, generator=gen)
    xt = (1 - t) * x0 + t * x
    pred = model(xt, torch.full((len(x),), t)).argmax(dim=1)
    return float((pred == labels).float().mean())
