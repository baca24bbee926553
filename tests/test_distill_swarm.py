"""Logit exchange between real daemons on 127.0.0.1: a mixed-architecture swarm that learns
through distillation, and a node that refuses and counts malformed logits."""

import re
import sys

import pytest
import yaml
from helpers import ROOT, NodeProcess, atoll_node
from test_swarm import metrics_text

pytestmark = pytest.mark.integration
ARCHS = [("mlp", 32), ("mlp", 128), ("cnn", 16)]


def node_config(path, workdir, i, n, swarm, rounds, method="edgefd", **comm):
    family, width = ARCHS[i % len(ARCHS)]
    cfg = {
        "node_index": i,
        "node_count": n,
        "checkpoint_dir": str(workdir / f"n{i}" / "ckpt"),
        "metrics_port": 0,
        "data": {"partition": "dirichlet", "alpha": 0.3},
        "model": {"family": family, "width": width},
        "train": {"rounds": rounds, "local_steps": 10},
        "comm": {
            "exchange": "logits",
            "topology": "complete",
            "fetch_timeout": 10,
            "min_peers": n,
            "join_timeout": 60,
            **comm,
        },
        "distill": {"method": method, "proxy_size": 300, "steps": 20},
        "net": {"swarm": swarm, "identity_path": str(workdir / f"n{i}" / "node.key"), "record_ttl": 4},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_three(tmp_path, nodes: list, swarm: str, rounds: int, method: str, edit=lambda tree: None) -> None:
    """Three daemons of `swarm` on 127.0.0.1, appended to `nodes` as each starts (the caller
    stops them), the others joining through the first; `edit(tree)` changes each config."""
    for i in range(3):
        cfg = node_config(tmp_path / f"n{i}.yaml", tmp_path, i, 3, swarm, rounds, method=method)
        tree = yaml.safe_load(cfg.read_text())
        edit(tree)
        cfg.write_text(yaml.safe_dump(tree))
        extra = ["--set", f"net.initial_peers={nodes[0].info['maddrs']}"] if nodes else []
        nodes.append(atoll_node(cfg, *extra, log=tmp_path / f"n{i}.log"))
        nodes[-1].ready(60)


@pytest.mark.slow  # keeps the default set under 10 minutes on 2 cores (`make test-all` runs it)
def test_mixed_architecture_swarm_learns_through_logits(tmp_path):
    """Three daemons with three architectures (no model could be averaged) exchange logits on
    the proxy set; every node distills from both others and ends above its round-0 accuracy,
    receiving logits, not models."""
    rounds, nodes = 6, []
    try:
        # the filter and the KnFu weights both on: every distillation code path of the daemon
        start_three(tmp_path, nodes, "mixed", rounds, "edgefd+knfu")
        done = [n.wait_event("done", 240) for n in nodes]
        for n, d in zip(nodes, done):
            by_round = {e["round"]: e for e in n.seen if e.get("event") == "round"}
            assert sorted(by_round) == list(range(1, rounds + 1))
            assert all(by_round[r]["mixed"] == 2 for r in by_round), by_round  # both teachers, every round
            assert d["accuracy"] > by_round[1]["accuracy"] + 0.05, (by_round[1]["accuracy"], d["accuracy"])
            # logits for <= 300 proxy rows x 10 classes in float16 (+ mask), from 2 teachers per round
            assert 0 < d["received_bytes"] <= rounds * 2 * (300 * 10 * 2 + 300 + 1024)
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.slow  # keeps the default set under 10 minutes on 2 cores; the checks themselves: tests/test_distill.py
def test_malformed_logits_are_refused_and_counted(tmp_path):
    """One honest daemon among four peers that serve logits with a wrong class count, a NaN,
    about another proxy set, or not signed in their record: it refuses each for its reason,
    counts it, and keeps training."""
    rounds, swarm = 4, "evil"
    peers, honest = [], None
    try:
        for k, mode in enumerate(("shape", "nan", "proxy", "unsigned")):
            extra = ["--initial-peers", *peers[0].info["maddrs"]] if peers else []
            peers.append(
                NodeProcess(
                    "--key",
                    str(tmp_path / f"evil{k}.key"),
                    "--swarm",
                    swarm,
                    "--mode",
                    mode,
                    "--rounds",
                    str(rounds),
                    *extra,
                    command=[sys.executable, str(ROOT / "tests" / "logits_peer.py")],
                    stderr_path=tmp_path / f"evil{k}.log",
                )
            )
            peers[-1].ready(60)
        # fetch_timeout 3: the unsigned peer is waited for until the deadline in every round
        cfg = node_config(tmp_path / "honest.yaml", tmp_path, 0, 1, swarm, rounds, min_peers=5, fetch_timeout=3)
        honest = atoll_node(cfg, "--set", f"net.initial_peers={peers[0].info['maddrs']}", log=tmp_path / "honest.log")
        honest.ready(60)
        honest.wait_event("round", 120, lambda e: e["round"] == rounds - 1)
        text = metrics_text(honest.info["metrics_port"])  # while it still serves
        counts = {m[0]: float(m[1]) for m in re.findall(r'atoll_fetch_failures_total\{reason="(\w+)"\} (\S+)', text)}
        for reason in ("logits_shape", "non_finite", "proxy_mismatch", "unsigned"):
            assert counts.get(reason, 0) >= rounds - 1, (reason, counts)
        done = honest.wait_event("done", 120)
        assert done["round"] == rounds and done["received_bytes"] > 0  # fetched, then refused
        assert all(e["mixed"] == 0 for e in honest.seen if e.get("event") == "round")
    finally:
        for p in [honest, *peers]:
            if p is not None:
                p.stop()


@pytest.mark.slow
def test_fedd2s_runs_in_daemons_and_reports_own_accuracy(tmp_path):
    """FedD2S in three real daemons: logits travel as for EdgeFD, the deeper layers leave the
    distillation from round 1 (drop rate 1), every node distils from both others each round
    and its final event carries its accuracy on its own held-out distribution."""
    rounds, nodes = 4, []
    try:

        def edit(tree):
            tree["distill"]["drop_rate"] = 1.0
            tree["data"]["personal_holdout"] = 0.2

        start_three(tmp_path, nodes, "d2s", rounds, "fedd2s", edit)
        done = [n.wait_event("done", 240) for n in nodes]
        for n, d in zip(nodes, done):
            by_round = {e["round"]: e for e in n.seen if e.get("event") == "round"}
            assert sorted(by_round) == list(range(1, rounds + 1))
            assert all(by_round[r]["mixed"] == 2 for r in by_round), by_round
            assert 0 <= d["metrics"]["own_accuracy"] <= 1, d
    finally:
        for n in nodes:
            n.stop()
