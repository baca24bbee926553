"""Attack rehearsals: a node configured with `security.attack` publishes a forgery in place of
its model. Tests and benchmarks install a `Forger` on the node's gossip protocol
(`install`); nothing of it is on the path of an honest node.

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


def install(engine, me: str) -> None:
    """Make `engine`'s node attack as its config says (no-op without `security.attack`)."""
    if engine.cfg.security.attack:
        engine.protocol.forger = Forger(engine.cfg, engine.worker, me)
