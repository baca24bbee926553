"""Knowledge distillation from fused soft targets on the proxy set.

Paper: knowledge distillation on soft targets, Hinton, Vinyals and Dean, "Distilling the Knowledge
in a Neural Network", arXiv 1503.02531.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def soft_targets(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float = 2.0) -> torch.Tensor:
    """Weighted average of the teachers' softened distributions (all over the same rows)."""
    if not logits or len(logits) != len(weights):
        raise ValueError("one weight per teacher, at least one teacher")
    w = torch.tensor(weights, dtype=torch.float32)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    return sum(wi * F.softmax(z.float() / temperature, dim=1) for wi, z in zip(w, logits))


def fused_targets(
    n_proxy: int,
    num_classes: int,
    teachers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    weights: Mapping[str, float],
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per proxy sample, the weighted average of the softened distributions of the teachers
    that sent logits for it. `teachers` maps a name to (row indices, logits for those rows):
    an EdgeFD teacher speaks only for the rows its filter keeps. Returns (targets for every
    row, indices of the rows at least one teacher covered), on the CPU."""
    num = torch.zeros(n_proxy, num_classes)
    den = torch.zeros(n_proxy, 1)
    for name, (rows, logits) in teachers.items():
        w = float(weights[name])
        if w <= 0:
            continue
        rows = rows.long().cpu()
        num[rows] += w * F.softmax(logits.float().cpu() / temperature, dim=1)
        den[rows] += w
    covered = torch.nonzero(den[:, 0] > 0).flatten()
    return num / den.clamp_min(1e-12), covered


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(targets || student) at the temperature, scaled by T^2 (Hinton et al.)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p, targets, reduction="batchmean") * temperature**2


def distill_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    proxy_x: torch.Tensor,
    targets: torch.Tensor,
    covered: torch.Tensor,
    steps: int,
    batch_size: int,
    temperature: float,
    generator: torch.Generator,
) -> float | None:
    """`steps` minibatch steps of distillation on the covered proxy rows; mean loss, or None
    if no row is covered.

    `optimizer` should be the node's own momentum-free SGD for distillation, not its local
    optimizer: a momentum buffer built on the local cross-entropy and carried into the first
    distillation step killed every ReLU of a small CNN in the simulator (accuracy stuck at
    10%), and gradient clipping did not prevent it."""
    if len(covered) == 0:
        return None
    model.train()
    device = proxy_x.device
    total = 0.0
    for _ in range(steps):
        pick = torch.randint(len(covered), (min(batch_size, len(covered)),), generator=generator)
        b = covered[pick]
        optimizer.zero_grad(set_to_none=True)
        loss = distillation_loss(model(proxy_x[b.to(device)]), targets[b].to(device), temperature)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / max(1, steps)
