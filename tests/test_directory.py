"""The bucketed DHT directory (net.directory_bits): records spread over 2^bits keys, read back whole, forged rows
dropped. Real hivemind DHT processes on 127.0.0.1 (each Discovery forks one, with its p2pd)."""

import pytest
from hivemind.utils import get_dht_time

from p2pd.discovery import Discovery
from p2pd.identity import Identity
from p2pd.records import PeerRecord, bucket_of, directory_key, sign_record, swarm_key

pytestmark = pytest.mark.integration
SWARM = "dirtest"
BITS = 2


def test_directory_keys_and_buckets():
    assert directory_key("s", 0, 0) == swarm_key("s")
    keys = {directory_key("s", 3, b) for b in range(8)}
    assert len(keys) == 8 and swarm_key("s") not in keys
    for bad in ((13, 0), (2, 4), (2, -1)):
        with pytest.raises(ValueError):
            directory_key("s", *bad)
    ids = [Identity.generate().peer_id for _ in range(400)]
    counts = [sum(bucket_of(p, 2) == b for p in ids) for b in range(4)]
    assert all(60 < c < 140 for c in counts), counts  # spread evenly: 100 each expected
    assert all(bucket_of(p, 2) == bucket_of(p, 2) for p in ids[:10])


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    keys = tmp_path_factory.mktemp("dirkeys")
    started = []
    try:
        first = Discovery(Identity.load_or_create(keys / "n0.key"), swarm=SWARM, ttl=30, directory_bits=BITS).start()
        started.append(first)
        boot = first.visible_maddrs()
        for i in range(1, 4):
            d = Discovery(
                Identity.load_or_create(keys / f"n{i}.key"),
                swarm=SWARM,
                ttl=30,
                directory_bits=BITS,
                initial_peers=boot,
            )
            started.append(d.start())
        for i, d in enumerate(started):
            d.announce(grpc_address=f"127.0.0.1:{5000 + i}")
        yield started
    finally:
        for d in started:
            d.close()


def wait_for(predicate, seconds=20.0):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def test_every_node_reads_every_bucket(nodes):
    ids = sorted(d.identity.peer_id for d in nodes)
    for d in nodes:
        assert wait_for(lambda d=d: [p.peer_id for p in d.live_peers()] == ids)
    # each record sits in its own bucket only, none under the one swarm key
    reader = nodes[0]
    for b in range(1 << BITS):
        found = reader.dht.get(directory_key(SWARM, BITS, b), latest=True)
        held = sorted(found.value) if found is not None else []
        assert held == sorted(p for p in ids if bucket_of(p, BITS) == b)
    assert reader.dht.get(swarm_key(SWARM), latest=True) is None
    # a node re-reading every second rotates: one bucket a read (4 buckets, each due within ttl / 3 = 10 s), the
    # others' records from their last read
    d = nodes[3]
    for _ in range(6):
        assert [p.peer_id for p in d.live_peers(rotate=True)] == ids
    due = [tuple(d._due()) for _ in range(8)]
    assert all(len(k) == 1 for k in due) and {k[0] for k in due} == set(d.keys) and due[:4] == due[4:]


def test_a_forged_row_in_a_bucket_is_never_returned(nodes, tmp_path):
    victim, forger = nodes[1].identity, Identity.generate()
    now = get_dht_time()
    forged = PeerRecord(peer_id=forger.peer_id, grpc_address="127.0.0.1:9", issued_at=now, expires_at=now + 30)
    envelope = sign_record(forged, forger)
    key = directory_key(SWARM, BITS, bucket_of(victim.peer_id, BITS))
    # the forger's record filed under the victim's peer id: the signer does not match the row
    nodes[0].dht.store(key, envelope, now + 30, subkey=victim.peer_id)
    # and a row of junk bytes under a fresh id
    nodes[0].dht.store(key, b"junk", now + 30, subkey=Identity.generate().peer_id)
    peers = {p.peer_id: p for p in nodes[2].live_peers()}
    assert peers[victim.peer_id].grpc_address == "127.0.0.1:5001"
    assert forger.peer_id not in peers and len(peers) == 4
