"""Three expert daemons and a router on 127.0.0.1 with a real DHT and gRPC: a query returns
images of the requested shape; with one expert SIGKILLed the router still answers, served by
the others; bad requests get a clear gRPC error and both roles keep serving."""

import json
import subprocess
import sys

import grpc
import pytest
import torch
import yaml

from helpers import ROOT, NodeProcess, atoll_node
from node.experts.service import matrix_from_pb, matrix_to_pb
from p2pd.rpc import router_pb2 as pb
from p2pd.rpc import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
K = 3


def role_config(path, workdir, role, name, cluster=0):
    cfg = {"role": role, "checkpoint_dir": str(workdir / name), "metrics_port": None,
           "experts": {"clusters": K, "cluster": cluster, "steps": 200, "router_steps": 200, "width": 64,
                       "checkpoint_every": 100, "sample_steps": 10, "max_n": 32, "predict_timeout": 5},
           "net": {"swarm": "ddm", "identity_path": str(workdir / f"{name}.key"), "record_ttl": 3}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def sample(address, **kw):
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.RouterStub(ch).Sample(pb.SampleRequest(**kw), timeout=60)


def code_of(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_experts_and_router_serve_survive_a_dead_expert_and_refuse_bad_requests(tmp_path):
    procs = []
    try:
        experts = []
        for k in range(K):
            extra = ["--set", f"net.initial_peers={experts[0].info['maddrs']}"] if experts else []
            experts.append(atoll_node(role_config(tmp_path / f"e{k}.yaml", tmp_path, "expert", f"e{k}", k), *extra,
                                      log=tmp_path / f"e{k}.log"))
            procs.append(experts[-1])
            experts[-1].ready(180)
        router = NodeProcess("--config", str(role_config(tmp_path / "r.yaml", tmp_path, "router", "r")),
                             "--initial-peers", experts[0].info["maddrs"][0], "--json-events",
                             command=[sys.executable, "-m", "node.cli", "router", "serve"], stderr_path=tmp_path / "r.log")
        procs.append(router)
        addr = router.ready(180)["grpc"]

        reply = sample(addr, n=6, strategy="full", seed=0)
        x = matrix_from_pb(reply.images, 64, max_rows=6)
        assert tuple(reply.image_shape) == (1, 8, 8) and x.shape == (6, 64) and 0 <= x.min() and x.max() <= 1
        assert set().union(*[set(s.clusters) for s in reply.served]) == set(range(K))  # full: every expert

        # the CLI a user runs: finds the router through the DHT, writes the grid, says who served
        cli = subprocess.run([sys.executable, "-m", "node.cli", "router", "query", "--peers", experts[0].info["maddrs"][0],
                              "--swarm", "ddm", "--n", "4", "--strategy", "top2", "--json", "--out",
                              str(tmp_path / "grid.png")], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert cli.returncode == 0, cli.stderr[-2000:]
        got = json.loads(cli.stdout)
        assert got["n"] == 4 and got["shape"] == [1, 8, 8] and got["per_step"] == [2] * 4 and got["live"] == [0, 1, 2]
        assert (tmp_path / "grid.png").stat().st_size > 0
        bad = subprocess.run([sys.executable, "-m", "node.cli", "router", "query", "--router", addr, "--n", "2",
                              "--strategy", "best"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert bad.returncode == 2 and "strategy" in bad.stderr and "Traceback" not in bad.stderr

        # bad requests: clear errors, and the router keeps serving
        assert code_of(lambda: sample(addr, n=33, strategy="top1"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        code, detail = code_of(lambda: sample(addr, n=2, strategy="top9"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "strategy" in detail
        assert code_of(lambda: sample(addr, n=2, strategy="top1", steps=10_000))[0] == grpc.StatusCode.INVALID_ARGUMENT
        # and an expert refuses a wrong-shaped or foreign batch
        with grpc.insecure_channel(experts[1].info["grpc"]) as ch:
            stub = pb_grpc.ExpertStub(ch)
            bad = pb.PredictRequest(x=matrix_to_pb(torch.zeros(2, 10)), t=[0.5, 0.5], cluster_digest="x")
            assert code_of(lambda: stub.Predict(bad, timeout=10))[0] == grpc.StatusCode.FAILED_PRECONDITION
            rec_digest = _cluster_digest(experts[1])
            bad.cluster_digest = rec_digest
            code, detail = code_of(lambda: stub.Predict(bad, timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "columns" in detail
            good = pb.PredictRequest(x=matrix_to_pb(torch.zeros(2, 64)), t=[0.5, 0.5], cluster_digest=rec_digest)
            assert stub.Predict(good, timeout=10).cluster == 1

        experts[2].kill()  # SIGKILL, p2pd included; its DHT record lives on until its TTL
        reply = sample(addr, n=8, strategy="full", seed=1)
        assert len(reply.served) == 8 and all(s.clusters and 2 not in s.clusters for s in reply.served)
        assert matrix_from_pb(reply.images, 64, max_rows=8).shape == (8, 64)
        reply = sample(addr, n=4, strategy="top1", seed=2)  # still serving, with the survivors
        assert all(set(s.clusters) <= {0, 1} for s in reply.served)
    finally:
        for p in procs:
            p.stop()


def _cluster_digest(expert):
    """The clustering digest an expert serves for, from its checkpoint metadata."""
    import json
    from pathlib import Path

    cfg_dir = Path(expert.proc.args[expert.proc.args.index("--config") + 1]).parent
    state = json.loads((cfg_dir / "e1" / "expert-1" / "state.json").read_text())
    return state["meta"]["clustering"]
