"""What an operator sees of a node: its metrics pass promtool, the status table, the cores a local swarm shares."""

import re

import torch
from sysdeps import needs


@needs("prometheus")
def test_metrics_pass_promtool():
    import subprocess

    from prometheus_client import generate_latest

    from node.net.metrics import NodeMetrics

    m = NodeMetrics()
    m.watch(lambda: 123, lambda: {"bad_signature": 2, "expired": 1})
    m.fetch_failures.labels(reason="timeout").inc()
    m.fetch_seconds.labels(path="relay").observe(0.2)
    text = generate_latest(m.registry)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b'atoll_records_refused_total{reason="bad_signature"} 2.0' in text


def test_status_table_shows_reach_where_it_says_something():
    from rich.console import Console

    from node.app.console import status_table
    from p2pd.identity import Identity
    from p2pd.records import PeerRecord

    def rec(**kw):
        i = Identity.generate()
        return PeerRecord(peer_id=i.peer_id, grpc_address="127.0.0.1:5000", issued_at=1, expires_at=10, **kw)

    def text(records, width):
        c = Console(width=width, record=True)
        c.print(status_table(records, width))
        return c.export_text()

    direct, hidden = rec(), rec(reachability="outbound_only", carrier=Identity.generate().peer_id)
    assert "reach" not in text([direct], 80) and "reach" in text([direct], 160)
    out = text([direct, hidden], 160)
    assert "reach" in out and "pushed via" in out and "direct" in out
    busy = rec(utilization=0.873, samples_per_second=1234, round=1200, dataset_size=100000)
    for width in (80, 100, 160):  # every column shown is whole: only the peer id is shortened, on purpose
        out = text([busy, hidden], width)
        assert "87%" in out and "1200" in out and "1234" in out and "samples/s" in out, out
        assert not re.search(r"\S…", out), out  # a cell cut by the table ends in "…"; our shortenings start with it


def test_swarm_up_shares_the_cores_among_its_nodes(tmp_path, monkeypatch):
    """Each of N local nodes gets cores // N torch threads (at least 1) unless threads is set."""

    from node.app import swarm
    from node.config import load_swarm_config
    from node.net import threads

    monkeypatch.setattr(swarm, "usable_cores", lambda: 8)
    cfgs = swarm.node_configs(load_swarm_config(None, {}, 3), tmp_path)
    assert [c.threads for c in cfgs] == [2, 2, 2]
    pinned = swarm.node_configs(load_swarm_config(None, {"threads": 5}, 3), tmp_path)
    assert [c.threads for c in pinned] == [5, 5, 5]
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
