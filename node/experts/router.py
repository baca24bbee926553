"""The router: a classifier p(cluster | x_t, t) trained on noisy samples of the whole data set.

Near t = 0 (pure noise) it cannot tell clusters apart and its output tends to the cluster
priors, so the ensemble averages experts there; near t = 1 it is confident and one expert
dominates. That is the DDM paper's router, in small.
"""

from __future__ import annotations

from typing import Callable

import torch

from node.experts.flow import TimeMLP, noisy


def router_net(dim: int, k: int, width: int = 256, depth: int = 3, seed: int = 0) -> TimeMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TimeMLP(dim, k, width, depth)


def train_router(model: TimeMLP, x: torch.Tensor, labels: torch.Tensor, steps: int, *, batch_size: int = 128,
                 lr: float = 2e-3, seed: int = 0, progress: Callable[[int, float], None] | None = None) -> float:
    """Cross-entropy on (x_t, t) -> cluster of x_1; returns the last 50 steps' mean loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - 0.95 * s / max(1, steps))
    model.train()
    recent: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        xt, t, _ = noisy(x[idx], gen)
        loss = torch.nn.functional.cross_entropy(model(xt, t), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if progress is not None:
            progress(step + 1, recent[-1])
    model.eval()
    return sum(recent) / len(recent)


@torch.no_grad()
def router_accuracy(model: TimeMLP, x: torch.Tensor, labels: torch.Tensor, t: float, seed: int = 0) -> float:
    """How often the router names the right cluster of noisy samples at time t."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(x.shape, generator=gen)
    xt = (1 - t) * x0 + t * x
    pred = model(xt, torch.full((len(x),), t)).argmax(dim=1)
    return float((pred == labels).float().mean())
