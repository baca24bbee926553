"""Attack rehearsals: a node configured with `security.attack` publishes a forgery in place of
its model. `install` is the one way in, for every round protocol: it asks the protocol for its kind
of forger (`Forger` for model gossip, `RankForger` for FRL) and sets it as the protocol's `forger`;
nothing of it is on the path of an honest node.

What the forger knows is what a malicious daemon would: its own model at the start of the
round (`ref`) and after training (`own`), the shared init, and the neighbour models it
fetched at its last gossip step (ALIE and IPM use them). It assumes n = its neighbours + 1
nodes of which f = max(1, byzantine_fraction * n) collude. Its random draws (Gaussian noise,
sybil jitter, random free riding) are seeded by (train.seed, peer id, round, step), so a
daemon and a simulated node with the same id forge the same bytes.
"""

from __future__ import annotations

import hashlib

import torch

from node.algo.aggregate.vectors import flatten, unflatten


class Forger:
    """Forges what an attacking node publishes (`cfg.security.attack`, node/algo/security/attacks.py)."""

    def __init__(self, cfg, worker, me: str):
        """`cfg`: the attacker's NodeConfig (`train.seed`, `security.byzantine_fraction`); `worker`: its Worker, whose
        `attack` (not None) and shared init it uses; `me`: its peer id, part of the seed of every draw."""
        self.attack = worker.attack
        self.init = worker.init_vector
        self.seed, self.me = cfg.train.seed, me
        self.byzantine_fraction = cfg.security.byzantine_fraction
        self.seen: list[torch.Tensor] = []

    @property
    def mixes(self) -> bool:
        """Whether this attacker mixes its neighbours' models into its own."""
        return self.attack.mixes

    def forge(self, ref: dict, own: dict, r: int, q: int) -> dict:
        """The state dict to publish as (model, r, q) instead of `own`."""
        key = f"{self.seed}:{self.me}:{r}:{q}".encode()
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1)
        n = len(self.seen) + 1
        f = max(1, int(self.byzantine_fraction * n))
        vec = self.attack.craft(flatten(ref), flatten(own), self.init, self.seen, n=n, f=f, gen=gen)
        return unflatten(vec, own)

    def saw(self, answered: dict) -> None:
        """The neighbour models of this gossip step."""
        self.seen = [flatten(sd) for sd in answered.values()]


class RankForger:
    """Forges what an attacking FRL node publishes (node/protocol/rounds/ranks.py): the same attacks, applied to the
    vector of its edge positions instead of its weights. Its draws are seeded by (train.seed, round)."""

    def __init__(self, cfg, worker, init: torch.Tensor):
        """`cfg`: the attacker's NodeConfig (`train.seed`, `security.byzantine_fraction`); `worker`: its Worker, whose
        `attack` (not None) it uses; `init`: its initial edge positions (float, flat), where the attacks start."""
        self.attack, self.init = worker.attack, init
        self.seed, self.byzantine_fraction = cfg.train.seed, cfg.security.byzantine_fraction
        self.seen: list[torch.Tensor] = []

    @property
    def mixes(self) -> bool:
        """Whether this attacker votes with its neighbours."""
        return self.attack.mixes

    def forge(self, start: torch.Tensor, positions: torch.Tensor, r: int) -> torch.Tensor | None:
        """The position vector to publish in round `r` instead of `positions` (`start`: at the round's start); None
        to publish the honest ranking (a label flip attacks the data, not what travels)."""
        if self.attack.name == "label_flip":
            return None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
        n = len(self.seen) + 1
        f = max(1, int(self.byzantine_fraction * n))
        return self.attack.craft(start, positions, self.init, self.seen, n=n, f=f, gen=gen)

    def saw(self, positions: list[torch.Tensor]) -> None:
        """The neighbours' position vectors of this round."""
        self.seen = positions


def install(engine, me: str) -> None:
    """Make `engine`'s node attack as its config says, whatever its round protocol: the protocol's own kind of forger
    (`forger_for`, node/protocol/rounds/__init__.py) becomes its `forger` (no-op without `security.attack`)."""
    if engine.cfg.security.attack:
        engine.protocol.forger = engine.protocol.forger_for(engine.cfg, engine.worker, me)
