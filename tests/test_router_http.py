"""The router's HTTP API (node/net/experts/http.py) served by uvicorn on 127.0.0.1, over the same
Sampler as gRPC: the README's curl commands as written, an answer with 1 of 4 experts live that
says so, clear 4xx errors, one rate limit for both transports, the OpenAPI document, and the
router's metrics through promtool. (Real expert and router daemons answering over HTTP:
tests/test_readme.py's expert walkthrough.)"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import grpc
import pytest
import torch
from helpers import ROOT
from sysdeps import needs
from test_experts import _serve

from node.net.experts.http import HttpServer, build_app
from node.net.experts.metrics import ExpertMetrics, RouterMetrics
from node.net.experts.sampling import Sampler
from node.net.experts.service import ExpertService, RouterService, register_router
from p2pd.admission import TokenBuckets
from p2pd.rpc import router_pb2 as pb
from p2pd.rpc import router_pb2_grpc as pb_grpc

K, SHAPE = 4, (1, 8, 8)


def _expert(j: int):
    """Expert j pulls every pixel towards its own grey level (so its images differ from the others')."""
    level = -1 + 2 * j / (K - 1)
    return lambda x, t: (level - x) / (1 - t.clamp(max=0.9)).unsqueeze(1)


def _router(x, t):
    """Prefers the experts whose grey level is nearest the image's mean (no ties: top-k picks exactly k)."""
    levels = torch.linspace(-1, 1, K)
    return -10 * (x.mean(dim=1, keepdim=True) - levels).pow(2) - 1e-3 * torch.arange(K)


@contextmanager
def router(live=tuple(range(K)), velocity=_expert, **sampler_kw):
    """A Sampler over in-process experts `live` (`velocity(j)`: expert j), its gRPC service and its HTTP API on
    127.0.0.1."""
    experts = {j: velocity(j) for j in live}
    sampler = Sampler(_router, lambda: dict(experts), K, SHAPE, **sampler_kw)
    grpc_service = RouterService(sampler)
    metrics = RouterMetrics(K, lambda: len(experts), lambda: dict(grpc_service.refused))
    grpc_service.observe = metrics.observe
    server, port = _serve(grpc_service, register_router)
    info = lambda: [  # noqa: E731
        dict(cluster=j, peer_id=f"peer{j}", address=f"127.0.0.1:{9000 + j}", images=10, calls=0, failures=0)
        for j in live
    ]
    http = HttpServer(build_app(sampler, info, metrics.observe), "127.0.0.1", 0)
    try:
        yield http, port, metrics
    finally:
        http.close()
        sampler.close()
        server.stop(0)


def call(url: str, body: dict | bytes | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET (body None) or a POST of JSON (dict) or raw bytes."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def readme_curls() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Diffusion experts and the ensemble router", 1)[1]
    section = section.split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("curl ")]


def run_readme_curls(port: int, cwd) -> list[str]:
    """Run the README's curl lines as written, but for the port a test cannot own; their outputs."""
    lines = readme_curls()
    assert len(lines) >= 3 and all("127.0.0.1:8080" in line for line in lines), lines
    outputs = []
    for line in lines:
        r = subprocess.run(
            ["bash", "-c", line.replace(":8080", f":{port}")], cwd=cwd, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, (line, r.stderr)
        outputs.append(r.stdout)
    return outputs


@needs("curl")
def test_the_readme_curl_commands_work_as_written(tmp_path):
    with router() as (http, _, _):
        outputs = run_readme_curls(http.port, tmp_path)
    health = json.loads(outputs[0])
    assert health == {"status": "ok", "live": K, "clusters": K}
    reply = json.loads(outputs[1])
    assert reply["count"] == 4 and reply["complete"] and reply["live"] == [0, 1, 2, 3] and reply["missing"] == []
    for image in reply["images"]:
        assert len(image["experts"]) >= 2 and image["fewest"] == 2  # top2: two experts at every step
        assert base64.b64decode(image["png"]).startswith(b"\x89PNG\r\n\x1a\n")
    grid = tmp_path / "samples.png"
    assert grid.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and grid.stat().st_size > 100


def test_one_of_four_experts_live_still_answers_and_says_so():
    with router(live=(2,)) as (http, port, metrics):
        status, _, body = call(f"{http.url}/v1/samples", {"count": 3, "strategy": "top2", "seed": 7})
        assert status == 200
        reply = json.loads(body)
        assert reply["live"] == [2] and reply["missing"] == [0, 1, 3] and reply["complete"] is False
        assert "1 of 4 experts were live (missing: 0, 1, 3)" in reply["warning"]
        assert [i["experts"] for i in reply["images"]] == [[2]] * 3 and {i["fewest"] for i in reply["images"]} == {1}
        status, headers, png = call(f"{http.url}/v1/samples", {"count": 3, "strategy": "top2", "format": "png"})
        assert status == 200 and png.startswith(b"\x89PNG") and headers["content-type"] == "image/png"
        assert headers["x-atoll-missing"] == "0,1,3" and headers["x-atoll-complete"] == "false"
        status, _, body = call(f"{http.url}/healthz")
        assert status == 200 and json.loads(body)["status"] == "degraded"
        experts = json.loads(call(f"{http.url}/v1/experts")[2])
        assert [e["cluster"] for e in experts["live"]] == [2] and experts["missing"] == [0, 1, 3]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # gRPC says the same
            g = pb_grpc.RouterStub(ch).Sample(pb.SampleRequest(n=3, strategy="top2"), timeout=60)
        assert list(g.live) == [2] and all(list(s.clusters) == [2] for s in g.served)
    assert metrics.incomplete._value.get() == 3
    assert metrics.samples._value.get() == 9


def test_bad_requests_get_clear_4xx_errors_and_no_expert_is_503():
    with router(max_n=8, max_steps=20) as (http, _, _):
        url = f"{http.url}/v1/samples"
        for body, status, words in (
            ({"count": 0}, 422, "count"),
            ({"count": 9}, 400, "n must be in [1, 8]"),
            ({"count": 1, "strategy": "median"}, 400, "strategy must be top1 .. top4 or full"),
            ({"count": 1, "steps": 21}, 400, "steps must be in [1, 20]"),
            ({"count": 1, "colour": "red"}, 422, "colour"),
            ({"count": "many"}, 422, "count"),
            ({"count": 1, "format": "gif"}, 422, "format"),
            (b"{not json", 422, ""),
        ):
            got, _, raw = call(url, body)
            assert got == status, (body, got, raw)
            error = json.loads(raw)["error"]
            assert words in error and "\n" not in error, (body, error)
        assert call(f"{http.url}/v1/nothing")[0] == 404
    with router(live=()) as (http, _, _):
        status, _, body = call(f"{http.url}/v1/samples", {"count": 1})
        assert status == 503 and "no expert could serve" in json.loads(body)["error"]
        assert call(f"{http.url}/healthz")[0] == 503


def test_http_and_grpc_share_one_rate_limit_per_client_address():
    with router(per_client=TokenBuckets(rate=0.01, burst=3)) as (http, port, metrics):
        assert call(f"{http.url}/v1/samples", {"count": 1, "steps": 2})[0] == 200
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RouterStub(ch)
            assert len(stub.Sample(pb.SampleRequest(n=1, strategy="top1", steps=2), timeout=30).served) == 1
        assert call(f"{http.url}/v1/samples", {"count": 1, "steps": 2})[0] == 200
        status, _, body = call(f"{http.url}/v1/samples", {"count": 1, "steps": 2})
        assert status == 429 and json.loads(body)["reason"] == "rate"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError) as e:
            pb_grpc.RouterStub(ch).Sample(pb.SampleRequest(n=1, strategy="top1", steps=2), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert metrics.requests.labels(route="http_samples", status="429")._value.get() == 1
    assert metrics.requests.labels(route="grpc_sample", status="RESOURCE_EXHAUSTED")._value.get() == 1


def test_the_openapi_document_describes_the_api():
    with router() as (http, _, _):
        status, _, body = call(f"{http.url}/openapi.json")
        page = call(f"{http.url}/")
    doc = json.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/samples", "/v1/experts", "/healthz"} <= set(doc["paths"])
    schema = doc["components"]["schemas"]["SampleBody"]["properties"]
    assert {"count", "strategy", "seed", "steps", "format"} <= set(schema)
    assert page[0] == 200 and b"<title>atoll router</title>" in page[2]


def router_scrape() -> bytes:
    """The exposition text of a router and an expert after real requests (shared with test_deploy)."""
    from prometheus_client import generate_latest

    with router(live=(0, 1)) as (http, port, metrics):
        call(f"{http.url}/v1/samples", {"count": 2, "strategy": "full", "steps": 3})
        call(f"{http.url}/v1/samples", {"count": 0})
        call(f"{http.url}/healthz")
        text = generate_latest(metrics.registry)
    expert = ExpertMetrics(1)
    svc = ExpertService(lambda x, t: torch.zeros_like(x), 1, "d", 4, torch.device("cpu"), observe=expert.observe)
    from node.net.experts.service import matrix_to_pb

    class Ctx:
        def abort(self, code, details):
            raise RuntimeError(details)

    svc.Predict(pb.PredictRequest(x=matrix_to_pb(torch.zeros(3, 4)), t=[0.5] * 3, cluster_digest="d"), Ctx())
    expert.on_event(dict(event="train", step=10, loss=0.5))
    return text + generate_latest(expert.registry)


@needs("prometheus")
def test_router_and_expert_metrics_pass_promtool():
    text = router_scrape()
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    s = text.decode()
    assert 'atoll_router_requests_total{route="http_samples",status="200"} 1.0' in s
    assert 'atoll_router_requests_total{route="http_samples",status="422"} 1.0' in s
    assert 'atoll_router_requests_total{route="http_healthz",status="200"} 1.0' in s
    assert "atoll_router_samples_total 2.0" in s and "atoll_router_incomplete_answers_total 1.0" in s
    assert "atoll_router_experts_live 2.0" in s and "atoll_router_experts_clusters 4.0" in s
    assert re.search(r'atoll_router_request_duration_seconds_count\{route="http_samples"\} 2\.0', s)
    assert 'atoll_expert_predict_requests_total{status="OK"} 1.0' in s and "atoll_expert_predict_rows_total 3.0" in s
    assert "atoll_expert_train_step 10.0" in s


def test_a_burst_of_slow_requests_is_refused_as_busy_and_health_still_answers():
    """Before: 100 concurrent samples each held a server thread until served, and /healthz (and gRPC Health) timed
    out behind them. Now at most max_pending wait; the rest are refused at once as busy."""
    import threading

    def slow(x, t):
        threading.Event().wait(0.05)
        return torch.zeros_like(x)

    with router(max_pending=2, velocity=lambda j: slow) as (http, _, _):
        codes: list[int] = []
        threads = [
            threading.Thread(
                target=lambda s=s: codes.append(call(f"{http.url}/v1/samples", {"count": 1, "steps": s})[0])
            )
            for s in range(1, 9)  # different steps: they cannot be batched into one run
        ]
        for th in threads:
            th.start()
        t0 = time.monotonic()
        status, _, body = call(f"{http.url}/healthz")
        assert status == 200 and time.monotonic() - t0 < 5
        for th in threads:
            th.join(60)
    assert sorted(codes).count(200) >= 2 and 503 in codes, codes
    assert set(codes) <= {200, 503}


def test_http_errors_are_one_json_line_even_for_unknown_routes_big_bodies_and_loose_types():
    with router() as (http, _, _):
        status, _, body = call(f"{http.url}/v1/nothing")
        assert status == 404 and json.loads(body) == {"error": "Not Found"}
        status, _, body = call(f"{http.url}/healthz", {"count": 1})  # POST to a GET route
        assert status == 405 and "error" in json.loads(body)
        status, _, body = call(f"{http.url}/v1/samples", {"count": 1, "strategy": "x" * 100_000})
        assert status == 413 and len(body) < 300
        for loose in ({"count": True}, {"count": "2"}, {"count": 2.0}, {"count": 1, "strategy": "top1" * 10}):
            status, _, body = call(f"{http.url}/v1/samples", loose)
            assert status == 422 and "\n" not in json.loads(body)["error"], (loose, body)
        status, _, body = call(f"{http.url}/v1/samples", {"count": 1, "a\nb": 1})
        assert status == 422 and "\n" not in json.loads(body)["error"]
        status, _, body = call(f"{http.url}/v1/samples", {"count": 1, "seed": 2**64 - 1, "steps": 2})
        assert status == 200  # the same seed range as gRPC's uint64
        doc = json.loads(call(f"{http.url}/openapi.json")[2])
        assert {"400", "422", "429", "503"} <= set(doc["paths"]["/v1/samples"]["post"]["responses"])


def test_an_http_port_in_use_is_one_clear_error():
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match=r"cannot serve HTTP on 127\.0\.0\.1:\d+: .*experts\.http_port"):
            HttpServer(build_app(None, list), "127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
