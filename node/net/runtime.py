"""What every role of a node runs on: its identity's DHT membership, TLS and admission, and one
gRPC server (p2pd/server.py) that serves Health (the signed record), Reach, Fetch and Push plus
the role's own services (an expert's Predict, a router's Sample), and the same Fetch and Health
over libp2p for peers that cannot dial it (p2pd/libp2p.py). Trainers, experts and routers join,
serve and announce the same way."""

from __future__ import annotations

import logging

from node.net import membership, netcheck
from p2pd import __version__
from p2pd.addresses import host_port
from p2pd.admission import Admission
from p2pd.libp2p import Libp2pPlane
from p2pd.sampling import sign_probe
from p2pd.server import SnapshotStore, SwarmServer, TLSConfig

log = logging.getLogger("atoll.node")


class Runtime:
    """Joins the swarm at once (the DHT forks a process: create the runtime before any gRPC
    object exists in this process, since gRPC does not survive a fork); `serve` starts the gRPC server later.
    `cfg`: the NodeConfig; `identity`: the node's p2pd Identity. Raises DiscoveryError."""

    def __init__(self, cfg, identity):
        """Joins the DHT now. `cfg`: the NodeConfig (its `net` and `security` sections); `identity`: the node's
        Identity (key and peer id). Raises DiscoveryError when the DHT cannot be started or joined."""
        self.cfg, self.identity = cfg, identity
        net, sec = cfg.net, cfg.security
        self.discovery = membership.join(net, identity)
        self.tls = TLSConfig(net.tls_cert, net.tls_key, net.tls_ca) if net.tls_cert or net.tls_key else None
        self.admission = Admission(
            identity.peer_id,
            self.discovery.is_known,
            sec.fetch_rate,
            sec.fetch_burst,
            presented=net.membership == "sampled",  # a member may present its record (p2pd/admission.py)
        )
        self.server: SwarmServer | None = None
        self.plane: Libp2pPlane | None = None
        self.advertised: str | None = None

    def serve(self, store: SnapshotStore | None = None, services=(), max_request_bytes: int = 64 * 1024) -> int:
        """Start the gRPC server with `store`'s snapshots and `services` ((register, servicer)
        pairs), and the libp2p plane (serving the same calls unless net.relay is off); returns
        the port. Raises OSError when the port is in use."""
        net = self.cfg.net
        # after the averager's fork (see GrpcExchange): the plane runs a thread and sockets
        try:
            self.plane = Libp2pPlane(self.discovery.dht)
        except Exception as e:  # the node still works where it is directly reachable
            log.warning("no libp2p data plane (%s): peers behind NAT cannot be fetched from, nor reach this node", e)
        self.server = SwarmServer(
            store if store is not None else SnapshotStore(),
            self.discovery.signed_record,
            host=net.host,
            port=net.grpc_port,
            tls=self.tls,
            admission=self.admission,
            address_of=self.discovery.address_of,
            dial=lambda address: netcheck.peer_at(address, self.tls),
            dial_libp2p=self.plane.answers if self.plane is not None else None,
            max_request_bytes=max_request_bytes,
            sign_probe=lambda nonce, requester: sign_probe(self.identity, nonce, requester),
        )
        for register, servicer in services:
            self.server.add_service(register, servicer)
        port = self.server.start()
        if net.relay and self.plane is not None:
            self.plane.serve(self.server.servicer)
        self.advertised = host_port(net.advertise_host or net.host, port)
        return port

    def announce(self, **record) -> None:
        """Publish the signed record: the advertised gRPC address, the software version and `record`."""
        self.discovery.announce(grpc_address=self.advertised, software_version=__version__, **record)

    def close(self) -> None:
        """Stop serving and leave the swarm."""
        if self.server is not None:  # first: its Reach calls use the plane
            self.server.stop(0.5)
        if self.plane is not None:
            self.plane.close()
        self.discovery.close()
