"""The single final merge: one exact average of all live nodes, by hivemind's all-reduce.

`DecentralizedAverager` finds its group through the swarm's DHT (under a prefix of its own)
and runs a butterfly all-reduce, so every member ends with bit-identical averaged tensors;
no node coordinates. A node that misses the group (late, partitioned) keeps its own model
and says so (`FinalMerge.run` returns None; the daemon counts it in a metric).

The averager runs in a forked process, so it is created when the node starts, before any
gRPC object exists (gRPC does not survive a fork), with tensors shaped like the model's floating tensors.

Paper: "A Single Merging Suffices: Recovering Server-based Learning Performance in Decentralized
Learning", 2025; the all-reduce is hivemind's DecentralizedAverager.
"""

from __future__ import annotations

import logging

import torch
from hivemind.averaging import DecentralizedAverager

from node.algo.averaging import is_norm_param, rescale_variance
from p2pd.procs import start_hivemind_process, stop_hivemind_process

log = logging.getLogger("atoll.merge")


MATCHMAKING_SECONDS = 3.0  # how long peers gather into a group before the all-reduce


def _var(t: torch.Tensor) -> float:
    return float(t.detach().to(torch.float32).var()) if t.numel() > 1 else 0.0


def float_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The tensors that are averaged: floating point ones, in a fixed order."""
    return sorted(k for k, v in state.items() if v.is_floating_point())


class FinalMerge:
    """The final all-reduce of a node's floating tensors with the swarm: a hivemind DecentralizedAverager (groups of 2
    to `group_size`) in a forked process, so create it before any gRPC object exists."""

    def __init__(
        self,
        dht,
        swarm: str,
        state: dict[str, torch.Tensor],
        group_size: int,
        timeout: float,
        how: str = "mean",
        task_digest: str = "",
        client_mode: bool = False,
    ):
        """`client_mode`: the node cannot be dialled (net.reachability outbound_only): it sends
        its part and receives the result but hosts no part of the all-reduce.
        `how`: "mean", or "variance_corrected": the per-tensor variances travel in the same
        all-reduce (one extra small tensor), so every member rescales the average to the
        members' mean variance exactly as node.algo.aggregate.variance_corrected_mean does.
        `task_digest` (node/task/load.py) is part of the group key: nodes of another task or
        shape never meet in matchmaking."""
        if how not in ("mean", "variance_corrected"):
            raise ValueError(f"unknown merge {how!r}")
        self.names = float_names(state)
        self.timeout, self.how, self.client_mode = timeout, how, client_mode
        tensors = [state[k].detach().to("cpu", dtype=torch.float32, copy=True) for k in self.names]
        tensors.append(torch.zeros(len(self.names)))  # per-tensor variances
        # hivemind logs a failed step with a full traceback; run() says why in one line instead
        # (the averager process inherits this level when it is forked)
        logging.getLogger("hivemind.averaging.averager").setLevel(logging.CRITICAL)
        self.averager = start_hivemind_process(
            lambda: DecentralizedAverager(
                tensors,
                dht=dht,
                prefix=f"atoll_{swarm}_final_merge_{task_digest[:16]}",
                start=False,
                target_group_size=max(2, group_size),
                min_group_size=2,
                # a request must time out well before matchmaking ends, or two peers asking each
                # other at once can deadlock the round (hivemind's Matchmaking docstring)
                min_matchmaking_time=MATCHMAKING_SECONDS,
                request_timeout=MATCHMAKING_SECONDS / 2,
                allreduce_timeout=timeout,
                client_mode=client_mode,
            )
        )

    def run(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]] | None:
        """All-reduce `state`'s floating tensors with whoever joins: (merged state, sorted peer
        ids of the group), or None if this node missed the merge.

        hivemind applies the average as local + (average - local), so members agree only up to
        float rounding; `canonical()` picks the copy everyone adopts to end bit-identical."""
        with self.averager.get_tensors() as shared:
            for name, t in zip(self.names, shared):
                t.copy_(state[name].detach().to("cpu", dtype=torch.float32))
            shared[-1].copy_(torch.tensor([_var(state[n]) for n in self.names]))
        try:
            group = self.averager.step(timeout=self.timeout, allow_retries=True)
        except Exception as e:  # hivemind raises assorted errors when peers vanish mid-way
            log.warning(
                "final merge failed, keeping this node's model: %s",
                (str(e).splitlines() or [type(e).__name__])[0][:200],
            )
            return None
        if not group:
            log.warning("final merge found no group within %.0f s; keeping this node's model", self.timeout)
            return None
        merged = dict(state)
        with self.averager.get_tensors() as shared:
            mean_vars = shared[-1].clone()
            for i, (name, t) in enumerate(zip(self.names, shared)):
                x = t.detach().clone()
                if self.how == "variance_corrected" and x.numel() > 1 and not is_norm_param(name):
                    x = rescale_variance(x, mean_vars[i])
                merged[name] = x.to(device=state[name].device, dtype=state[name].dtype)
        log.info("final merge with %d peers", len(group))
        return merged, sorted(peer.to_base58() for peer in group)

    def close(self) -> None:
        """Stop the averager process."""
        stop_hivemind_process(self.averager)


def same_merge(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """True if two members' merged models differ only by the all-reduce's float rounding
    (integer buffers such as step counters are not averaged and may differ)."""
    return set(a) == set(b) and all(
        a[k].shape == b[k].shape
        and (
            not a[k].is_floating_point()
            or torch.allclose(a[k].to(torch.float32).cpu(), b[k].to(torch.float32).cpu(), rtol=rtol, atol=atol)
        )
        for k in a
    )


def adopt_canonical(fetcher, canonical: str, round_: int, mine: dict, timeout: float) -> dict:
    """After the all-reduce: the canonical member's merged model (published as round `round_`'s model), fetched
    through `fetcher` (node/net/fetcher.py) within `timeout` seconds, if it is the same merge as ours (`mine`) up to
    float rounding; else ours, and the metric counts why (merge_canonical_gone, merge_mismatch)."""
    import time

    from node.protocol.exchange import model_like
    from p2pd.tensors import SnapshotKey

    if canonical not in fetcher.view.addresses:
        fetcher.metrics.fetch_failures.labels(reason="merge_canonical_gone").inc()
        return mine
    deadline = time.monotonic() + timeout
    theirs = fetcher.fetch(canonical, SnapshotKey("model", round_, 0), model_like(mine), deadline)
    if theirs is None:
        return mine
    if not same_merge(mine, theirs):
        fetcher.metrics.fetch_failures.labels(reason="merge_mismatch").inc()
        log.warning("canonical merged model of %s differs from ours beyond rounding; keeping ours", canonical[:16])
        return mine
    return {k: theirs[k].to(device=v.device, dtype=v.dtype) for k, v in mine.items()}
