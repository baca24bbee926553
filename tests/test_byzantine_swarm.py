"""A loopback swarm of real daemons with one sign-flipping node: every honest node's
/metrics endpoint shows that node flagged within a few rounds, and honest accuracy holds."""

import re

import pytest
import yaml
from helpers import atoll_node
from test_swarm import metrics_text

pytestmark = pytest.mark.integration
HONEST, ROUNDS = 4, 8


def node_config(path, workdir, i, n, attack=None):
    cfg = {
        "node_index": i,
        "node_count": n,
        "checkpoint_dir": str(workdir / f"n{i}" / "ckpt"),
        "metrics_port": 0,
        "data": {"partition": "dirichlet", "alpha": 0.5},
        "model": {"family": "mlp", "width": 32},
        "train": {"rounds": ROUNDS, "local_steps": 25},
        "comm": {"topology": "complete", "fetch_timeout": 10, "min_peers": n, "join_timeout": 60},
        "security": {"aggregator": "trimmed_mean", **({"attack": attack} if attack else {})},
        "net": {"swarm": "byz", "identity_path": str(workdir / f"n{i}" / "node.key"), "record_ttl": 4},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def flagged_peers(text: str) -> set[str]:
    return set(re.findall(r'^atoll_peer_flagged\{peer="([^"]+)"\} 1\.0$', text, re.M))


def test_sign_flipper_is_flagged_and_honest_nodes_still_learn(tmp_path):
    n = HONEST + 1
    nodes = []
    try:
        for i in range(n):
            cfg = node_config(tmp_path / f"n{i}.yaml", tmp_path, i, n, attack="sign_flip" if i == n - 1 else None)
            extra = ["--set", f"net.initial_peers={nodes[0].info['maddrs']}"] if nodes else []
            nodes.append(atoll_node(cfg, *extra, log=tmp_path / f"n{i}.log"))
            nodes[-1].ready(60)
        honest, attacker = nodes[:HONEST], nodes[-1]
        bad_id = attacker.info["peer_id"]
        for node in honest:  # "within a few rounds": flagged once round 3 is done, while the swarm still runs
            node.wait_event("round", 180, lambda e: e["round"] >= 3)
            text = metrics_text(node.info["metrics_port"])
            assert flagged_peers(text) == {bad_id}, text[-3000:]
            trust = re.search(rf'^atoll_peer_trust_ratio\{{peer="{bad_id}"\}} ([0-9.e+-]+)$', text, re.M)
            assert trust and float(trust.group(1)) < 0.35  # security.flag_below
            assert re.search(r"^atoll_peers_flagged 1\.0$", text, re.M)
        done = [node.wait_event("done", 240) for node in honest]
        assert all(d["accuracy"] >= 0.8 for d in done), [d["accuracy"] for d in done]
    finally:
        for node in nodes:
            node.stop()
