"""Fetching neighbours' snapshots for a daemon, each on the path its signed record names.

The path (node/net/netcheck.py finds a node's own at start): `direct` gRPC at its address;
`relay`, libp2p streams to its peer id (p2pd/libp2p.py) when it cannot be dialled; `pushed`,
from its carrier when it is outbound-only (it pushes each snapshot to a reachable neighbour,
which serves it unaltered: the digest is the one its producer signed). The path is read from
the record, never found by waiting for a timeout.

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
from node.net.metrics import NodeMetrics
from node.net.view import MemberView
from node.protocol.exchange import Accept
from p2pd.client import FetchError, SwarmClient
from p2pd.errors import ReasonedError
from p2pd.reasons import RETRYABLE
from p2pd.records import RecordRefused, open_record
from p2pd.server import MAX_HEALTH_WAIT
from p2pd.tensors import SnapshotKey

log = logging.getLogger("atoll.exchange")
# A neighbour that refuses connections (nothing listens at its address: it is gone, or its
# advertised address is wrong) for this long is given up for the round instead of retried until
# fetch_timeout; one that accepts but is slow still gets the whole fetch_timeout.
REFUSED_SECONDS = 2.0


class Fetcher:
    """One daemon's fetches of its neighbours' snapshots (see the module docstring): the clients it keeps per address,
    the back-off of unreachable neighbours, and the bytes and paths it fetched."""

    def __init__(self, comm, runtime, view: MemberView | None, metrics: NodeMetrics, stop: threading.Event):
        """`comm`: the node's CommConfig (fetch_timeout, seconds); `runtime`: its joined Runtime (identity, TLS,
        libp2p plane, discovery); `view`: its MemberView (addresses and records of the live members; None: set
        before the first fetch); `metrics`: its NodeMetrics; `stop`: the Event set on a stop request."""
        self.comm, self.runtime, self.view, self.metrics, self.stop = comm, runtime, view, metrics, stop
        self.identity, self.discovery = runtime.identity, runtime.discovery
        self.backoff = Backoff()
        self.present_record = False  # sampled membership: every fetch carries this node's signed record
        self.received_bytes = 0  # snapshot bytes fetched
        self.paths: collections.Counter[str] = collections.Counter()  # snapshots fetched, by path
        self._clients: dict[str, SwarmClient] = {}
        self._failed_on: dict[str, str] = {}  # peer id -> the path it was backed off on
        self._lock = threading.Lock()

    def fetch_many(self, peers: Sequence[str], key: SnapshotKey, accept: Accept) -> dict[str, Any]:
        """{peer: accept(its `key` snapshot)} for the `peers` that delivered it within one deadline,
        comm.fetch_timeout, fetched in parallel; backed-off peers are skipped at once."""
        with self._lock:  # a peer whose record names another path since it failed is tried at once
            skipped = [j for j in peers if self.backoff.skip(j, key.round) and self._failed_on.get(j) == self.path(j)]
        for _ in skipped:
            self.metrics.fetch_failures.labels(reason="backed_off").inc()
        peers = [j for j in peers if j not in skipped and j in self.view.addresses]
        if not peers:
            return {}
        deadline = time.monotonic() + self.comm.fetch_timeout
        with ThreadPoolExecutor(max_workers=min(32, len(peers)), thread_name_prefix="atoll-fetch") as pool:
            got = list(pool.map(lambda j: self.fetch(j, key, accept, deadline), peers))
        return {j: v for j, v in zip(peers, got) if v is not None}

    def fetch(self, peer_id: str, key: SnapshotKey, accept: Accept, deadline: float) -> Any:
        """accept(the neighbour's snapshot `key`), or None (reason counted) if not had by `deadline`
        (time.monotonic() seconds) or refused."""
        at = (key.round, key.step)
        address = self.view.addresses[peer_id]
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
                if e.reason in RETRYABLE:  # denied: a peer that joined a moment ago may not know us yet
                    time.sleep(0.1)
                    continue
                break  # bad data: skip this neighbour for this round
            except ReasonedError as e:  # refused by `accept`
                reason = e.reason
                break
        self.metrics.fetch_failures.labels(reason=reason).inc()
        log.info("round %d: skipped neighbour %s (%s)", key.round, peer_id[:16], reason)
        if not answered and reason in ("timeout", "unavailable") and not self.stop.is_set():
            self._failed_on[peer_id] = self.path(peer_id)
            self._back_off(peer_id, address, key.round, reason)
        return None

    def served(self, peer_id: str) -> list[SnapshotKey]:
        """The snapshot keys `peer_id` serves now (one Health call on the path its record names, within
        comm.fetch_timeout); [] when it cannot be asked or does not answer."""
        if peer_id not in self.view.addresses:
            return []
        route = self._route(peer_id)
        if isinstance(route, str):
            return []
        client, _, producer, _ = route
        try:
            return list(client.health(timeout=self.comm.fetch_timeout, producer_peer_id=producer)[1])
        except FetchError:
            return []

    def path(self, peer_id: str) -> str:
        """The way to `peer_id` its record names: its reachability, and the carrier for an
        outbound-only one (a peer backed off through one carrier is tried again through another)."""
        rec = self.view.records.get(peer_id)
        if rec is None:
            return "direct"
        return f"outbound_only:{rec.carrier}" if rec.reachability == "outbound_only" else rec.reachability

    def _route(self, peer_id: str):
        """(client, server peer id, producer peer id, path) for fetching `peer_id`'s snapshots as
        its record says (see the module docstring), or the reason there is no way: no_carrier
        (an outbound-only peer without a live carrier yet), no_libp2p (this node has no plane)."""
        records = self.view.records  # replaced whole by the refresh thread: read it once
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
            return self.client(carrier.grpc_address), carrier.peer_id, peer_id, "pushed"
        return self.client(self.view.addresses[peer_id]), peer_id, "", "direct"

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

    def client(self, address: str) -> SwarmClient:
        """The gRPC client of `address` (host:port), made on first use and kept."""
        if address not in self._clients:
            self._clients[address] = SwarmClient(
                address,
                timeout=self.comm.fetch_timeout,
                retries=1,
                tls=self.runtime.tls,
                identity=self.identity,
                envelope=self.discovery.signed_record if self.present_record else None,
            )
        return self._clients[address]

    def close(self) -> None:
        """Close every client."""
        for c in self._clients.values():
            c.close()
