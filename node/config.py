"""Node configuration: typed, nested, loaded from YAML and overridden by CLI flags.

Every model forbids unknown fields, so a typo in a YAML file or a `--set` flag is an error
naming the field, not a silently ignored setting. `load_config` turns every failure into a
`ConfigError` whose message is one line fit for a user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from node import registry
from p2pd.addresses import check_maddr


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false are not numbers: `train.rounds: true` is a mistake, not 1 round."""
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool and bool not in get_args(annotation):
                raise ValueError(f"expected {getattr(annotation, '__name__', annotation)}, got {value}")
        return value


class DataConfig(_Strict):
    """Which data set a node trains on and how it is partitioned among the nodes."""

    dataset: Literal["digits", "fashion-mnist"] = "digits"
    path: Path | None = Field(
        None,
        description="where the data set's files are, if not the default: the folder of the Fashion-MNIST IDX "
        "files, or the digits.csv.gz table for digits",
    )
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skewed)")
    shards_per_node: int = Field(2, ge=1)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    personal_holdout: float = Field(
        0.0,
        ge=0,
        lt=0.9,
        description="share of each node's partition held out to measure accuracy on its own distribution "
        "(the metric own_accuracy)",
    )
    seed: int = 0


class ModelConfig(_Strict):
    """The model every node builds (one architecture per swarm unless comm.exchange is logits)."""

    family: Literal["mlp", "cnn"] = "mlp"
    width: int = Field(128, ge=4, le=8192)
    seed: int | None = Field(
        None, description="initialisation seed (default: train.seed, one shared init for the swarm)"
    )


class OptimConfig(_Strict):
    """The local optimizer and its step size schedule over the rounds."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(
        0.05,
        gt=0,
        le=1,
        description="step size; 1 is already past what SGD with momentum or Adam train with (a node that diverges "
        "anyway is clipped by its neighbours, node/protocol/defence.py)",
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1, le=65536)
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate over the rounds")
    sam_rho: float = Field(0.0, ge=0, le=1, description="> 0: SAM local steps (DFedSAM), rho about 0.01")
    final_lr_fraction: float = Field(0.05, ge=0, le=1, description="cosine: lr in the last round, as a fraction")


class TrainConfig(_Strict):
    """Rounds and the local work per round (steps or seconds)."""

    rounds: int = Field(50, ge=1, le=1_000_000)
    local_steps: int | None = Field(10, ge=1, description="local SGD steps per round")
    local_seconds: float | None = Field(None, gt=0, description="or: a time budget per round")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA where supported, float32 elsewhere; snapshots stay float32"
    )
    loader_workers: int = Field(
        0, ge=0, le=64, description="DataLoader worker processes for a task's own Dataset (0: in the node process)"
    )

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if (self.local_steps is None) == (self.local_seconds is None):
            raise ValueError("set exactly one of local_steps and local_seconds")
        return self


class CommConfig(_Strict):
    """How nodes exchange: what, over which graph, under which schedule, with which timeouts."""

    exchange: Literal[registry.EXCHANGES] = Field(
        "model",
        description="model: gossip parameters (one architecture); logits: distill on a proxy set (any mix); "
        "ranks: FRL, vote on edge rankings of a shared random network",
    )
    topology: Literal[registry.TOPOLOGIES] = "ring"
    random_degree: int = Field(4, ge=2, le=64, description="topology random: degree bound k")
    algorithm: Literal[registry.ALGORITHMS] = Field("gossip", description="gossip averaging, or MoDeST sampling")
    modest_trainers: int = Field(4, ge=1, description="modest: nodes sampled to train each round")
    modest_aggregators: int = Field(2, ge=1, description="modest: nodes sampled to aggregate each round")
    schedule: Literal["constant", "late"] = Field(
        "constant", description="how the gossip budget is spread over rounds"
    )
    gossip_budget: int | None = Field(
        None, ge=0, description="gossip steps over the whole run (default: one per round)"
    )
    late_shape: float = Field(3.0, ge=0, description="late schedule: round r gets a share ~ ((r+1)/R)^shape")
    final_merge: bool = Field(
        False, description="after the last round, one exact all-reduce average of all live nodes"
    )
    merge: Literal["mean", "variance_corrected"] = Field(
        "mean", description="final merge: plain or variance-corrected mean"
    )
    mix_variance_correction: bool = Field(False, description="variance-corrected gossip averaging at every step")
    merge_timeout: float = Field(
        60.0, gt=0, description="seconds for the final merge before a node keeps its own model"
    )
    keep_snapshots: int = Field(
        8,
        ge=1,
        le=32,
        description="published snapshots kept for slower neighbours "
        "(each one's digest is signed into the peer record, hence the cap)",
    )
    fetch_timeout: float = Field(20.0, gt=0, le=600, description="seconds to wait for a neighbour's snapshot")
    codec: Literal["none", "fp16", "bf16", "int8", "topk"] = Field(
        "none", description="how gossiped models travel: raw float32, fp16, bf16, int8 (blockwise absmax) or topk"
    )
    topk_ratio: float = Field(0.01, gt=0, le=1, description="codec topk: share of each tensor's values sent")
    int8_block: int = Field(256, ge=16, le=1 << 20, description="codec int8: values per float32 scale")
    error_feedback: bool = Field(
        False, description="send the coded difference from an estimate both sides hold (CHOCO-SGD), not the model"
    )
    rank_keep: float = Field(
        0.5, gt=0, le=1, description="exchange ranks (FRL): share of each layer's edges the supermask keeps"
    )
    consensus_step: float | None = Field(
        None, gt=0, le=1, description="CHOCO-SGD step size gamma (default: 1; topk: 0.25 + 5 x topk_ratio, at most 1)"
    )
    min_peers: int | None = Field(
        None,
        ge=1,
        description="live nodes (self included) to wait for before round 0 (default: node_count, on a fresh start)",
    )
    join_timeout: float = Field(60.0, gt=0)


class DistillConfig(_Strict):
    """Federated distillation, used when comm.exchange is logits (see node/algo/distill/)."""

    method: Literal[registry.DISTILL_METHODS] = Field(
        "edgefd", description="edgefd: speak only for in-distribution proxy rows; knfu: weight similar neighbours more"
    )
    proxy_size: int = Field(
        300, ge=10, le=100_000, description="unlabeled proxy samples taken out of the training split"
    )
    steps: int = Field(20, ge=1, le=10_000, description="distillation steps per round on the proxy set")
    temperature: float = Field(1.0, gt=0, le=20)
    knfu_beta: float = Field(10.0, ge=0, le=1000, description="knfu: softmax sharpness over neighbour similarity")
    lr: float | None = Field(None, gt=0, le=10, description="distillation step size (default: optim.lr)")
    drop_rate: float = Field(
        0.1, ge=0, le=10, description="fedd2s: layers leaving the shared distillation per round, deepest first"
    )


class SecurityConfig(_Strict):
    """Byzantine and sybil defence (node/algo/aggregate/robust.py, node/algo/security/), and attacks for
    tests and benchmarks. Model exchange with gossip only."""

    aggregator: Literal[registry.AGGREGATORS] = Field(
        "mean", description="how neighbour models are combined; mean is plain gossip averaging"
    )
    byzantine_fraction: float = Field(
        0.25, ge=0, lt=0.5, description="share of inputs the robust aggregators assume malicious"
    )
    flag_below: float = Field(0.35, gt=0, lt=1, description="trust below this flags a neighbour")
    sybil_similarity: float = Field(0.98, gt=0, le=1, description="update-history cosine that marks suspected sybils")
    metrics_top_n: int = Field(16, ge=1, le=256, description="per-peer trust series exported for the N least trusted")
    fetch_rate: float = Field(20.0, gt=0, description="gRPC calls per second served to one identity (token bucket)")
    fetch_burst: int = Field(60, ge=1, description="token bucket size per identity")
    attack: Literal[registry.ATTACKS] | None = Field(
        None, description="make this node malicious (tests and benchmarks only)"
    )
    attack_params: dict[str, float | str] = Field(
        {}, description="scale, sigma, epsilon, z, free_ride_mode, jitter, data_of"
    )

    @model_validator(mode="after")
    def _attack_params(self) -> SecurityConfig:
        unknown = sorted(set(self.attack_params) - set(registry.ATTACK_PARAMS))
        if unknown:  # the values are checked where the attack is built (node/protocol/worker.py)
            raise ValueError(
                f"attack_params: unknown {', '.join(unknown)}; known: {', '.join(registry.ATTACK_PARAMS)}"
            )
        if self.attack is None and self.attack_params:
            raise ValueError("attack_params set without an attack")
        return self


class ExpertsConfig(_Strict):
    """Decentralized diffusion (node/algo/experts/): for `role: expert` and `role: router`."""

    clusters: int = Field(4, ge=2, le=64, description="K: KMeans clusters of the data set, one expert each")
    cluster: int = Field(0, ge=0, description="the cluster an expert node trains on")
    steps: int = Field(1500, ge=1, description="expert training steps (flow matching, Adam)")
    router_steps: int = Field(2000, ge=1, description="router training steps")
    width: int = Field(256, ge=8, le=4096)
    depth: int = Field(3, ge=1, le=8)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints while training")
    sample_steps: int = Field(50, ge=1, le=500, description="router: default Euler steps per sample")
    max_n: int = Field(256, ge=1, le=4096, description="router: most images one request may ask for")
    max_image_steps: int = Field(
        256 * 50,
        ge=1,
        description="router: most images x Euler steps one Sample request may ask for (a heavy request holds the "
        "small ones behind it for at most this much work)",
    )
    predict_timeout: float = Field(10.0, gt=0, le=300, description="router: deadline of one expert call")
    sample_rate: float = Field(5.0, gt=0, description="router: Sample requests per second per client address")
    sample_burst: int = Field(20, ge=1, description="router: token bucket size per client address")


class NetConfig(_Strict):
    """Swarm membership and networking: identity, addresses, DHT peers, record TTL, TLS."""

    swarm: str = "atoll"
    identity_path: Path = Path("~/.atoll/node.key")
    host: str = Field("127.0.0.1", description="address the gRPC server and metrics bind to")
    advertise_host: str | None = Field(None, description="address peers use to reach this node (default: host)")
    grpc_port: int = Field(0, ge=0, le=65535)
    dht_listen: list[str] = ["/ip4/127.0.0.1/tcp/0"]
    announce_maddrs: list[str] = []
    initial_peers: list[str] = []
    record_ttl: float = Field(15.0, ge=1, le=3600)

    @field_validator("dht_listen", "announce_maddrs", "initial_peers")
    @classmethod
    def _multiaddrs(cls, value: list[str]) -> list[str]:
        return [check_maddr(m) for m in value]

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    relay: bool = Field(
        True,
        description="behind NAT: serve snapshots over libp2p too (an open connection, hole punching, or a circuit "
        "relay that hivemind's auto-relay reserves); false: peers that cannot dial this node get its snapshots "
        "from a reachable neighbour it pushes them to",
    )
    reachability: Literal["auto", "direct", "relayed", "outbound_only"] = Field(
        "auto",
        description="how peers reach this node's snapshots; auto: ask live peers to dial it back at start. "
        "outbound_only also makes it a client in the final merge",
    )

    @model_validator(mode="after")
    def _reachable(self) -> NetConfig:
        if self.host in ("0.0.0.0", "::", "") and not self.advertise_host:
            raise ValueError(
                f"host {self.host!r} binds every interface: set net.advertise_host to the address peers should use"
            )
        return self


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
    def _index(self) -> NodeConfig:
        if self.node_index >= self.node_count:
            raise ValueError(f"node_index {self.node_index} must be < node_count {self.node_count}")
        c = self.comm
        if c.exchange == "logits":
            clash = _named(
                ("comm.algorithm: modest", c.algorithm == "modest"),
                ("comm.final_merge", c.final_merge),
                ("comm.mix_variance_correction", c.mix_variance_correction),
            )
            if clash:
                raise ValueError(f"comm.exchange logits does not average models: unset {', '.join(clash)}")
        if (c.codec != "none" or c.error_feedback) and (c.exchange != "model" or c.algorithm != "gossip"):
            raise ValueError("comm.codec and comm.error_feedback apply to gossip of models (exchange model, gossip)")
        if c.error_feedback and c.codec == "none":
            raise ValueError("comm.error_feedback needs a comm.codec that loses something (fp16, bf16, int8, topk)")
        if c.error_feedback or c.codec == "topk":  # deltas and estimates: two kinds of snapshots
            if 2 * c.keep_snapshots + 2 > 32:
                raise ValueError(
                    "comm.keep_snapshots must be <= 15 with deltas (error feedback or topk): the record signs 32"
                )
            if c.topology == "random":
                raise ValueError(
                    "comm.error_feedback and codec topk keep copies of the neighbours' estimates: use a topology "
                    "that does not change every step (ring, torus, exponential, complete), not random"
                )
        if self.role == "expert" and self.experts.cluster >= self.experts.clusters:
            raise ValueError(
                f"experts.cluster {self.experts.cluster} must be < experts.clusters {self.experts.clusters}"
            )
        sec = self.security
        if self.task is None and self.task_config:
            raise ValueError("task_config is for a task of your own: set task as well")
        if self.task is not None:  # these need the built-in classification data (node/task/images.py)
            needs_labels = _named(
                ("comm.exchange: logits", c.exchange == "logits"),
                ("security.aggregator: bristle", sec.aggregator == "bristle"),
                (f"security.attack: {sec.attack}", sec.attack in ("label_flip", "sybil")),
                ("data.personal_holdout", self.data.personal_holdout > 0),
            )
            if needs_labels:
                raise ValueError(f"{', '.join(needs_labels)} work on the built-in image tasks only, not with task")
        if c.exchange == "ranks":
            clash = _named(
                ("comm.algorithm: modest", c.algorithm == "modest"),
                ("comm.mix_variance_correction", c.mix_variance_correction),
                ("comm.merge: variance_corrected", c.merge == "variance_corrected"),
                (f"security.aggregator: {sec.aggregator}", sec.aggregator != "mean"),
                (f"security.attack: {sec.attack}", sec.attack in ("free_ride", "sybil", "gaussian")),
            )
            if clash:
                raise ValueError(f"comm.exchange ranks votes on rankings: unset {', '.join(clash)}")
        elif (sec.aggregator != "mean" or sec.attack) and (c.exchange != "model" or c.algorithm != "gossip"):
            raise ValueError(
                "security.aggregator and security.attack need comm.exchange model (or ranks) and comm.algorithm gossip"
            )
        return self


def _named(*settings: tuple[str, bool]) -> list[str]:
    """The names of the (name, set) pairs that are set: what a validator says to unset."""
    return [name for name, on in settings if on]


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


def _apply(tree: dict, overrides: dict[str, Any]) -> None:
    """Set dotted `overrides` in `tree`; setting one local-work budget clears the other."""
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
    _apply(tree, overrides)
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
        _apply(tree, self.per_node.get(index, {}))
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
    _apply(node_tree, node_overrides or {})
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
