"""Streaming DiLoCo (`comm.fragments` > 1 or `comm.sync_delay` > 0, with `comm.outer_average: all_reduce`): the
model is synchronised in fragments on a stagger, each transfer running while the inner steps go on.

The floating tensors are dealt into F fragments of near-equal size (node.algo.comm.allreduce.fragments). Every
fragment keeps its shared parameters phi_f (what its last outer step gave; at the start, the model) and its own
outer momentum. A round of H = train.local_steps inner steps is F parts of H / F steps; in part f:
1. train H / F - tau steps (tau = comm.sync_delay);
2. start the all-reduce of fragment f's pseudo-gradient phi_f - theta_f (node/protocol/allreduce.py) in a background
   thread, and train tau more steps meanwhile;
3. wait for it (time spent waiting is communication) and take the outer Nesterov step phi_f <- phi_f - lr (g + mu b);
4. merge it into the live parameters, which moved on tau steps: theta_f <- alpha theta_f + (1 - alpha) phi_f, with
   alpha = comm.stream_mix when tau > 0 and 0 when tau = 0.

So each fragment is synchronised once every H steps, fragment f at step (f + 1) H / F of each round, and a node's
upload is spread over the round instead of arriving all at once. With F = 1 and tau = 0 this is DiLoCo over the
all-reduce exactly. As in node/protocol/rounds/diloco.py, a swarm cut into several groups averages models, not
pseudo-gradients.

Paper: Douillard et al., "Streaming DiLoCo with overlapping communication", arXiv 2501.18512.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from node.algo.aggregate.vectors import float_keys
from node.algo.comm.allreduce import fragments
from node.algo.diloco import nesterov
from node.protocol.rounds import RoundResult
from node.protocol.train import RoundStats
from node.protocol.worker import NonFinite


class Stream:
    """One node's streamed outer optimization (see the module docstring): `parts` (each fragment's tensor names),
    `shared` (phi: the fragments' parameters after their last outer step), `momentum` (per fragment)."""

    def __init__(self, cfg, worker, exchange, allreduce):
        """`cfg`: the NodeConfig (`comm.fragments`, `comm.sync_delay`, `comm.stream_mix`, the outer optimizer,
        `train.local_steps`); `worker`, `exchange`: the node's; `allreduce`: its SlicedAllReduce. Raises ValueError
        for more fragments than floating tensors."""
        self.cfg, self.worker, self.exchange, self.allreduce = cfg, worker, exchange, allreduce
        state = worker.state()
        self.parts = fragments({k: state[k].numel() for k in float_keys(state)}, cfg.comm.fragments)
        self.shared: dict[str, torch.Tensor] | None = None
        self.momentum: list[dict | None] = [None] * len(self.parts)
        self.since = [0] * len(self.parts)  # samples each fragment's pseudo-gradient stands for
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="atoll-stream")

    def run(self, r: int, forger) -> RoundResult:
        """Round r (see the module docstring); `forger`: the attack rehearsal's, None for an honest node. Raises
        NonFinite; the engine's rollback then puts the fragments' state back (node/protocol/worker.py, OuterState).
        Each fragment's shared parameters and momentum move together, so a stop mid-round leaves them matching."""
        w, c, ex = self.worker, self.cfg.comm, self.exchange
        if self.shared is None:
            self.shared = {k: v.detach().clone() for k, v in w.state().items() if v.is_floating_point()}
        shared = self.shared
        chunk, tau = self.cfg.train.local_steps // len(self.parts), c.sync_delay
        alpha = c.stream_mix if tau > 0 else 0.0
        gen = w.trainer.batches(r)
        result, answered = RoundResult(RoundStats(0.0, 0, 0, 0.0)), set()
        for f, keys in enumerate(self.parts):
            self._train(result, r, chunk - tau, gen)
            if ex.stopping():
                return result
            own = w.state()
            published = own if forger is None else forger.forge(shared, own, r, f)
            after = {k: published[k].detach().clone() for k in keys}  # the live tensors train on meanwhile
            weight, sps = max(self.since[f], 1), round(result.stats.samples_per_second, 3)
            average = self.allreduce.pseudo_gradient
            job = self.pool.submit(average, ex, r, shared, after, keys, weight, f, samples_per_second=sps)
            try:
                self._train(result, r, tau, gen)
            finally:  # never leave a transfer running behind a failed part
                done, g = job.result()
            self.since[f] = 0
            result.members = len(done.group)
            answered |= set(done.answered)
            if forger is not None and not forger.mixes:
                continue
            phi = {k: shared[k] for k in keys}
            moved, self.momentum[f] = nesterov(phi, g, self.momentum[f], c.outer_lr, c.outer_momentum)
            shared.update(moved)
            live = w.state()
            w.load({k: (alpha * live[k] + (1 - alpha) * moved[k]) if k in moved else live[k] for k in live})
            if not w.all_finite():
                raise NonFinite("model_after_mixing")
        result.mixed = sorted(answered)
        return result

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fragments' state for checkpoints: shared/<tensor> (phi), stream_momentum/<fragment>/<tensor>, and
        since (int64, per fragment: the samples behind its next pseudo-gradient)."""
        out = {f"shared/{k}": v for k, v in (self.shared or {}).items()}
        for f, m in enumerate(self.momentum):
            out |= {f"stream_momentum/{f}/{k}": v for k, v in (m or {}).items()}
        return out | {"since": torch.tensor(self.since, dtype=torch.int64)}

    def load(self, tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> None:
        """Load what `tensors` gave, checked against `like` (the model's floating tensors). Raises ValueError for a
        name, shape or dtype that does not fit."""
        shared, momentum = {}, [{} for _ in self.parts]
        if not tensors:  # the state before the first round
            self.shared, self.momentum, self.since = None, [None] * len(self.parts), [0] * len(self.parts)
            return
        since = tensors.get("since")
        fitting("since", since, torch.zeros(len(self.parts), dtype=torch.int64) if since is not None else None)
        for name, t in tensors.items():
            kind, _, key = name.partition("/")
            if kind == "shared":
                shared[key] = fitting(name, t, like.get(key))
            elif kind == "stream_momentum" and key.partition("/")[0].isdigit():
                f, _, k = key.partition("/")
                if int(f) >= len(self.parts) or k not in self.parts[int(f)]:
                    raise ValueError(f"checkpoint's outer state {name!r} does not fit these fragments")
                momentum[int(f)][k] = fitting(name, t, like.get(k))
            elif name != "since":
                raise ValueError(f"checkpoint holds outer state {name!r} this node does not keep")
        if shared and set(shared) != set(like):
            raise ValueError("checkpoint's shared parameters do not cover this model's tensors")
        self.shared = shared or None
        self.momentum = [m or None for m in momentum]
        self.since = [int(x) for x in since]

    def _train(self, result: RoundResult, r: int, steps: int, gen) -> None:
        """`steps` more inner steps of round r into `result`, counted towards every fragment's samples."""
        if steps <= 0:
            return
        stats = self.worker.train(r, stop=self.exchange.stopping, steps=steps, gen=gen)
        result.stats = result.stats + stats
        self.since = [s + stats.samples for s in self.since]


def fitting(name: str, t: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """`t` (a checkpoint's tensor `name`) if it has `like`'s shape and dtype, on `like`'s device; raises ValueError
    otherwise (and for no `like`: a name this node does not keep)."""
    if like is None or t.shape != like.shape or t.dtype != like.dtype:
        raise ValueError(f"checkpoint's outer state {name!r} does not fit this model")
    return t.to(like.device)
