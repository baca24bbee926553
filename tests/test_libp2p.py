"""The data plane's libp2p fallback (p2pd/libp2p.py) and the carrier of outbound-only nodes
(the Push RPC, p2pd/server.py) between real nodes on 127.0.0.1: two DHTs, their p2pd daemons,
gRPC servers with admission. Snapshots over libp2p are checked against the digest the
producer signed exactly as over gRPC; a carrier serves a producer's snapshot unaltered and
refuses what its producer did not sign."""

import pytest
import torch

from p2pd.admission import Admission
from p2pd.client import BadSnapshot, FetchRefused, SwarmClient
from p2pd.discovery import Discovery
from p2pd.identity import Identity
from p2pd.libp2p import Libp2pPlane
from p2pd.records import open_record
from p2pd.server import PUSH_CHUNK_BYTES, SnapshotStore, SwarmServer
from p2pd.tensors import SnapshotKey

KEY = SnapshotKey("model", 2, 0)


class Node:
    """A DHT membership, a gRPC server with admission and the libp2p plane serving the same store."""

    def __init__(self, keydir, name, initial_peers=(), **record):
        self.identity = Identity.load_or_create(keydir / f"{name}.key")
        self.discovery = Discovery(self.identity, swarm="nat", initial_peers=initial_peers, ttl=20).start()
        self.store = SnapshotStore()
        admission = Admission(self.identity.peer_id, self.discovery.is_known, rate=100, burst=100)
        self.plane = Libp2pPlane(self.discovery.dht)
        self.server = SwarmServer(
            self.store,
            self.discovery.signed_record,
            admission=admission,
            address_of=self.discovery.address_of,
            dial_libp2p=self.plane.answers,
        )
        self.server.start()
        self.plane.serve(self.server.servicer)
        self.discovery.announce(grpc_address=self.server.address, **record)

    def publish(self, key, tensors, **record):
        def sign(index, packed):
            self.discovery.update(snapshots=index, model_digest=packed.hexdigest, **record)

        return self.store.publish(key, tensors, before_visible=sign)

    def close(self):
        self.plane.close()
        self.server.stop(0.2)
        self.discovery.close()


@pytest.fixture
def pair(keydir):
    a = Node(keydir, "a")
    b = None
    try:
        b = Node(keydir, "b", initial_peers=a.discovery.visible_maddrs())
        assert {p.peer_id for p in a.discovery.live_peers()} == {a.identity.peer_id, b.identity.peer_id}
        yield a, b
    finally:
        for n in (b, a):
            if n is not None:
                n.close()


@pytest.mark.integration
def test_a_snapshot_travels_over_libp2p_checked_against_the_signed_digest(pair):
    a, b = pair
    tensors = {"w": torch.randn(1000, 300), "b": torch.arange(7.0)}
    packed = a.publish(KEY, tensors)
    client = b.plane.client(a.identity.peer_id, identity=b.identity)
    envelope, keys = client.health(wait_for=KEY, wait=1.0)
    assert open_record(envelope, now=None).peer_id == a.identity.peer_id and KEY in keys
    snap = client.fetch(KEY, expected_digest=packed.digest, server_peer_id=a.identity.peer_id)
    assert all(torch.equal(snap.tensors[k], v) for k, v in tensors.items())
    assert snap.nbytes == packed.total_bytes
    with pytest.raises(BadSnapshot) as e:  # a digest the producer did not sign: refused as over gRPC
        client.fetch(KEY, expected_digest=bytes(32), server_peer_id=a.identity.peer_id)
    assert e.value.reason == "digest_mismatch"
    with pytest.raises(FetchRefused) as e:
        client.fetch(SnapshotKey("model", 9, 0), server_peer_id=a.identity.peer_id)
    assert e.value.reason == "not_found"
    # the dial-back of a reachability check over libp2p
    assert b.plane.answers(a.identity.peer_id) and a.plane.answers(b.identity.peer_id)
    stranger = Identity.generate()
    assert not b.plane.answers(stranger.peer_id, timeout=3.0)
    assert a.server.servicer.stats["fetches_served"] == 2


@pytest.mark.integration
def test_a_stream_from_another_peer_than_the_signer_is_refused(pair):
    a, b = pair
    a.publish(KEY, {"w": torch.ones(3)})
    # b's daemon carries a request signed by a third identity that a's swarm does not know either
    impostor = b.plane.client(a.identity.peer_id, identity=Identity.load_or_create(b.discovery.identity.path))
    impostor.identity = Identity.generate()
    with pytest.raises(FetchRefused) as e:
        impostor.fetch(KEY, server_peer_id=a.identity.peer_id)
    assert e.value.reason == "denied" and "not from the signer" in str(e.value)


@pytest.mark.integration
def test_a_carrier_serves_an_outbound_only_producers_snapshot_unaltered(pair):
    carrier, producer = pair
    me, them = producer.identity.peer_id, carrier.identity.peer_id
    producer.store.chunk_bytes = PUSH_CHUNK_BYTES
    tensors = {"w": torch.randn(700, 1000)}  # 2.8 MB: three parts
    packed = producer.publish(KEY, tensors, reachability="outbound_only", carrier=them)
    envelope = producer.discovery.signed_record()
    with SwarmClient(carrier.server.address, identity=producer.identity, retries=0) as c:
        c.push(them, KEY, packed.parts, envelope, timeout=30)
    assert carrier.server.servicer.carried.producers() == [me]
    # a third party (here the carrier's own client identity stands in for a neighbour) fetches it
    reader = Identity.load_or_create(carrier.discovery.identity.path)
    with SwarmClient(carrier.server.address, identity=reader, retries=0) as c:
        got, keys = c.health(wait_for=KEY, wait=1.0, producer_peer_id=me)
        record = open_record(got, now=None, expected_peer_id=me)  # the producer's own signed record
        digest = record.snapshot_digest(KEY.kind, KEY.round, KEY.step)
        assert KEY in keys and digest == packed.digest
        snap = c.fetch(KEY, expected_digest=digest, server_peer_id=them, producer_peer_id=me)
    assert torch.equal(snap.tensors["w"], tensors["w"])
    # what the producer's record does not sign is refused at the carrier
    other = producer.store.publish(SnapshotKey("model", 3, 0), {"w": torch.zeros(3)})  # not signed
    with SwarmClient(carrier.server.address, identity=producer.identity, retries=0) as c:
        with pytest.raises(FetchRefused) as e:
            c.push(them, SnapshotKey("model", 3, 0), other.parts, envelope, timeout=30)
        assert e.value.reason == "denied" and "signs no" in str(e.value)
        # altered bytes under a signed key: refused by the digest check
        forged = producer.store.publish(SnapshotKey("model", 4, 0), {"w": torch.ones(700, 1000)})
        with pytest.raises(FetchRefused):
            c.push(them, KEY, forged.parts, envelope, timeout=30)
    assert carrier.server.servicer.refused["unsigned"] == 1
    assert sum(v for k, v in carrier.server.servicer.refused.items() if k.startswith("push_")) == 1


@pytest.mark.integration
def test_a_carrier_bounds_what_it_carries_and_keeps_the_newest_record(pair):
    carrier, producer = pair
    them = carrier.identity.peer_id
    carrier.server.servicer.carried.max_bytes = 4_000_000  # room for one 2.8 MB snapshot, not two
    producer.store.chunk_bytes = PUSH_CHUNK_BYTES
    first, second = SnapshotKey("model", 1, 0), SnapshotKey("model", 2, 0)
    p1 = producer.publish(first, {"w": torch.randn(700, 1000)}, reachability="outbound_only", carrier=them)
    old_envelope = producer.discovery.signed_record()
    p2 = producer.publish(second, {"w": torch.randn(700, 1000)})
    new_envelope = producer.discovery.signed_record()
    with SwarmClient(carrier.server.address, identity=producer.identity, retries=0) as c:
        c.push(them, first, p1.parts, old_envelope, timeout=30)
        with pytest.raises(FetchRefused) as e:
            c.push(them, second, p2.parts, new_envelope, timeout=30)
        assert e.value.reason == "busy"
        carrier.server.servicer.carried.max_bytes = 1 << 30
        c.push(them, second, p2.parts, new_envelope, timeout=30)
        c.push(them, first, p1.parts, old_envelope, timeout=30)  # an older record, replayed: not kept
    envelope, keys = SwarmClient(carrier.server.address, retries=0).health(producer_peer_id=producer.identity.peer_id)
    assert envelope == new_envelope and {first, second} <= set(keys)


@pytest.mark.integration
def test_junk_from_a_libp2p_peer_is_a_typed_error_not_a_traceback(pair):
    """A peer that answers a libp2p call with bytes that are no message: the fetcher gets
    BadSnapshot("malformed"), so its round skips that neighbour instead of failing."""
    from hivemind.p2p import P2P

    from p2pd.libp2p import HEALTH

    a, b = pair

    async def junk(info, reader, writer):
        await P2P.receive_raw_data(reader)
        await P2P.send_raw_data(b"\xff\xff\xff not a StreamStatus", writer)
        writer.close()

    a.plane.run(a.plane.p2p.remove_binary_stream_handler(HEALTH), 10)
    a.plane.run(a.plane.p2p.add_binary_stream_handler(HEALTH, junk), 10)
    with pytest.raises(BadSnapshot) as e:
        b.plane.client(a.identity.peer_id).health(timeout=5)
    assert e.value.reason == "malformed"
    assert not b.plane.answers(a.identity.peer_id, timeout=5)
