"""Sampling from an ensemble of experts through the router.

At every Euler step the router gives p(k | x_t, t) per sample; the strategy keeps the top-k
experts of each sample (top-1, top-k, or all for the full ensemble) and renormalises their
weights; each expert is called once per step on just the samples that need it, and the
velocity is the weighted sum. An expert that fails (dead, slow, refused) is dropped for the
rest of the run and its weight is renormalised over the others; the result says which experts
served each sample.

Paper: McAllister et al., "Decentralized Diffusion Models", arXiv 2501.05450.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from node.algo.experts.flow import Velocity


class ExpertUnavailable(Exception):
    """Raised by an expert callable that could not answer (the sampler drops that expert)."""


def parse_strategy(text: str, k: int) -> int:
    """'top1' / 'top-2' / 'full' -> how many experts each sample uses (full = all k)."""
    if text == "full":
        return k
    m = re.fullmatch(r"top-?([0-9]{1,3})", text)
    if not m or not 1 <= int(m.group(1)) <= k:
        shown = text if len(text) <= 16 else text[:16] + "..."
        raise ValueError(f"strategy must be top1 .. top{k} or full, got {shown!r}")
    return int(m.group(1))


def expert_weights(probs: torch.Tensor, top: int, alive: torch.Tensor) -> torch.Tensor:
    """(B, K) router probabilities -> (B, K) weights over live experts, top `top` per row, summing to 1."""
    p = probs * alive.to(probs.dtype).unsqueeze(0)
    top = min(top, int(alive.sum()))
    kth = p.topk(top, dim=1).values[:, -1:]
    w = torch.where(p >= kth, p, torch.zeros_like(p))
    w = torch.where(alive.unsqueeze(0), w, torch.zeros_like(w))
    s = w.sum(dim=1, keepdim=True)
    # a row whose router mass all sat on dead experts: the live ones share it equally
    uniform = alive.to(p.dtype).unsqueeze(0).expand_as(p) / alive.sum()
    return torch.where(s > 0, w / s.clamp_min(1e-12), uniform)


@dataclass
class SampleResult:
    """What `sample` returns: the (n, D) samples, the experts that served each, the experts dropped with the reason,
    the number of expert calls and, per sample, the fewest experts mixed at one step."""

    x: torch.Tensor  # (n, D)
    served: list[set[int]]  # experts that contributed to each sample, over all steps
    failed: dict[int, str] = field(default_factory=dict)  # expert -> why it was dropped
    expert_calls: int = 0
    fewest: list[int] = field(default_factory=list)  # per sample: experts mixed at its leanest step


@torch.no_grad()
def sample(
    router: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    experts: Mapping[int, Velocity],
    k: int,
    n: int,
    dim: int,
    steps: int,
    top: int,
    gen: torch.Generator | None = None,
    x0: torch.Tensor | None = None,
) -> SampleResult:
    """Euler sampling of n images from the ensemble, from noise x0 (or drawn from `gen`).
    `experts` maps cluster id -> velocity callable (missing ids count as dead); `router`
    returns logits (B, k)."""
    alive = torch.tensor([j in experts for j in range(k)])
    if not alive.any():
        raise ExpertUnavailable("no live expert")
    x = x0.clone() if x0 is not None else torch.randn(n, dim, generator=gen)
    served: list[set[int]] = [set() for _ in range(n)]
    out = SampleResult(x, served)
    fewest = torch.full((n,), k)
    for i in range(steps):
        t = torch.full((n,), i / steps)
        probs = torch.softmax(router(x, t), dim=1)
        for _attempt in range(k):  # each retry follows the loss of one expert: bounded by k
            w = expert_weights(probs, top, alive)
            v = torch.zeros_like(x)
            try:
                for j in torch.nonzero(w.sum(dim=0) > 0).flatten().tolist():
                    rows = torch.nonzero(w[:, j] > 0).flatten()
                    out.expert_calls += 1
                    pred = experts[j](x[rows], t[rows])
                    if pred.shape != (len(rows), dim) or not torch.isfinite(pred).all():
                        raise ExpertUnavailable(f"expert {j} answered shape {tuple(pred.shape)} or non-finite values")
                    v[rows] += w[rows, j].unsqueeze(1) * pred
                    for r in rows.tolist():
                        served[r].add(j)
                fewest = torch.minimum(fewest, (w > 0).sum(dim=1))
                break
            except ExpertUnavailable as e:
                alive[j] = False
                out.failed[j] = str(e)
                if not alive.any():
                    raise ExpertUnavailable(f"every expert failed: {out.failed}") from None
        x = x + v / steps
    out.x = x
    out.fewest = fewest.tolist()
    return out
