"""Flow-matching denoisers (rectified flow) small enough for CPUs.

x_t = (1 - t) x_0 + t x_1 with x_0 ~ N(0, I) noise and x_1 a data point; the net predicts
the velocity x_1 - x_0 and sampling integrates dx/dt = v(x_t, t) from t = 0 (noise) to t = 1
(data) with Euler steps. The same time embedding serves the router (router.py).

Paper: flow matching, Lipman et al., "Flow Matching for Generative Modeling", arXiv 2210.02747.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, D), t (B,)) -> (B, D)


def time_embedding(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1], (B,) -> (B, dim)."""
    freqs = torch.exp(torch.arange(dim // 2, dtype=torch.float32, device=t.device) * (-math.log(1000.0) / (dim // 2)))
    angles = 1000.0 * t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeMLP(nn.Module):
    """MLP over [x, embedding(t)]: the denoiser (out = D) and the router (out = K) alike."""

    def __init__(self, dim: int, out: int, width: int = 256, depth: int = 3, t_dim: int = 32):
        """`dim`: input features D of x (B, D); `out`: output features (D for a denoiser, the K cluster logits for the
        router); `width`: units of each hidden layer; `depth`: hidden Linear+SiLU layers; `t_dim`: features of the time
        embedding (even: time_embedding gives 2 * (t_dim // 2) of them)."""
        super().__init__()
        self.dim, self.out, self.width, self.depth, self.t_dim = dim, out, width, depth, t_dim
        layers, d = [], dim + t_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        layers.append(nn.Linear(d, out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Output (B, out) for inputs x (B, dim) at times t (B,) in [0, 1]."""
        return self.net(torch.cat([x, time_embedding(t, self.t_dim)], dim=1))


def noisy(x1: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training triple (x_t, t, target velocity) for data x1."""
    x0 = torch.randn(x1.shape, generator=gen).to(x1.device)
    t = torch.rand(len(x1), generator=gen).to(x1.device)
    xt = (1 - t).unsqueeze(1) * x0 + t.unsqueeze(1) * x1
    return xt, t, x1 - x0


def fit(
    model: nn.Module,
    batch_loss: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    *,
    lr: float = 2e-3,
    seed: int = 0,
    start: int = 0,
    opt_state: dict | None = None,
    every: int = 0,
    on_checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """Adam on `batch_loss(gen)` from step `start` to `steps`, the learning rate decaying
    linearly to 5%; `on_checkpoint(step, opt)` every `every` steps and at the end (a restart
    passes the saved step and optimizer state back). Returns the last 50 steps' mean loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    # counted from `start`, so a resumed run continues the same schedule
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - 0.95 * min(1.0, (s + start) / max(1, steps)))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + start)  # deterministic from any resume point
    model.train()
    recent: list[float] = []
    for step in range(start, steps):
        loss = batch_loss(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if progress is not None:
            progress(step + 1, recent[-1])
        if on_checkpoint is not None and ((every and (step + 1) % every == 0) or step + 1 == steps):
            on_checkpoint(step + 1, opt)
    model.eval()
    return sum(recent) / len(recent) if recent else float("nan")


def train_denoiser(model: nn.Module, x: torch.Tensor, steps: int, *, batch_size: int = 128, **kw) -> float:
    """Flow matching on x (N, D) in [-1, 1]; see `fit` for the other arguments."""
    if len(x) == 0:
        raise ValueError("no data to train on")

    def batch_loss(gen):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        xt, t, target = noisy(x[idx], gen)
        return (model(xt, t) - target).pow(2).mean()

    return fit(model, batch_loss, steps, **kw)


@torch.no_grad()
def euler_sample(velocity: Velocity, n: int, dim: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """Integrate one velocity field from noise; (n, dim) samples in about [-1, 1]."""
    x = torch.randn(n, dim, generator=gen)
    for i in range(steps):
        t = torch.full((n,), i / steps)
        x = x + velocity(x, t) / steps
    return x
