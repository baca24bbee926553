"""A node's swarm membership built from its config: one place for every role (trainer,
expert, router) to join the DHT the same way."""

from __future__ import annotations

from node.config import NetConfig
from p2pd.discovery import Discovery
from p2pd.identity import Identity


def join(net: NetConfig, identity: Identity) -> Discovery:
    """Start this node's DHT membership (`net`: swarm, initial peers, listen and announced
    multiaddrs, record TTL, relays). Forks the DHT process: call it before any gRPC object exists in
    this process (gRPC does not survive a fork). Raises DiscoveryError with a one-line reason."""
    return Discovery(
        identity,
        swarm=net.swarm,
        initial_peers=net.initial_peers,
        host_maddrs=net.dht_listen,
        announce_maddrs=net.announce_maddrs or None,
        ttl=net.record_ttl,
        relay=net.relay,
    ).start()
