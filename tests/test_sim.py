"""The simulator: same algorithm functions as the daemon, bytes counted as on the wire."""

import pytest
import torch

from node.sim import SimConfig, Simulation
from p2pd.client import SwarmClient
from p2pd.server import SnapshotStore, SwarmServer
from p2pd.tensors import SnapshotKey


def small(**kw):
    base = dict(nodes=6, rounds=3, local_steps=3, width=16, alpha=0.5)
    base.update(kw)
    return SimConfig(**base)


def test_byte_accounting_equals_the_real_transport():
    """One real fetch over gRPC on 127.0.0.1 counts exactly what the simulator counts."""
    sim = Simulation(small())
    state = sim._state(2)
    store = SnapshotStore()
    store.publish(SnapshotKey("model", 7, 2), state)
    server = SwarmServer(store)
    server.start()
    try:
        with SwarmClient(server.address) as c:
            c.fetch(SnapshotKey("model", 7, 2))
        assert server.servicer.stats["bytes_sent"] == sim.wire_bytes(state, 7, 2)
    finally:
        server.stop(0)


def test_gossip_step_preserves_the_average_and_counts_every_fetch():
    sim = Simulation(small(topology="ring"))
    for i in range(sim.cfg.nodes):
        sim._train(i, 0)
    before = torch.stack([sim._state(i)["1.weight"] for i in range(6)]).mean(0)
    sim._gossip_step(0, 0, list(range(6)))
    after = torch.stack([sim._state(i)["1.weight"] for i in range(6)]).mean(0)
    assert torch.allclose(before, after, atol=1e-6)
    assert sim.bytes_sent == 6 * 2 * sim.wire_bytes(sim._state(0), 0, 0)  # 6 nodes x 2 ring neighbours


def test_fedavg_and_final_merge_leave_identical_models():
    for cfg in (small(method="fedavg"), small(method="gossip", final_merge=True)):
        sim = Simulation(cfg)
        sim.run()
        ref = sim._state(0)
        assert all(torch.equal(sim._state(i)[k], ref[k]) for i in range(6) for k in ref)


def test_unresponsive_nodes_are_a_deterministic_fraction():
    sim = Simulation(small(unresponsive=0.5))
    assert len(sim.responsive(3)) == 3 and sim.responsive(3) == sim.responsive(3)
    assert sim.responsive(3) != sim.responsive(4) or sim.responsive(4) != sim.responsive(5)


def test_training_improves_and_methods_run():
    for method in ("gossip", "fedavg", "centralized", "modest"):
        res = Simulation(small(method=method, rounds=6, local_steps=10)).run()
        assert len(res.log) == 6
        assert res.log[-1].accuracy_mean > max(0.2, res.log[0].accuracy_mean), (method, res.log)
    with pytest.raises(ValueError):
        Simulation(small(method="swarmavg"))


def test_per_node_speed_scales_local_steps():
    sim = Simulation(small(speeds=[1.0, 0.5, 0.1, 1.0, 1.0, 2.0], local_steps=10))
    done = {}
    for i, t in enumerate(sim.trainers):
        orig = t.train_round
        t.train_round = lambda r, steps=None, _o=orig, _i=i, **kw: (
            done.setdefault(_i, steps) and _o(r, steps=steps, **kw)
        )
    sim.run_round(0)
    assert done == {0: 10, 1: 5, 2: 1, 3: 10, 4: 10, 5: 20}


def test_distillation_methods_run_on_mixed_architectures_with_few_bytes():
    arch = ["mlp:128", "cnn:8"]
    fd = Simulation(small(method="edgefd", architectures=arch, rounds=3, topology="complete", proxy_size=100))
    res = fd.run()
    assert len({type(m[1]).__name__ for m in fd.models}) == 2  # two architectures in one swarm
    gossip = Simulation(small(rounds=3, topology="complete", width=128)).run()  # the MLP alone, gossiped
    assert 0 < res.bytes_sent < gossip.bytes_sent / 5  # logits on <= 100 proxy rows vs whole models
    assert not set(fd.proxy_idx.tolist()) & {int(i) for p in fd.parts for i in p}  # proxy is nobody's data
    assert Simulation(small(method="knfu", architectures=arch, rounds=2, proxy_size=100)).run().log
