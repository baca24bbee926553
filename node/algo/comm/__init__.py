"""Who talks to whom each round, and how models are mixed. Pure functions: no sockets, no clocks."""

from __future__ import annotations

import hashlib
import random


def seeded_rng(salt: str, seed: int, round_: int, step: int = 0) -> random.Random:
    """The random stream of one (purpose, seed, round, gossip step): identical on every node, so
    sampled graphs and node sets need no coordination. Round and step stay separate: no number
    of gossip steps in a round can make two (round, step) pairs share a stream."""
    key = f"{salt}:{seed}:{round_}" if step == 0 else f"{salt}:{seed}:{round_}:{step}"
    digest = hashlib.sha256(key.encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
