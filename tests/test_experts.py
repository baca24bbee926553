"""Units of decentralized diffusion: clustering, wire matrices, routing weights, ensemble
sampling with failing experts, request batching and refusals of the router service,
checkpointed expert training that resumes, and the Fréchet distance."""

import threading
import time

import grpc
import pytest
import torch
from helpers import self_signed_cert

from node.algo.experts import ensemble
from node.algo.experts.cluster import cluster, from_unit, to_unit
from node.app.evaluate import frechet
from node.net.experts.sampling import Sampler
from node.net.experts.service import (
    MAX_MESSAGE_BYTES,
    ExpertService,
    RemoteExpert,
    RouterService,
    client_host,
    matrix_from_pb,
    matrix_to_pb,
)
from p2pd.admission import Admission, TokenBuckets
from p2pd.client import SwarmClient
from p2pd.identity import Identity
from p2pd.records import open_record
from p2pd.rpc import router_pb2 as pb
from p2pd.rpc import router_pb2_grpc as pb_grpc
from p2pd.server import SnapshotStore, SwarmServer, TLSConfig


@pytest.fixture(scope="module")
def digits():
    from node.protocol.data import load_dataset

    return load_dataset("digits")


def test_clustering_is_deterministic_and_ordered(digits):
    a, b = cluster(digits.x_train, 4, 0), cluster(digits.x_train, 4, 0)
    assert torch.equal(a.labels, b.labels) and a.digest == b.digest
    sizes = torch.bincount(a.labels).tolist()
    assert sizes == sorted(sizes, reverse=True) and min(sizes) > 100
    assert (a.assign(to_unit(digits.x_train)) == a.labels).float().mean() > 0.99
    assert torch.allclose(from_unit(to_unit(digits.x_train[:3]), (1, 8, 8)), digits.x_train[:3])


@pytest.mark.parametrize(
    "shape,data,why",
    [
        ([4], b"\0" * 16, "rank"),
        ([2, 3], b"\0" * 24, "columns"),
        ([0, 4], b"", "rows"),
        ([2, 4], b"\0" * 31, "bytes"),
        ([5000, 4], b"\0" * 80000, "rows"),
    ],
)
def test_matrix_validation_refuses_malformed(shape, data, why):
    with pytest.raises(ValueError, match=why):
        matrix_from_pb(pb.Matrix(shape=shape, data=data), cols=4)


def test_matrix_roundtrip_and_nan_refused():
    x = torch.randn(3, 4)
    assert torch.equal(matrix_from_pb(matrix_to_pb(x), 4), x)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        matrix_from_pb(matrix_to_pb(x), 4)


def test_expert_weights_top_k_and_dead_experts():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    alive = torch.tensor([True, True, True])
    assert torch.equal(ensemble.expert_weights(probs, 1, alive), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    w2 = ensemble.expert_weights(probs, 2, alive)
    assert torch.allclose(w2[0], torch.tensor([2 / 3, 1 / 3, 0])) and torch.allclose(w2.sum(1), torch.ones(2))
    dead0 = ensemble.expert_weights(probs, 1, torch.tensor([False, True, True]))
    assert torch.equal(dead0[0], torch.tensor([0, 1.0, 0]))  # its mass moves to the best live expert
    only2 = ensemble.expert_weights(torch.tensor([[1.0, 0, 0]]), 1, torch.tensor([False, False, True]))
    assert torch.equal(only2, torch.tensor([[0, 0, 1.0]]))
    assert ensemble.parse_strategy("top-2", 4) == 2 and ensemble.parse_strategy("full", 4) == 4
    for bad in ("top0", "top5", "best", ""):
        with pytest.raises(ValueError):
            ensemble.parse_strategy(bad, 4)


def _const(value):
    return lambda x, t: torch.full_like(x, value)


def _uniform_router(k):
    return lambda x, t: torch.zeros(len(x), k)


def test_ensemble_drops_a_failing_expert_and_renormalises():
    def broken(x, t):
        raise ensemble.ExpertUnavailable("gone")

    res = ensemble.sample(
        _uniform_router(3),
        {0: _const(1.0), 1: broken, 2: _const(3.0)},
        3,
        n=5,
        dim=2,
        steps=4,
        top=3,
        x0=torch.zeros(5, 2),
    )
    assert res.failed == {1: "gone"} and all(s == {0, 2} for s in res.served)
    assert torch.allclose(res.x, torch.full((5, 2), 2.0))  # mean of 1 and 3 over t in [0, 1]
    with pytest.raises(ensemble.ExpertUnavailable):
        ensemble.sample(_uniform_router(2), {0: broken}, 2, n=2, dim=2, steps=2, top=1, x0=torch.zeros(2, 2))
    nan = ensemble.sample(
        _uniform_router(2),
        {0: _const(float("nan")), 1: _const(1.0)},
        2,
        n=2,
        dim=2,
        steps=2,
        top=2,
        x0=torch.zeros(2, 2),
    )
    assert 0 in nan.failed and torch.isfinite(nan.x).all()


def test_ensemble_reports_experts_per_step_so_a_short_strategy_is_visible():
    """top2 with one of four experts live mixes one expert per step (and says so); with a
    router that moves its choice between steps, an image's union of experts can exceed two
    while each step still mixes exactly two."""
    lone = ensemble.sample(_uniform_router(4), {0: _const(1.0)}, 4, n=3, dim=2, steps=3, top=2, x0=torch.zeros(3, 2))
    assert lone.fewest == [1, 1, 1]

    def drifting(x, t):  # prefers experts (0, 1) early and (2, 3) late
        early = (t < 0.5).to(torch.float32).unsqueeze(1)
        return torch.cat(
            [
                early.expand(-1, 2) * 2.0 + 0.1 * torch.tensor([1.0, 0.0]),
                (1 - early).expand(-1, 2) * 2.0 + 0.1 * torch.tensor([1.0, 0.0]),
            ],
            dim=1,
        )

    everyone = {j: _const(float(j)) for j in range(4)}
    res = ensemble.sample(drifting, everyone, 4, n=2, dim=2, steps=4, top=2, x0=torch.zeros(2, 2))
    assert res.fewest == [2, 2] and all(s == {0, 1, 2, 3} for s in res.served)


def _serve(servicer, register, **server_kwargs) -> tuple[SwarmServer, int]:
    """`servicer` on a SwarmServer on 127.0.0.1 (the runtime every role serves on)."""
    server = SwarmServer(SnapshotStore(), max_request_bytes=MAX_MESSAGE_BYTES, **server_kwargs)
    server.add_service(register, servicer)
    return server, server.start()


def test_an_expert_answers_only_signed_requests_of_live_members(tmp_path):
    """Predict goes through the same admission as a fetch: signed by a live member of the
    swarm, within its rate; the same server answers Health with the expert's record."""
    expert, router, stranger = (Identity.generate() for _ in range(3))
    admission = Admission(expert.peer_id, lambda p: p == router.peer_id, rate=20, burst=60)
    svc = ExpertService(_linear(4), 0, "digest", 4, torch.device("cpu"), admission)
    record = lambda: _signed_record(expert)  # noqa: E731
    server, port = _serve(svc, pb_grpc.add_ExpertServicer_to_server, signed_record=record)
    address = f"127.0.0.1:{port}"
    x, t = torch.zeros(3, 4), torch.full((3,), 0.5)
    try:
        signed = RemoteExpert(address, 0, "digest", 4, peer_id=expert.peer_id, identity=router)
        assert signed(x, t).shape == (3, 4)
        for who in (None, stranger):
            with pytest.raises(ensemble.ExpertUnavailable, match="PERMISSION_DENIED"):
                RemoteExpert(address, 0, "digest", 4, peer_id=expert.peer_id, identity=who)(x, t)
        with pytest.raises(ensemble.ExpertUnavailable, match="PERMISSION_DENIED"):  # signed for another expert
            RemoteExpert(address, 0, "digest", 4, peer_id=stranger.peer_id, identity=router)(x, t)
        assert svc.refused == {"unsigned": 2, "unknown": 1} and svc.calls == 1
        with SwarmClient(address) as c:
            envelope, _ = c.health()
        assert open_record(envelope, now=None).peer_id == expert.peer_id
    finally:
        server.stop(0)


def test_an_expert_over_tls(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    svc = ExpertService(_linear(4), 1, "digest", 4, torch.device("cpu"))
    server, port = _serve(svc, pb_grpc.add_ExpertServicer_to_server, tls=TLSConfig(cert_file=cert, key_file=key))
    x, t = torch.zeros(2, 4), torch.full((2,), 0.5)
    try:
        assert RemoteExpert(f"127.0.0.1:{port}", 1, "digest", 4, tls=TLSConfig(ca_file=cert))(x, t).shape == (2, 4)
        with pytest.raises(ensemble.ExpertUnavailable):  # plaintext to a TLS server
            RemoteExpert(f"127.0.0.1:{port}", 1, "digest", 4, timeout=3)(x, t)
    finally:
        server.stop(0)


def test_a_router_limits_sample_requests_per_client_address():
    sampler = Sampler(
        _uniform_router(2),
        lambda: {0: _const(0.0), 1: _const(0.0)},
        2,
        (1, 2, 2),
        default_steps=2,
        per_client=TokenBuckets(rate=0.01, burst=2),
    )
    svc = RouterService(sampler)
    server, port = _serve(svc, pb_grpc.add_RouterServicer_to_server)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RouterStub(ch)
            for _ in range(2):
                assert len(stub.Sample(pb.SampleRequest(n=1, strategy="top1"), timeout=30).served) == 1
            with pytest.raises(grpc.RpcError) as e:
                stub.Sample(pb.SampleRequest(n=1, strategy="top1"), timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and svc.refused == {"rate": 1}
    finally:
        sampler.close()
        server.stop(0)
    assert client_host("ipv4:127.0.0.1:5000") == "127.0.0.1" and client_host("ipv6:[::1]:5000") == "::1"


def _linear(dim: int) -> torch.nn.Module:
    class Velocity(torch.nn.Module):
        def forward(self, x, t):
            return x + t.unsqueeze(1)

    return Velocity()


def _signed_record(identity: Identity) -> bytes:
    from p2pd.records import PeerRecord, sign_record

    now = time.time()
    rec = PeerRecord(peer_id=identity.peer_id, grpc_address="127.0.0.1:1", issued_at=now, expires_at=now + 60)
    return sign_record(rec, identity)


def test_router_service_batches_concurrent_requests_and_refuses_bad_ones():
    def slow(x, t):
        time.sleep(0.05)
        return torch.zeros_like(x)

    sampler = Sampler(_uniform_router(2), lambda: {0: slow, 1: slow}, 2, (1, 2, 2), max_n=8, default_steps=10)
    svc = RouterService(sampler)
    server, port = _serve(svc, pb_grpc.add_RouterServicer_to_server)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RouterStub(ch)
            replies = []
            first = threading.Thread(
                target=lambda: replies.append(stub.Sample(pb.SampleRequest(n=2, strategy="top1"), timeout=30))
            )
            first.start()
            time.sleep(0.3)  # the first run is going: the next three wait and are served by one run
            rest = [
                threading.Thread(
                    target=lambda s=s: replies.append(
                        stub.Sample(pb.SampleRequest(n=3, strategy="top1", seed=s), timeout=30)
                    )
                )
                for s in range(3)
            ]
            for th in rest:
                th.start()
            for th in [first, *rest]:
                th.join(30)
            assert len(replies) == 4 and sorted(len(r.served) for r in replies) == [2, 3, 3, 3]
            assert sampler.runs == 2
            for req, what in (
                (pb.SampleRequest(n=9, strategy="top1"), "n must be"),
                (pb.SampleRequest(n=1, strategy="median"), "strategy"),
                (pb.SampleRequest(n=1, strategy="top1", steps=501), "steps"),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Sample(req, timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in e.value.details()
            assert len(stub.Sample(pb.SampleRequest(n=1, strategy="full"), timeout=30).served) == 1
    finally:
        sampler.close()
        server.stop(0)


def test_denoiser_learns_and_resumes_from_checkpoint(tmp_path):
    from node.config import NodeConfig
    from node.net.experts.roles import ExpertNode

    cfg = NodeConfig(
        role="expert",
        checkpoint_dir=tmp_path,
        experts=dict(clusters=2, cluster=1, steps=120, width=32, checkpoint_every=40),
    )
    events = []
    node = ExpertNode(cfg, events.append)
    node.stop_requested.set()  # stop at the first checkpoint
    assert node.run(serve=False) == dict(event="stopped", step=40)
    again = ExpertNode(cfg, events.append)
    done = again.run(serve=False)
    assert done["event"] == "done" and len(done["checkpoint"]) == 64
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps[0] <= 40 and steps[-1] == 120 and 40 < min(s for s in steps if s > 40)  # resumed, not restarted
    assert ExpertNode(cfg).run(serve=False)["checkpoint"] == done["checkpoint"]  # finished: loaded, not retrained
    first_losses = [e["loss"] for e in events if e["event"] == "train"]
    assert first_losses[-1] < first_losses[0]
    other = NodeConfig(
        role="expert", checkpoint_dir=tmp_path, experts=dict(clusters=2, cluster=1, steps=120, width=64)
    )
    with pytest.raises(ValueError, match="another expert"):
        ExpertNode(other).run(serve=False)


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3000, 6, generator=g), torch.randn(3000, 6, generator=g)
    assert frechet(a, a) < 1e-6 and frechet(a, b) < 0.05
    assert abs(frechet(a, b + 2) - 6 * 4) < 0.5  # |mu difference|^2


def test_a_closed_sampler_refuses_at_once_and_ends_queued_requests():
    """Before: a request submitted after close() (or still queued at close) waited forever."""
    from node.net.experts.sampling import SampleRefused

    sampler = Sampler(_uniform_router(2), lambda: {0: _const(0.0), 1: _const(0.0)}, 2, (1, 2, 2), default_steps=2)
    assert sampler.submit(1, "top1", 2, 0, "c").images.shape == (1, 1, 2, 2)
    sampler.close()
    t0 = time.monotonic()
    with pytest.raises(SampleRefused) as e:
        sampler.submit(1, "top1", 2, 0, "c")
    assert e.value.reason == "unavailable" and "stopping" in str(e.value) and time.monotonic() - t0 < 2


def test_a_remote_expert_splits_a_large_batch_into_messages_under_the_limit():
    """Before: 3000 28x28 rows in one Predict were 9.4 MB, over the 8 MiB message limit, and the healthy expert was
    dropped as failed."""
    svc = ExpertService(_linear(784), 0, "digest", 784, torch.device("cpu"))
    server, port = _serve(svc, pb_grpc.add_ExpertServicer_to_server)
    try:
        remote = RemoteExpert(f"127.0.0.1:{port}", 0, "digest", 784)
        x, t = torch.randn(3000, 784), torch.rand(3000)
        assert torch.allclose(remote(x, t), x + t.unsqueeze(1)) and remote.calls == 3 and remote.failures == 0
        remote.close()
    finally:
        server.stop(0)


def test_a_bad_clustering_file_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    from node.task.flow import clustering

    good = clustering("digits", 3, 0, "pixels", cache_dir=tmp_path)
    path = next(tmp_path.glob("clustering-*.safetensors"))
    assert clustering("digits", 3, 0, "pixels", cache_dir=tmp_path).digest == good.digest  # read back
    n = len(good.labels)
    for bad, words in (
        ({"centroids": torch.zeros(3, 5), "labels": torch.zeros(n, dtype=torch.int64)}, "without images"),
        ({"centroids": torch.full((3, 64), float("nan")), "labels": good.labels}, "finite centroids"),
        ({"centroids": good.centroids, "labels": good.labels.float()}, "int64"),
        ({"centroids": good.centroids, "labels": good.labels[:10]}, "one label"),
        ({"centroids": good.centroids[:2], "labels": good.labels}, "3 finite centroids"),
    ):
        save_file(bad, path)
        with pytest.raises(ValueError, match=words):
            clustering("digits", 3, 0, "pixels", cache_dir=tmp_path)
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a clustering file"):
        clustering("digits", 3, 0, "pixels", cache_dir=tmp_path)
    path.unlink()
    path.mkdir()
    with pytest.raises(ValueError, match="not a file"):
        clustering("digits", 3, 0, "pixels", cache_dir=tmp_path)
    other = type(good)(good.centroids, good.labels.roll(1))
    assert other.digest != good.digest  # the digest covers how the data is split, not only the centroids
