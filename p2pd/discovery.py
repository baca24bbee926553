"""Swarm membership on the hivemind DHT: join, heartbeat a signed record, list live peers.

Every member stores its signed PeerRecord under one DHT key, ``atoll/<swarm>/peers``, with
its peer id as the subkey, so a single ``get`` returns the whole swarm (one row per peer,
each row with its own expiry). A node re-publishes every ``ttl / 3`` seconds (p2pd/announce.py);
a node that stops doing so disappears once its row expires, i.e. within ``ttl``.

Two checks keep forged rows out: ``PeerRecordValidator`` inside every atoll DHT node
(p2pd/dht.py), and ``live_peers``, which opens every row again (signature, schema, binding,
expiry against the local clock) and drops and counts the failures in ``refused`` by reason, so
a row that slipped through a foreign DHT node (one without the validator) still never reaches
the caller.

The DHT daemon runs with the node's own Ed25519 key (see identity.py), so its libp2p peer
id equals the record's peer id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence

import hivemind
from hivemind.utils import get_dht_time

from p2pd.addresses import maddr_tcp_listen, tcp_port_in_use
from p2pd.announce import Announcing
from p2pd.dht import (  # DiscoveryError: raised to every caller of Discovery
    DiscoveryError,
    PeerRecordValidator,
    clock_skew,
    start_dht,
)
from p2pd.identity import Identity
from p2pd.procs import stop_hivemind_process
from p2pd.records import PeerRecord, RecordRefused, open_record, swarm_key

log = logging.getLogger(__name__)
BOOTSTRAP_ATTEMPTS = 3  # DHT starts tried when no initial peer answers
BOOTSTRAP_RETRY_SECONDS = 2.0


def dht_kwargs(initial_peers, host_maddrs, announce_maddrs, startup_timeout: float, client_mode: bool, relay: bool):
    """hivemind.DHT's arguments for Discovery's (see its constructor): relays used when `relay`, and an auto-relay
    reservation asked of the initial peers (its trusted relays) when there are any."""
    return dict(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
        startup_timeout=startup_timeout,
        client_mode=client_mode,
        use_relay=relay,
        use_auto_relay=relay and bool(initial_peers),
    )


class Discovery(Announcing):
    """Membership of one swarm for one node: it starts the DHT (p2pd/dht.py), publishes the node's signed record
    (Announcing, p2pd/announce.py) and reads the live members' records.

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
        self._dht_kwargs = dht_kwargs(initial_peers, host_maddrs, announce_maddrs, startup_timeout, client_mode, relay)
        self._dht: hivemind.DHT | None = None
        self._stop = threading.Event()
        self._init_announcing()
        self._logged: set[tuple[str, str]] = set()
        self._known: dict[str, float] = {}  # peer id -> record expiry, from the last live_peers()
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

    def _count_refusal(self, subkey: str, e: RecordRefused) -> None:
        self._refused[e.reason] += 1
        if (subkey, e.reason) not in self._logged and len(self._logged) < 10_000:
            self._logged.add((subkey, e.reason))
            log.warning("refused peer record in row %s: %s", subkey[:20], e)
