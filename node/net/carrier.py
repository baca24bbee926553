"""An outbound-only node's snapshots reach its neighbours through a carrier: a directly reachable
neighbour it pushes each snapshot to (the Push RPC, p2pd/server.py), named in its signed record.
Neighbours fetch the snapshot from the carrier and check it against the digest the producer
signed, so the carrier cannot alter it (node/net/grpc_exchange.py routes them there).

This module is the producer's side: choose a carrier, push in the background, replace a carrier
that stops answering (the record names the new one before its first push, and what the node
still holds is pushed to it again)."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable

from p2pd.client import FetchError
from p2pd.reasons import FULL
from p2pd.server import MAX_PUSH_MESSAGE_BYTES
from p2pd.tensors import EncodedSnapshot, SnapshotKey

log = logging.getLogger("atoll.exchange")


class Pusher:
    """Pushes every snapshot published to `store` (p2pd.server.SnapshotStore) to a carrier.

    `discovery`: the node's Discovery (its record names the carrier); `candidates()`: live peer
    records that could carry (same task, codec); `client(address)`: a SwarmClient there;
    `metrics`: NodeMetrics (atoll_pushed_bytes_total, failures); `stop`: the node's stop event;
    `timeout`: seconds one push may take."""

    def __init__(self, store, discovery, candidates: Callable[[], list], client, metrics, stop, timeout: float):
        """Starts the background push thread. `store`: the node's SnapshotStore (what it still holds goes to a new
        carrier); `discovery`: its Discovery; `candidates()`: the peer records that may carry; `client(address)`: a
        SwarmClient for a gRPC host:port; `metrics`: its NodeMetrics; `stop`: the node's threading.Event; `timeout`:
        seconds one push attempt may take (`close` waits that plus 5 s for the thread)."""
        self.store, self.discovery, self.candidates, self.client = store, discovery, candidates, client
        self.metrics, self.stop, self.timeout = metrics, stop, timeout
        self.me = discovery.identity.peer_id
        self.pushed_bytes = 0
        self._queue: queue.Queue[tuple[SnapshotKey, EncodedSnapshot]] = queue.Queue()
        self._failed: set[str] = set()  # carriers that stopped answering, skipped until none is left
        self._thread = threading.Thread(target=self._run, name="atoll-push", daemon=True)
        self._thread.start()

    def choose(self) -> str:
        """A directly reachable candidate to carry this node's snapshots ("" if none): the one
        whose id hashes closest to ours, so carriers spread over the swarm."""
        options = [p.peer_id for p in self.candidates() if p.peer_id != self.me and p.reachability == "direct"]
        fresh = [j for j in options if j not in self._failed]
        if not fresh:
            self._failed.clear()  # all failed once: try them again
            fresh = options
        return min(fresh, key=lambda j: hashlib.sha256((self.me + j).encode()).digest(), default="")

    def push(self, key: SnapshotKey, packed: EncodedSnapshot) -> None:
        """Queue a published snapshot for its carrier (pushed in order, in the background)."""
        self._queue.put((key, packed))

    def close(self) -> None:
        """Stop pushing (the node's stop event ends the thread too)."""
        self._queue.put(None)
        self._thread.join(timeout=self.timeout + 5)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            try:
                self._push(*item)
            except Exception as e:  # never let one bad push end the thread: later ones may pass
                log.warning("push of %s failed: %s", item[0], e)

    def _push(self, key: SnapshotKey, packed: EncodedSnapshot) -> None:
        record = self.discovery.record
        if record is None or record.snapshot_digest(key.kind, key.round, key.step) is None:
            return  # no longer held nor signed: a newer snapshot follows
        if max(len(p) for p in packed.parts) > MAX_PUSH_MESSAGE_BYTES:  # published before the verdict
            self.metrics.fetch_failures.labels(reason="push_too_large").inc()
            return
        for attempt in range(4):
            carrier = self.discovery.record.carrier
            live = {p.peer_id: p for p in self.candidates()}
            if carrier not in live:
                carrier = self._switch(key)
            if not carrier:
                self.metrics.fetch_failures.labels(reason="no_carrier").inc()
                return
            try:
                envelope = self.discovery.signed_record()
                self.client(live[carrier].grpc_address).push(carrier, key, packed.parts, envelope, self.timeout)
            except FetchError as e:
                if e.reason in FULL:
                    self.stop.wait(0.5 * 2**attempt)
                    continue
                log.warning("push of %s to carrier %s failed (%s); choosing another", key, carrier[:16], e)
                self._failed.add(carrier)
                self._switch(key)
                continue
            self.pushed_bytes += packed.wire_bytes
            self.metrics.pushed.inc(packed.wire_bytes)
            return

    def _switch(self, pushing: SnapshotKey) -> str:
        """Name a new carrier in the record and queue what the node still holds for it."""
        carrier = self.choose()
        self.discovery.update(carrier=carrier)
        if carrier:
            for k in self.store.keys():
                held = self.store.get(k)
                if k != pushing and held is not None:
                    self._queue.put((k, held))
        return carrier
