"""Admission of fetches (p2pd/admission.py) through a real gRPC server on 127.0.0.1: signed
requests from known identities are served; unsigned, replayed, stale, unknown and
over-rate ones are refused with their reason and counted. Plus the signed snapshot list in
peer records that receivers check fetched snapshots against."""

import time

import pydantic
import pytest
import torch

from p2pd.admission import Admission, TokenBuckets, signed_request
from p2pd.client import FetchRefused, SwarmClient
from p2pd.identity import Identity
from p2pd.records import MAX_SNAPSHOTS, PeerRecord, open_record, sign_record
from p2pd.server import SnapshotStore, SwarmServer
from p2pd.tensors import SnapshotKey

KEY = SnapshotKey("model", 3, 1)


@pytest.fixture
def node():
    """A server that knows `friend`, serving one snapshot, limited to a burst of 3 fetches."""
    me, friend, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    store = SnapshotStore()
    store.publish(KEY, {"w": torch.arange(6.0)})
    admission = Admission(me.peer_id, {me.peer_id, friend.peer_id}.__contains__, rate=1e-3, burst=3)
    server = SwarmServer(store, admission=admission)
    server.start()
    yield server, me, friend, stranger
    server.stop(0.2)


def refusal(address, identity, server_id="", key=KEY):
    with SwarmClient(address, identity=identity, retries=0, timeout=5) as c, pytest.raises(FetchRefused) as e:
        c.fetch(key, server_peer_id=server_id)
    return e.value.reason, str(e.value)


@pytest.mark.integration
def test_signed_known_identity_is_served_others_refused_and_counted(node):
    server, me, friend, stranger = node
    with SwarmClient(server.address, identity=friend, retries=0, timeout=5) as c:
        assert torch.equal(c.fetch(KEY, server_peer_id=me.peer_id).tensors["w"], torch.arange(6.0))
    reason, detail = refusal(server.address, None, me.peer_id)
    assert (reason, "unsigned" in detail) == ("denied", True)
    reason, detail = refusal(server.address, friend, server_id="12D3KooWsomeoneElse")  # signed for another node
    assert (reason, "unsigned" in detail) == ("denied", True)
    reason, detail = refusal(server.address, stranger, me.peer_id)  # valid signature, not in the swarm
    assert (reason, "unknown" in detail) == ("denied", True)
    assert dict(server.servicer.refused) == {"unsigned": 2, "unknown": 1}


@pytest.mark.integration
def test_rate_limit_per_identity(node):
    server, me, friend, _ = node
    with SwarmClient(server.address, identity=friend, retries=0, timeout=5) as c:
        for _ in range(3):  # the burst
            c.fetch(KEY, server_peer_id=me.peer_id)
        with pytest.raises(FetchRefused) as e:
            c.fetch(KEY, server_peer_id=me.peer_id)
    assert e.value.reason == "rate_limited"
    with SwarmClient(server.address, identity=me, retries=0, timeout=5) as c:  # another identity has its own bucket
        c.fetch(KEY, server_peer_id=me.peer_id)
    assert server.servicer.refused["rate"] == 1 and server.servicer.stats["fetches_served"] == 4


def test_stale_and_tampered_requests_refused():
    me, friend = Identity.generate(), Identity.generate()
    now = [1_800_000_000.0]
    adm = Admission(me.peer_id, lambda p: True, rate=10, burst=10, max_skew=30, clock=lambda: now[0])
    req = signed_request(friend, me.peer_id, KEY, now[0])
    assert adm.check(req, KEY) is None
    assert adm.check(req, SnapshotKey("model", 4, 1)) == "unsigned"  # signature bound to the key asked for
    now[0] += 31
    assert adm.check(req, KEY) == "stale"  # a replay after max_skew
    bad = signed_request(friend, me.peer_id, KEY, now[0])
    bad.requester_peer_id = me.peer_id  # claims another identity
    assert adm.check(bad, KEY) == "unsigned"
    bad = signed_request(friend, me.peer_id, KEY, now[0])
    bad.issued_at = float("nan")
    assert adm.check(bad, KEY) == "stale"


def test_token_buckets_refill_and_stay_bounded():
    t = [0.0]
    b = TokenBuckets(rate=2.0, burst=2, max_keys=3, clock=lambda: t[0])
    assert [b.take("a") for _ in range(3)] == [True, True, False]
    t[0] += 0.5  # one token back at 2/s
    assert [b.take("a"), b.take("a")] == [True, False]
    for k in "bcde":
        b.take(k)
    assert len(b._buckets) == 3 and "a" not in b._buckets  # least recently used forgotten


def test_record_signs_snapshot_digests_and_refuses_bad_entries():
    ident = Identity.generate()
    store = SnapshotStore()
    packed = store.publish(KEY, {"w": torch.ones(3)})
    rec = PeerRecord(
        peer_id=ident.peer_id, grpc_address="127.0.0.1:5000", issued_at=1.0, expires_at=31.0, snapshots=store.index()
    )
    assert rec.snapshot_digest("model", 3, 1) == packed.digest
    assert rec.snapshot_digest("model", 3, 0) is None and rec.snapshot_digest("logits", 3, 1) is None
    for entries in (
        ("model:3:1:" + "zz" * 32,),
        ("weights:3:1:" + "ab" * 32,),
        ("model:3:1:" + "ab" * 31,),
        tuple(f"model:{i}:0:" + "ab" * 32 for i in range(MAX_SNAPSHOTS + 1)),
    ):
        with pytest.raises(pydantic.ValidationError):
            PeerRecord(
                peer_id=ident.peer_id, grpc_address="127.0.0.1:5000", issued_at=1.0, expires_at=31.0, snapshots=entries
            )


@pytest.mark.integration
def test_one_identity_cannot_hold_every_fetch_slot_with_streams_it_never_reads(caplog):
    """Field report: eight signed Fetch streams from one member, opened and never read, held
    every slot; honest neighbours got "too many concurrent fetches" and nothing was counted.
    Now one identity gets at most two slots, stalled streams are cancelled, and an honest
    neighbour is served meanwhile."""
    import time

    import grpc
    from hivemind.utils import get_dht_time

    from p2pd.rpc import swarm_pb2 as pb
    from p2pd.tensors import SnapshotKey as Key

    me, hog, honest = Identity.generate(), Identity.generate(), Identity.generate()
    store = SnapshotStore()
    big = Key("model", 1, 0)
    store.publish(big, {"w": torch.zeros(16 * 2**20 // 4)})  # 16 MiB: more than the transport buffers
    admission = Admission(me.peer_id, {hog.peer_id, honest.peer_id}.__contains__, rate=100, burst=100)
    server = SwarmServer(store, admission=admission)
    server.servicer.stall_seconds = 4.0  # longer than opening eight streams takes on a loaded 2-core machine
    server.start()
    channels, calls = [], []
    try:
        for _ in range(8):  # each on its own connection, so gRPC's per-connection window cannot hide it
            ch = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 8 * 2**20)])
            channels.append(ch)
            fetch = ch.unary_stream(
                "/atoll.v1.Swarm/Fetch",
                request_serializer=pb.FetchRequest.SerializeToString,
                response_deserializer=None,
            )
            call = fetch(signed_request(hog, me.peer_id, big, get_dht_time()), timeout=60)
            calls.append(call)
            try:
                next(call)  # one part read, then never again
            except grpc.RpcError:
                pass
        assert server.servicer.refused["busy_identity"] == 6, dict(server.servicer.refused)
        with SwarmClient(server.address, identity=honest, retries=0, timeout=30) as c:
            assert c.fetch(big, server_peer_id=me.peer_id).tensors["w"].numel() == 4 * 2**20
        for _ in range(50):  # the two held streams are cancelled once stalled for 4 s
            if server.servicer.refused["stalled"] >= 2:
                break
            time.sleep(0.2)
        assert server.servicer.refused["stalled"] == 2, dict(server.servicer.refused)
    finally:
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
        server.stop(0.2)


@pytest.mark.integration
def test_undecodable_requests_are_counted_not_logged_as_tracebacks(node, caplog):
    """Field report: 200 undecodable requests wrote 1206 log lines of ERROR tracebacks."""
    import logging

    import grpc

    server, *_ = node
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(server.address) as ch:
        raw = ch.unary_stream("/atoll.v1.Swarm/Fetch", request_serializer=None, response_deserializer=None)
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as e:
                list(raw(b"\xff\xff\xff garbage", timeout=5))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.servicer.refused["bad_request"] == 200
    assert len(caplog.records) <= 2 and "Traceback" not in caplog.text


@pytest.mark.integration
def test_reach_dials_the_requester_back_only_at_its_signed_address():
    """Reach: a node asks a peer whether it can be dialled at its advertised address. The
    server dials the address from the requester's record (the request names none), refuses
    unsigned requests, and reports who answered there."""
    me, asker, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    asker_server = SwarmServer(
        SnapshotStore(),
        signed_record=lambda: sign_record(
            PeerRecord(peer_id=asker.peer_id, grpc_address="127.0.0.1:1", issued_at=1.0, expires_at=2.0), asker
        ),
    )
    asker_server.start()
    addresses = {asker.peer_id: asker_server.address, stranger.peer_id: "127.0.0.1:9"}  # nobody on port 9

    def dial(address):
        try:
            with SwarmClient(address, retries=0, timeout=5) as c:
                return open_record(c.health(timeout=2)[0], now=None).peer_id
        except Exception:
            return None

    admission = Admission(me.peer_id, addresses.__contains__, rate=100, burst=100)
    server = SwarmServer(SnapshotStore(), admission=admission, address_of=addresses.get, dial=dial)
    server.start()
    try:
        with SwarmClient(server.address, identity=asker, retries=0, timeout=10) as c:
            yes = c.reach(me.peer_id)
        assert yes.reachable and yes.address == asker_server.address
        with SwarmClient(server.address, identity=stranger, retries=0, timeout=10) as c:
            no = c.reach(me.peer_id)
        assert not no.reachable and no.address == "127.0.0.1:9" and no.detail == "no answer there"
        with SwarmClient(server.address, identity=asker, retries=0, timeout=10) as c, pytest.raises(FetchRefused):
            c.reach("12D3KooWsomeoneElse")  # signed for another server
        assert server.servicer.refused["unsigned"] == 1
    finally:
        server.stop(0.2)
        asker_server.stop(0.2)


def test_predict_requests_are_signed_over_their_inputs_and_have_their_own_budget():
    """A router calls an expert once per sampling step: far more Predicts than fetches pass,
    and a signature seen on the wire cannot carry other inputs."""
    from node.net.experts.service import matrix_to_pb
    from p2pd.admission import Admission, sign_predict
    from p2pd.identity import Identity
    from p2pd.rpc import router_pb2 as rpb

    expert, router = Identity.generate(), Identity.generate()
    admission = Admission(expert.peer_id, lambda p: p == router.peer_id, rate=20, burst=60)
    for i in range(200):  # more than the fetch bucket's 60
        req = rpb.PredictRequest(x=matrix_to_pb(torch.full((2, 3), float(i))), t=[0.5, 0.5], cluster_digest="d")
        sign_predict(router, expert.peer_id, req, time.time())
        assert admission.check_predict(req) is None
    req.x.CopyFrom(matrix_to_pb(torch.ones(2, 3)))  # replayed with other inputs
    assert admission.check_predict(req) == "unsigned"
