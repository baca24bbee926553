"""A daemon's exchange: snapshots served by this node's gRPC server (p2pd/server.py), their
digests signed into its DHT record (p2pd/discovery.py), neighbours fetched over gRPC, and the
final merge by hivemind's all-reduce (node/net/merge.py).

Each neighbour is fetched on the path its signed record names (its reachability, found by
node/net/netcheck.py at start): `direct` gRPC at its address; `relay`, libp2p streams to its peer
id (p2pd/libp2p.py) when it cannot be dialled; `pushed`, from its carrier when it is
outbound-only (it pushes each snapshot to a reachable neighbour, which serves it unaltered:
the digest is the one its producer signed). The path is read from the record, never found by
waiting for a timeout.

A fetch asks the neighbour's Health for its signed record until the record shows the wanted
snapshot (or shows the neighbour moved past it), then fetches it checked against the digest
the neighbour signed. Neighbours that did not answer at all are backed off for a few rounds
(node/algo/comm/backoff.py) and skipped without waiting.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from node.algo.comm.backoff import Backoff
from node.net.carrier import Pusher
from node.net.membership import why_not_joined
from node.net.metrics import NodeMetrics
from node.protocol.compression import record_codec, sends_deltas
from node.protocol.exchange import Accept, Member, model_like
from p2pd.client import FetchError, SwarmClient
from p2pd.codecs import CODECS
from p2pd.discovery import DiscoveryError
from p2pd.errors import ReasonedError
from p2pd.records import RecordRefused, open_record
from p2pd.server import MAX_HEALTH_WAIT, PUSH_CHUNK_BYTES, SnapshotStore
from p2pd.tensors import SnapshotKey

log = logging.getLogger("atoll.exchange")

REFRESH_SECONDS = 1.0  # how often the view of the live members is re-read from the DHT
# A neighbour that refuses connections (nothing listens at its address: it is gone, or its
# advertised address is wrong) for this long is given up for the round instead of retried until
# fetch_timeout; one that accepts but is slow still gets the whole fetch_timeout.
REFUSED_SECONDS = 2.0
_RETRY = ("timeout", "unavailable", "busy", "not_found", "rate_limited", "denied")


class GrpcExchange:
    """Serves on a joined `runtime` (node/net/runtime.py: the node's DHT membership `discovery`,
    TLS and admission): the final merge's averager when `comm.final_merge` is set (`merger`,
    shaped like `model_state`) and the gRPC server (`server`). Forks the averager process first,
    before any gRPC object exists in this process (gRPC does not survive a fork). `stop` is set when the
    node is asked to stop. Raises OSError (ports in use) or TimeoutError (the averager did not start), one line."""

    def __init__(
        self, cfg, runtime, model_state: dict, metrics: NodeMetrics, stop: threading.Event, task_digest: str = ""
    ):
        """`cfg`: the node's NodeConfig; `runtime`: its joined Runtime, served on here; `model_state`: the model's
        state dict (name -> tensor), whose shapes the final merge's all-reduce takes; `metrics`: its NodeMetrics;
        `stop`: the Event set on a stop request; `task_digest`: the task's hex digest (node/task/load.py), part of the
        merge's group key ("" for none). Raises OSError when the gRPC port is in use, TimeoutError when the averager
        process does not start."""
        self.comm, self.record_ttl = cfg.comm, cfg.net.record_ttl
        self.runtime, self.identity = runtime, runtime.identity
        self.metrics, self.stop, self.me = metrics, stop, runtime.identity.peer_id
        self.discovery, self.tls = self.runtime.discovery, self.runtime.tls
        self.merger = None
        if cfg.comm.final_merge:
            from node.net.merge import FinalMerge

            c = cfg.comm
            client = cfg.net.reachability == "outbound_only"  # known before the fork only when configured
            self.merger = FinalMerge(
                self.discovery.dht,
                cfg.net.swarm,
                model_state,
                cfg.node_count,
                c.merge_timeout,
                c.merge,
                task_digest,
                client,
            )
        self.store = SnapshotStore(keep=cfg.comm.keep_snapshots)
        try:
            self.runtime.serve(self.store)
        except BaseException:  # a port in use: the averager process must not outlive us
            if self.merger is not None:
                self.merger.close()
            raise
        self.server = self.runtime.server
        self._clients: dict[str, SwarmClient] = {}
        self._addresses: dict[str, str] = {}
        self.backoff = Backoff()
        self.received_bytes = 0
        self.live = 0  # live members at the last look
        self._view = None  # the live peers as last read from the DHT (see members)
        self._refresher: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._other_task: set[str] = set()  # peers named once for running another task
        self._codec_warned: set[str] = set()  # peers named once for a codec we cannot use
        self._records: dict = {}  # peer id -> its PeerRecord, from the last members()
        self.reachability = "direct"  # this node's, as published (see reachable_as)
        self.pusher: Pusher | None = None  # outbound-only: hands each snapshot to a carrier
        self._dialled: dict[str, float] = {}  # relayed: peer id -> when a connection to it was last opened
        self._failed_on: dict[str, str] = {}  # peer id -> the path it was backed off on
        self.paths: collections.Counter[str] = collections.Counter()  # snapshots fetched, by path

    @property
    def pushed_bytes(self) -> int:
        """Wire bytes of this node's snapshots pushed to its carrier (outbound-only nodes)."""
        return self.pusher.pushed_bytes if self.pusher is not None else 0

    @property
    def sent_bytes(self) -> int:
        """Wire bytes this node's server has sent (snapshots fetched from it)."""
        return self.server.servicer.stats["bytes_sent"]

    # -- the Exchange protocol ----------------------------------------------------------------
    def members(self, round_: int) -> list[Member]:
        """Live peers (node.protocol.exchange.Exchange.members) from a view of the DHT that a background
        thread refreshes every REFRESH_SECONDS, so no gossip step waits for the DHT; remembers
        their gRPC addresses."""
        if self._view is None:
            self._refresh()
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_loop, name="atoll-members", daemon=True)
            self._refresher.start()
        live = self._same_task(self._view)
        self.live = len(live)
        self.metrics.peers_live.set(len(live))
        self._addresses = {p.peer_id: p.grpc_address for p in live}
        return [Member(p.peer_id, max(1, p.dataset_size)) for p in sorted(live, key=lambda p: p.peer_id)]

    def _same_task(self, live: list) -> list:
        """The peers whose signed task digest matches ours (model exchange only: logit exchange
        mixes architectures by design) and whose codec we can decode and use (p2pd/codecs.py;
        a peer sending CHOCO deltas cannot gossip with one sending models). Others are never
        fetched nor merged; each is named once at WARNING. A record without a digest (an older
        release) is kept: its snapshots are still checked tensor by tensor."""
        mine = self.discovery.record.task_digest if self.discovery.record is not None else ""
        if self.comm.exchange == "logits":
            return live
        live = [p for p in live if self._codec_fits(p)]
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

    def publish(self, key: SnapshotKey, tensors: dict, **record: Any) -> None:
        """Serve `tensors` as `key`, its digest (with every other held one's) signed into the
        record before the snapshot becomes visible: peers refuse snapshots whose digest this
        node has not signed, and a peer that sees the key finds it signed."""

        def sign(index: tuple[str, ...], packed) -> None:
            fields = dict(round=key.round, step=key.step, model_digest=packed.hexdigest, snapshots=index)
            self.discovery.update(**fields, **record)

        packed = self.store.publish(key, tensors, before_visible=sign)
        if self.pusher is not None:
            self.pusher.push(key, packed)

    # -- reachability: the path neighbours take to this node ---------------------------------
    def reachable_as(self, state: str) -> None:
        """Publish this node's reachability (p2pd.records.Reachability, see node/net/netcheck.py);
        outbound_only: from now on every snapshot is pushed to a carrier named in the record."""
        self.reachability = state
        self.metrics.reachability.labels(state=state).set(1)
        for other in ("direct", "relayed", "outbound_only"):
            if other != state:
                self.metrics.reachability.labels(state=other).set(0)
        if state != "outbound_only":
            self.discovery.update(reachability=state, carrier="")
            return
        self.store.chunk_bytes = PUSH_CHUNK_BYTES  # first: one part must fit the carrier's request limit
        if self.merger is not None and not self.merger.client_mode:
            log.warning(
                "the final merge's all-reduce started before this node knew nobody can dial it: peers may wait "
                "for its part; set net.reachability: outbound_only to make it a client there"
            )
        if self.pusher is None:

            def candidates() -> list:
                return self._same_task(self._view or [])

            args = (self.discovery, candidates, self._client, self.metrics, self.stop, self.comm.fetch_timeout)
            self.pusher = Pusher(self.store, *args)
        self.discovery.update(reachability=state, carrier=self.pusher.choose())
        for key in self.store.keys():  # what it published before the verdict, if small enough
            self.pusher.push(key, self.store.get(key))

    def note(self, round_: int, step: int = 0, **record: Any) -> None:
        """Update the signed record without a new snapshot (node.protocol.exchange.Exchange.note)."""
        self.discovery.update(round=round_, step=step, **record)

    def fetch_many(self, peers: Sequence[str], key: SnapshotKey, accept: Accept) -> dict[str, Any]:
        """Fetch `key` from `peers` in parallel under one deadline, comm.fetch_timeout
        (node.protocol.exchange.Exchange.fetch_many)."""
        with self._lock:  # a peer whose record names another path since it failed is tried at once
            skipped = [j for j in peers if self.backoff.skip(j, key.round) and self._failed_on.get(j) == self._path(j)]
        for _ in skipped:
            self.metrics.fetch_failures.labels(reason="backed_off").inc()
        peers = [j for j in peers if j not in skipped and j in self._addresses]
        if not peers:
            return {}
        deadline = time.monotonic() + self.comm.fetch_timeout
        with ThreadPoolExecutor(max_workers=min(32, len(peers)), thread_name_prefix="atoll-fetch") as pool:
            got = list(pool.map(lambda j: self._fetch(j, key, accept, deadline), peers))
        return {j: v for j, v in zip(peers, got) if v is not None}

    def all_reduce(self, round_: int, state: dict, how: str):
        """hivemind's all-reduce once every live peer finished round `round_` (bounded by
        comm.merge_timeout). Members agree up to float rounding; every member adopts the copy of
        the group's first peer id, so they end bit-identical."""
        self._wait_all_at(round_, self.comm.merge_timeout)
        if not self.discovery.live_peers(include_self=False):
            log.info("final merge skipped: no other live node")
            result = ({k: v.clone() for k, v in state.items()}, [self.me])
        else:
            result = self.merger.run(state)
        self.metrics.merge_peers.set(len(result[1]) if result is not None else 0)
        if result is None or result[1][0] == self.me:
            return result
        merged, group = result
        return self._adopt_canonical(group[0], round_ + 1, merged), group

    def linger(self, round_: int) -> None:
        """Serve until every live peer reached `round_`, at most fetch_timeout + 2 record TTLs."""
        self._wait_all_at(round_, self.comm.fetch_timeout + 2 * self.record_ttl)

    def stopping(self) -> bool:
        """Whether the node was asked to stop."""
        return self.stop.is_set()

    # -- internals ----------------------------------------------------------------------------
    def _codec_fits(self, p) -> bool:
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

    def _fetch(self, peer_id: str, key: SnapshotKey, accept: Accept, deadline: float) -> Any:
        """accept(the neighbour's snapshot `key`), or None (reason counted) if not had by the
        deadline or refused."""
        at = (key.round, key.step)
        address = self._addresses[peer_id]
        reason, answered, refused_since = "timeout", False, None
        while time.monotonic() < deadline and not self.stop.is_set():
            route = self._route(peer_id)  # read from its record each time: a node learns its own at start
            if isinstance(route, str):  # no way to it: no carrier live (yet), or no libp2p here
                reason = route
                if route == "no_libp2p":
                    break
                time.sleep(0.2)
                continue
            client, server, producer, path = route
            try:
                t0, wait = time.monotonic(), max(0.0, min(MAX_HEALTH_WAIT, deadline - time.monotonic() - 0.5))
                # one call that the neighbour answers when it serves the key (no polling)
                call_timeout = max(0.1, min(wait + 5.0, deadline - time.monotonic() + 0.5))
                envelope, keys = client.health(
                    timeout=call_timeout, wait_for=key, wait=wait, producer_peer_id=producer
                )
                answered = True
                rec = open_record(envelope, now=time.time(), expected_peer_id=peer_id)
                if key.kind == "logits" and rec.proxy_digest != self.discovery.record.proxy_digest:
                    reason = "proxy_mismatch"  # logits about another proxy set: meaningless to us
                    break
                if key not in keys:
                    reason = "behind" if (rec.round, rec.step) < at else "evicted"
                    if (rec.round, rec.step) > at:
                        break  # it moved on and dropped the snapshot: nothing to wait for
                    if time.monotonic() - t0 < 0.05:
                        time.sleep(0.05)  # it answered at once (an older peer, or no waiting slot free)
                    continue
                digest = rec.snapshot_digest(key.kind, key.round, key.step)
                if digest is None:  # served but not yet signed (the record is re-signed just after)
                    reason = "unsigned"
                    time.sleep(0.05)
                    continue
                t0 = time.perf_counter()
                remaining = max(0.1, deadline - time.monotonic())
                snap = client.fetch(
                    key, expected_digest=digest, timeout=remaining, server_peer_id=server, producer_peer_id=producer
                )
                self.metrics.fetch_seconds.labels(path=path).observe(time.perf_counter() - t0)
                self.metrics.received.labels(path=path).inc(snap.nbytes)
                self.paths[path] += 1
                with self._lock:
                    self.received_bytes += snap.nbytes
                    if self.backoff.succeeded(peer_id):
                        log.info("neighbour %s at %s answers again", peer_id[:16], address)
                    self.metrics.peers_backed_off.set(len(self.backoff.backed_off(key.round)))
                return accept(snap.tensors)
            except RecordRefused as e:
                reason = f"record_{e.reason}"
                break
            except FetchError as e:
                reason = e.reason
                if reason == "unavailable" and not answered:
                    refused_since = refused_since or time.monotonic()
                    if time.monotonic() - refused_since > REFUSED_SECONDS:
                        break
                if e.reason in _RETRY:  # denied: a peer that joined a moment ago may not know us yet
                    time.sleep(0.1)
                    continue
                break  # bad data: skip this neighbour for this round
            except ReasonedError as e:  # refused by `accept`
                reason = e.reason
                break
        self.metrics.fetch_failures.labels(reason=reason).inc()
        log.info("round %d: skipped neighbour %s (%s)", key.round, peer_id[:16], reason)
        if not answered and reason in ("timeout", "unavailable") and not self.stop.is_set():
            self._failed_on[peer_id] = self._path(peer_id)
            self._back_off(peer_id, address, key.round, reason)
        return None

    def _path(self, peer_id: str) -> str:
        """The way to `peer_id` its record names: its reachability, and the carrier for an
        outbound-only one (a peer backed off through one carrier is tried again through another)."""
        rec = self._records.get(peer_id)
        if rec is None:
            return "direct"
        return f"outbound_only:{rec.carrier}" if rec.reachability == "outbound_only" else rec.reachability

    def _route(self, peer_id: str):
        """(client, server peer id, producer peer id, path) for fetching `peer_id`'s snapshots as
        its record says (see the module docstring), or the reason there is no way: no_carrier
        (an outbound-only peer without a live carrier yet), no_libp2p (this node has no plane)."""
        records = self._records  # replaced whole by the refresh thread: read it once
        rec = records.get(peer_id)
        state = rec.reachability if rec is not None else "direct"
        if state == "relayed":
            if self.runtime.plane is None:
                return "no_libp2p"
            return self.runtime.plane.client(peer_id, identity=self.identity), peer_id, "", "relay"
        if state == "outbound_only":
            carrier = records.get(rec.carrier)
            if carrier is None:
                return "no_carrier"
            return self._client(carrier.grpc_address), carrier.peer_id, peer_id, "pushed"
        return self._client(self._addresses[peer_id]), peer_id, "", "direct"

    def _back_off(self, peer_id: str, address: str, round_: int, reason: str) -> None:
        with self._lock:
            new = self.backoff.failed(peer_id, round_)
            self.metrics.peers_backed_off.set(len(self.backoff.backed_off(round_ + 1)))
        if new:
            log.warning(
                "neighbour %s at %s is unreachable (%s): skipped without waiting from now on, "
                "retried after 1, 2, 4, ... rounds (atoll_peers_backed_off)",
                peer_id[:16],
                address,
                reason,
            )

    def _adopt_canonical(self, canonical: str, round_: int, mine: dict) -> dict:
        """The canonical member's merged model if it is the same merge as ours up to float
        rounding, else ours (and count why)."""
        from node.net.merge import same_merge

        self.members(round_)
        if canonical not in self._addresses:
            self.metrics.fetch_failures.labels(reason="merge_canonical_gone").inc()
            return mine
        deadline = time.monotonic() + self.comm.fetch_timeout
        theirs = self._fetch(canonical, SnapshotKey("model", round_, 0), model_like(mine), deadline)
        if theirs is None:
            return mine
        if not same_merge(mine, theirs):
            self.metrics.fetch_failures.labels(reason="merge_mismatch").inc()
            log.warning("canonical merged model of %s differs from ours beyond rounding; keeping ours", canonical[:16])
            return mine
        return {k: theirs[k].to(device=v.device, dtype=v.dtype) for k, v in mine.items()}

    def _set_view(self, view: list) -> None:
        self._view, self._records = view, {p.peer_id: p for p in view}

    def _refresh(self) -> None:
        self._set_view(self.discovery.live_peers())
        if self.reachability == "relayed" and self.runtime.plane is not None:
            self._keep_connected()

    def _keep_connected(self) -> None:
        """A relayed node keeps a libp2p connection open to every live peer of its task, so each
        can fetch from it over that connection (connection reversal) where no relay slot or
        hole punch helps; tried at most every 10 s per peer, all at once."""
        plane, now = self.runtime.plane, time.monotonic()
        try:
            open_ = plane.connected()
        except Exception:  # the daemon is going away with the node
            return
        due = [
            p
            for p in self._same_task(self._view or [])
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
                self._refresh()
            except DiscoveryError as e:
                if self.stop.is_set() or self._closed:
                    return  # the DHT is gone with the node
                log.warning("could not refresh the live peers (%s); keeping the last view", e)

    def _wait_all_at(self, round_: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                if all(p.round >= round_ for p in self._same_task(self.discovery.live_peers())):
                    return
            except DiscoveryError:
                if self.stop.is_set():
                    return
                raise
            time.sleep(0.2)

    def wait_for_members(self, want: int, timeout: float, say) -> None:
        """Before the first round: wait (up to `timeout` s) until `want` nodes are live; calls
        `say(event)` with a "waiting" event once per change of the count."""
        deadline, said = time.monotonic() + timeout, None
        while not self.stop.is_set():
            try:
                view = self.discovery.live_peers()
            except DiscoveryError:
                if self.stop.is_set():
                    return
                raise
            self._set_view(view)
            live = self._same_task(view)
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
                say(
                    dict(
                        event="waiting",
                        live=len(live),
                        want=want,
                        seconds_left=round(left),
                        peers=[p.peer_id for p in live],
                    )
                )
            time.sleep(0.2)

    def _client(self, address: str) -> SwarmClient:
        if address not in self._clients:
            self._clients[address] = SwarmClient(
                address, timeout=self.comm.fetch_timeout, retries=1, tls=self.tls, identity=self.identity
            )
        return self._clients[address]

    def close(self) -> None:
        """Stop serving and leave the swarm (what was started, in reverse order)."""
        self._closed = True
        if self.pusher is not None:
            self.pusher.close()
        for c in self._clients.values():
            c.close()
        if self.merger is not None:  # it averages through the DHT: before the runtime leaves
            self.merger.close()
        self.runtime.close()
