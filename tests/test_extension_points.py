"""Every extension point is a declared interface whose implementations are registered by name
in one place (node/registry.py; the codecs in p2pd/codecs.py): each registered name builds and
works, a name and its implementation cannot drift apart, and an unknown name is a config error
that lists the valid ones."""

from __future__ import annotations

import pytest
import torch

from node import registry
from node.algo.aggregate.base import Context
from node.algo.aggregate.robust import IMPLEMENTATIONS as AGGREGATORS
from node.algo.aggregate.robust import combine
from node.algo.comm.topology import IMPLEMENTATIONS as TOPOLOGIES
from node.algo.comm.topology import graph
from node.config import ConfigError, NodeConfig, SwarmConfig, load_config
from node.protocol.rounds import PROTOCOLS, RoundProtocol, Rounds
from node.protocol.sim import Simulation
from p2pd.codecs import CODECS


@pytest.mark.parametrize("name", registry.TOPOLOGIES)
def test_every_topology_gives_a_connected_symmetric_graph(name):
    peers = [f"p{i:02d}" for i in range(12)]
    g = graph(peers, name, round_=3, seed=1)
    assert set(g) == set(peers) and all(p not in g[p] for p in peers)
    assert all(q in g[p] for p in peers for q in g[p])  # undirected
    seen, todo = set(), [peers[0]]
    while todo:
        p = todo.pop()
        seen.add(p)
        todo += [q for q in g[p] if q not in seen]
    assert seen == set(peers), name  # one component: gossip reaches everyone


@pytest.mark.parametrize("name", registry.AGGREGATORS)
def test_every_aggregator_keeps_an_honest_consensus_and_reports_by_name(name):
    gen = torch.Generator().manual_seed(0)
    own = torch.ones(20)
    others = {f"h{i}": torch.ones(20) + 0.01 * torch.randn(20, generator=gen) for i in range(5)}
    weights = {j: 1 / 6 for j in others}
    ctx = Context(per_class_accuracy=lambda v: torch.ones(3), familiar=torch.ones(3, dtype=torch.bool), seed=0)
    out = combine(name, own, others, 1 / 6, weights, ctx)
    assert out.vector.shape == own.shape and torch.allclose(out.vector, own, atol=0.05), name
    assert set(out.discarded) <= set(others)
    assert name in AGGREGATORS


def test_names_and_implementations_cannot_drift_apart():
    assert set(TOPOLOGIES) == set(registry.TOPOLOGIES) and set(AGGREGATORS) == set(registry.AGGREGATORS)
    with pytest.raises(RuntimeError, match=r"names without implementation \['star'\]"):
        registry.check_registered("topology", TOPOLOGIES, (*registry.TOPOLOGIES, "star"))


@pytest.mark.parametrize("exchange, algorithm", sorted(PROTOCOLS))
def test_every_round_protocol_builds_and_runs_a_round_in_the_simulator(exchange, algorithm):
    tree = {"threads": 1, "model": {"width": 64}, "train": {"rounds": 4, "local_steps": 10}}
    tree["comm"] = {"exchange": exchange, "algorithm": algorithm}
    if algorithm == "modest":
        tree["comm"] |= {"modest_trainers": 2, "modest_aggregators": 2}
    if exchange == "logits":
        tree["distill"] = {"proxy_size": 50, "steps": 2}
    sim = Simulation(SwarmConfig(nodes=3, node=NodeConfig.model_validate(tree)))
    protocols = [engine.protocol for engine in sim.engines]
    assert all(isinstance(p, Rounds) and isinstance(p, RoundProtocol) for p in protocols)
    res = sim.run()
    assert len(res.final_accuracies) == 3 and res.bytes_sent > 0 and sum(res.refused.values()) == 0
    assert min(res.final_accuracies) > 0.2, res.final_accuracies  # chance: 0.1


@pytest.mark.parametrize(
    "setting, value",
    [
        ("comm.topology", "star"),
        ("security.aggregator", "average"),
        ("comm.exchange", "gradients"),
        ("comm.algorithm", "fedavg"),
        ("comm.codec", "zstd"),
        ("security.attack", "nuke"),
        ("distill.method", "magic"),
    ],
)
def test_an_unknown_name_is_a_config_error_listing_the_valid_ones(setting, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, {setting: value})
    message = str(e.value)
    assert setting in message and "Input should be" in message and "\n" not in message


@pytest.mark.parametrize("name", CODECS)
def test_every_codec_round_trips_within_its_error_and_counts_its_bytes(name):
    from p2pd.codecs import IMPLEMENTATIONS, Codec, decode, payload_bytes

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    codec = Codec(name, ratio=1.0, block=64)  # top-k keeping everything: exact up to fp16
    coded = codec.encode(x)
    assert coded.codec == name and coded.nbytes == payload_bytes(name, 1000, coded.block, coded.count)
    # 2-bit values: within a third of their chunk's scale s of one of the levels -s, -s/3, s/3, s
    atol = float(x.abs().max()) / 3 + 1e-6 if name == "topk2bit" else 0.02
    assert torch.allclose(decode(coded), x, atol=atol), name
    assert name in IMPLEMENTATIONS


@pytest.mark.parametrize("name", registry.ATTACKS)
def test_every_attack_crafts_a_finite_vector_unlike_the_honest_one(name):
    from node.algo.security.attacks import CRAFTERS, Attack

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=gen)
    trained = base + 0.1 * torch.randn(50, generator=gen)
    honest = [base + 0.1 * torch.randn(50, generator=gen) for _ in range(4)]
    init = torch.randn(50, generator=gen)
    out = Attack(name).craft(base, trained, init, honest, n=6, f=2, gen=torch.Generator().manual_seed(1))
    assert out.shape == trained.shape and out.dtype == trained.dtype and torch.isfinite(out).all()
    if name != "label_flip":  # label flipping poisons the training, then publishes honestly
        assert not torch.allclose(out, trained), name
    assert name in CRAFTERS


@pytest.mark.parametrize("method", registry.DISTILL_METHODS)
def test_every_distillation_method_runs_rounds_in_the_simulator(method):
    from node.algo.distill import METHODS

    tree = {"threads": 1, "model": {"width": 32}, "train": {"rounds": 2, "local_steps": 5}}
    tree |= {"comm": {"exchange": "logits"}, "distill": {"method": method, "proxy_size": 40, "steps": 2}}
    res = Simulation(SwarmConfig(nodes=3, node=NodeConfig.model_validate(tree))).run()
    assert len(res.final_accuracies) == 3 and res.bytes_sent > 0 and sum(res.refused.values()) == 0
    assert method in METHODS
