"""A node's swarm membership built from its config: one place for every role (trainer,
expert, router) to join the DHT the same way."""

from __future__ import annotations

from node.config import NetConfig
from p2pd.discovery import Discovery
from p2pd.identity import Identity


def join(net: NetConfig, identity: Identity) -> Discovery:
    """Start this node's DHT membership (`net`: swarm, initial peers, listen and announced
    multiaddrs, record TTL, relays, directory split). Forks the DHT process: call it before any gRPC object exists in
    this process (gRPC does not survive a fork). Raises DiscoveryError with a one-line reason."""
    discovery = Discovery(
        identity,
        swarm=net.swarm,
        initial_peers=net.initial_peers,
        host_maddrs=net.dht_listen,
        announce_maddrs=net.announce_maddrs or None,
        ttl=net.record_ttl,
        relay=net.relay,
        directory_bits=net.directory_bits,
    )
    discovery.store_updates = net.membership == "full"  # sampled: progress travels in Health answers only
    return discovery.start()


def why_not_joined(refused: dict[str, int], other_task: int) -> str:
    """What this node saw of the nodes it waited for, and where to look: records it refused (a clock off by more than
    the records' slack shows as not_yet_valid or expired), live peers of another task."""
    seen = [f"{n} record(s) refused as {reason}" for reason, n in sorted(refused.items()) if n]
    if other_task:
        seen.append(f"{other_task} live peer(s) of another task or codec")
    clock = refused.get("not_yet_valid", 0) or refused.get("expired", 0)
    return (
        ("Seen: " + "; ".join(seen) + ". " if seen else "No other node's record was seen. ")
        + ("A peer's clock differs from this one's: synchronise the clocks (NTP). " if clock else "")
        + "A node that cannot join says why in its own log (a clock more than 3 s off, initial peers it cannot "
        "reach, another net.swarm)"
    )
