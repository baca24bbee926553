"""Real gRPC servers on 127.0.0.1: good snapshots arrive intact, bad ones are refused with
the right reason, and the receiving node keeps serving."""

import time

import grpc
import pytest
import torch
from helpers import self_signed_cert

from p2pd.client import BadSnapshot, FetchRefused, FetchTimeout, SwarmClient
from p2pd.rpc import swarm_pb2 as pb
from p2pd.server import MAX_MESSAGE_BYTES, SERVICE_NAME, SnapshotStore, SwarmServer, TLSConfig
from p2pd.tensors import Limits, SnapshotKey, iter_parts, pack

pytestmark = pytest.mark.integration


def model_state(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return m.state_dict()


# scenario by requested round: what a broken or malicious peer sends
def _evil_parts(round_: int):
    key = SnapshotKey("model", round_).to_pb()
    good = list(iter_parts(pack(model_state()), key, 4096))
    if round_ == 1:  # truncated: stream stops halfway
        return good[: len(good) // 2]
    if round_ == 2:  # wrong digest in the trailer
        return good[:-1] + [pb.SnapshotPart(trailer=pb.StreamTrailer(digest=b"\x07" * 32))]
    if round_ == 3:  # NaN inside an otherwise consistent, correctly digested stream
        sd = model_state()
        sd["0.weight"][3, 3] = float("nan")
        return list(iter_parts(pack(sd), key, 4096))
    if round_ == 4:  # announces 1 GiB
        return [pb.SnapshotPart(header=pb.StreamHeader(key=key, tensor_count=1, total_bytes=2**30))]
    if round_ == 5:  # unknown dtype
        bad = list(good)
        bad[1] = pb.SnapshotPart.FromString(bad[1].SerializeToString())
        bad[1].chunk.dtype = "complex128"
        return bad
    if round_ == 6:  # one message over the receiver's max message size
        big = pb.TensorChunk(
            name="w", dtype="uint8", shape=[MAX_MESSAGE_BYTES + 10], payload=b"\x00" * (MAX_MESSAGE_BYTES + 10)
        )
        return [
            pb.SnapshotPart(header=pb.StreamHeader(key=key, tensor_count=1, total_bytes=MAX_MESSAGE_BYTES + 10)),
            pb.SnapshotPart(chunk=big),
        ]
    return good


@pytest.fixture
def evil_server():
    def fetch(request, context):
        r = request.key.round
        if r == 7:  # never answers in time
            time.sleep(3)
        for part in _evil_parts(r):
            yield part.SerializeToString()

    server = grpc.server(
        __import__("concurrent.futures").futures.ThreadPoolExecutor(4),
        options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE_NAME,
                {
                    "Fetch": grpc.unary_stream_rpc_method_handler(
                        fetch, request_deserializer=pb.FetchRequest.FromString
                    )
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait(5)


@pytest.fixture
def node():
    """The receiving node's own server, which must keep serving through all of this."""
    store = SnapshotStore(keep=2)
    server = SwarmServer(store, lambda: b"record")
    server.start()
    published = store.publish(SnapshotKey("model", 1), model_state(1))
    yield server, published
    server.stop(0)


@pytest.mark.parametrize(
    "round_,reason",
    [
        (1, "truncated"),
        (2, "digest_mismatch"),
        (3, "non_finite"),
        (4, "oversize"),
        (5, "unknown_dtype"),
        (6, "oversize"),
    ],
)
def test_bad_streams_refused_and_node_keeps_serving(evil_server, node, round_, reason):
    server, published = node
    with SwarmClient(evil_server, timeout=10, limits=Limits(max_total_bytes=64 * 2**20)) as c:
        with pytest.raises(BadSnapshot) as e:
            c.fetch(SnapshotKey("model", round_))
        assert e.value.reason == reason
    with SwarmClient(server.address, timeout=10) as c:  # our own node still answers
        snap = c.fetch(SnapshotKey("model", 1), expected_digest=published.digest)
        assert snap.digest == published.digest
    assert server.servicer.stats["fetches_served"] == 1


def test_timeout_is_typed_and_bounded(evil_server):
    with SwarmClient(evil_server, retries=3) as c:
        t0 = time.monotonic()
        with pytest.raises(FetchTimeout):
            c.fetch(SnapshotKey("model", 7), timeout=0.5)
        assert time.monotonic() - t0 < 2.5  # no retry past the deadline


def test_digest_from_signed_record_is_enforced(node):
    server, published = node
    with SwarmClient(server.address) as c:
        with pytest.raises(BadSnapshot) as e:
            c.fetch(SnapshotKey("model", 1), expected_digest=b"\x00" * 32)
        assert e.value.reason == "digest_mismatch"


def test_not_found_eviction_and_health(node):
    server, _ = node
    store = server.servicer.store
    for r in (2, 3):
        store.publish(SnapshotKey("model", r), model_state(r))
    store.publish(SnapshotKey("logits", 3), {"logits": torch.randn(5, 10)})
    assert store.keys() == [SnapshotKey("logits", 3), SnapshotKey("model", 2), SnapshotKey("model", 3)]
    with SwarmClient(server.address) as c:
        with pytest.raises(FetchRefused) as e:
            c.fetch(SnapshotKey("model", 1))  # evicted: keep=2
        assert e.value.reason == "not_found"
        record, keys = c.health()
        assert record == b"record" and SnapshotKey("model", 3) in keys


def test_unreachable_peer_is_refused_after_bounded_retries():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with SwarmClient(f"127.0.0.1:{port}", retries=2, backoff=0.05) as c:
        t0 = time.monotonic()
        with pytest.raises(FetchRefused) as e:
            c.fetch(SnapshotKey("model", 1), timeout=10)
        assert e.value.reason == "unavailable"
        assert time.monotonic() - t0 < 8


def test_tls(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    store = SnapshotStore()
    published = store.publish(SnapshotKey("model", 1), model_state())
    server = SwarmServer(store, tls=TLSConfig(cert_file=cert, key_file=key))
    server.start()
    try:
        with SwarmClient(server.address, tls=TLSConfig(ca_file=cert)) as c:
            assert c.fetch(SnapshotKey("model", 1)).digest == published.digest
        with SwarmClient(server.address, retries=0) as plain:  # plaintext client to a TLS server
            with pytest.raises(FetchRefused):
                plain.fetch(SnapshotKey("model", 1), timeout=5)
    finally:
        server.stop(0)


def _reader_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "atoll-fetch-reader" and t.is_alive()]


def test_refused_fetch_frees_its_reader_thread_quickly(tmp_path):
    """A bad tensor followed by many more parts: the fetch fails fast and leaves nothing behind."""
    store = SnapshotStore(chunk_bytes=64 * 1024)
    sd = {"a": torch.zeros(4 * 2**20), **{f"z{i:02d}": torch.zeros(64 * 1024) for i in range(20)}}
    sd["a"][-1] = float("nan")
    store.publish(SnapshotKey("model", 1), sd)
    server = SwarmServer(store)
    server.start()
    try:
        with SwarmClient(server.address) as c:
            for _ in range(3):
                t0 = time.monotonic()
                with pytest.raises(BadSnapshot) as e:
                    c.fetch(SnapshotKey("model", 1))
                assert e.value.reason == "non_finite"
                assert time.monotonic() - t0 < 3
        deadline = time.monotonic() + 3
        while _reader_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _reader_threads()
    finally:
        server.stop(0)


def test_fetch_without_deadline_is_refused_and_stalled_readers_cannot_block_health():
    store = SnapshotStore(chunk_bytes=64 * 1024)
    store.publish(SnapshotKey("model", 1), {"w": torch.zeros(2**20)})
    server = SwarmServer(store, lambda: b"rec", max_workers=4)  # one fetch slot, one Health wait, two free
    server.start()
    # no BDP probing: the receive window stays at its 64 KiB default, so a reader that stops
    # reading really stalls the server (with probing the window can grow to hold all 4 MiB)
    channel = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
    raw = channel.unary_stream(
        f"/{SERVICE_NAME}/Fetch", request_serializer=pb.FetchRequest.SerializeToString, response_deserializer=None
    )
    req = pb.FetchRequest(key=SnapshotKey("model", 1).to_pb())
    try:
        with pytest.raises(grpc.RpcError) as e:
            next(iter(raw(req)))  # no deadline at all
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stalled = raw(req, timeout=30)
        next(stalled)  # read one part, then stop reading: holds the only fetch slot
        with SwarmClient(server.address, retries=0) as c:
            assert c.health(timeout=2)[0] == b"rec"
            with pytest.raises(FetchRefused) as busy:
                c.fetch(SnapshotKey("model", 1), timeout=5)
            assert busy.value.reason == "busy"
        stalled.cancel()
    finally:
        channel.close()
        server.stop(0)


def test_health_waits_for_a_snapshot_and_sees_it_signed(tmp_path):
    """A neighbour waits for a snapshot with one Health call that returns once it is served,
    and by then the record naming its digest is already signed (no polling, no unsigned race)."""
    import threading

    store = SnapshotStore()
    signed_index: list[tuple] = []

    def before_visible(index, packed):
        assert store.get(SnapshotKey("model", 3)) is None  # not visible before the record names it
        signed_index.append(index)

    server = SwarmServer(store, lambda: b"record")
    server.start()
    timer = threading.Timer(0.3, lambda: store.publish(SnapshotKey("model", 3), model_state(), before_visible))
    try:
        with SwarmClient(server.address) as c:
            timer.start()
            _, keys = c.health(timeout=10, wait_for=SnapshotKey("model", 3), wait=5)
            assert SnapshotKey("model", 3) in keys  # returned on the publish (0.3 s), not after the wait
            assert signed_index and signed_index[0][0].startswith("model:3:0:")
            _, keys = c.health(timeout=10, wait_for=SnapshotKey("model", 2), wait=5)  # moved past: at once
            assert keys == [SnapshotKey("model", 3)]
    finally:
        timer.cancel()
        server.stop(0)
