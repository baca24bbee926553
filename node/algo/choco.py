"""CHOCO-SGD's bookkeeping, with no I/O: a node's public estimate of its own model, its copies of
its neighbours' estimates, and the lineage that keeps them in step (see node/protocol/compression.py,
which publishes and fetches what this computes).

Every node i keeps a public estimate x̂_i of its model, which its neighbours hold too. Each step it
sends q_i = Q(x_i - x̂_i) (a delta), both sides add q_i to their copy of x̂_i, and i moves
x_i <- x_i + gamma * sum_j w_ij (x̂_j - x̂_i). Without error feedback (a top-k codec alone) the delta
is Q(x_i - x_i'), the change since the last step. A delta names its predecessor (round, step) and
its lineage (epoch); a copy takes a delta only at that predecessor of that lineage, else the node
fetches the neighbour's estimate once. Lineage ids of a node's own restarts come from an explicit
`random.Random` (never the global stream); the common lineage of nodes that start together is a
hash of the shared initial model.

Paper: CHOCO-SGD, Koloskova, Stich and Jaggi, "Decentralized Stochastic Optimization and Gossip
Algorithms with Compressed Communication", ICML 2019, arXiv 1902.00340.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

START = (-1, -1)  # the predecessor of a lineage's first delta
State = dict[str, torch.Tensor]


def lineage(state: State) -> int:
    """A 62-bit epoch from the bytes of `state` (the shared initial model: equal on every node)."""
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 2


def clone(state: State) -> State:
    """A detached copy of every tensor of `state`."""
    return {k: v.detach().clone() for k, v in state.items()}


def apply(into: State, delta: State) -> State:
    """Add `delta` to `into` in place (integer tensors, step counters, are replaced); returns `into`."""
    for k, v in delta.items():
        v = v.to(into[k].device)
        if into[k].is_floating_point():
            into[k].add_(v.to(into[k].dtype))
        else:
            into[k].copy_(v)
    return into


@dataclass
class Copy:
    """A neighbour's public estimate as this node holds it: lineage, last step applied, tensors."""

    epoch: int
    at: tuple[int, int]
    tensors: State


@dataclass
class Outgoing:
    """What a node publishes at one step: its new estimate, the coded delta, and the lineage (epoch, predecessor)
    they belong to; `Choco.commit` makes them the node's own once published."""

    round_: int
    step: int
    epoch: int
    prev: tuple[int, int]
    estimate: State
    delta: State
    own: State


class Choco:
    """One node's CHOCO-SGD state (see the module docstring)."""

    def __init__(
        self,
        compress: Callable[[State], State],
        decompress: Callable[[State], State],
        feedback: bool,
        gamma: float,
        rng: random.Random,
    ):
        """`compress`/`decompress`: the codec (its coded form and back, float32); `feedback`: error feedback
        (deltas from the estimate) or not (deltas from the last step, what top-k alone does); `gamma`: the consensus
        step in (0, 1]; `rng`: where the lineage ids of this node's own restarts come from."""
        self.compress, self.decompress, self.feedback, self.gamma, self.rng = (
            compress,
            decompress,
            feedback,
            gamma,
            rng,
        )
        self.mine: State | None = None  # x̂_i
        self.last: State | None = None  # x_i at the last step (without feedback)
        self.init: State | None = None
        self.init_epoch: int | None = None
        self.epoch = 0
        self.at = START  # the last step this node published
        self.copies: dict[str, Copy] = {}
        self.resyncs = 0  # estimates fetched (full-size transfers), for tests and benchmarks

    def begin(self, round_: int, state: State) -> None:
        """Before this process's first round: at round 0 `state` is the shared initial model and starts the common
        lineage; a resumed node starts a lineage of its own."""
        if self.mine is not None:
            return
        self.mine = clone(state)
        self.last = None if self.feedback else clone(state)
        if round_ == 0:
            self.init, self.init_epoch = clone(state), lineage(state)
            self.epoch = self.init_epoch
        else:
            self.epoch = self.rng.getrandbits(62)

    def outgoing(self, round_: int, step: int, own: State) -> Outgoing:
        """Step (round_, step)'s estimate and coded delta of model `own` (nothing changes until `commit`)."""
        epoch, prev = self.epoch, self.at
        if (round_, step) <= self.at:  # a redone round: its deltas differ, start a new lineage
            epoch, prev = self.rng.getrandbits(62), START
        ref = self.mine if self.feedback else self.last
        diff = {k: v - ref[k] if v.is_floating_point() else v for k, v in own.items()}
        coded = self.compress(diff)
        estimate = apply(clone(self.mine), self.decompress(coded))
        return Outgoing(round_, step, epoch, prev, estimate, coded, own)

    def commit(self, out: Outgoing) -> None:
        """`out` was published: receivers' copies and ours move together."""
        self.mine, self.epoch, self.at = out.estimate, out.epoch, (out.round_, out.step)
        if not self.feedback:
            self.last = clone(out.own)

    def lost_track(self) -> None:
        """A publication that may or may not have happened: whatever comes next starts a new lineage."""
        self.epoch, self.at = self.rng.getrandbits(62), START

    def receive(self, round_: int, step: int, got: dict[str, tuple[int, tuple[int, int], State]]) -> list[str]:
        """Apply the neighbours' deltas of step (round_, step), `got` = {peer: (epoch, predecessor, delta)}, to the
        copies they fit; returns the peers whose estimate must be fetched instead (first contact, a missed step, a
        new lineage)."""
        resync = []
        for j, (epoch, prev, delta) in got.items():
            c = self.copies.get(j)
            if c is not None and c.epoch == epoch and c.at == prev:
                apply(c.tensors, delta)
                c.at = (round_, step)
            elif prev == START and epoch == self.init_epoch:
                self.copies[j] = Copy(epoch, (round_, step), apply(clone(self.init), delta))
            else:
                resync.append(j)
        self.resyncs += len(resync)
        return resync

    def resynced(self, epochs: dict[str, int], at: tuple[int, int], estimates: dict, own: State) -> None:
        """Take the fetched estimates, {peer: (epoch, at, tensors)}, that are of the lineage its delta named
        (`epochs`) and of step `at`, as the peers' copies (on `own`'s devices)."""
        for j, (epoch, where, tensors) in estimates.items():
            if epoch == epochs[j] and where == at:
                self.copies[j] = Copy(epoch, where, {k: v.to(own[k].device, copy=True) for k, v in tensors.items()})

    def views(self, peers, at: tuple[int, int], own: State) -> dict[str, State]:
        """{peer: own + (x̂_j - x̂_i)} for the `peers` whose copy is at step `at`: neighbour j as this node sees it."""
        out = {}
        for j in peers:
            c = self.copies.get(j)
            if c is not None and c.at == at:
                out[j] = {
                    k: own[k] + (c.tensors[k] - self.mine[k]) if v.is_floating_point() else c.tensors[k]
                    for k, v in own.items()
                }
        return out

    def blend(self, own: State, mixed: State) -> State:
        """The consensus step: own + gamma (mixed - own) for floating tensors (gamma = 1: mixed)."""
        if self.gamma == 1.0:
            return mixed
        return {
            k: own[k] + self.gamma * (v - own[k]) if v.is_floating_point() and k in own else v
            for k, v in mixed.items()
        }

    def forget(self, live: set[str]) -> None:
        """Drop the copies of peers that are no longer members."""
        for j in [j for j in self.copies if j not in live]:
            del self.copies[j]
