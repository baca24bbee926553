"""A daemon's peer sampler (net.membership: sampled): a Basalt view (node/algo/comm/sampling.py) kept fresh by view
exchanges in Health calls (p2pd/sampling.py), and each round's neighbours drawn from it and probed.

Every SAMPLE_SECONDS the node pulls the view of the peer in its least-hit slot, pushes its own to the next least-hit
and re-seeds one slot: O(view) ids a round whatever the swarm's size, instead of every member's record every second.
Entries are (peer id, address) hints. A round's neighbours are the peers of the `sample_size` oldest slots (the next
to be re-seeded, closest to their seeds' lowest ranks: Basalt's samples), so a node's neighbours are a pure function
of its view; each is used only after a probe at the hinted address answers with that peer's signed, unexpired record
and its signature over a fresh nonce. A peer whose call fails leaves the view at once; its hint may be wrong, or it
may be gone.

Bootstrap: a few random buckets of the DHT directory (p2pd/discovery.py read_buckets), whose rows are the members'
signed records: they hold attackers only at their share of identities, whatever those flood.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from hivemind.utils import get_dht_time

from node.algo.comm.sampling import BasaltViews, peer_hash
from p2pd.client import FetchError
from p2pd.records import PeerRecord, RecordRefused, open_record
from p2pd.sampling import MAX_VIEW_ENTRIES, new_nonce, probe_ok

log = logging.getLogger("atoll.exchange")
SAMPLE_SECONDS = 2.0  # one Basalt round (a pull and a push) at most this often
BOOT_BUCKETS = 4  # directory buckets read at bootstrap
CALL_SECONDS = 5.0  # deadline of one exchange or probe call


def address_prefix(address: str) -> str:
    """The network prefix an address (host:port) sits in, for hierarchical ranking: an IPv4 /24, an IPv6 /48, or a
    host name without its first label (so the hosts of one domain share a prefix)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.split(".", 1)[-1]
    bits = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


class PeerSampler:
    """One node's Basalt view and probes (see the module docstring); implements p2pd.sampling.Sampling for the
    node's gRPC server."""

    def __init__(
        self, me: str, address: str, client, view_size: int = 64, sample_size: int = 4, by_prefix: bool = False
    ):
        """`me`: this node's peer id; `address`: its advertised gRPC address (its own entry in the views it sends);
        `client(address)`: a SwarmClient there (signed as this node; probes name it); `view_size`: slots (v);
        `sample_size`: neighbours drawn per round; `by_prefix`: rank by the network prefix of each entry's address
        first (Basalt's hierarchical ranking, see `address_prefix`)."""
        self.me, self.address, self.client, self.sample_size = me, address, client, sample_size
        self.views = BasaltViews(1, view_size, k=1, hierarchical=by_prefix)
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self._hashes: list[int] = []
        self.hints: dict[str, str] = {}  # peer id -> the address it was last offered (or verified) at
        self.verified: dict[str, PeerRecord] = {}  # peer id -> the record its last good probe answered with
        self.exchanges = {"pull": 0, "push": 0, "failed": 0}
        self.size_estimate = 0
        self._lock = threading.Lock()
        self._row = np.zeros(1, np.int64)

    # -- the view ----------------------------------------------------------------------------
    def _intern(self, peer_id: str) -> int:
        i = self._ids.get(peer_id)
        if i is None:
            i = self._ids[peer_id] = len(self._names)
            self._names.append(peer_id)
            self._hashes.append(peer_hash(peer_id))
        return i

    def offer(self, entries: list[tuple[str, str]]) -> None:
        """Offer (peer id, address) entries to the view (this node's own id left out; at most MAX_VIEW_ENTRIES)."""
        entries = [(p, a) for p, a in entries[:MAX_VIEW_ENTRIES] if p != self.me]
        if not entries:
            return
        with self._lock:
            ids = np.array([[self._intern(p) for p, _ in entries]], np.int64)
            hashes = np.array([[self._hashes[i] for i in ids[0]]], np.uint64)
            for p, a in entries:
                if p not in self.verified:  # a probed peer's address is the one its record signs
                    self.hints.setdefault(p, a)
            # the prefix of the address the id will be probed at: a claimed prefix it does not answer at fails there
            prefixes = np.array([[peer_hash(address_prefix(self.hints.get(p, a))) for p, a in entries]], np.uint64)
            self.views.offer(self._row, ids, hashes, prefixes)

    def peers(self) -> list[str]:
        """The distinct peer ids the view holds, sorted."""
        with self._lock:
            return sorted(self._names[i] for i in self.views.view(0))

    def view(self) -> list[tuple[str, str]]:
        """The view as (peer id, address) entries, this node's own first (what a pull answers, what a push sends)."""
        hints = [(p, self.hints.get(p)) for p in self.peers()]  # a hint may go as a server thread forgets its peer
        return [(self.me, self.address)] + [(p, a) for p, a in hints if a is not None]

    def pushed(self, entries: list[tuple[str, str]]) -> None:
        """A peer pushed its view (p2pd.sampling.Sampling)."""
        self.offer(entries)

    def forget(self, peer_id: str) -> None:
        """Drop `peer_id` from the view (its call failed): its slots take the next best peer offered."""
        with self._lock:
            i = self._ids.get(peer_id)
            if i is None:
                return
            dead = np.zeros(len(self._names), bool)
            dead[i] = True
            self.views.forget(self._row, dead)
            self.hints.pop(peer_id, None)
            self.verified.pop(peer_id, None)

    # -- bootstrap and rounds ------------------------------------------------------------------
    def bootstrap_if_empty(self, discovery) -> None:
        """Bootstrap (see `bootstrap`) while the view holds nobody. Raises DiscoveryError."""
        if not self.peers():
            self.bootstrap(discovery)

    def bootstrap(self, discovery) -> int:
        """Offer the records of BOOT_BUCKETS random directory buckets; returns the swarm size they suggest (also kept
        in `size_estimate`). Raises DiscoveryError when no bucket can be read."""
        records, self.size_estimate = discovery.read_buckets(BOOT_BUCKETS)
        self.offer([(r.peer_id, r.grpc_address) for r in records])
        return self.size_estimate

    def exchange(self) -> None:
        """One Basalt round: pull the view of the least-hit slot's peer, push ours to the next, re-seed a slot."""
        with self._lock:
            pull = int(self.views.select(self._row)[0])
            push = int(self.views.select(self._row)[0])
            pull_id = self._names[pull] if pull >= 0 else None
            push_id = self._names[push] if push >= 0 else None
        if pull_id is not None and pull_id in self.hints:
            address = self.hints[pull_id]
            try:
                _, entries, _ = self.client(address).sample(pull=True, timeout=CALL_SECONDS)
                self.offer(entries + [(pull_id, address)])
                self.exchanges["pull"] += 1
            except FetchError:
                self.exchanges["failed"] += 1
                self.forget(pull_id)
        if push_id is not None and push_id in self.hints:
            try:
                self.client(self.hints[push_id]).sample(push=self.view(), timeout=CALL_SECONDS)
                self.exchanges["push"] += 1
            except FetchError:
                self.exchanges["failed"] += 1
                self.forget(push_id)
        with self._lock:
            self.views.reset(self._row)

    def probe(self, peer_id: str) -> PeerRecord | None:
        """Ask `peer_id`, at its hinted address, for its signed record and a signature over a fresh nonce; its record
        when both check out (and it is unexpired), else None and the peer leaves the view."""
        address = self.hints.get(peer_id)
        if address is None:
            return None
        nonce = new_nonce()
        try:
            envelope, _, signature = self.client(address).sample(nonce=nonce, timeout=CALL_SECONDS)
            record = open_record(envelope, now=get_dht_time(), expected_peer_id=peer_id)
            if not probe_ok(signature, nonce, self.me, peer_id):
                raise RecordRefused("bad_probe", "the probe's signature does not check out")
        except (FetchError, RecordRefused) as e:
            log.info("probe of %s at %s failed (%s): left out of the view", peer_id[:16], address, e)
            self.forget(peer_id)
            return None
        with self._lock:
            self.verified[peer_id] = record
            self.hints[peer_id] = record.grpc_address
        return record

    def sample(self) -> list[PeerRecord]:
        """This round's neighbours: the peers of the sample_size oldest slots, each probed (in parallel); a failed
        probe is replaced by the next oldest, at most twice over. Sorted by peer id."""
        with self._lock:
            order = [self._names[i] for i in self.views.oldest(0)][: 3 * self.sample_size]
        got: list[PeerRecord] = []
        with ThreadPoolExecutor(max_workers=self.sample_size, thread_name_prefix="atoll-probe") as pool:
            while order and len(got) < self.sample_size:
                batch, order = order[: self.sample_size - len(got)], order[self.sample_size - len(got) :]
                got += [r for r in pool.map(self.probe, batch) if r is not None]
        return sorted(got, key=lambda r: r.peer_id)
