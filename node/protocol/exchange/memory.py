"""The simulator's exchange: virtual nodes in one process, each a thread running the same round
protocols as a daemon, meeting on one shared `Board`.

What travels is what a daemon would send: a fetch counts the `wire_bytes` of the snapshot as
the daemon's encoder (`p2pd.tensors.encode`) writes it, coded tensors decoded by the same codec
functions as the daemon's decoder (p2pd/codecs.py), and a corrupted delivery goes through
the daemon's decoder and its digest check. Nothing here depends on the wall clock: a fetch
waits until the snapshot is published, or until it is certain it never will be (the peer
failed, dropped it, moved past it or finished), so runs are deterministic.

Faults (`Faults`, as torchft's failure injector): `fail_at(peer, r)` crashes a node at the
start of its round r (nothing of r is published; from r on it is no member), `drop(peer, r)`
loses its snapshots of round r (neighbours skip it, as after a fetch timeout), `delay(peer,
r, s)` delivers them `s` seconds late (past `comm.fetch_timeout`: the same as dropped),
`corrupt(peer, r)` flips one byte of them on the wire (receivers refuse: digest_mismatch),
and `unresponsive(fraction, seed)` drops a seeded sample of the nodes' snapshots every round.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from node.algo.aggregate import mean, variance_corrected_mean
from node.algo.comm import seeded_rng
from node.algo.comm.links import AllReduce, Fetch, Linger, Op, Publish
from node.protocol.exchange import Accept, Member
from p2pd.codecs import CodecError, Coded, decompress
from p2pd.decoding import StreamDecoder
from p2pd.errors import ReasonedError
from p2pd.tensors import SnapshotKey, TensorStreamError, encode

SAFETY_SECONDS = 600.0  # a fetch never waits longer, even if a bug stalled a virtual node


class Crashed(Exception):
    """Raised in a virtual node that `Faults.fail_at` crashes; the simulator ends its thread."""


class Faults:
    """Deterministic fault plan of one simulation; see the module docstring. Rounds count from 0."""

    def __init__(self) -> None:
        """An empty plan: no node crashes, loses, delays or corrupts anything until the methods below add faults."""
        self.fail: dict[str, int] = {}
        self.dropped: set[tuple[str, int]] = set()
        self.delays: dict[tuple[str, int], float] = {}
        self.corrupted: set[tuple[str, int]] = set()
        self.unresponsive_fraction, self.unresponsive_seed = 0.0, 0

    def fail_at(self, peer: str, round_: int) -> Faults:
        """Crash `peer` at the start of its round `round_` (and every later one)."""
        self.fail[peer] = min(round_, self.fail.get(peer, round_))
        return self

    def drop(self, peer: str, round_: int) -> Faults:
        """Lose `peer`'s snapshots of `round_`."""
        self.dropped.add((peer, round_))
        return self

    def delay(self, peer: str, round_: int, seconds: float) -> Faults:
        """Deliver `peer`'s snapshots of `round_` `seconds` late (lost past comm.fetch_timeout)."""
        self.delays[(peer, round_)] = seconds
        return self

    def corrupt(self, peer: str, round_: int) -> Faults:
        """Flip one byte of `peer`'s snapshots of `round_` on the wire."""
        self.corrupted.add((peer, round_))
        return self

    def unresponsive(self, fraction: float, seed: int = 0) -> Faults:
        """Each round, lose the snapshots of a seeded sample of `fraction` of the nodes."""
        if not 0 <= fraction < 1:
            raise ValueError("unresponsive fraction must be in [0, 1)")
        self.unresponsive_fraction, self.unresponsive_seed = fraction, seed
        return self

    def failed(self, peer: str, round_: int) -> bool:
        """Whether `peer` has crashed by `round_`."""
        return round_ >= self.fail.get(peer, 1 << 62)

    def lost(self, peer: str, round_: int, ids: Sequence[str], timeout: float) -> bool:
        """Whether `peer`'s snapshots of `round_` never arrive (dropped, or later than `timeout`)."""
        if (peer, round_) in self.dropped or self.delays.get((peer, round_), 0.0) >= timeout:
            return True
        k = int(round(self.unresponsive_fraction * len(ids)))
        return k > 0 and peer in seeded_rng("down", self.unresponsive_seed, round_).sample(sorted(ids), k)


class Board:
    """What the virtual nodes of one simulation share: published snapshots, progress, faults
    and byte counts. `ids`: every virtual node's peer id; `sizes`: their data set sizes;
    `swarms`: their `net.swarm` names (nodes only see members of their own swarm, as daemons
    of different swarms never find each other; default: one swarm)."""

    def __init__(
        self,
        ids: Sequence[str],
        sizes: Sequence[int],
        faults: Faults | None = None,
        timeout: float = 20.0,
        swarms: Sequence[str] | None = None,
    ):
        """`ids`: every virtual node's peer id; `sizes`: their data set sizes (samples), in the order of `ids`;
        `faults`: the fault plan, None for none; `timeout`: comm.fetch_timeout in seconds, snapshots delayed that long
        or longer are lost; `swarms`: each node's net.swarm in the order of `ids`, None for one swarm."""
        self.ids = sorted(ids)
        self.sizes = dict(zip(ids, sizes))
        self.swarm = dict(zip(ids, swarms or [""] * len(ids)))
        self.faults = faults or Faults()
        self.timeout = timeout
        self.cond = threading.Condition()
        self.snapshots: dict[tuple[str, SnapshotKey], dict[str, torch.Tensor]] = {}
        self.progress: dict[str, tuple[int, int]] = {}
        self.done: set[str] = set()  # threads that ended (finished, crashed or failed)
        self.merges: dict[tuple[int, str], dict[str, dict]] = {}  # (round, swarm) -> peer -> state
        self.merged: dict[tuple[int, str], tuple[dict, list[str]]] = {}
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.by_round: Counter[int] = Counter()  # bytes sent for snapshots of each round
        self.stop = threading.Event()
        self._wire: dict[tuple, int] = {}
        self._waiters: dict[str, list[threading.Event]] = {}  # peer -> events of fetches waiting on it
        self._floor = -(1 << 62)
        self._lost: dict[int, frozenset[str]] = {}
        # what each node did, in order, for the link model (node/algo/comm/links.py); None: not recorded
        self.traces: dict[str, list[Op]] | None = None

    def record(self, peer: str, op: Op) -> None:
        """Append `op` to `peer`'s trace when traces are recorded (only `peer`'s own thread calls this)."""
        if self.traces is not None:
            self.traces.setdefault(peer, []).append(op)

    @property
    def bytes_sent(self) -> int:
        """Wire bytes of every delivered fetch and every all-reduce so far."""
        return sum(self.sent.values())

    def members(self, round_: int, swarm: str = "") -> list[Member]:
        """The members of `swarm` that have not failed by `round_`, sorted by peer id."""
        return [
            Member(p, self.sizes[p]) for p in self.ids if self.swarm[p] == swarm and not self.faults.failed(p, round_)
        ]

    def finished(self, peer: str) -> None:
        """Mark `peer`'s thread as ended: nobody waits for it any more."""
        with self.cond:
            self.done.add(peer)
            self.wake(peer)
            self.cond.notify_all()

    def wake(self, peer: str) -> None:
        """Wake the fetches waiting on `peer` (it published, moved on or ended); call under `cond`.
        Waiters are kept per peer, so a publish wakes its neighbours, not every virtual node."""
        for event in self._waiters.pop(peer, ()):
            event.set()

    def wait_on(self, peer: str) -> threading.Event:
        """An event set at `peer`'s next change; call under `cond`."""
        event = threading.Event()
        self._waiters.setdefault(peer, []).append(event)
        return event

    def wire_bytes(self, key: SnapshotKey, state: dict[str, torch.Tensor | Coded]) -> int:
        """Bytes one fetch of `state` as `key` puts on the wire, from the daemon's own encoder
        (coded tensors included, p2pd/codecs.py). The size depends only on the key and the
        tensors' names, dtypes, shapes and codec sizes, so it is encoded once per layout."""
        layout = (
            key,
            tuple(
                (k, v.codec, v.dtype, v.shape, v.nbytes) if isinstance(v, Coded) else (k, v.dtype, tuple(v.shape))
                for k, v in sorted(state.items())
            ),
        )
        if layout not in self._wire:
            self._wire[layout] = encode(state, key.to_pb()).wire_bytes
        return self._wire[layout]

    def evict(self) -> None:
        """Forget snapshots no live node can still ask for (two rounds behind the slowest)."""
        live = [self.progress.get(p, (0, 0))[0] for p in self.ids if p not in self.done]  # not started: round 0
        floor = min(live, default=0) - 2
        if floor <= self._floor:
            return
        self._floor = floor
        for key in [k for k in self.snapshots if k[1].round < floor]:
            del self.snapshots[key]

    def lost(self, peer: str, round_: int) -> bool:
        """Faults.lost, with the round's unresponsive sample drawn once."""
        if round_ not in self._lost:
            self._lost[round_] = frozenset(p for p in self.ids if self.faults.lost(p, round_, self.ids, self.timeout))
        return peer in self._lost[round_]


class MemoryExchange:
    """One virtual node's view of a `Board` (the `node.protocol.exchange.Exchange` protocol)."""

    def __init__(self, board: Board, me: str):
        """`board`: the simulation's shared Board; `me`: this virtual node's peer id, one of `board.ids`."""
        self.board, self.me = board, me

    def members(self, round_: int) -> list[Member]:
        """node.protocol.exchange.Exchange.members; raises Crashed if this node fails at `round_`."""
        self._alive(round_)
        return self.board.members(round_, self.board.swarm[self.me])

    def publish(self, key: SnapshotKey, tensors: dict[str, torch.Tensor], **record: Any) -> None:
        """node.protocol.exchange.Exchange.publish (a copy is kept); raises Crashed if this node fails at the round."""
        self._alive(key.round)
        copy = {k: v if isinstance(v, Coded) else v.detach().clone() for k, v in tensors.items()}
        self.board.record(self.me, Publish((key.kind, key.round, key.step)))
        with self.board.cond:
            self.board.snapshots[(self.me, key)] = copy
            self.board.progress[self.me] = (key.round, key.step)
            self.board.evict()
            self.board.wake(self.me)

    def note(self, round_: int, step: int = 0, **record: Any) -> None:
        """node.protocol.exchange.Exchange.note; raises Crashed if this node fails at `round_`."""
        self._alive(round_)
        with self.board.cond:
            self.board.progress[self.me] = (round_, step)
            self.board.wake(self.me)

    def fetch_many(self, peers: Sequence[str], key: SnapshotKey, accept: Accept) -> dict[str, Any]:
        """node.protocol.exchange.Exchange.fetch_many, in order; refusals are counted in Board.refused by reason."""
        out, moved = {}, []
        for peer in peers:
            state, reason, size = self._wait_for(peer, key)
            moved.append((peer, (key.kind, key.round, key.step), size))
            if state is not None:
                try:
                    out[peer] = accept(state)
                    continue
                except ReasonedError as e:
                    reason = e.reason
            with self.board.cond:
                self.board.refused[reason] += 1
        self.board.record(self.me, Fetch(tuple(moved)))
        return out

    def all_reduce(self, round_: int, state: dict[str, torch.Tensor], how: str):
        """The exact average of every member's `state` (a ring all-reduce's bytes counted:
        2 (n - 1) / n model sizes per member), once all members of `round_` have joined."""
        b = self.board
        key = (round_, b.swarm[self.me])
        with b.cond:
            b.merges.setdefault(key, {})[self.me] = {k: v.detach().clone() for k, v in state.items()}
            b.cond.notify_all()
            group = [m.peer_id for m in b.members(round_, b.swarm[self.me])]
            ok = b.cond.wait_for(lambda: all(p in b.merges[key] or p in b.done for p in group), timeout=SAFETY_SECONDS)
            joined = sorted(b.merges[key])
            if not ok:
                return None
            if joined == [self.me]:  # alone: nothing to average
                return {k: v.clone() for k, v in state.items()}, joined
            if key not in b.merged:
                states = [b.merges[key][p] for p in joined]
                merged = variance_corrected_mean(states) if how == "variance_corrected" else mean(states)
                b.merged[key] = (merged, joined)
                n = len(joined)
                share = int(2 * (n - 1) / n * b.wire_bytes(SnapshotKey("model", round_), merged))
                for p in joined:
                    b.sent[p] += share
                b.by_round[round_] += share * n
            merged, joined = b.merged[key]
        b.record(self.me, AllReduce(key, tuple(joined), b.wire_bytes(SnapshotKey("model", round_), merged)))
        return {k: v.clone() for k, v in merged.items()}, list(joined)

    def linger(self, round_: int) -> None:
        """Nothing to wait for: the board keeps what finished nodes published (the trace notes that a daemon
        would serve until every live peer published round `round_`)."""
        self.board.record(self.me, Linger(("model", round_, 0)))

    def stopping(self) -> bool:
        """Whether the simulation is being stopped (a virtual node failed with an error)."""
        return self.board.stop.is_set()

    # -- internals --------------------------------------------------------------------------
    def _alive(self, round_: int) -> None:
        if self.board.faults.failed(self.me, round_):
            raise Crashed(f"{self.me} fails at round {round_}")

    def _wait_for(self, peer: str, key: SnapshotKey) -> tuple[dict | None, str, int]:
        """(the snapshot, "", wire bytes moved) or (None, why it will never arrive, wire bytes moved)."""
        b, at = self.board, (key.round, key.step)
        if b.faults.failed(peer, key.round):
            return None, "unavailable", 0
        if b.lost(peer, key.round):
            return None, "timeout", 0
        deadline = time.monotonic() + SAFETY_SECONDS
        while True:
            with b.cond:
                state = b.snapshots.get((peer, key))
                if state is not None:
                    size = b.wire_bytes(key, state)
                    b.sent[peer] += size
                    b.received[self.me] += size
                    b.by_round[key.round] += size
                    break
                if peer in b.done:
                    return None, "unavailable", 0
                if b.progress.get(peer, (-1, -1)) > at:
                    return None, "evicted", 0
                event = b.wait_on(peer)
            if not event.wait(max(0.0, deadline - time.monotonic())):
                return None, "timeout", 0
        if (peer, key.round) in b.faults.corrupted:
            return None, _corrupted(state, key), size
        try:
            state = decompress(state)  # what the daemon's decoder hands over
        except CodecError as e:
            return None, e.reason, size
        if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in state.values()):
            return None, "non_finite", size  # what the daemon's decoder refuses
        return state, "", size


def _corrupted(state: dict[str, torch.Tensor], key: SnapshotKey) -> str:
    """Flip one payload byte of `state` on the wire (in the middle of its longest part, where
    tensor bytes are; a coded chunk's codec fields come after them) and run the daemon's
    decoder on the serialized parts with the digest the sender signed: the reason it refuses."""
    enc = encode(state, key.to_pb())
    parts = [bytearray(p) for p in enc.parts]
    longest = max(range(len(parts)), key=lambda i: len(parts[i]))
    parts[longest][len(parts[longest]) // 2] ^= 0xFF
    decoder = StreamDecoder(expected_digest=enc.digest)
    try:
        for p in parts:
            decoder.feed_bytes(bytes(p))
        decoder.finish()
    except TensorStreamError as e:
        return e.reason
    return "undetected_corruption"  # would be a bug in the decoder: counted, never used
