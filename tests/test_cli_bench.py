"""`atoll bench ...`: each benchmark end to end on a tiny size (the longer ones in the slow set), the figures it
takes from round events, and clean errors for bad input."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.integration


def atoll(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "node.app.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.slow  # keeps the default set under 10 minutes on 2 cores (`make test-all` runs it)
def test_bench_transport_json_and_outputs(tmp_path):
    r = atoll("bench", "transport", "--sizes", "2", "--repeats", "1", "--json", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    coded = {"atoll_fp16", "atoll_bf16", "atoll_int8", "atoll_topk1"}
    plain = {"copy", "grpc_raw", "atoll", "atoll_reuse", "atoll_libp2p", "hivemind"}
    assert {row["path"] for row in rows} == plain | coded
    assert all(row["gbps"] > 0 and row["size_mb"] == 2 for row in rows)
    wire = {row["path"]: row["wire_bytes"] for row in rows}
    assert wire["atoll_fp16"] < 0.51 * wire["atoll"] and wire["atoll_int8"] < 0.27 * wire["atoll"]
    assert wire["atoll_topk1"] < 0.02 * wire["atoll"]
    assert all(row["encode_seconds"] > 0 for row in rows if row["path"] in coded)
    assert next(row for row in rows if row["path"] == "grpc_raw")["ratio_to_grpc_raw"] == 1.0
    for name in ("results.json", "table.md", "transport.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "transport", "--sizes", "ten"],
        ["bench", "transport", "--sizes", "0"],
        ["bench", "transport", "--repeats", "0"],
        ["bench", "transport", "--paths", "atoll,pigeon"],
        ["bench", "compression", "--workloads", "cifar"],
        ["bench", "compression", "--methods", "zstd"],
        ["bench", "swarm", "--systems", "flower"],
        ["bench", "swarm", "--systems", "atoll,spark"],
        ["bench", "swarm", "--config", "/nonexistent.yaml"],
        ["bench", "byzantine", "--algorithm", "streaming"],
        ["bench", "byzantine", "--algorithm", "diloco_allreduce", "--aggregators", "median,krum"],
    ],
)
def test_bad_input_is_one_clear_line_not_a_traceback(args):
    r = atoll(*args, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip()


def test_bench_swarm_figures_from_round_events():
    """The figures of `atoll bench swarm` from nodes' round events (times as read) and sampled usage."""
    import subprocess as sp

    from node.app.bench.swarm import Usage, summarize, table
    from node.app.swarm import NodeRun

    runs = []
    for i, (start, accs) in enumerate([(0.0, [0.5, 0.9, 0.95]), (1.0, [0.6, 0.94, 0.96])]):
        run = NodeRun(i, sp.Popen(["true"]), started=start)
        run.proc.wait()
        run.rounds = [{"_t": 2.0 + 0.1 * k + i * 0.01, "accuracy": a} for k, a in enumerate(accs)]
        run.final = {"accuracy": accs[-1], "sent_bytes": 1_000_000, "received_bytes": 1_000_000}
        runs.append(run)
    usage = Usage()
    usage.peak_mb = {runs[0].proc.pid: 400.0, runs[1].proc.pid: 450.0}
    usage.cpu_s = {runs[0].proc.pid: 3.0, runs[1].proc.pid: 5.0}
    r = summarize("atoll", 0, runs, 0.0, 4.0, usage, [], 0.93)
    assert r.round_ms == 100.0 and r.first_round_s == 2.0  # node 0: launched at 0, first round at 2.0
    assert r.to_target_s == 2.2  # node 1 is at 0.94 from 2.11, node 0 reaches 0.95 at 2.2
    assert r.final_min_accuracy == 0.95 and r.mb_per_node == 2.0 and r.cpu_s_per_node == 4.0
    assert r.peak_mb_per_node == 450.0
    assert "| median round (ms) | 100 |" in table([r], 0.93)


@pytest.mark.slow
def test_bench_swarm_measures_a_real_atoll_swarm(tmp_path):
    import yaml

    cfg = tmp_path / "swarm2.yaml"
    node = {"train": {"rounds": 8, "local_steps": 2}, "net": {"swarm": "bench-swarm-test", "record_ttl": 10}}
    cfg.write_text(yaml.safe_dump({"nodes": 2, "node": node}))
    r = atoll(
        "bench",
        "swarm",
        "-c",
        str(cfg),
        "--systems",
        "atoll",
        "--repeats",
        "1",
        "--target",
        "0.3",
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["system"] == "atoll" and run["round_ms"] > 0 and 0 < run["first_round_s"] < run["wall_s"]
    assert run["to_target_s"] is not None and run["final_min_accuracy"] >= 0.3
    assert run["peak_mb_per_node"] > 100 and run["cpu_s_per_node"] > 0.5  # a real process tree was sampled
    assert run["mb_per_node"] > 0 and len(run["curve"]) >= 7
    assert "median round (ms)" in r.stdout and (tmp_path / "out" / "swarm.png").stat().st_size > 0


@pytest.mark.slow  # benchmark plumbing: keeps the default set under 10 minutes
def test_bench_algorithms_and_scale_write_their_outputs(tmp_path):
    r = atoll(
        "bench",
        "algorithms",
        "--nodes",
        "4",
        "--rounds",
        "3",
        "--seeds",
        "0",
        "--methods",
        "fedavg,late_merge",
        "--out",
        str(tmp_path / "alg"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "alg" / "results.json").read_text())
    assert {s["method"] for s in res["summary"]} == {"fedavg", "late_merge"}
    assert all(run["bytes_sent"] > 0 and len(run["log"]) == 3 for run in res["runs"])
    assert (tmp_path / "alg" / "accuracy.png").stat().st_size > 0
    r = atoll("bench", "scale", "--sizes", "4,8", "--rounds", "2", "--out", str(tmp_path / "scale"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "scale" / "results.json").read_text())["rows"]
    assert [row["nodes"] for row in rows] == [4, 8] and all(row["peak_rss_mb"] > 0 for row in rows)
    bad = atoll("bench", "algorithms", "--methods", "gossip-of-doom", timeout=60)
    assert bad.returncode == 2 and "--methods: unknown" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # benchmark plumbing: keeps the default set under 10 minutes
def test_bench_distill_writes_per_architecture_results(tmp_path):
    r = atoll(
        "bench",
        "distill",
        "--nodes",
        "4",
        "--architectures",
        "mlp:16,cnn:8",
        "--rounds",
        "2",
        "--local-steps",
        "3",
        "--distill-steps",
        "2",
        "--proxy-size",
        "60",
        "--seeds",
        "0",
        "--methods",
        "isolated,edgefd,gossip_same_arch",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    summary = {s["method"]: s for s in res["summary"]}
    assert set(summary["edgefd"]["per_architecture"]) == {"mlp:16", "cnn:8"}
    assert summary["isolated"]["kilobytes_per_round"] == 0 < summary["edgefd"]["kilobytes_per_round"]
    assert summary["edgefd"]["kilobytes_per_round"] < summary["gossip_same_arch"]["kilobytes_per_round"]
    assert "fewer" in (tmp_path / "table.md").read_text() and (tmp_path / "accuracy.png").stat().st_size > 0
    for bad in (["--architectures", "mlp:huge"], ["--methods", "fedmd"], ["--proxy-size", "5000"]):
        b = atoll("bench", "distill", "--seeds", "0", "--rounds", "1", *bad, timeout=60)
        assert b.returncode == 2 and "Traceback" not in b.stderr and b.stderr.strip(), (bad, b.stderr[-500:])


@pytest.mark.slow  # keeps the default set under 10 minutes on 2 cores (`make test-all` runs it)
def test_bench_byzantine_tiny_grid(tmp_path):
    r = atoll(
        "bench",
        "byzantine",
        "--honest",
        "4",
        "--sybils",
        "3",
        "--sybil-honest",
        "3",
        "--attacks",
        "sign_flip,sybil",
        "--aggregators",
        "mean,median,sybilwall",
        "--rounds",
        "3",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(row["attack"], row["aggregator"]) for row in rows if row["group"] == "grid"} >= {
        ("none", "mean"),
        ("sign_flip", "median"),
        ("sybil", "sybilwall"),
    }
    assert "precision / recall" in r.stdout and (tmp_path / "accuracy.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_compression_counts_fewer_bytes_and_states_the_targets(tmp_path):
    r = atoll(
        "bench", "compression", "--workloads", "digits-mlp", "--methods", "float32,int8+ef,topk5%+ef",
        "--seeds", "0", "--out", str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    summary = {s["method"]: s for s in json.loads((tmp_path / "results.json").read_text())["summary"]}
    assert summary["float32"]["bytes_ratio"] == 1.0
    assert summary["int8+ef"]["bytes_ratio"] > 3 and summary["topk5%+ef"]["bytes_ratio"] > 8
    assert abs(summary["int8+ef"]["vs_float32"]) < 3  # int8 with error feedback tracks float32
    assert "digits-mlp: int8+ef at" in r.stdout and "top-k with error feedback at >= 10x" in r.stdout
    for name in ("results.json", "table.md", "compression.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_the_baselines_environments_have_what_the_worker_imports():
    """Flower and torchft run atoll's Worker in environments of their own with torch and WORKER_PACKAGES only: a
    NodeConfig (its multiaddr check) and a Worker must import and build there. Found in the field: multiaddr was
    missing, and every Flower client failed at its config."""
    from node.app.bench.venvs import WORKER_PACKAGES

    allowed = {"torch", "yaml" if "pyyaml" in WORKER_PACKAGES else "", *WORKER_PACKAGES, "node", "p2pd"}
    code = f"""
import importlib.abc, sys
allowed = {sorted(allowed)!r}
ours = (sys.argv[2] + "/node/", sys.argv[2] + "/p2pd/")
class Only(importlib.abc.MetaPathFinder):  # what atoll's own modules import (their dependencies pull the rest)
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in allowed or top.startswith("_"):
            return None
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename.startswith("<frozen"):
            f = f.f_back
        if f is None or not f.f_code.co_filename.startswith(ours):
            return None
        raise ImportError(f"{{name}} is not in the baselines' environments")
sys.meta_path.insert(0, Only())
import json
from node.config import NodeConfig
from node.protocol.worker import Worker
cfg = NodeConfig.model_validate(json.loads(sys.argv[1]))  # as the baselines read it: every field written
print(json.dumps({{"dataset_size": Worker(cfg).dataset_size}}))
"""
    from node.config import NodeConfig
    from node.protocol.data.datasets import digits_file

    cfg = NodeConfig.model_validate({"model": {"width": 16}, "data": {"path": str(digits_file())}})
    argv = [sys.executable, "-c", code, json.dumps(cfg.model_dump(mode="json")), str(ROOT)]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["dataset_size"] > 0
