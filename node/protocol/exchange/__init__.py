"""The exchange seam: everything a round protocol (node/protocol/rounds/) asks of the network.

Two implementations:
- `node.net.grpc_exchange.GrpcExchange`: a daemon's; snapshots served by its gRPC server, their
  digests signed into its DHT record, neighbours fetched over gRPC, the final merge by
  hivemind's all-reduce;
- `node.protocol.exchange.memory.MemoryExchange`: the simulator's; one in-process board shared by all
  virtual nodes, the same wire bytes counted with the daemon's encoder, and deterministic
  fault injection (a peer that fails at a round, drops, delays or corrupts a snapshot).

A round protocol publishes what it computed under a `SnapshotKey` (kind, round, step), then
fetches its neighbours' snapshots of the same key, passing each through `accept` (which checks
shapes and may refuse with a ReasonedError). Whoever did not deliver in time is left out of
the result: the protocols renormalise over what arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from p2pd.errors import ReasonedError
from p2pd.tensors import SnapshotKey

Accept = Callable[[dict[str, torch.Tensor]], Any]


@dataclass(frozen=True)
class Member:
    """A live node of the swarm as the exchange sees it."""

    peer_id: str
    dataset_size: int = 1


class Exchange(Protocol):
    """What the round protocols use; see the module docstring."""

    me: str  # this node's peer id

    def members(self, round_: int) -> list[Member]:
        """The live nodes in round `round_`, this node included, sorted by peer id."""

    def publish(self, key: SnapshotKey, tensors: dict[str, torch.Tensor], **record: Any) -> None:
        """Serve `tensors` as `key` (read-only afterwards: pass a copy) and note progress
        (`key.round`, `key.step`, and any other record fields, e.g. samples_per_second)."""

    def note(self, round_: int, step: int = 0, **record: Any) -> None:
        """Note progress without a new snapshot (a round without gossip, an idle MoDeST node)."""

    def fetch_many(self, peers: Sequence[str], key: SnapshotKey, accept: Accept) -> dict[str, Any]:
        """{peer: accept(its `key` snapshot)} for the peers that delivered by the deadline
        (`comm.fetch_timeout`) and were accepted, in the order of `peers`."""

    def all_reduce(
        self, round_: int, state: dict[str, torch.Tensor], how: str
    ) -> tuple[dict[str, torch.Tensor], list[str]] | None:
        """The final merge: the average (`how`: mean or variance_corrected) of every live
        member's `state`, identical on every member, with the sorted group; None if missed."""

    def linger(self, round_: int) -> None:
        """Keep serving until every live member has reached `round_` (bounded)."""

    def stopping(self) -> bool:
        """True once this node was asked to stop: protocols end the round early."""


def model_like(own: dict[str, torch.Tensor]) -> Accept:
    """Accept a received state dict only if it has `own`'s names, shapes and dtypes; raises
    ReasonedError("incompatible") otherwise."""

    def accept(theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if set(theirs) != set(own) or any(
            theirs[k].shape != own[k].shape or theirs[k].dtype != own[k].dtype for k in own
        ):
            raise ReasonedError("incompatible", "snapshot does not fit this model")
        return theirs

    return accept
