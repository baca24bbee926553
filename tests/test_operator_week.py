"""Field reports from an operator's first week with a real swarm, each a test that failed
before its fix: one misconfigured node, poisoned or orphaned checkpoints, stock gRPC clients,
full disks, `swarm up` settings, undecodable router and expert requests, a skewed clock."""

from __future__ import annotations

import grpc
import torch

from p2pd.rpc import swarm_pb2 as pb
from p2pd.server import SERVICE_NAME, SnapshotStore, SwarmServer
from p2pd.tensors import Limits, SnapshotKey, StreamDecoder


def test_a_stock_grpc_client_with_default_limits_fetches_a_16_mib_snapshot():
    """Parts carried 4 MiB of payload plus 35 bytes of framing, over gRPC's default 4 MiB
    receive limit, so any client with default settings failed at once with RESOURCE_EXHAUSTED
    on a model over 4 MiB."""
    store = SnapshotStore()
    state = {"w": torch.arange(4 * 2**20, dtype=torch.float32), "b": torch.ones(3)}  # 16 MiB + 12 bytes
    store.publish(SnapshotKey("model", 1), state)
    server = SwarmServer(store, lambda: b"rec")
    server.start()
    channel = grpc.insecure_channel(server.address)  # no options: gRPC's defaults
    fetch = channel.unary_stream(
        f"/{SERVICE_NAME}/Fetch", request_serializer=pb.FetchRequest.SerializeToString, response_deserializer=None
    )
    try:
        raw = list(fetch(pb.FetchRequest(key=SnapshotKey("model", 1).to_pb()), timeout=60))
        assert len(raw) >= 6 and max(len(part) for part in raw) <= 4 * 1024 * 1024
        decoder = StreamDecoder(Limits(), expected_key=SnapshotKey("model", 1).to_pb())
        for part in raw:
            decoder.feed_bytes(part)
        got = decoder.finish()
        assert torch.equal(got["w"], state["w"]) and torch.equal(got["b"], state["b"])
    finally:
        channel.close()
        server.stop(0)
