"""The simulator: the daemons' round engine on virtual nodes, bytes counted as on the wire."""

import pytest
import torch

from node.app.bench import BENCH_NODE, baselines, merged, simulate
from node.config import NodeConfig, SwarmConfig
from node.protocol.sim import Simulation
from p2pd.client import SwarmClient
from p2pd.server import SnapshotStore, SwarmServer
from p2pd.tensors import SnapshotKey

SMALL = {"model": {"width": 16}, "train": {"rounds": 3, "local_steps": 3}, "data": {"alpha": 0.5}}


def small(nodes: int = 6, per_node=None, **sections) -> Simulation:
    tree = merged(merged(BENCH_NODE, SMALL), sections)
    return Simulation(SwarmConfig(nodes=nodes, node=NodeConfig.model_validate(tree), per_node=per_node or {}))


def test_byte_accounting_equals_the_real_transport():
    """One real fetch over gRPC on 127.0.0.1 counts exactly what the simulator counts."""
    sim = small()
    state = sim.workers[2].state()
    store = SnapshotStore()
    store.publish(SnapshotKey("model", 7, 2), state)
    server = SwarmServer(store)
    server.start()
    try:
        with SwarmClient(server.address) as c:
            c.fetch(SnapshotKey("model", 7, 2))
        assert server.servicer.stats["bytes_sent"] == sim.board.wire_bytes(SnapshotKey("model", 7, 2), state)
    finally:
        server.stop(0)


def test_gossip_preserves_the_average_and_counts_every_fetch():
    """One gossip step a round on a ring: Metropolis-Hastings mixing is doubly stochastic, so
    the average of the published (trained) models is the average after mixing."""
    sim = small(train={"rounds": 1})
    res = sim.run()
    published = [sim.board.snapshots[(p, SnapshotKey("model", 0, 0))]["1.weight"] for p in sim.ids]
    final = [sim.board.snapshots[(p, SnapshotKey("model", 1, 0))]["1.weight"] for p in sim.ids]
    assert torch.allclose(torch.stack(published).mean(0), torch.stack(final).mean(0), atol=1e-6)
    size = sim.board.wire_bytes(SnapshotKey("model", 0, 0), sim.workers[0].state())
    assert res.bytes_sent == 6 * 2 * size  # 6 nodes x 2 ring neighbours


def test_final_merge_and_fedavg_leave_identical_models():
    sim = small(comm={"final_merge": True})
    sim.run()
    digests = {sim.board.snapshots[(p, SnapshotKey("model", 4, 0))]["1.weight"].sum().item() for p in sim.ids}
    assert len(digests) == 1
    res = baselines.run("fedavg", 4, SMALL, seed=0)
    assert res.bytes_sent > 0 and len(set(res.final_accuracies)) == 1


def test_training_improves_for_every_protocol():
    more = {"train": {"rounds": 6, "local_steps": 10}}
    for extra in ({}, {"comm": {"algorithm": "modest", "modest_trainers": 3}}, {"comm": {"gossip_budget": 12}}):
        res = simulate(6, merged(merged(SMALL, more), extra), seed=0)
        assert len(res.log) == 6
        assert res.log[-1].accuracy_mean > max(0.2, res.log[0].accuracy_mean), (extra, res.log)
    centralized = baselines.run("centralized", 6, merged(SMALL, more), seed=0)
    assert centralized.final_accuracies[0] > max(0.3, centralized.log[0].accuracy_mean)


def test_per_node_configs_apply_to_each_virtual_node():
    sim = small(per_node={2: {"train.local_steps": 1}, 5: {"optim.name": "adam", "optim.weight_decay": 0.01}})
    assert [w.cfg.train.local_steps for w in sim.workers] == [3, 3, 1, 3, 3, 3]
    assert (
        type(sim.workers[5].optimizer).__name__ == "Adam" and sim.workers[5].optimizer.defaults["weight_decay"] == 0.01
    )
    assert type(sim.workers[0].optimizer).__name__ == "SGD"


def test_distillation_runs_on_mixed_architectures_with_few_bytes():
    arch = {0: {"model.family": "cnn", "model.width": 8}, 3: {"model.family": "cnn", "model.width": 8}}
    logits = {"comm": {"exchange": "logits", "topology": "complete"}, "distill": {"proxy_size": 100}}
    fd = small(nodes=4, per_node=arch, **logits)
    res = fd.run()
    assert {type(w.model[1]).__name__ for w in fd.workers} != {type(fd.workers[1].model[1]).__name__}
    gossip = small(nodes=4, comm={"topology": "complete"}, model={"width": 128}).run()
    assert 0 < res.bytes_sent < gossip.bytes_sent / 5  # logits on <= 100 proxy rows vs whole models
    assert res.refused == {}


def test_separate_swarms_never_mix():
    sim = small(nodes=4, per_node={i: {"net.swarm": "b"} for i in (1, 3)}, comm={"topology": "complete"})
    sim.run()
    assert sim.board.members(0, "b") and {m.peer_id for m in sim.board.members(0, "b")} == {"n0001", "n0003"}
    assert sorted(sim.workers[0].defence.tracker.signals) == ["n0002"]  # node 0 only ever saw node 2


def test_a_virtual_node_error_is_raised_not_hidden():
    sim = small(nodes=3)

    def broken(r, stop=None):
        raise KeyError("boom")

    sim.workers[1].train = broken
    with pytest.raises(KeyError):
        sim.run()


def test_a_diverging_virtual_node_leaves_as_a_daemon_would_and_is_counted():
    """A node whose loss keeps turning NaN stops (a daemon exits with Diverged); the others
    finish, and it is reported with the last good model it rolled back to."""
    from node.protocol.train import RoundStats

    sim = small(nodes=4, train={"rounds": 6})
    sim.workers[2].trainer.train_round = lambda *a, **kw: RoundStats(float("nan"), 1, 32, 0.01)
    res = sim.run()
    assert res.diverged == ["n0002"]
    assert len(res.final_accuracies) == 4 and all(0 <= a <= 1 for a in res.final_accuracies)
