"""Communication schedules: how many gossip steps each round gets out of a fixed budget.

- ``constant``: the budget spread evenly (with Q steps per round this is multi-step gossip,
  MGS; with one step per round, plain D-PSGD).
- ``late``: a late-concentrated budget ("A Single Merging Suffices"): round r gets a share
  proportional to ((r + 1) / R) ** shape, so most steps fall in the last rounds; shape 0 is
  constant, larger shapes concentrate harder.
Integer steps are allotted by cumulative rounding, so the total is exactly the budget.
A final global merge (one exact average of all live nodes) is a separate switch.

Papers: multi-step gossip (MGS), Shi et al., "Improving the Model Consistency of Decentralized
Federated Learning", arXiv 2302.04083; the late-concentrated budget, "A Single Merging Suffices:
Recovering Server-based Learning Performance in Decentralized Learning", 2025.
"""

from __future__ import annotations

import math


def allotment(schedule: str, rounds: int, budget: int, shape: float = 3.0) -> list[int]:
    """Gossip steps for every round; sums to `budget`."""
    if rounds < 1 or budget < 0:
        raise ValueError("rounds must be >= 1 and budget >= 0")
    if schedule == "constant":
        weights = [1.0] * rounds
    elif schedule == "late":
        if shape < 0:
            raise ValueError("shape must be >= 0")
        weights = [((r + 1) / rounds) ** shape for r in range(rounds)]
    else:
        raise ValueError(f"unknown schedule {schedule!r}; available: constant, late")
    # cumulative rounding: round r gets round(C(r+1)) - round(C(r)) where C is the cumulative
    # share, so steps follow the curve, spread evenly when it is flat, and sum to the budget
    total, acc, prev, steps = sum(weights), 0.0, 0, []
    for w in weights:
        acc += budget * w / total
        now = min(budget, math.floor(acc + 0.5))
        steps.append(now - prev)
        prev = now
    steps[-1] += budget - prev  # float drift
    return steps
