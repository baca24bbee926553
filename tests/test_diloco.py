"""DiLoCo-class rounds (node/algo/diloco.py, node/protocol/rounds/diloco.py): the outer step is torch's Nesterov
SGD on the pseudo-gradient, with lr 1 and no momentum it is plain gossip after H local steps, and DiLoCo's outer
momentum trains a non-IID swarm further than gossip at the same bytes. (Daemons equal the simulator bit for bit:
tests/test_engine.py.)"""

import pytest
import torch

from node.algo.diloco import outer_step, pseudo_gradient
from node.config import ConfigError, NodeConfig, SwarmConfig, load_config
from node.protocol.sim import Simulation


def test_the_outer_step_is_torchs_nesterov_sgd_on_the_pseudo_gradient():
    gen = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(5, 3, generator=gen), "n": torch.tensor(7)}
    afters = [{"w": start["w"] - 0.1 * torch.randn(5, 3, generator=gen), "n": torch.tensor(9)} for _ in range(3)]
    p = torch.nn.Parameter(start["w"].clone())
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    theta, buf = start, None
    for after in afters:  # three outer steps, each from the parameters the last one left
        p.grad = pseudo_gradient(theta, after)["w"]
        sgd.step()
        theta, buf = outer_step(theta, after, buf, 0.7, 0.9)
        assert torch.allclose(theta["w"], p.detach(), atol=1e-6)
    assert theta["n"] == 9  # what does not train is taken from the average


def test_lr_one_without_momentum_is_gossip_and_diloco_trains_further():
    def run(**comm):
        tree = {"threads": 1, "model": {"width": 64}, "train": {"rounds": 8, "local_steps": 20}, "comm": comm}
        tree["data"] = {"alpha": 0.3}
        return Simulation(SwarmConfig(nodes=4, node=NodeConfig.model_validate(tree))).run()

    gossip = run()
    plain = run(algorithm="diloco", outer_lr=1.0, outer_momentum=0.0)
    diloco = run(algorithm="diloco")
    assert plain.final_accuracies == pytest.approx(gossip.final_accuracies, abs=1e-9)
    assert plain.bytes_sent == gossip.bytes_sent == diloco.bytes_sent
    assert min(diloco.final_accuracies) > min(gossip.final_accuracies) + 0.02, (diloco, gossip)


@pytest.mark.parametrize(
    "sets, words",
    [
        ({"comm.algorithm": "diloco", "comm.exchange": "logits"}, "comm.exchange: logits"),
        ({"comm.algorithm": "diloco", "comm.schedule": "late"}, "comm.schedule: late"),
        ({"comm.algorithm": "diloco", "comm.outer_momentum": 1.0}, "comm.outer_momentum"),
    ],
)
def test_settings_diloco_cannot_use_are_one_clear_error(sets, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, sets)
