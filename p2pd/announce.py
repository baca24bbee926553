"""Publishing a node's own signed record: `announce` once, `update` as fields change (round, digests, ...), and a
heartbeat thread that re-signs and stores it every ttl/3 (updates coalesced, at most one store a second). The record
is served by the node's gRPC Health call the moment it is signed; the DHT store happens in the background, so
nothing on a node's per-step path waits for the DHT."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Any

from hivemind.utils import get_dht_time

from p2pd.dht import DiscoveryError
from p2pd.records import PeerRecord, sign_record

log = logging.getLogger("p2pd.discovery")
STORE_MIN_SECONDS = 1.0  # an updated record reaches the DHT within this (Health serves it at once)


class Announcing:
    """The publishing half of Discovery (p2pd/discovery.py), which provides `identity`, `key`, `ttl`, `dht`,
    `call_timeout` and the state set up by `_init_announcing`."""

    def _init_announcing(self) -> None:
        self._fields: dict[str, Any] | None = None
        self._record: PeerRecord | None = None
        self._lock = threading.Lock()
        self._store_soon = threading.Event()  # set by update(): the heartbeat thread stores the new record
        self._heartbeat: threading.Thread | None = None
        self._envelope = b""
        self._issued: collections.deque[float] = collections.deque(maxlen=64)  # issued_at of our records
        # False (sampled membership): updates are served by Health only, the DHT copy re-stored every ttl/3
        self.store_updates = True

    def announce(self, **fields: Any) -> PeerRecord:
        """Publish this node's record (fields of PeerRecord except id and times) and keep it alive."""
        with self._lock:
            self._fields = dict(fields)
            # the listen addresses are fixed for the node's life: ask the DHT process once
            self._fields.setdefault("dht_maddrs", tuple(self.visible_maddrs()[:8]))
            record = self._publish_locked()
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="atoll-heartbeat", daemon=True)
            self._heartbeat.start()
        return record

    def update(self, **fields: Any) -> PeerRecord:
        """Change some fields (round, model_digest, ...): the new record is signed and served by
        Health at once, and stored to the DHT in the background (nothing on a node's per-step
        path waits for the DHT; the heartbeat re-stores it in any case). With `store_updates`
        False (sampled membership, where peers read a node's progress from its Health answers,
        never from the directory) only the heartbeat stores it: the directory's copy is a ticket,
        re-signed every ttl/3, whose round and digests may be that old."""
        with self._lock:
            if self._fields is None:
                raise RuntimeError("announce() first")
            self._fields.update(fields)
            record = self._sign_locked()
        if self.store_updates:
            self._store_soon.set()
        return record

    @property
    def record(self) -> PeerRecord | None:
        """The record this node last published, None before announce()."""
        return self._record

    def signed_record(self) -> bytes:
        """The current record's envelope (served by the gRPC Health call). Lock-free: it must
        not wait behind a slow DHT store."""
        return self._envelope

    def _sign_locked(self) -> PeerRecord:
        now = get_dht_time()
        record = PeerRecord(peer_id=self.identity.peer_id, issued_at=now, expires_at=now + self.ttl, **self._fields)
        self._envelope = sign_record(record, self.identity)
        self._issued.append(record.issued_at)
        self._record = record
        return record

    def _store(self, record: PeerRecord, envelope: bytes) -> None:
        """Store a signed record to the DHT (waits for the DHT's answer)."""
        ok = self._call(
            self.dht.store(self.key, envelope, record.expires_at, subkey=record.peer_id, return_future=True)
        )
        if not ok:
            log.warning("DHT store of this node's record was not acknowledged; will retry on heartbeat")

    def _publish_locked(self) -> PeerRecord:
        record = self._sign_locked()
        self._store(record, self._envelope)
        return record

    def _heartbeat_loop(self) -> None:
        """Re-sign and store the record every ttl/3, and store it soon after an update: at most
        once per STORE_MIN_SECONDS, the updates in between coalesced into the latest record (a
        node updates its record every round; storing each one cost the DHT process and p2pd of a
        4-node demo a third of the machine's CPU)."""
        next_beat, stored_at = time.monotonic() + self.ttl / 3, 0.0
        while not self._stop.is_set():
            due = self._store_soon.wait(max(0.0, next_beat - time.monotonic()))
            if due and self._stop.wait(max(0.0, stored_at + STORE_MIN_SECONDS - time.monotonic())):
                return
            if self._stop.is_set():
                return
            stored_at = time.monotonic()
            try:
                with self._lock:
                    if due:
                        self._store_soon.clear()
                    else:
                        self._sign_locked()
                        next_beat = time.monotonic() + self.ttl / 3
                    record, envelope = self._record, self._envelope
                self._store(record, envelope)
            except Exception as e:  # keep heartbeating through transient DHT errors
                log.warning("heartbeat failed: %s", e)

    def _call(self, future):
        """Wait for a DHT call, bounded: a dead DHT process must not hang the node, and one
        that died (killed with its process group, say) fails the call within a second."""
        deadline = time.monotonic() + self.call_timeout
        while True:
            try:
                return future.result(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except concurrent.futures.TimeoutError:
                alive = self._dht is not None and self._dht.is_alive()
                if alive and time.monotonic() < deadline:
                    continue
                future.cancel()
                raise DiscoveryError(
                    f"the DHT did not answer within {self.call_timeout:.0f} s" if alive else "the DHT process has died"
                ) from None
