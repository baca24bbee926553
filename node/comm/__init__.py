"""Who talks to whom each round, and how models are mixed. Pure functions: no sockets, no clocks."""

from __future__ import annotations

import hashlib
import random


def seeded_rng(salt: str, seed: int, round_: int) -> random.Random:
    """The random stream of one (purpose, seed, round): identical on every node, so sampled
    graphs and node sets need no coordination."""
    digest = hashlib.sha256(f"{salt}:{seed}:{round_}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
