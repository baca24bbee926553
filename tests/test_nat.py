"""Nodes behind NAT: a node that cannot be dialled still contributes to every round.

On loopback (always): a node whose advertised address nobody can dial is found `relayed` by
its reachability check and fetched over libp2p; with the libp2p path off it is found
`outbound_only`, pushes its snapshots to a carrier and is fetched from there.

Behind a real NAT (tests/netns.py: two public hosts and one host behind a MASQUERADE router,
no port forwarding; skipped with the reason where namespaces or iptables are missing): the same
two cases with one `atoll node start` daemon per host. Each node's events say which path every
fetched snapshot took (`paths`: direct, relay, pushed).
"""

from __future__ import annotations

import sys

import pytest
import yaml
from helpers import ATOLL_NODE, NodeProcess, atoll_node
from netns import nat_topology, unavailable

pytestmark = pytest.mark.integration

ROUNDS = 6


def _config(tmp_path, name: str, index: int, swarm: str, host: str, **net) -> str:
    cfg = {
        "node_index": index,
        "node_count": 3,
        "checkpoint_dir": str(tmp_path / name / "ck"),
        "metrics_port": None,
        "train": {"rounds": ROUNDS, "local_steps": 5},
        "comm": {"fetch_timeout": 30},
        "net": {
            "swarm": swarm,
            "identity_path": str(tmp_path / f"{name}.key"),
            "record_ttl": 6,
            "host": host,
            "dht_listen": [f"/ip4/{host}/tcp/0"],
            **net,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _run_three(start, tmp_path) -> dict[str, dict]:
    """Start pub1, then pub2 and the hidden node through it; every node's done event by name."""
    nodes = {}
    try:
        nodes["pub1"] = start("pub1")
        boot = nodes["pub1"].ready(90)["maddrs"]
        nodes["pub2"] = start("pub2", boot[0])
        nodes["hidden"] = start("hidden", boot[0])
        for n in (nodes["pub2"], nodes["hidden"]):
            n.ready(90)
        done = {name: n.wait_event("done", 240) for name, n in nodes.items()}
        for name, n in nodes.items():
            rounds = [e for e in n.seen if e.get("event") == "round"]
            assert len(rounds) == ROUNDS and done[name]["round"] == ROUNDS, name
            # every node mixed both others in every round after the first (round 0 may start
            # before the hidden node's reachability reached the others' view of the DHT)
            assert all(e["mixed"] == 2 for e in rounds[1:]), (name, [e["mixed"] for e in rounds])
        return done
    except BaseException:
        for name in nodes:
            log = tmp_path / f"{name}.log"
            if log.exists():
                sys.stderr.write(f"--- {name} ---\n{log.read_text()[-4000:]}\n")
        raise
    finally:
        for n in nodes.values():
            n.stop()


def _check_paths(done: dict[str, dict], hidden_path: str) -> None:
    for name, e in done.items():  # which path each node's fetches took (pytest -s shows it)
        print(f"{name}: {e['reachability']}, fetched {e['paths']}, carried for {len(e['carried_for'])} peer(s)")
    hidden_state = {"relay": "relayed", "pushed": "outbound_only"}[hidden_path]
    assert done["hidden"]["reachability"] == hidden_state
    assert done["pub1"]["reachability"] == done["pub2"]["reachability"] == "direct"
    # the hidden node fetches both public nodes directly (outbound connections pass the NAT)
    assert set(done["hidden"]["paths"]) == {"direct"}, done["hidden"]["paths"]
    for pub in ("pub1", "pub2"):
        paths = done[pub]["paths"]
        # the other public node directly; the hidden one by its path, at least once a round
        assert set(paths) == {"direct", hidden_path} and paths[hidden_path] >= ROUNDS - 1, (pub, paths)
    if hidden_path == "pushed":
        carriers = [name for name in ("pub1", "pub2") if done[name]["carried_for"]]
        assert carriers and done[carriers[0]]["carried_for"] == [done["hidden"]["peer_id"]]
        assert done["hidden"]["pushed_bytes"] > 0


@pytest.mark.slow  # the NAT test below covers the same paths where namespaces can be built
@pytest.mark.parametrize("hidden_path", ["relay", "pushed"])
def test_an_undialable_node_on_loopback_is_fetched_by_its_path(tmp_path, hidden_path):
    """The hidden node advertises 127.0.0.2 while it listens on 127.0.0.1 only."""
    relay = hidden_path == "relay"

    def start(name: str, *boot: str) -> NodeProcess:
        index = {"pub1": 0, "pub2": 1, "hidden": 2}[name]
        net = dict(advertise_host="127.0.0.2", relay=relay) if name == "hidden" else {}
        cfg = _config(tmp_path, name, index, f"loop{hidden_path}", "127.0.0.1", **net)
        return atoll_node(cfg, *(("-p", boot[0]) if boot else ()), log=tmp_path / f"{name}.log")

    _check_paths(_run_three(start, tmp_path), hidden_path)


@pytest.mark.skipif(unavailable() is not None, reason=f"no NAT namespaces here: {unavailable()}")
@pytest.mark.parametrize("hidden_path", ["relay", "pushed"])
def test_a_node_behind_nat_trains_with_two_public_nodes(tmp_path, hidden_path):
    """pub1 and pub2 on the public LAN, the hidden node behind the MASQUERADE router; with
    `pushed` the hidden node has the libp2p path off (net.relay false: no relay, no libp2p
    serving), so only its outbound gRPC connections are left to it."""
    relay = hidden_path == "relay"
    with nat_topology("n" + hidden_path[0]) as topo:
        host = {"pub1": "pub1", "pub2": "pub2", "hidden": "priv"}

        def start(name: str, *boot: str) -> NodeProcess:
            index = {"pub1": 0, "pub2": 1, "hidden": 2}[name]
            net = {"relay": relay} if name == "hidden" else {}
            cfg = _config(tmp_path, name, index, f"nat{hidden_path}", topo.hosts[host[name]], **net)
            argv = ["ip", "netns", "exec", topo.ns(host[name]), *ATOLL_NODE, "--config", cfg]
            if boot:
                argv += ["-p", boot[0]]
            return NodeProcess(command=argv, stderr_path=tmp_path / f"{name}.log")

        done = _run_three(start, tmp_path)
    _check_paths(done, hidden_path)
