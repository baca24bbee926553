"""Swarm membership on the hivemind DHT: join, heartbeat a signed record, list live peers.

Every member stores its signed PeerRecord in the swarm's directory, with its peer id as the
subkey: by default one DHT key, ``atoll/<swarm>/peers``, so a single ``get`` returns the whole
swarm (one row per peer, each row with its own expiry); with ``directory_bits`` b >= 1, in one
of 2^b bucket keys chosen by its peer id (p2pd.records.directory_key), read together, so no
one key (and no one set of DHT nodes holding it) carries the whole swarm: a key's reply must
stay under p2pd's 4 MiB message cap, about 3,000 records. A node re-publishes every ``ttl / 3``
seconds (p2pd/announce.py); a node that stops doing so disappears once its row expires, i.e. within ``ttl``.

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

from p2pd.addresses import maddr_tcp_listen, tcp_port_in_use
from p2pd.announce import Announcing
from p2pd.dht import (  # DiscoveryError: raised to every caller of Discovery
    DiscoveryError,
    PeerRecordValidator,
    clock_skew,
    start_dht,
)
from p2pd.directory import DirectoryReading
from p2pd.identity import Identity
from p2pd.procs import stop_hivemind_process
from p2pd.records import MAX_DIRECTORY_BITS, PeerRecord, bucket_of, directory_key

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


class Discovery(Announcing, DirectoryReading):
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
        directory_bits: int = 0,
    ):
        """`client_mode`: read the swarm without serving DHT requests (for observers such as
        `atoll status`); such a node should not announce. `relay`: the daemon may use circuit
        relays and, when AutoNAT finds it behind NAT, reserves a slot on one (hivemind's
        use_auto_relay; its initial peers are its trusted relays). `directory_bits`: the
        directory's split into 2^bits bucket keys (0 to MAX_DIRECTORY_BITS; every node of a swarm
        must use the same). Raises ValueError for a bad swarm name, ttl or bits."""
        if identity.path is None:
            raise ValueError("Discovery needs an identity persisted to a file (Identity.load_or_create)")
        if not 1.0 <= ttl <= 3600.0:
            raise ValueError(f"ttl must be within [1, 3600] s, got {ttl}")
        self.identity = identity
        self.swarm = swarm
        if not 0 <= directory_bits <= MAX_DIRECTORY_BITS:
            raise ValueError(f"directory_bits must be within [0, {MAX_DIRECTORY_BITS}], got {directory_bits}")
        self.bits = directory_bits
        self.keys = [directory_key(swarm, directory_bits, b) for b in range(1 << directory_bits)]
        self.key = self.keys[bucket_of(identity.peer_id, directory_bits)]  # where this node's record goes
        self.ttl = ttl
        self._refused: Counter[str] = Counter()  # rows dropped by live_peers, by reason
        self._validator = PeerRecordValidator(swarm, directory_bits)
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
        self._bucket_records: dict[str, list[PeerRecord]] = {}  # bucket key -> its records at its last read
        self._next_bucket = 0  # where a rotating read goes on (p2pd/directory.py)
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
