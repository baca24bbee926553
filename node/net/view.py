"""A daemon's view of the swarm's live members, as the round protocols see them.

The view is re-read from the DHT by a background thread every REFRESH_SECONDS, so no gossip
step waits for the DHT. It keeps only the peers this node can exchange with: the same signed
task digest (model exchange only: logit exchange mixes architectures by design) and a codec
this node decodes, in the same gossip mode (models or CHOCO deltas); each other peer is named
once at WARNING. A relayed node also keeps a libp2p connection open to every member, so each
can fetch from it over that connection (connection reversal).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time

from node.net.membership import why_not_joined
from node.net.metrics import NodeMetrics
from node.protocol.compression import record_codec, sends_deltas
from node.protocol.exchange import Member
from p2pd.codecs import CODECS
from p2pd.discovery import DiscoveryError

log = logging.getLogger("atoll.exchange")
REFRESH_SECONDS = 1.0  # how often the view of the live members is re-read from the DHT
BEHIND = 2  # a member whose record is more rounds than this behind the swarm's median is not waited for


class MemberView:
    """The live members of one node's swarm that it can exchange with (see the module docstring)."""

    def __init__(self, comm, runtime, metrics: NodeMetrics, stop: threading.Event):
        """`comm`: the node's CommConfig (exchange kind, codec); `runtime`: its joined Runtime (discovery, libp2p
        plane, identity); `metrics`: its NodeMetrics (atoll_peers_live); `stop`: the Event set on a stop request."""
        self.comm, self.runtime, self.metrics, self.stop = comm, runtime, metrics, stop
        self.discovery, self.me = runtime.discovery, runtime.identity.peer_id
        self.live = 0  # live members at the last look
        self.addresses: dict[str, str] = {}  # peer id -> gRPC address, from the last members()
        self.records: dict = {}  # peer id -> its PeerRecord, as last read (replaced whole: read it once)
        self.keep_connected = False  # set when this node is relayed (see the module docstring)
        self._view = None  # the live peers as last read from the DHT
        self._refresher: threading.Thread | None = None
        self._closed = False
        self._other_task: set[str] = set()  # peers named once for running another task
        self._codec_warned: set[str] = set()  # peers named once for a codec we cannot use
        self._dialled: dict[str, float] = {}  # relayed: peer id -> when a connection to it was last opened

    def members(self, round_: int | None = None) -> list[Member]:
        """The live peers this node exchanges with, this node included, sorted by peer id; remembers their gRPC
        addresses. With `round_` (a protocol asking for a round's members), a member whose record is more than
        BEHIND rounds behind the view's median is left out: a node joining (node/net/join.py) or stalled, whose
        snapshots would not come in time, is not waited for. (The median, not `round_`: every record in the view is
        as old as the view.) Starts the refresh thread on first use."""
        if self._view is None:
            self.refresh()
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_loop, name="atoll-members", daemon=True)
            self._refresher.start()
        live = self.same_task(self._view)
        if round_ is not None and live:
            swarm = statistics.median_high(p.round for p in live)
            live = [p for p in live if p.peer_id == self.me or p.round >= swarm - BEHIND]
        self.live = len(live)
        self.metrics.peers_live.set(len(live))
        self.addresses = {p.peer_id: p.grpc_address for p in live}
        return [Member(p.peer_id, max(1, p.dataset_size)) for p in sorted(live, key=lambda p: p.peer_id)]

    def candidates(self) -> list:
        """The records of the current view this node exchanges with (an outbound-only node's carrier candidates)."""
        return self.same_task(self._view or [])

    def same_task(self, live: list) -> list:
        """The records of `live` whose signed task digest matches ours and whose codec fits (see the module
        docstring). A record without a digest (an older release) is kept: its snapshots are still checked tensor by
        tensor."""
        mine = self.discovery.record.task_digest if self.discovery.record is not None else ""
        if self.comm.exchange == "logits":
            return live
        live = [p for p in live if self.codec_fits(p)]
        if not mine:
            return live
        other = [p for p in live if p.task_digest not in ("", mine)]
        for p in other:
            if p.peer_id not in self._other_task:
                self._other_task.add(p.peer_id)
                log.warning(
                    "peer %s runs another task or model shape (task digest %s, ours %s): not exchanging with it",
                    p.peer_id[:16],
                    p.task_digest[:12],
                    mine[:12],
                )
        return [p for p in live if p not in other]

    def codec_fits(self, p) -> bool:
        """Whether peer record `p`'s codec is one this node decodes, in the same gossip mode
        (models or deltas) as its own; says once why not."""
        ours = record_codec(self.comm)
        if p.peer_id == self.me or p.codec == ours:
            return True
        why = None
        if p.codec.split("+")[0] not in ("none", *CODECS):
            why = f"sends codec {p.codec!r}, which this release cannot decode (it knows {', '.join(CODECS)})"
        elif sends_deltas(p.codec) != sends_deltas(ours):
            why = f"gossips with codec {p.codec}, ours is {ours}: one sends CHOCO deltas, the other models"
        if why is None:
            return True
        if p.peer_id not in self._codec_warned:
            self._codec_warned.add(p.peer_id)
            log.warning("peer %s %s: not exchanging with it (set the same comm.codec)", p.peer_id[:16], why)
        return False

    def refresh(self) -> None:
        """Re-read the live records from the DHT (raises DiscoveryError)."""
        self._set(self.discovery.live_peers(rotate=True))
        if self.keep_connected and self.runtime.plane is not None:
            self._keep_connected()

    def _set(self, view: list) -> None:
        self._view, self.records = view, {p.peer_id: p for p in view}

    def _keep_connected(self) -> None:
        """Open a libp2p connection to every live member not connected, at most every 10 s per peer, all at once."""
        plane, now = self.runtime.plane, time.monotonic()
        try:
            open_ = plane.connected()
        except Exception:  # the daemon is going away with the node
            return
        due = [
            p
            for p in self.candidates()
            if p.peer_id != self.me and p.peer_id not in open_ and now - self._dialled.get(p.peer_id, -1e9) > 10.0
        ]
        for p in due:
            self._dialled[p.peer_id] = now
        opened = plane.connect_many([(p.peer_id, p.dht_maddrs) for p in due]) if due else {}
        for p in due:
            if not opened.get(p.peer_id):
                log.info("could not open a libp2p connection to %s (%s)", p.peer_id[:16], ", ".join(p.dht_maddrs))

    def _refresh_loop(self) -> None:
        while not self.stop.wait(REFRESH_SECONDS) and not self._closed:
            try:
                self.refresh()
            except DiscoveryError as e:
                if self.stop.is_set() or self._closed:
                    return  # the DHT is gone with the node
                log.warning("could not refresh the live peers (%s); keeping the last view", e)

    def anyone_else(self) -> bool:
        """Whether another node is live (a fresh read of the directory; raises DiscoveryError)."""
        return bool(self.discovery.live_peers(include_self=False))

    def wait_all_at(self, round_: int, timeout: float) -> None:
        """Until every live member this node exchanges with has reached `round_` (at most `timeout` s, or a stop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                if all(p.round >= round_ for p in self.same_task(self.discovery.live_peers())):
                    return
            except DiscoveryError:
                if self.stop.is_set():
                    return
                raise
            time.sleep(0.2)

    def wait_for_members(self, want: int, timeout: float, say) -> None:
        """Before the first round: wait (up to `timeout` s) until `want` nodes are live; calls
        `say(event)` with a "waiting" event once per change of the count; at the timeout, says what it saw."""
        deadline, said = time.monotonic() + timeout, None
        while not self.stop.is_set():
            try:
                view = self.discovery.live_peers()
            except DiscoveryError:
                if self.stop.is_set():
                    return
                raise
            self._set(view)
            live = self.same_task(view)
            self.live = len(live)
            self.metrics.peers_live.set(len(live))
            if len(live) >= want:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "only %d of %d nodes live after %.0f s (comm.join_timeout); starting with them. %s",
                    len(live),
                    want,
                    timeout,
                    why_not_joined(self.discovery.refused, len(view) - len(live)),
                )
                return
            if said != len(live):
                said = len(live)
                peers = [p.peer_id for p in live]
                say(dict(event="waiting", live=len(live), want=want, seconds_left=round(left), peers=peers))
            time.sleep(0.2)

    def close(self) -> None:
        """Stop the refresh thread (at its next wake-up)."""
        self._closed = True
