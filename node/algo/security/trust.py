"""Per-neighbour trust: the signals a node computes from the models it receives, and a score.

Every round each node sees its neighbours' models x_j and its own model at the start of the
round, ref. A neighbour's update is u_j = x_j - ref (what it would move us by). Signals:

- ``norm_ratio``: ||u_j|| / median_k ||u_k|| (self included): noise and amplified updates are large;
- ``cos_consensus``: cosine of u_j with the coordinate-wise median update of everyone received
  (self included, near-identical updates counted once): a robust estimate of where the swarm
  is going; reversed updates are < 0;
- ``cos_history``: the largest cosine between u_j's running sum (its history, FoolsGold's
  signal) and any other known history: coordinated sybils publish near-identical histories.

Round score s_j = clip(1/2 + cos_consensus / (2 cos_full), 0, 1) * min(1, (norm_tolerance / norm_ratio)^4):
an update that goes the swarm's way (cosine >= cos_full = 0.2) with an ordinary size scores
1, an orthogonal one 1/2, one against the swarm (cosine <= -0.2) 0. Orthogonal is neutral on
purpose: late in training an honest node with an unusual class mix moves at right angles to
the median (measured: cosine about 0), while a reversed or inner-product attack moves against
it. The size term is steep (4th power) because on non-IID data the cosine is a weak signal in
daemons (honest updates of nodes with different class mixes are themselves near-orthogonal or
opposed), while honest size ratios stay under 2 (measured): an update 4x the median scores
0.15, one 2.5x or less is not penalised. Trust is an exponential average,
t_j <- (1 - alpha) t_j + alpha s_j, starting at 1 (a newcomer is not suspect); a neighbour is
*flagged* when t_j < flag_below, or when its history is as similar to another's as
``sybil_similarity`` (a suspected sybil).

The history signal is FoolsGold's (Fung et al., arXiv 1808.04866); the score itself is atoll's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from node.algo.aggregate.vectors import median


@dataclass
class Signals:
    """One neighbour's signals in one exchange (see the module docstring): norm ratio, consensus and history cosines,
    round score and trust in [0, 1], and whether it is a suspected sybil or flagged."""

    norm_ratio: float
    cos_consensus: float
    cos_history: float
    score: float
    trust: float
    sybil: bool
    flagged: bool


@dataclass
class TrustTracker:
    """Per-neighbour trust: the exponential average of round scores, update histories (observed and heard) and the last
    signals, with the thresholds of the module docstring."""

    alpha: float = 0.5
    flag_below: float = 0.35
    cos_full: float = 0.2
    norm_tolerance: float = 2.5
    norm_power: float = 4.0
    min_consensus: int = 4  # distinct updates (self included) needed before the cosine counts
    sybil_similarity: float = 0.98
    # an update this many times the median is clipped at once, before its trust has had time to fall (the
    # first exchange with a diverging node would otherwise mix it in whole); honest ratios stay under 2 (measured)
    clip_ratio: float = 10.0
    trust: dict[str, float] = field(default_factory=dict)
    histories: dict[str, torch.Tensor] = field(default_factory=dict)  # neighbours', observed directly
    heard: dict[str, torch.Tensor] = field(default_factory=dict)  # learned from others' gossip (SybilWall)
    signals: dict[str, Signals] = field(default_factory=dict)  # last observation of each neighbour

    def observe(self, ref: torch.Tensor, own: torch.Tensor, others: dict[str, torch.Tensor]) -> dict[str, Signals]:
        """Update trust from this round's received models (flat vectors); returns their signals."""
        if not others:
            return {}
        names = sorted(others)
        updates = torch.stack([own - ref] + [others[j] - ref for j in names])
        norms = updates.norm(dim=1)
        med_norm = median(norms).clamp_min(1e-12)
        # near-identical updates count once in the median: k copies of one attacker must not
        # become the swarm's "consensus" that honest nodes are then measured against
        same = pairwise_cosine(updates) >= self.sybil_similarity
        distinct = [i for i in range(len(updates)) if not same[i, :i].any()]
        consensus = median(updates[distinct])
        cos = torch.nn.functional.cosine_similarity(updates, consensus.unsqueeze(0), dim=1)
        if len(distinct) < self.min_consensus:
            # the median of 2 or 3 updates is one of them, not a consensus: on a ring, honest
            # neighbours with other class mixes then look opposed (measured: trust 0.2-0.35 on a
            # 6-node ring without any attack). Judge by update size only.
            cos = torch.full_like(cos, self.cos_full)
        for i, j in enumerate(names, start=1):
            self.histories[j] = self.histories.get(j, torch.zeros_like(own)) + updates[i]
        sim = self.history_similarity()
        out = {}
        for i, j in enumerate(names, start=1):
            ratio = float(norms[i] / med_norm)
            c = float(cos[i]) if torch.isfinite(cos[i]) else -1.0
            score = min(max(0.5 + c / (2 * self.cos_full), 0.0), 1.0) * min(
                1.0, (self.norm_tolerance / max(ratio, 1e-12)) ** self.norm_power
            )
            t = (1 - self.alpha) * self.trust.get(j, 1.0) + self.alpha * score
            self.trust[j] = t
            ch = sim.get(j, 0.0)
            sybil = ch >= self.sybil_similarity
            out[j] = Signals(ratio, c, ch, score, t, sybil, t < self.flag_below or sybil)
        self.signals.update(out)
        return out

    def known_histories(self) -> dict[str, torch.Tensor]:
        """Direct observations win over gossip about the same peer."""
        return {**self.heard, **self.histories}

    def history_similarity(self) -> dict[str, float]:
        """Each known peer's largest history cosine to any other known peer (FoolsGold's max cs)."""
        hist = self.known_histories()
        if len(hist) < 2:
            return {j: 0.0 for j in hist}
        names = sorted(hist)
        cs = pairwise_cosine(torch.stack([hist[j] for j in names]))
        cs.fill_diagonal_(-1.0)
        return {j: float(cs[i].max()) for i, j in enumerate(names)}

    def sybil_clusters(self) -> list[set[str]]:
        """Groups (size >= 2) of known peers linked by history cosine >= sybil_similarity."""
        hist = self.known_histories()
        names = sorted(hist)
        if len(names) < 2:
            return []
        linked = pairwise_cosine(torch.stack([hist[j] for j in names])) >= self.sybil_similarity
        seen, groups = set(), []
        for start in range(len(names)):
            if start in seen:
                continue
            group, todo = set(), [start]
            while todo:
                i = todo.pop()
                if i in group:
                    continue
                group.add(i)
                todo.extend(int(k) for k in torch.nonzero(linked[i]).flatten() if int(k) not in group)
            seen |= group
            if len(group) >= 2:
                groups.append({names[i] for i in group})
        return groups

    def suspects(self, signals: dict[str, Signals]) -> set[str]:
        """The neighbours of `signals` (one exchange's) whose update is clipped (node/protocol/defence.py): the
        flagged ones, and any whose update is over `clip_ratio` times the median now."""
        return {j for j, s in signals.items() if s.flagged or s.norm_ratio > self.clip_ratio}

    def flagged(self) -> set[str]:
        """Peers whose last signals flagged them (trust below flag_below, or a suspected sybil)."""
        return {j for j, s in self.signals.items() if s.flagged}

    def forget(self, keep: set[str]) -> None:
        """Drop state about peers no longer in view (bounded memory in a churning swarm)."""
        for table in (self.trust, self.histories, self.heard, self.signals):
            for j in [j for j in table if j not in keep]:
                del table[j]


def pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """(n, n) cosine similarities between the rows of `x` (n, D)."""
    n = torch.nn.functional.normalize(x, dim=1)
    return n @ n.T
