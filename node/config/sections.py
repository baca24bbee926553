"""The sections of a node's configuration (data, model, optim, train, comm, distill, security, experts, net),
each with the rules that concern it alone. Every model forbids unknown fields, and numbers refuse YAML booleans."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from node import registry
from p2pd.addresses import check_maddr
from p2pd.codecs import CODECS


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

    name: Literal["sgd", "adam", "adamw"] = "sgd"
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
    algorithm: Literal[registry.ALGORITHMS] = Field(
        "gossip",
        description="gossip averaging; MoDeST sampling; or diloco: outer Nesterov steps on pseudo-gradients averaged "
        "over the gossip graph every round (train.local_steps inner steps a round)",
    )
    outer_lr: float = Field(0.7, gt=0, le=10, description="diloco: the outer Nesterov SGD's learning rate")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="diloco: the outer Nesterov SGD's momentum")
    outer_average: Literal["gossip", "all_reduce"] = Field(
        "gossip",
        description="diloco: average pseudo-gradients over the round's gossip graph (no step needs every node), or by "
        "an all-reduce in groups of comm.allreduce_group (every member takes the same step, weighted by samples)",
    )
    fragments: int = Field(
        1,
        ge=1,
        le=16,
        description="diloco over all_reduce: Streaming DiLoCo's fragments, each synchronised once a round on a "
        "stagger (train.local_steps a multiple of it)",
    )
    sync_delay: int = Field(
        0, ge=0, description="streaming: inner steps that run while a fragment's all-reduce travels (tau)"
    )
    stream_mix: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="streaming with sync_delay: share of the live fragment kept when the outer step lands",
    )
    allreduce_group: int = Field(
        8, ge=2, le=16, description="outer_average all_reduce: most members of a group (at most keep_snapshots)"
    )
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
        le=29,
        description="published snapshots of each kind kept for slower neighbours (each one's digest is signed "
        "into the peer record, which signs 32: hence the cap, with the last models and the join state)",
    )
    fetch_timeout: float = Field(20.0, gt=0, le=600, description="seconds to wait for a neighbour's snapshot")
    codec: Literal[("none", *CODECS)] = Field(
        "none",
        description="how gossiped models travel: raw float32, fp16, bf16, int8 (blockwise absmax), topk, or topk2bit "
        "(top-k per chunk of int8_block values with 2-bit values, SparseLoCo's)",
    )
    topk_ratio: float = Field(0.01, gt=0, le=1, description="codec topk: share of each tensor's values sent")
    int8_block: int = Field(
        256, ge=16, le=1 << 20, description="codec int8: values per float32 scale; topk2bit: values a chunk (<= 2^16)"
    )
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
    net: Literal["mlp", "unet"] = Field(
        "mlp", description="mlp: an MLP over flattened pixels (8x8 digits); unet: a small conv U-Net (28x28 images)"
    )
    cluster_on: Literal["pixels", "features"] = Field(
        "pixels",
        description="KMeans on flattened pixels, or on the penultimate features of a judge classifier trained "
        "first (the clustering is kept in checkpoint_dir/clustering-*.safetensors: copy it to share it)",
    )
    feature_steps: int = Field(1000, ge=1, le=100_000, description="cluster_on features: judge training steps")
    width: int = Field(256, ge=8, le=4096, description="mlp: hidden units; unet: channels at full resolution")
    depth: int = Field(3, ge=1, le=8, description="mlp: hidden layers (unet: unused)")
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
    max_pending: int = Field(
        8,
        ge=1,
        le=8,
        description="router: sample requests queued or running at once (gRPC and HTTP together); more are refused as "
        "busy. Each holds a server thread while it waits, and the gRPC server keeps the rest of its 12 for Health",
    )
    http_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="router: serve the HTTP API (/v1/samples, /v1/experts, /healthz, the page at /) on net.host at "
        "this port beside gRPC; 0: a free port; null: gRPC only",
    )

    @model_validator(mode="after")
    def _unet_width(self) -> ExpertsConfig:
        if self.net == "unet" and self.width % 8:
            raise ValueError(f"net unet needs width a multiple of 8 (GroupNorm of 8 groups), got {self.width}")
        return self


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
    directory_bits: int = Field(
        0,
        ge=0,
        le=12,
        description="split the swarm's DHT directory into 2^bits keys, about 64 records each at most (0: one key, "
        "fine to about 1,000 nodes); every node of a swarm must use the same value",
    )
    membership: Literal["full", "sampled"] = Field(
        "full",
        description="full: every node reads the whole directory each second and neighbours come from the sorted "
        "list (to about 1,000 nodes); sampled: a Basalt peer-sampling view exchanged with peers, each round's "
        "neighbours drawn from it and probed (any size; gossip of models only)",
    )
    view_size: int = Field(64, ge=8, le=256, description="sampled: slots of the peer-sampling view")
    sample_size: int = Field(4, ge=1, le=32, description="sampled: neighbours drawn from the view each round")
    sample_by_prefix: bool = Field(
        False,
        description="sampled: rank view entries by network prefix first (/24, /48, domain), so identities packed "
        "into a few prefixes win no more of a view than those prefixes; costs fairness to honest nodes that share one",
    )

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
