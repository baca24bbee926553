"""Reading a swarm's DHT directory: every bucket (the full list of live members), the node's own bucket, or a few
random buckets (a sampled node's bootstrap), each row opened and checked again (signature, schema, binding to its
row, expiry against the local clock) and refusals counted by reason. The reading half of Discovery
(p2pd/discovery.py), which provides `dht`, `keys`, `key`, `identity`, `_call`, `_refused`, `_logged`, `_issued` and
the caches set up in its constructor."""

from __future__ import annotations

import logging
import math
import random

from hivemind.utils import get_dht_time

from p2pd.dht import DiscoveryError
from p2pd.records import PeerRecord, RecordRefused, bucket_of, open_record

log = logging.getLogger("p2pd.discovery")


class DirectoryReading:
    """The reading half of Discovery (see the module docstring)."""

    def _rows(self, keys: list[str]) -> dict:
        """The rows of directory `keys`: {subkey: ValueWithExpiration}, read at once (a bucket whose read fails
        counts as `bucket_unread` and is left out, unless every read fails: DiscoveryError)."""
        futures = [self.dht.get(key, latest=True, return_future=True) for key in keys]
        rows, failed = {}, 0
        for future in futures:
            try:
                found = self._call(future)
            except DiscoveryError:
                failed += 1
                self._refused["bucket_unread"] += 1
                if failed == len(keys):
                    raise
                continue
            if found is not None and isinstance(found.value, dict):
                rows.update(found.value)
        return rows

    def _open(self, rows: dict) -> list[PeerRecord]:
        """The rows' records that check out (signature, schema, subkey, expiry), sorted by peer id; refusals
        counted."""
        now = get_dht_time()
        peers = []
        for subkey, item in rows.items():
            try:
                if not isinstance(subkey, str):
                    raise RecordRefused("malformed", "subkey is not a peer id")
                peers.append(open_record(item.value, now=now, expected_peer_id=subkey))
            except RecordRefused as e:
                self._count_refusal(str(subkey), e)
        return sorted(peers, key=lambda p: p.peer_id)

    def live_peers(self, include_self: bool = True, rotate: bool = False) -> list[PeerRecord]:
        """Records of every peer whose row is alive and checks out, sorted by peer id. Every bucket is read, unless
        `rotate`: then only the buckets due (round-robin, each read again within ttl/3 of its last read, as its
        members re-store theirs) and the others' records taken from their last read, the expired ones left out. A
        node re-reading the directory every second so makes about one DHT lookup a second for 2^b <= ttl/3 buckets,
        not 2^b."""
        due = self._due() if rotate else self.keys
        rows, rows_of = self._rows(due), set(due)
        for key in due:
            self._bucket_records[key] = []
        for record in self._open(rows):  # a row filed in another bucket than its peer id's is left out
            key = self.keys[bucket_of(record.peer_id, self.bits)]
            if key in rows_of:
                self._bucket_records[key].append(record)
        now = get_dht_time()
        peers = sorted(
            (r for key in self.keys for r in self._bucket_records.get(key, ()) if r.expires_at > now),
            key=lambda p: p.peer_id,
        )
        self._known = {p.peer_id: p.expires_at for p in peers}  # replaced whole: readers need no lock
        self._addresses = {p.peer_id: p.grpc_address for p in peers}
        self._note_own(peers)
        if not include_self:
            peers = [p for p in peers if p.peer_id != self.identity.peer_id]
        return peers

    def _due(self) -> list[str]:
        """The buckets a rotating read takes now: those never read, else the next ceil(2^b / (ttl / 3)) round-robin."""
        unread = [k for k in self.keys if k not in self._bucket_records]
        if unread:
            return unread
        n = min(len(self.keys), math.ceil(len(self.keys) / max(1.0, self.ttl / 3)))
        start = self._next_bucket % len(self.keys)
        self._next_bucket = start + n
        return [self.keys[(start + i) % len(self.keys)] for i in range(n)]

    def read_own_bucket(self) -> list[PeerRecord]:
        """The valid records of the bucket this node's record goes to (sorted by peer id), noting a live record under
        this node's own id that this process did not sign (foreign_self). One bucket read, whatever the swarm's size.
        Raises DiscoveryError."""
        peers = self._open(self._rows([self.key]))
        self._note_own(peers)
        return peers

    def read_buckets(self, n: int) -> tuple[list[PeerRecord], int]:
        """The valid records of `n` directory buckets drawn at random (every bucket when n >= 2^bits), sorted by peer
        id, and the swarm size they suggest (records read times 2^bits / buckets read). A sampled node's bootstrap:
        it costs n bucket reads, whatever the swarm's size. Raises DiscoveryError when no read succeeds."""
        keys = self.keys if n >= len(self.keys) else random.sample(self.keys, max(1, n))
        peers = self._open(self._rows(keys))
        return peers, round(len(peers) * len(self.keys) / len(keys))

    def address_of(self, peer_id: str) -> str | None:
        """The gRPC address `peer_id` signed into its record, as of the last live_peers(); None
        if it had no live record then (a fresh look costs the caller one live_peers())."""
        return self._addresses.get(peer_id)

    def foreign_self(self) -> PeerRecord | None:
        """A live record under this node's own peer id that this process did not sign, as of
        the last live_peers() or read_own_bucket(): the key is (or was, before a restart) in use elsewhere. Whether
        that other process is alive is for the caller to ask it (see Node._check_key_in_use)."""
        return self._foreign_self

    def is_known(self, peer_id: str) -> bool:
        """Whether `peer_id` has a live, valid record in the swarm's DHT row (admission of
        fetches). Answers from the last look at the DHT; an id not seen there triggers a fresh
        look at most once a second, so a flood of unknown ids cannot flood the DHT."""
        now = get_dht_time()
        if self._known.get(peer_id, 0.0) > now:
            return True
        with self._lock_known:
            if now - self._known_at < 1.0:
                return False
            self._known_at = now
        try:
            self.live_peers()
        except DiscoveryError:
            return False
        return self._known.get(peer_id, 0.0) > get_dht_time()

    def _count_refusal(self, subkey: str, e: RecordRefused) -> None:
        self._refused[e.reason] += 1
        if (subkey, e.reason) not in self._logged and len(self._logged) < 10_000:
            self._logged.add((subkey, e.reason))
            log.warning("refused peer record in row %s: %s", subkey[:20], e)

    def _note_own(self, peers: list[PeerRecord]) -> None:
        """Remember a live record under this node's own id that this process did not sign (see foreign_self)."""
        mine = next((p for p in peers if p.peer_id == self.identity.peer_id), None)
        self._foreign_self = mine if mine is not None and mine.issued_at not in self._issued else None
