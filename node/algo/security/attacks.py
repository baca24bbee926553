"""Attack models: what a byzantine node publishes in place of its honest model.

Each attack is a pure function over flat parameter vectors (see node.algo.aggregate.vectors):

- ``base``: the attacker's model at the start of the round (≈ the swarm's consensus),
- ``trained``: its model after this round's local training (on flipped labels for
  ``label_flip`` and ``sybil``),
- ``honest``: the honest models it can see this round (the simulator gives the attacker all
  of them, an omniscient worst case; a daemon uses the neighbour models it fetched last step),
- ``init``: the shared initial model.

Attacks (``Attack.name``):
- ``label_flip``: trains on labels y -> C-1-y and publishes that model honestly;
- ``sign_flip``: publishes base - scale * (trained - base), its update reversed and amplified;
- ``gaussian``: publishes trained + N(0, sigma^2) per coordinate;
- ``alie`` ("A little is enough", Baruch et al. 2019): mean - z * std of the honest models,
  coordinate-wise, with z from the paper's formula for n nodes of which f are byzantine;
- ``ipm`` (inner-product manipulation, Xie et al. 2020): base - epsilon * (mean(honest) - base),
  an update whose inner product with the honest mean update is negative; epsilon 10 is the
  paper's "large epsilon" regime that breaks plain averaging;
- ``free_ride``: never trains; publishes the stale initial model (``free_ride_mode: stale``)
  or a fresh random one (``random``);
- ``reverse``: publishes -trained; under rank exchange (FRL) that is its ranking reversed,
  the most damaging single vote;
- ``sybil``: k identities of one attacker publish one coordinated model: trained on flipped
  labels from the shared init, never mixing, identical in every member (same data, same seed),
  plus a tiny per-identity jitter so the copies are not byte-identical. The identities of one
  attacker name the same partition with ``data_of`` (a node index): same data, same seed.

Papers: ALIE, Baruch, Baruch and Goldberg, "A Little Is Enough: Circumventing Defenses For
Distributed Learning", arXiv 1902.06156; IPM, Xie, Koyejo and Gupta, "Fall of Empires: Breaking
Byzantine-tolerant SGD by Inner Product Manipulation", arXiv 1903.03936.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Protocol

import torch

from node.registry import ATTACKS, check_registered


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels y -> C - 1 - y for C = `num_classes` (same shape and dtype)."""
    return (num_classes - 1) - y


def alie_z(n: int, f: int) -> float:
    """z_max of Baruch et al.: the largest shift that still hides among n - s honest values,
    with s = floor(n/2 + 1) - f supporters needed for a majority."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    return NormalDist().inv_cdf(min(max(p, 0.5), 0.999))


@dataclass(frozen=True)
class Attack:
    """One byzantine behaviour (`name`, one of ATTACKS) and its knobs; `craft` gives the vector it publishes. Raises
    ValueError for an unknown name or free_ride_mode, or a `data_of` that is not a node index."""

    name: str
    scale: float = 4.0  # sign_flip
    sigma: float = 1.0  # gaussian
    epsilon: float = 10.0  # ipm
    z: float | None = None  # alie; None: alie_z(n, f)
    free_ride_mode: str = "stale"
    jitter: float = 1e-3  # sybil: relative std of the per-identity noise
    data_of: float | None = None  # train on this node index's partition and seed (sybil groups)

    def __post_init__(self):
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; available: {', '.join(ATTACKS)}")
        if self.free_ride_mode not in ("stale", "random"):
            raise ValueError("free_ride_mode must be stale or random")
        if self.data_of is not None and (self.data_of < 0 or self.data_of != int(self.data_of)):
            raise ValueError("data_of must be a node index")

    @property
    def flips_labels(self) -> bool:
        """Whether the attacker trains on flipped labels (`label_flip`, `sybil`)."""
        return self.name in ("label_flip", "sybil")

    @property
    def trains(self) -> bool:
        """Whether the attacker's own model is trained at all (its publication may ignore it)."""
        return self.name != "free_ride"

    @property
    def mixes(self) -> bool:
        """Whether the attacker mixes in its neighbours' models (sybils and free riders do not)."""
        return self.name not in ("sybil", "free_ride")

    def craft(
        self,
        base: torch.Tensor,
        trained: torch.Tensor,
        init: torch.Tensor,
        honest: Sequence[torch.Tensor] = (),
        n: int = 0,
        f: int = 0,
        gen: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The vector this attacker publishes (flat float32, the shape of `trained`; see the module docstring):
        CRAFTERS[name] given this attack's knobs and the round's vectors."""
        return CRAFTERS[self.name](self, Round(base, trained, init, tuple(honest), n, f, gen))


@dataclass(frozen=True)
class Round:
    """What an attacker sees in one round (flat float32 vectors of one length; see the module docstring): `base`,
    `trained`, `init`, `honest` (the honest vectors it can see), `n` nodes of which `f` byzantine (0: unknown) and
    `gen`, the generator of its noise (None: torch's global one)."""

    base: torch.Tensor
    trained: torch.Tensor
    init: torch.Tensor
    honest: tuple[torch.Tensor, ...]
    n: int
    f: int
    gen: torch.Generator | None


class Crafter(Protocol):
    """The attack extension point: (attack knobs, the round) -> the flat vector the attacker publishes. Register a
    new attack's crafter in CRAFTERS under its name in node.registry.ATTACKS."""

    def __call__(self, attack: Attack, seen: Round) -> torch.Tensor:
        """The vector `attack` publishes, having seen `seen` (flat float32, the shape of `seen.trained`)."""


def _free_ride(a: Attack, s: Round) -> torch.Tensor:
    if a.free_ride_mode == "stale":
        return s.init.clone()
    return torch.randn(s.init.shape, generator=s.gen) * s.init.std()


def _alie(a: Attack, s: Round) -> torch.Tensor:
    if not s.honest:  # before anything was seen: behave (and stay unsuspicious)
        return s.trained.clone()
    stack = torch.stack(list(s.honest))
    z = a.z if a.z is not None else alie_z(max(s.n, len(s.honest) + s.f), s.f)
    return stack.mean(0) - z * stack.std(0, unbiased=len(s.honest) > 1)


def _ipm(a: Attack, s: Round) -> torch.Tensor:
    if not s.honest:  # before anything was seen: behave (and stay unsuspicious)
        return s.trained.clone()
    return s.base - a.epsilon * (torch.stack(list(s.honest)).mean(0) - s.base)


CRAFTERS: dict[str, Crafter] = {
    "label_flip": lambda a, s: s.trained.clone(),
    "sign_flip": lambda a, s: s.base - a.scale * (s.trained - s.base),
    "reverse": lambda a, s: -s.trained,
    "gaussian": lambda a, s: s.trained + a.sigma * torch.randn(s.trained.shape, generator=s.gen),
    "free_ride": _free_ride,
    "sybil": lambda a, s: s.trained + a.jitter * s.trained.std() * torch.randn(s.trained.shape, generator=s.gen),
    "alie": _alie,
    "ipm": _ipm,
}
check_registered("attack", CRAFTERS, ATTACKS)
