"""Swarm membership on the hivemind DHT: join, heartbeat a signed record, list live peers.

Every member stores its signed PeerRecord under one DHT key, ``atoll/<swarm>/peers``, with
its peer id as the subkey, so a single ``get`` returns the whole swarm (one row per peer,
each row with its own expiry). A node re-publishes every ``ttl / 3`` seconds; a node that
stops doing so disappears once its row expires, i.e. within ``ttl``.

Two checks keep forged rows out:
- ``PeerRecordValidator`` runs inside every atoll DHT node, on stores it receives and on
  values it fetches: a row whose signature is bad, whose signer is not the row's subkey, or
  whose DHT expiry outlives the signed one is never stored nor returned.
- ``live_peers`` opens every row again (signature, schema, binding, expiry against the local
  clock) and drops and counts the failures in ``refused`` by reason, so a row that slipped
  through a foreign DHT node (one without the validator) still never reaches the caller.

The DHT daemon runs with the node's own Ed25519 key (see identity.py), so its libp2p peer
id equals the record's peer id.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import hivemind
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from p2pd.addresses import maddr_tcp_listen, tcp_port_in_use
from p2pd.identity import Identity
from p2pd.procs import start_hivemind_process, stop_hivemind_process
from p2pd.records import PeerRecord, RecordRefused, open_record, sign_record, swarm_key

log = logging.getLogger(__name__)


BOOTSTRAP_ATTEMPTS = 3  # DHT starts tried when no initial peer answers
BOOTSTRAP_RETRY_SECONDS = 2.0
STORE_MIN_SECONDS = 1.0  # an updated record reaches the DHT within this (Health serves it at once)


def clock_skew(error: str) -> str | None:
    """hivemind's "local time must be within 3 seconds of others (local: T1, peer: T2)" as one line with the offset
    and what to do; None for any other error."""
    m = re.search(r"local time must be within ([\d.]+) seconds.*?local: ([\d.]+), peer: ([\d.]+)", error, re.S)
    if m is None:
        return None
    limit, offset = float(m.group(1)), float(m.group(2)) - float(m.group(3))
    return (
        f"clock skew: this machine's clock is {abs(offset):.1f} s {'ahead of' if offset > 0 else 'behind'} the "
        f"initial peer's (the DHT needs them within {limit:g} s): synchronise the clock (NTP: timedatectl "
        f"set-ntp true, or chrony) on whichever machine is wrong, then start again"
    )


class DiscoveryError(RuntimeError):
    """The DHT could not be started or joined; the message says what to check."""


def start_dht(*, ready_timeout: float = 60.0, **dht_kwargs: Any) -> hivemind.DHT:
    """A started hivemind DHT process, waited for with a bound (see start_hivemind_process).

    The p2pd daemon it spawns inherits this process's environment: unless the user set GOGC,
    its Go collector runs at GOGC=50 (p2pd resident 70 instead of 85 MB on the demo, same speed;
    a GOMEMLIMIT low enough to matter made the demo 2x slower)."""
    os.environ.setdefault("GOGC", "50")
    try:
        return start_hivemind_process(lambda: hivemind.DHT(start=False, **dht_kwargs), ready_timeout=ready_timeout)
    except TimeoutError as e:
        raise DiscoveryError(str(e)) from e


class PeerRecordValidator(RecordValidatorBase):
    """hivemind record validator for the swarm key; other keys pass through untouched.

    `dropped` counts the rows it refused, in memory shared with the DHT child process where
    it runs (created before the fork), so the node can export the count."""

    def __init__(self, swarm: str):
        """`swarm`: the swarm name whose DHT key it checks (rows under other keys pass). Raises ValueError for a name
        swarm_key refuses."""
        self._key_id = DHTID.generate(source=swarm_key(swarm)).to_bytes()
        self.dropped = multiprocessing.Value("Q", 0)

    def validate(self, record: DHTRecord) -> bool:
        """True for rows under other keys; for a swarm row, whether its signed record opens with the subkey as signer
        and its DHT expiry is at most the signed one (refusals counted in `dropped`)."""
        if record.key != self._key_id:
            return True
        ok = self._valid_row(record)
        if not ok:
            with self.dropped.get_lock():
                self.dropped.value += 1
        return ok

    def _valid_row(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
            if not isinstance(subkey, str) or not isinstance(value, bytes):
                return False
            # Expiry is deliberately not checked here: hivemind drops expired rows itself, and
            # a rejection here would discard a whole multi-peer answer over one stale row.
            rec = open_record(value, now=None, expected_peer_id=subkey)
        except (RecordRefused, ValueError, TypeError):
            return False
        except Exception:  # msgpack raises its own exception types for junk
            return False
        # Exactly the signed expiry or less: any slack would let a replayed older record outlive
        # (and so replace, since hivemind keeps the later expiry) the current one.
        return record.expiration_time <= rec.expires_at


def _validate_rows_one_by_one(self, key_bytes: bytes, dictionary) -> bool:
    """Replaces hivemind's DHTProtocol._validate_dictionary, which refuses a peer's whole
    dictionary answer when one row fails: one garbage row held by a DHT node that does not run
    atoll's validator (a stock bootstrap) would then hide every member it holds. Here invalid
    rows are dropped (and counted by the validator) and the valid ones kept."""
    if self.record_validator is None:
        return True
    with dictionary.freeze():
        bad = [
            subkey
            for subkey, (value, expiration) in dictionary.items()
            if not self.record_validator.validate(
                DHTRecord(key_bytes, self.serializer.dumps(subkey), value, expiration)
            )
        ]
    for subkey in bad:
        del dictionary[subkey]
    return True


DHTProtocol._validate_dictionary = _validate_rows_one_by_one  # hivemind <1.2, see pyproject


class Discovery:
    """Membership of one swarm for one node.

    >>> d = Discovery(identity, swarm="demo", initial_peers=["/ip4/127.0.0.1/tcp/4000/p2p/12D3..."])
    >>> d.start(); d.announce(grpc_address="127.0.0.1:5000")
    >>> d.live_peers()  # [PeerRecord(...), ...] including this node
    >>> d.close()
    """

    def __init__(
        self,
        identity: Identity,
        *,
        swarm: str = "atoll",
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] | None = None,
        ttl: float = 30.0,
        startup_timeout: float = 30.0,
        client_mode: bool = False,
        call_timeout: float | None = None,
        relay: bool = True,
    ):
        """`client_mode`: read the swarm without serving DHT requests (for observers such as
        `atoll status`); such a node should not announce. `relay`: the daemon may use circuit
        relays and, when AutoNAT finds it behind NAT, reserves a slot on one (hivemind's
        use_auto_relay; its initial peers are its trusted relays)."""
        if identity.path is None:
            raise ValueError("Discovery needs an identity persisted to a file (Identity.load_or_create)")
        if not 1.0 <= ttl <= 3600.0:
            raise ValueError(f"ttl must be within [1, 3600] s, got {ttl}")
        self.identity = identity
        self.swarm = swarm
        self.key = swarm_key(swarm)
        self.ttl = ttl
        self._refused: Counter[str] = Counter()  # rows dropped by live_peers, by reason
        self._validator = PeerRecordValidator(swarm)
        self.call_timeout = call_timeout if call_timeout is not None else max(10.0, ttl)
        self._dht_kwargs = dict(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
            startup_timeout=startup_timeout,
            client_mode=client_mode,
            use_relay=relay,
            use_auto_relay=relay and bool(initial_peers),
        )
        self._dht: hivemind.DHT | None = None
        self._fields: dict[str, Any] | None = None
        self._record: PeerRecord | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._store_soon = threading.Event()  # set by update(): the heartbeat thread stores the new record
        self._heartbeat: threading.Thread | None = None
        self._logged: set[tuple[str, str]] = set()
        self._envelope = b""
        self._known: dict[str, float] = {}  # peer id -> record expiry, from the last live_peers()
        self._issued: collections.deque[float] = collections.deque(maxlen=64)  # issued_at of our records
        self._addresses: dict[str, str] = {}  # peer id -> advertised gRPC address, from the last live_peers()
        self._foreign_self: PeerRecord | None = None
        self._known_at = 0.0
        self._lock_known = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Discovery:
        """Start the DHT process, retrying up to BOOTSTRAP_ATTEMPTS times when no initial peer answers, and return
        self; raises DiscoveryError when a listen address is in use or the DHT cannot start."""
        for maddr in self._dht_kwargs["host_maddrs"]:
            listen = maddr_tcp_listen(maddr)
            if listen is not None and tcp_port_in_use(*listen):
                raise DiscoveryError(
                    f"the DHT listen address {maddr} is in use by another process: "
                    f"choose another port (net.dht_listen) or stop that process"
                )
        for attempt in range(1, BOOTSTRAP_ATTEMPTS + 1):
            try:
                self._dht = start_dht(
                    ready_timeout=2 * self._dht_kwargs["startup_timeout"],
                    identity_path=str(self.identity.path),
                    check_if_identity_free=False,  # hivemind's probe parses RSA keys only
                    record_validators=[self._validator],
                    **self._dht_kwargs,
                )
                break
            except DiscoveryError:
                raise
            except Exception as e:
                skew = clock_skew(str(e))
                if skew is not None:
                    raise DiscoveryError(skew) from e
                # hivemind says "bootstrap" when no initial peer answered: often passing (a peer
                # restarting, or one that still holds a connection of this id from before a crash)
                bootstrap = "bootstrap" in str(e)
                if bootstrap and attempt < BOOTSTRAP_ATTEMPTS:
                    log.warning(
                        "could not reach the initial peers (attempt %d of %d); retrying in %.0f s",
                        attempt,
                        BOOTSTRAP_ATTEMPTS,
                        BOOTSTRAP_RETRY_SECONDS,
                    )
                    time.sleep(BOOTSTRAP_RETRY_SECONDS)
                    continue
                hint = " (are the initial peers reachable from here?)" if bootstrap else ""
                raise DiscoveryError(
                    f"could not start the DHT: {str(e).splitlines()[0] if str(e) else type(e).__name__}{hint}"
                ) from e
        return self

    @property
    def refused(self) -> Counter[str]:
        """Rows refused, by reason: by live_peers, and inside the DHT (`invalid_row`: a row that
        failed the record validator on its way in, stored or fetched)."""
        counts = Counter(self._refused)
        if self._validator.dropped.value:
            counts["invalid_row"] = self._validator.dropped.value
        return counts

    @property
    def dht(self) -> hivemind.DHT:
        """The running hivemind DHT; raises RuntimeError before start(), DiscoveryError after close() (a thread
        still reading the view as the node closes must see the DHT gone, which it handles, not a bug)."""
        if self._dht is None:
            if self._stop.is_set():
                raise DiscoveryError("the DHT is closed")
            raise RuntimeError("Discovery.start() has not been called")
        return self._dht

    @property
    def pid(self) -> int | None:
        """Pid of the DHT child process (its p2pd daemon is that process's child)."""
        return self._dht.pid if self._dht is not None else None

    def visible_maddrs(self) -> list[str]:
        """The multiaddrs at which the DHT says other peers can reach this node, as strings."""
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def close(self) -> None:
        """Leave: stop heartbeating and shut the DHT process and its p2pd down."""
        self._stop.set()
        self._store_soon.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        if self._dht is not None:
            stop_hivemind_process(self._dht)
            self._dht = None

    def __enter__(self) -> Discovery:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- publishing ------------------------------------------------------------------------
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
        path waits for the DHT; the heartbeat re-stores it in any case)."""
        with self._lock:
            if self._fields is None:
                raise RuntimeError("announce() first")
            self._fields.update(fields)
            record = self._sign_locked()
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

    # -- reading ---------------------------------------------------------------------------
    def live_peers(self, include_self: bool = True) -> list[PeerRecord]:
        """Records of every peer whose row is alive and checks out, sorted by peer id."""
        found = self._call(self.dht.get(self.key, latest=True, return_future=True))
        if found is None or not isinstance(found.value, dict):
            return []
        now = get_dht_time()
        peers = []
        for subkey, item in found.value.items():
            try:
                if not isinstance(subkey, str):
                    raise RecordRefused("malformed", "subkey is not a peer id")
                peers.append(open_record(item.value, now=now, expected_peer_id=subkey))
            except RecordRefused as e:
                self._count_refusal(str(subkey), e)
        self._known = {p.peer_id: p.expires_at for p in peers}  # replaced whole: readers need no lock
        self._addresses = {p.peer_id: p.grpc_address for p in peers}
        mine = next((p for p in peers if p.peer_id == self.identity.peer_id), None)
        self._foreign_self = mine if mine is not None and mine.issued_at not in self._issued else None
        if not include_self:
            peers = [p for p in peers if p.peer_id != self.identity.peer_id]
        return sorted(peers, key=lambda p: p.peer_id)

    def address_of(self, peer_id: str) -> str | None:
        """The gRPC address `peer_id` signed into its record, as of the last live_peers(); None
        if it had no live record then (a fresh look costs the caller one live_peers())."""
        return self._addresses.get(peer_id)

    def foreign_self(self) -> PeerRecord | None:
        """A live record under this node's own peer id that this process did not sign, as of
        the last live_peers(): the key is (or was, before a restart) in use elsewhere. Whether
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

    def _count_refusal(self, subkey: str, e: RecordRefused) -> None:
        self._refused[e.reason] += 1
        if (subkey, e.reason) not in self._logged and len(self._logged) < 10_000:
            self._logged.add((subkey, e.reason))
            log.warning("refused peer record in row %s: %s", subkey[:20], e)
