"""Node configuration: typed, nested, loaded from YAML and overridden by CLI flags.

- sections.py: one model per section (data, model, optim, train, comm, distill, security, experts, net) with the rules
  that concern it alone;
- rules.py: the rules across sections, each a named function;
- node.py: NodeConfig, SwarmConfig and loading (`load_config`, `load_swarm_config`, `parse_override`).

Every model forbids unknown fields, so a typo in a YAML file or a `--set` flag is an error naming the field, not a
silently ignored setting; every failure is a `ConfigError` whose message is one line fit for a user. The lists of
names (topologies, aggregators, attacks, exchanges, codecs) come from node/registry.py and p2pd/codecs.py.
"""

from node.config.node import (
    MAX_LOCAL_NODES,
    SWARM_FIELDS,
    ConfigError,
    NodeConfig,
    SwarmConfig,
    apply_overrides,
    dump_config,
    is_swarm_file,
    load_config,
    load_swarm_config,
    node_config,
    parse_override,
)
from node.config.sections import (
    CommConfig,
    DataConfig,
    DistillConfig,
    ExpertsConfig,
    ModelConfig,
    NetConfig,
    OptimConfig,
    SecurityConfig,
    TrainConfig,
)

__all__ = [
    "MAX_LOCAL_NODES",
    "SWARM_FIELDS",
    "CommConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "ExpertsConfig",
    "ModelConfig",
    "NetConfig",
    "NodeConfig",
    "OptimConfig",
    "SecurityConfig",
    "SwarmConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_config",
    "is_swarm_file",
    "load_config",
    "load_swarm_config",
    "node_config",
    "parse_override",
]
