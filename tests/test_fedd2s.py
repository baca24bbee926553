"""FedD2S (node/algo/distill/fedd2s.py): deep-to-shallow layer dropping keeps the deeper layers
personal, and nodes report accuracy on their own held-out distribution."""

import torch

from node.algo import distill
from node.config import NodeConfig, SwarmConfig
from node.protocol.models import build_model
from node.protocol.rounds.distill import DistillRounds
from node.protocol.sim import Simulation


def test_layers_drop_deepest_first_and_never_the_first():
    model = build_model("mlp", (64,), 10, 32)
    ls = distill.layers(model)
    assert len(ls) == 3 and ls[0] is model[1] and ls[-1] is model[5]
    assert distill.dropped_layers(model, 0, 0.1) == []
    assert distill.dropped_layers(model, 10, 0.1) == [model[5]]
    assert distill.dropped_layers(model, 100, 0.1) == [model[3], model[5]]  # the first always learns
    assert distill.dropped_layers(model, 100, 0.0) == []


def test_dropped_layers_stay_personal_while_shallow_ones_learn_from_the_neighbours():
    """One simulated FedD2S run at a rate that drops the last layer from round 1 on: from then,
    each round's distillation leaves the last layer exactly as local training made it while the
    first layer learns; every node reports its own-distribution accuracy beside the global one."""
    tree = {
        "comm": {"exchange": "logits", "topology": "ring"},
        "distill": {"method": "fedd2s", "drop_rate": 1.0, "steps": 5},
        "data": {"personal_holdout": 0.2},
        "train": {"rounds": 3, "local_steps": 5},
        "threads": 1,
    }
    sim = Simulation(SwarmConfig(nodes=3, node=NodeConfig.model_validate(tree)))
    assert all(isinstance(e.protocol, DistillRounds) for e in sim.engines)
    calls: dict[int, list[tuple[bool, bool]]] = {}  # model -> (last layer kept, first kept), per round
    original = distill.distill_steps

    def spy(model, *args, **kw):
        first, last = distill.layers(model)[0].weight, distill.layers(model)[-1].weight
        before_first, before_last = first.detach().clone(), last.detach().clone()
        loss = original(model, *args, **kw)
        calls.setdefault(id(model), []).append((torch.equal(last, before_last), torch.equal(first, before_first)))
        return loss

    distill.distill_steps = spy
    try:
        res = sim.run()
    finally:
        distill.distill_steps = original
    assert len(calls) == 3
    for rounds in calls.values():
        assert not rounds[0][0]  # round 0: nothing dropped yet, the last layer distils too
        assert all(last_kept and not first_kept for last_kept, first_kept in rounds[1:])
    assert all(0 <= m["own_accuracy"] <= 1 and "accuracy" in m for m in res.final_metrics)
    assert all(p.requires_grad for w in sim.workers for p in w.model.parameters())  # restored
