"""The node's configuration: YAML then --set, one-line errors naming the field, swarm files and per-
node overrides, the registered names."""

import pytest

from node.config import ConfigError, load_config, parse_override


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  rounds: 7\ndata:\n  alpha: 0.1\n")
    cfg = load_config(
        p, dict([parse_override("train.rounds=9"), parse_override("net.initial_peers=[/ip4/1.2.3.4/tcp/1]")])
    )
    assert cfg.train.rounds == 9 and cfg.data.alpha == 0.1 and cfg.net.initial_peers == ["/ip4/1.2.3.4/tcp/1"]


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"train.rounds": 0}, "train.rounds"),
        ({"optim.lr": "fast"}, "optim.lr"),
        ({"data.partition": "random"}, "data.partition"),
        ({"trian.rounds": 3}, "trian"),
        ({"node_index": 4, "node_count": 4}, "node_index"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_name_the_field_in_one_line(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_unreadable_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_swarm_config_per_node_overrides(tmp_path):
    from node.config import load_swarm_config

    p = tmp_path / "s.yaml"
    p.write_text("nodes: 3\nnode:\n  train: {rounds: 5}\nper_node:\n  2: {model.width: 32, optim.lr: 0.01}\n")
    s = load_swarm_config(p, {"data.alpha": 0.2})
    c0, c2 = s.config_for(0), s.config_for(2)
    assert (c0.node_index, c0.node_count, c0.model.width, c0.train.rounds, c0.data.alpha) == (0, 3, 128, 5, 0.2)
    assert (c2.node_index, c2.model.width, c2.optim.lr) == (2, 32, 0.01)
    assert load_swarm_config(p, nodes=5).nodes == 5
    p.write_text("nodes: 2\nper_node:\n  1: {model.family: transformer}\n")
    with pytest.raises(ConfigError, match=r"per_node\[1\].*model.family"):
        load_swarm_config(p)


def test_example_swarm_config_is_valid():
    from helpers import ROOT

    from node.config import load_swarm_config

    s = load_swarm_config(ROOT / "examples" / "swarm4.yaml")
    assert s.nodes == 4 and s.node.data.dataset == "digits" and s.node.data.alpha == 0.5


def test_the_config_accepts_exactly_the_registered_topologies():
    """One list of topology names (node.algo.comm.topology.KINDS); the config's choices are that list."""
    import typing

    from node.algo.comm.topology import KINDS
    from node.config import CommConfig

    assert typing.get_args(CommConfig.model_fields["topology"].annotation) == KINDS
