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


def check_reachability(discovery, advertised: str, tls, metrics, stop: threading.Event, wait: float, ask: int = 3):
    """Ask up to `ask` live peers to dial this node back at `advertised` (the Reach RPC), once
    some are live (waits at most `wait` s), set atoll_reachable and say what they found:
    neighbours that cannot reach a node skip it, so its training is lost to the swarm."""
    deadline = time.monotonic() + wait
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            peers = discovery.live_peers(include_self=False)[:ask]
        except DiscoveryError:
            return
        if peers:
            break
        stop.wait(1.0)
    else:
        return
    verdicts = []
    for p in peers:
        try:
            with SwarmClient(p.grpc_address, timeout=15.0, retries=0, tls=tls, identity=discovery.identity) as c:
                verdicts.append(c.reach(p.peer_id, timeout=10.0))
        except FetchError:
            continue  # that peer could not be asked: no verdict either way
    yes = sum(v.reachable for v in verdicts)
    if yes:
        metrics.reachable.set(1)
        log.info("reachable at %s (checked by %d of %d peers asked)", advertised, yes, len(peers))
    elif verdicts:
        metrics.reachable.set(0)
        log.warning(
            "%d peer(s) could not reach this node at %s (%s): they will skip it and its training is lost to "
            "the swarm; set net.advertise_host to an address they can reach, or forward the port",
            len(verdicts),
            advertised,
            verdicts[0].detail or "no answer",
        )
