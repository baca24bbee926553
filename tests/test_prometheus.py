"""A real Prometheus server (Debian package prometheus) scrapes a 3-node loopback swarm
through the file_sd targets `atoll prometheus-targets` writes from the DHT, loads the alert
rules, and answers PromQL over its HTTP API with every node's accuracy and trust metrics."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from helpers import ROOT, atoll_node, kill_tree
from sysdeps import marks

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,  # about 40 s: `make test-all`
    *marks("prometheus"),
]
N = 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port, promql):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_swarm_through_file_sd(tmp_path):
    nodes, prom = [], None
    try:
        for i in range(N):
            cfg = {
                "node_index": i,
                "node_count": N,
                "checkpoint_dir": str(tmp_path / f"n{i}"),
                "metrics_port": 0,
                "model": {"family": "mlp", "width": 32},
                "train": {"rounds": 1000, "local_steps": 5},
                "comm": {"topology": "complete", "min_peers": N, "join_timeout": 60},
                "security": {"aggregator": "trimmed_mean"},
                "net": {"swarm": "prom", "identity_path": str(tmp_path / f"n{i}.key"), "record_ttl": 4},
            }
            (tmp_path / f"n{i}.yaml").write_text(yaml.safe_dump(cfg))
            extra = ["--set", f"net.initial_peers={nodes[0].info['maddrs']}"] if nodes else []
            nodes.append(atoll_node(tmp_path / f"n{i}.yaml", *extra, log=tmp_path / f"n{i}.log"))
            nodes[-1].ready(60)
        for n in nodes:  # trust metrics exist once a node has mixed; the swarm keeps training while scraped
            n.wait_event("round", 120, lambda e: e["round"] >= 1)

        sd = tmp_path / "targets.json"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "node.app.cli",
                "prometheus-targets",
                "--peers",
                nodes[0].info["maddrs"][0],
                "--swarm",
                "prom",
                "--out",
                str(sd),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        groups = json.loads(sd.read_text())
        assert sorted(g["labels"]["node"] for g in groups) == sorted(n.info["peer_id"] for n in nodes)
        assert sorted(g["targets"][0] for g in groups) == sorted(f"127.0.0.1:{n.info['metrics_port']}" for n in nodes)

        port = free_port()
        shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": ["alerts.yml"],
                    "scrape_configs": [
                        {"job_name": "atoll", "file_sd_configs": [{"files": [str(sd)], "refresh_interval": "5s"}]}
                    ],
                }
            )
        )
        prom = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "prometheus.log", "wb"),
            start_new_session=True,
        )
        peers = {n.info["peer_id"] for n in nodes}
        accuracy, trust = [], []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                accuracy = query(port, "atoll_test_accuracy_ratio")
                trust = query(port, "count by (peer) (atoll_peer_trust_ratio)")
            except OSError:  # not listening yet
                continue
            if len(accuracy) == N and {t["metric"]["peer"]: int(t["value"][1]) for t in trust} == dict.fromkeys(
                peers, N - 1
            ):
                break
        assert {a["metric"]["node"] for a in accuracy} == peers, (
            accuracy,
            (tmp_path / "prometheus.log").read_text()[-2000:],
        )
        assert all(0.0 <= float(a["value"][1]) <= 1.0 for a in accuracy)
        # every node scores the other two: each neighbour (peer) is seen by N - 1 scraped nodes (node)
        assert {t["metric"]["peer"]: int(t["value"][1]) for t in trust} == {p: N - 1 for p in peers}
        pairs = query(port, "atoll_peer_trust_ratio")
        assert {(t["metric"]["node"], t["metric"]["peer"]) for t in pairs} == {
            (a, b) for a in peers for b in peers if a != b
        }
        rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10).read())
        assert sum(len(g["rules"]) for g in rules["data"]["groups"]) >= 9  # the alert rules loaded
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(20)
            except subprocess.TimeoutExpired:
                pass
            kill_tree(prom.pid)
        for n in nodes:
            n.stop()
