"""NodeConfig (everything one node runs with) and SwarmConfig (a local swarm for `atoll swarm up`), loaded from
YAML and overridden by `--set` flags; every failure is a ConfigError whose message is one line fit for a user."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from node.config.rules import check
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
    _Strict,
)


class NodeConfig(_Strict):
    """Everything one node runs with; the YAML file of `atoll node start` (see README)."""

    node_index: int = Field(0, ge=0, description="this node's data partition")
    node_count: int = Field(1, ge=1, description="number of partitions the data set is cut into")
    task: str | None = Field(
        None,
        max_length=1024,
        description="your own workload (node/task): module:attribute (the current folder searched first) or "
        "path/to/file.py:attribute (relative to the YAML that names it); default: image classification",
    )
    task_config: dict[str, Any] = Field(
        default_factory=dict, description="parameters handed to the task's function (with `task`)"
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch intra-op threads (default: the cores this process may use; "
        "`swarm up` shares them among the nodes it starts)",
    )
    checkpoint_dir: Path = Path("~/.atoll/checkpoints")
    checkpoint_rounds: int = Field(
        1,
        ge=1,
        le=1_000_000,
        description="rounds between checkpoints while training (always one at the end and at a stop); "
        "a crash loses at most this many rounds of the node's own work. 10 makes the demo's rounds about 10% faster",
    )
    checkpoint_keep: int = Field(
        2,
        ge=1,
        le=1000,
        description="checkpoints kept on disk: a resumed node that finds the newest one holding NaN/Inf falls back to "
        "the next older one",
    )
    checkpoint_give_up_rounds: int = Field(
        20,
        ge=1,
        le=1_000_000,
        description="a checkpoint write that fails (disk full, I/O error, permissions) is one line and retried at the "
        "next checkpoint while the node trains on; after this many rounds with no checkpoint written it exits (2)",
    )
    metrics_port: int | None = Field(0, ge=0, le=65535, description="0 = any free port, null = off")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    role: Literal["trainer", "expert", "router"] = Field(
        "trainer",
        description="trainer: gossip training; expert: train one diffusion expert in isolation and "
        "serve it; router: serve ensemble sampling over the live experts",
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    comm: CommConfig = CommConfig()
    distill: DistillConfig = DistillConfig()
    security: SecurityConfig = SecurityConfig()
    experts: ExpertsConfig = ExpertsConfig()
    net: NetConfig = NetConfig()

    @model_validator(mode="after")
    def _rules(self) -> NodeConfig:
        check(self)
        return self


class ConfigError(ValueError):
    """A configuration a user must fix; str() is one line."""


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'train.rounds=5' -> ('train.rounds', 5); the value is parsed as YAML (numbers, lists...)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return key.strip(), raw


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "invalid config: " + "; ".join(parts)


def _read_yaml(path: str | Path) -> dict:
    p = Path(path).expanduser()
    try:
        loaded = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config {p} must be a mapping at the top level")
    tree = loaded or {}
    sections = [tree, tree.get("node"), *(tree.get("per_node") or {}).values()]
    for section in sections:  # `task: ./my_task.py:task` means next to this file
        if isinstance(section, dict) and isinstance(section.get("task"), str):
            section["task"] = _anchored(section["task"], p.parent)
    return tree


def _anchored(ref: str, folder: Path) -> str:
    """A task file reference (`path.py:attr`) relative to `folder` made absolute; module
    references (`pkg.mod:attr`) unchanged."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not (target.endswith(".py") or "/" in target) or Path(target).is_absolute():
        return ref
    return f"{(folder / target).resolve()}:{attr}"


# The two local-work budgets exclude each other: a layer (file, per_node, --set) that sets one
# replaces the other, instead of failing until the user also nulls the first.
_BUDGETS = ("train.local_steps", "train.local_seconds")
SWARM_FIELDS = ("nodes", "timeout", "node", "per_node")


def apply_overrides(tree: dict, overrides: dict[str, Any]) -> None:
    """Set dotted `overrides` (e.g. {"comm.codec": "int8"}) in the config `tree` (a node section, nested dicts);
    setting one local-work budget clears the other. Raises ConfigError when a dotted key passes through a value."""
    for key, value in overrides.items():
        _set_path(tree, key, value)
    for mine, other in (_BUDGETS, _BUDGETS[::-1]):
        if overrides.get(mine) is not None and other not in overrides:
            _set_path(tree, other, None)


def is_swarm_file(tree: dict) -> bool:
    """A swarm file (for `atoll swarm up`) has `node:` / `nodes:` / `per_node:` at the top."""
    return any(k in tree for k in ("nodes", "node", "per_node"))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """YAML file (optional) + dotted overrides -> validated NodeConfig, or ConfigError.

    The file may also be a swarm file (see `SwarmConfig`): then its shared `node:` section is
    used, with `node_count` from its `nodes` and the `per_node` overrides of the node index
    that the overrides (or the section) name."""
    tree = _read_yaml(path) if path is not None else {}
    overrides = dict(overrides or {})
    if is_swarm_file(tree):
        tree = _node_tree_of_swarm_file(tree, overrides, path)
    apply_overrides(tree, overrides)
    return node_config(tree)


def node_config(tree: dict[str, Any]) -> NodeConfig:
    """A NodeConfig from nested fields; raises ConfigError with one line naming the field."""
    try:
        return NodeConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def _node_tree_of_swarm_file(tree: dict, overrides: dict[str, Any], path) -> dict:
    try:
        swarm = SwarmConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(
            f"{path} is a swarm file (for `atoll swarm up`; node commands use its node: section): "
            + _one_line(e).removeprefix("invalid config: ")
        ) from None
    index = overrides.get("node_index", swarm.node.node_index)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < swarm.nodes:
        raise ConfigError(
            f"node_index must be an integer in 0..{swarm.nodes - 1} for the swarm file {path} "
            f"(nodes: {swarm.nodes}), got {index!r}"
        )
    return swarm.config_for(index).model_dump(mode="json")


def dump_config(cfg: NodeConfig) -> str:
    """The config as YAML, in field order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


MAX_LOCAL_NODES = 64  # `atoll swarm up` processes on one machine; the simulator takes more


class SwarmConfig(_Strict):
    """A local swarm for `atoll swarm up`: how many nodes, the config they share, and optional
    per-node overrides (by node index, dotted keys), e.g. a different model width on node 3."""

    nodes: int = Field(4, ge=1, le=4096, description="nodes (at most MAX_LOCAL_NODES processes for `swarm up`)")
    timeout: float = Field(900.0, gt=0, description="give up on the swarm after this many seconds")
    node: NodeConfig = NodeConfig()
    per_node: dict[int, dict[str, Any]] = {}

    def config_for(self, index: int) -> NodeConfig:
        """The shared config with this node's overrides, index and count applied."""
        tree = self.node.model_dump(mode="json")
        apply_overrides(tree, self.per_node.get(index, {}))
        tree["node_index"], tree["node_count"] = index, self.nodes
        try:
            return NodeConfig.model_validate(tree)
        except ValidationError as e:
            raise ConfigError(f"per_node[{index}]: " + _one_line(e)) from None


def load_swarm_config(
    path: str | Path | None = None, node_overrides: dict[str, Any] | None = None, nodes: int | None = None
) -> SwarmConfig:
    """Swarm YAML (optional) + dotted overrides of the shared node config -> SwarmConfig.
    A node file (no `node:` section) is taken as the config every node shares."""
    tree = _read_yaml(path) if path is not None else {}
    if tree and not is_swarm_file(tree):
        tree = {"node": tree}
    node_tree = tree.setdefault("node", {}) or {}
    tree["node"] = node_tree
    apply_overrides(node_tree, node_overrides or {})
    if nodes is not None:
        tree["nodes"] = nodes
    try:
        cfg = SwarmConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    if cfg.nodes > MAX_LOCAL_NODES:
        raise ConfigError(f"invalid config: nodes: at most {MAX_LOCAL_NODES} node processes on one machine")
    bad = [i for i in cfg.per_node if not 0 <= i < cfg.nodes]
    if bad:
        raise ConfigError(f"invalid config: per_node names nodes {bad} outside 0..{cfg.nodes - 1}")
    for i in range(cfg.nodes):
        cfg.config_for(i)  # every node's config must be valid before anything starts
    return cfg
