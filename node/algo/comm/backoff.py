"""Exponential back-off of unreachable neighbours, counted in rounds (no clocks).

A neighbour that could not be reached at all (connection refused, or no answer to any request
before the fetch deadline) would otherwise cost every round of its neighbours the whole fetch
timeout. After its first failure it is skipped without waiting for 1 round, then 2, 4, ... up
to `max_rounds`, and tried again after each pause; one successful fetch clears it. A peer that
answers but is behind, or sends bad data, is not unreachable and is handled per round as before.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _State:
    failures: int  # consecutive unreachable rounds
    retry_at: int  # first round in which the peer is tried again


class Backoff:
    """Which neighbours to skip this round. Pure bookkeeping: the caller reports outcomes.

    >>> b = Backoff(max_rounds=8)
    >>> b.failed("p", round=3)   # True: a new back-off (the caller warns once)
    True
    >>> b.skip("p", round=4), b.skip("p", round=5)
    (True, False)
    """

    def __init__(self, max_rounds: int = 16):
        """`max_rounds`: the longest pause of a peer, in rounds (pauses double from 1 up to it). Raises ValueError when
        `max_rounds` < 1."""
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.max_rounds = max_rounds
        self._peers: dict[str, _State] = {}

    def skip(self, peer: str, round: int) -> bool:
        """Whether to leave `peer` out of round `round` without contacting it."""
        state = self._peers.get(peer)
        return state is not None and round < state.retry_at

    def failed(self, peer: str, round: int) -> bool:
        """`peer` was unreachable in `round`; True if it was not backed off before."""
        state = self._peers.get(peer)
        failures = 1 if state is None else state.failures + 1
        pause = min(self.max_rounds, 2 ** (failures - 1))
        self._peers[peer] = _State(failures, round + 1 + pause)
        return state is None

    def succeeded(self, peer: str) -> bool:
        """`peer` answered; True if it had been backed off."""
        return self._peers.pop(peer, None) is not None

    def backed_off(self, round: int) -> list[str]:
        """Peers skipped in `round`, sorted."""
        return sorted(p for p, s in self._peers.items() if round < s.retry_at)
