"""Three "hosts" as network namespaces joined by veth links to a bridge, all created (and
removed) by this test, one node each; the slow host's link is throttled with tc tbf. The swarm
forms across them and trains, and the slow host does not stall the others: the fast nodes go on
without its snapshot when it misses the fetch deadline. Skipped with the reason where namespaces
cannot be made."""

import os
import subprocess
import sys

import pytest
import yaml
from helpers import NodeProcess
from sysdeps import missing

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # about 45 s: `make test-all`
HOSTS = ("a", "b", "c")  # c is the slow one
ROUNDS, FETCH_TIMEOUT = 8, 2.0
SUBNET = "10.231.0"  # exists only inside this test's namespaces


def sh(*cmd, ns=None):
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {r.stderr.strip()}")


def namespaces_possible() -> str | None:
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    reason = missing("iproute2")
    if reason:
        return reason
    probe = f"atoll-probe-{os.getpid()}"
    try:
        sh("ip", "netns", "add", probe)
    except (RuntimeError, OSError) as e:
        return f"cannot create a network namespace here: {e}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@pytest.fixture
def hosts():
    why = namespaces_possible()
    if why:
        pytest.skip(why)
    tag = str(os.getpid() % 100000)
    hub, made = f"atoll-{tag}-hub", []
    try:
        sh("ip", "netns", "add", hub)
        made.append(hub)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=hub)
        sh("ip", "link", "set", "br0", "up", ns=hub)
        addrs = {}
        for i, h in enumerate(HOSTS, start=1):
            ns, outer, inner = f"atoll-{tag}-{h}", f"h{tag}{h}", f"n{tag}{h}"
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", outer, "netns", hub)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", "br0", ns=hub)
            sh("ip", "link", "set", outer, "up", ns=hub)
            sh("ip", "addr", "add", f"{SUBNET}.{i}/24", "dev", inner, ns=ns)
            sh("ip", "link", "set", inner, "up", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            addrs[h] = (ns, f"{SUBNET}.{i}", inner)
        ns, _, dev = addrs["c"]
        # the slow host sends at 200 kbit/s: one ~105 KB model takes about 4 s, past the 2 s fetch deadline
        sh(
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            "200kbit",
            "burst",
            "16kbit",
            "latency",
            "500ms",
            ns=ns,
        )
        yield addrs
    finally:
        for ns in reversed(made):  # deleting a namespace removes its veth end, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def start(tmp_path, addrs, h, i, initial=None):
    ns, ip, _ = addrs[h]
    cfg = {
        "node_index": i,
        "node_count": len(HOSTS),
        "checkpoint_dir": str(tmp_path / h),
        "metrics_port": None,
        "train": {"rounds": ROUNDS, "local_steps": 10},
        "comm": {"topology": "complete", "fetch_timeout": FETCH_TIMEOUT, "min_peers": len(HOSTS), "join_timeout": 90},
        "net": {
            "swarm": "hosts",
            "host": ip,
            "dht_listen": [f"/ip4/{ip}/tcp/0"],
            "record_ttl": 6,
            "identity_path": str(tmp_path / f"{h}.key"),
            "initial_peers": [initial] if initial else [],
        },
    }
    (tmp_path / f"{h}.yaml").write_text(yaml.safe_dump(cfg))
    return NodeProcess(
        "--config",
        str(tmp_path / f"{h}.yaml"),
        "--json-events",
        command=["ip", "netns", "exec", ns, sys.executable, "-m", "node.app.cli", "node", "start"],
        stderr_path=tmp_path / f"{h}.log",
    )


def test_swarm_across_namespaces_with_a_throttled_host(hosts, tmp_path):
    nodes = {}
    try:
        nodes["a"] = start(tmp_path, hosts, "a", 0)
        boot = nodes["a"].ready(90)["maddrs"][0]
        assert boot.startswith(f"/ip4/{SUBNET}.1/")
        for i, h in enumerate(HOSTS[1:], start=1):
            nodes[h] = start(tmp_path, hosts, h, i, boot)
        for h in HOSTS[1:]:
            nodes[h].ready(90)
        done = {h: nodes[h].wait_event("done", 300) for h in HOSTS}
        rounds = {h: [e for e in nodes[h].seen if e.get("event") == "round"] for h in HOSTS}
        assert all(done[h]["round"] == ROUNDS for h in HOSTS)
        assert all(max(e["peers"] for e in rounds[h]) == len(HOSTS) for h in HOSTS)  # formed across hosts
        for h in ("a", "b"):
            assert max(e["mixed"] for e in rounds[h]) >= 1  # the fast hosts mix with each other
        # not stalled: the fast hosts finish every round, and in some of them they went on without the slow
        # host's snapshot (dropped at the fetch deadline) instead of waiting for it. Round durations are
        # printed, not asserted: on a shared 2-core machine a time bound only measures the neighbours' load
        fast_skips = sum(e["mixed"] < 2 for h in ("a", "b") for e in rounds[h])
        assert fast_skips > 0, "the throttle never bit: the test would prove nothing"
        for h in HOSTS:
            print(f"host {h}: round seconds {[e['seconds'] for e in rounds[h]]}")
        assert all(done[h]["accuracy"] > 0.5 for h in HOSTS)
    finally:
        for n in nodes.values():
            n.stop()
