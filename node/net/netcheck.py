"""A daemon's checks of its own place in the network: does its advertised address answer, can
peers dial it back (the Reach RPC, as petals' reachability check), and is its key already in
use by another live node. Each says what it found in one log line with advice."""

from __future__ import annotations

import logging
import threading
import time

from p2pd.client import FetchError, SwarmClient
from p2pd.discovery import DiscoveryError
from p2pd.records import RecordRefused, open_record

log = logging.getLogger("atoll.node")


class KeyInUse(RuntimeError):
    """Another live process serves this node's peer id (a copied key file)."""


def peer_at(address: str, tls) -> str | None:
    """The peer id whose signed record the node at `address` serves, or None (no answer)."""
    try:
        with SwarmClient(address, timeout=5.0, retries=0, tls=tls) as c:
            envelope, _ = c.health(timeout=3.0)
        return open_record(envelope, now=None).peer_id
    except (FetchError, RecordRefused):
        return None


def check_own_address(advertised: str, tls) -> None:
    """Warn when the advertised address does not answer even from here (a wrong
    net.advertise_host): neighbours would wait out their fetch timeout for it. Passing says
    nothing about NAT or firewalls on the way from other machines."""
    try:
        with SwarmClient(advertised, timeout=5.0, retries=0, tls=tls) as own:
            own.health(timeout=3.0)
    except FetchError as e:
        log.warning(
            "this node's advertised address %s does not answer (%s): neighbours cannot fetch from "
            "it; set net.advertise_host to an address of this machine that they can reach",
            advertised,
            e.reason,
        )


def check_key_in_use(discovery, advertised: str, tls, key_path, running: bool = False) -> None:
    """Raise KeyInUse when another live process serves this node's peer id: two processes with
    one key would overwrite each other's record and split the swarm. At start the newcomer
    refuses; two that find each other while running agree without talking that the one with
    the larger address stops. The other record may also be this node's own from before a
    restart: then its address no longer answers with this id."""
    other, me = discovery.foreign_self(), discovery.identity.peer_id
    if other is None or other.grpc_address == advertised or (running and advertised < other.grpc_address):
        return
    if peer_at(other.grpc_address, tls) == me:
        raise KeyInUse(
            f"this node's key {key_path} (peer id {me[:20]}...) is already in use by a live node at "
            f"{other.grpc_address}: stop that one, or give this one its own key (--identity)"
        )
    log.info(
        "a record of this peer id from an earlier run (%s) is still in the DHT; it will expire", other.grpc_address
    )


def check_reachability(
    discovery,
    advertised: str,
    tls,
    metrics,
    stop: threading.Event,
    wait: float,
    ask: int = 3,
    relay: bool = True,
    forced: str = "auto",
    connect=None,
) -> str | None:
    """Ask up to `ask` live peers to dial this node back (the Reach RPC: over gRPC at
    `advertised`, and over libp2p to its peer id), once some are live (waits at most `wait` s),
    set atoll_reachable and say in one line what they found, with advice where it matters.
    Returns the reachability to publish (p2pd.records.Reachability: direct, relayed when only
    libp2p reached it and `relay` is on, else outbound_only), or None when nobody could be
    asked. `forced`: net.reachability when the operator set it: the check still says what it
    found, and returns `forced`. `connect(peer_id, maddrs)` opens a libp2p connection to each
    peer asked first, and the libp2p dial-back rides it: `relayed` means reachable over this
    node's own outbound connections, which holds for every neighbour it keeps one open to
    (node/net/grpc_exchange.py), whatever relays or hole punching would add."""
    deadline = time.monotonic() + wait
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            me = discovery.identity.peer_id  # a few buckets' members: one read each, whatever the swarm's size
            peers = [p for p in discovery.read_buckets(4)[0] if p.peer_id != me][:ask]
        except DiscoveryError:
            return None
        if peers:
            break
        stop.wait(1.0)
    else:
        return None
    verdicts = []
    for p in peers:
        if connect is not None and relay:
            connect(p.peer_id, p.dht_maddrs)
        try:
            with SwarmClient(p.grpc_address, timeout=15.0, retries=0, tls=tls, identity=discovery.identity) as c:
                verdicts.append(c.reach(p.peer_id, timeout=20.0))
        except FetchError:
            continue  # that peer could not be asked: no verdict either way
    if not verdicts:
        return None
    direct, libp2p = sum(v.reachable for v in verdicts), sum(v.libp2p_reachable for v in verdicts)
    metrics.reachable.set(1 if direct else 0)
    why = verdicts[0].detail or "no answer"
    if direct:
        log.info("reachable at %s (checked by %d of %d peers asked)", advertised, direct, len(peers))
        return "direct" if forced == "auto" else forced
    advice = "set net.advertise_host to an address they can reach, or forward the port"
    if forced != "auto":
        log.warning(
            "%d peer(s) could not reach this node at %s (%s)%s, but net.reachability says %s: peers that try to "
            "fetch from it that way skip it; %s, or unset net.reachability",
            len(verdicts),
            advertised,
            why,
            " (it answers over libp2p)" if libp2p else "",
            forced,
            advice,
        )
        return forced
    if libp2p and relay:
        log.warning(
            "%d peer(s) could not dial this node at %s (%s) but reached it over libp2p: its snapshots travel over "
            "libp2p (a relay or hole punching, slower than direct gRPC); for direct gRPC %s",
            len(verdicts),
            advertised,
            why,
            advice,
        )
        return "relayed"
    log.warning(
        "%d peer(s) could not reach this node at %s (%s)%s: it pushes its snapshots to a reachable neighbour that "
        "serves them for it (one more transfer each); %s%s",
        len(verdicts),
        advertised,
        why,
        "" if not relay else ", nor over libp2p",
        advice,
        "" if relay else ", or turn net.relay on",
    )
    return "outbound_only"
