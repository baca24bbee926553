"""The rules that tie settings of several sections together, each a named function that raises ValueError with
one line saying what to change. NodeConfig runs `check`, so every way a config is built (file, --set, swarm files,
code) meets all of them. A rule that concerns one section alone lives beside that section (sections.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from node.registry import SLICE_AGGREGATORS

if TYPE_CHECKING:  # the rules read a NodeConfig; node.py imports this module
    from node.config.node import NodeConfig


def _named(*settings: tuple[str, bool]) -> list[str]:
    """The names of the (name, set) pairs that are set: what a rule says to unset."""
    return [name for name, on in settings if on]


def index_in_count(cfg: NodeConfig) -> None:
    """node_index must name one of the node_count partitions."""
    if cfg.node_index >= cfg.node_count:
        raise ValueError(f"node_index {cfg.node_index} must be < node_count {cfg.node_count}")


def logits_average_no_models(cfg: NodeConfig) -> None:
    """comm.exchange logits distils: nothing that averages models applies."""
    c = cfg.comm
    if c.exchange == "logits":
        clash = _named(
            ("comm.algorithm: modest", c.algorithm == "modest"),
            ("comm.final_merge", c.final_merge),
            ("comm.mix_variance_correction", c.mix_variance_correction),
        )
        if clash:
            raise ValueError(f"comm.exchange logits does not average models: unset {', '.join(clash)}")


def codecs_code_model_gossip(cfg: NodeConfig) -> None:
    """comm.codec and comm.error_feedback apply to gossip of models, and keep what they need."""
    c = cfg.comm
    if (c.codec != "none" or c.error_feedback) and (c.exchange != "model" or c.algorithm == "modest"):
        raise ValueError(
            "comm.codec and comm.error_feedback apply to gossip of models (exchange model, algorithm gossip or diloco)"
        )
    if c.error_feedback and c.codec == "none":
        raise ValueError("comm.error_feedback needs a comm.codec that loses something (fp16, bf16, int8, topk)")
    if c.error_feedback or c.codec in ("topk", "topk2bit"):  # deltas and estimates: two kinds of snapshots
        if 2 * c.keep_snapshots + 3 > 32:  # deltas and estimates, the last two models, the join state
            raise ValueError(
                "comm.keep_snapshots must be <= 14 with deltas (error feedback or topk): the record signs 32"
            )
        if c.topology == "random":
            raise ValueError(
                "comm.error_feedback and codec topk keep copies of the neighbours' estimates: use a topology "
                "that does not change every step (ring, torus, exponential, complete), not random"
            )


def expert_cluster_exists(cfg: NodeConfig) -> None:
    """An expert trains one of the experts.clusters clusters."""
    if cfg.role == "expert" and cfg.experts.cluster >= cfg.experts.clusters:
        raise ValueError(f"experts.cluster {cfg.experts.cluster} must be < experts.clusters {cfg.experts.clusters}")


def own_task_settings(cfg: NodeConfig) -> None:
    """task_config needs a task; settings that need the built-in labelled images do not apply to a task."""
    c, sec = cfg.comm, cfg.security
    if cfg.task is None and cfg.task_config:
        raise ValueError("task_config is for a task of your own: set task as well")
    if cfg.task is not None:  # these need the built-in classification data (node/task/images.py)
        needs_labels = _named(
            ("comm.exchange: logits", c.exchange == "logits"),
            ("security.aggregator: bristle", sec.aggregator == "bristle"),
            (f"security.attack: {sec.attack}", sec.attack in ("label_flip", "sybil")),
            ("data.personal_holdout", cfg.data.personal_holdout > 0),
        )
        if needs_labels:
            raise ValueError(f"{', '.join(needs_labels)} work on the built-in image tasks only, not with task")


def ranks_and_security(cfg: NodeConfig) -> None:
    """comm.exchange ranks votes on rankings; robust aggregators and attacks need model gossip."""
    c, sec = cfg.comm, cfg.security
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
    elif (sec.aggregator != "mean" or sec.attack) and (c.exchange != "model" or c.algorithm == "modest"):
        raise ValueError(
            "security.aggregator and security.attack need comm.exchange model (or ranks) and comm.algorithm gossip "
            "or diloco"
        )


def diloco_every_round(cfg: NodeConfig) -> None:
    """comm.algorithm diloco averages models every round: no gossip schedule, and it needs model exchange."""
    c = cfg.comm
    streamed = c.fragments > 1 or c.sync_delay > 0
    if c.algorithm != "diloco" or c.outer_average != "all_reduce":
        if c.outer_average != "gossip" or streamed:
            raise ValueError(
                "comm.outer_average all_reduce is for comm.algorithm diloco, and comm.fragments and comm.sync_delay "
                "(Streaming DiLoCo) for diloco with comm.outer_average all_reduce"
            )
    if c.algorithm != "diloco":
        return
    clash = _named(
        (f"comm.exchange: {c.exchange}", c.exchange != "model"),
        ("comm.schedule: late", c.schedule != "constant"),
        ("comm.gossip_budget", c.gossip_budget is not None),
        ("comm.mix_variance_correction", c.mix_variance_correction),
    )
    if clash:
        raise ValueError(f"comm.algorithm diloco averages every round: unset {', '.join(clash)}")
    if c.outer_average == "all_reduce":
        rule = cfg.security.aggregator
        if rule not in SLICE_AGGREGATORS:
            raise ValueError(
                f"security.aggregator {rule} compares whole updates, which no member of an all-reduce sees: use "
                f"{', '.join(SLICE_AGGREGATORS)} with comm.outer_average all_reduce, or comm.outer_average gossip"
            )
        _streaming(cfg)
        if c.allreduce_group > c.keep_snapshots:
            raise ValueError(
                f"comm.allreduce_group {c.allreduce_group} needs comm.keep_snapshots >= it (a member holds one slice "
                f"per member), got {c.keep_snapshots}"
            )


def _streaming(cfg: NodeConfig) -> None:
    """Streaming DiLoCo cuts every round into comm.fragments equal parts of fixed steps."""
    c, t = cfg.comm, cfg.train
    if c.fragments == 1 and c.sync_delay == 0:
        return
    if t.local_seconds is not None:
        raise ValueError(
            "comm.fragments and comm.sync_delay cut a round of train.local_steps: unset train.local_seconds"
        )
    if t.local_steps % c.fragments:
        raise ValueError(f"train.local_steps {t.local_steps} must be a multiple of comm.fragments {c.fragments}")
    if c.sync_delay > t.local_steps // c.fragments:
        raise ValueError(
            f"comm.sync_delay {c.sync_delay} must be at most train.local_steps / comm.fragments "
            f"({t.local_steps // c.fragments}): a fragment's outer step lands before the next one leaves"
        )


def sampled_membership(cfg: NodeConfig) -> None:
    """net.membership sampled: each node sees a sample of the swarm, so only what needs no global list runs on it."""
    c = cfg.comm
    if cfg.net.membership != "sampled":
        return
    clash = _named(
        ("comm.algorithm: " + c.algorithm, c.algorithm != "gossip"),
        ("comm.exchange: " + c.exchange, c.exchange != "model"),
        ("comm.error_feedback", c.error_feedback),
        ("comm.codec: " + c.codec, c.codec in ("topk", "topk2bit")),
    )
    if clash:
        raise ValueError(
            "net.membership sampled runs gossip of models over neighbours that change every round (MoDeST's "
            "committee, DiLoCo's all-reduce groups, FRL's vote and CHOCO's estimates need the same list on "
            f"every node): unset {', '.join(clash)}, or use net.membership full"
        )
    if c.topology != "complete":
        raise ValueError(
            "net.membership sampled: the round's sample is the neighbourhood; set comm.topology complete "
            "(net.sample_size sets how many neighbours)"
        )


RULES: tuple[Callable[[NodeConfig], None], ...] = (
    index_in_count,
    logits_average_no_models,
    codecs_code_model_gossip,
    expert_cluster_exists,
    own_task_settings,
    ranks_and_security,
    diloco_every_round,
    sampled_membership,
)


def check(cfg: NodeConfig) -> None:
    """Run every rule on `cfg` in order; raises ValueError from the first that fails."""
    for rule in RULES:
        rule(cfg)
