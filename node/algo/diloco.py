"""DiLoCo's outer optimizer: Nesterov SGD on the averaged pseudo-gradient (pure; no sockets, clocks or globals).

A DiLoCo round starts from parameters theta, takes H inner steps of the task's optimizer (AdamW in the paper) to
theta', and the pseudo-gradient is theta - theta'. The swarm's pseudo-gradients are averaged (an all-reduce in
DiLoCo; over a gossip graph, each node with its own momentum, in NoLoCo's direction), and the outer step applies
the average g with Nesterov momentum: buf = mu * buf + g; theta <- theta - lr * (g + mu * buf), as
torch.optim.SGD(nesterov=True, dampening=0) does (the first step starts from buf = g). With lr 1 and mu 0 the outer
step takes the average itself: H local steps, then gossip.

Papers: DiLoCo, Douillard et al., arXiv 2311.08105 (outer lr 0.7, momentum 0.9); NoLoCo, Kolehmainen et al.,
arXiv 2506.10911.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def pseudo_gradient(start: Mapping[str, torch.Tensor], average: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """start - average for every floating tensor of `start` (same shapes and dtypes): the averaged pseudo-gradient
    when `average` is the average of the nodes' parameters after their inner steps, all begun at `start`."""
    return {k: start[k] - average[k] for k, v in start.items() if v.is_floating_point()}


def nesterov(
    start: Mapping[str, torch.Tensor],
    g: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor] | None,
    lr: float,
    mu: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new floating tensors, new momentum buffers): one Nesterov step from `start` on the pseudo-gradient `g` (a
    tensor per floating tensor of `start`, same shapes). `momentum`: the last step's buffers, None on the first;
    `lr` > 0 and `mu` in [0, 1). Raises KeyError when a tensor is missing."""
    buf = {k: (g[k].clone() if momentum is None else mu * momentum[k] + g[k]) for k in g}
    return {k: start[k] - lr * (g[k] + mu * buf[k]) for k in g}, buf


def outer_step(
    start: Mapping[str, torch.Tensor],
    average: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor] | None,
    lr: float,
    mu: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new parameters, new momentum buffers): one Nesterov outer step from `start` on the pseudo-gradient
    start - `average` (floating tensors; the others are taken from `average`). `momentum`: the buffers of the last
    step, None on the first; `lr` > 0 and `mu` in [0, 1). Raises KeyError when a tensor is missing."""
    moved, buf = nesterov(start, pseudo_gradient(start, average), momentum, lr, mu)
    return {k: moved[k] if k in moved else average[k].clone() for k in start}, buf
