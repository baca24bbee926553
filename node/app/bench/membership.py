"""The membership simulator behind `atoll bench membership`: Basalt views (node/algo/comm/sampling.py, the code a
daemon runs) for 1,000 to 30,000 virtual nodes in one process, rounds in lockstep, no training.

Each round every live honest node pulls the view of the peer in its least-hit slot, pushes its own view to the next
least-hit, re-seeds k slots (their peers are the round's samples) and probes those samples. Attackers hold a share of
the identities; each answers pulls with attacker ids only and pushes `flood` views of attacker ids per round to random
honest nodes (an honest node pushes one). A node accepts at most `max_pushes` pushes a round, drawn at random (the
rest are refused before they are read). Churn: every round a share of the honest nodes leaves and as many new ones
join, bootstrapping from `boot` rows of the bucketed directory (uniform over identities, attackers included). A node
learns that a peer left when it pulls from it (the call fails) or when the peer's ticket expires (`ticket_rounds`).

Bytes are counted per node per round from the sizes of the real messages (node/app/bench/membership_costs.py): the
pull and push calls, the pulls served and pushes received, a ticket lookup for each id new to the view, and a probe
of each sample.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from node.algo.comm.sampling import EMPTY, BasaltViews


@dataclasses.dataclass(frozen=True)
class Costs:
    """Bytes on the wire of one membership operation, both directions, framing included (membership_costs.measure):
    `pull` (asking a peer for its view, and the reply of v entries), `push` (sending one's view, and the reply),
    `probe` (a Health call with a nonce, answered with the signed record), `bucket_read` (one DHT get of a directory
    bucket of about 64 tickets, all hops: what a joiner reads to bootstrap)."""

    pull: int
    push: int
    probe: int
    bucket_read: int


@dataclasses.dataclass
class Scenario:
    """One simulated swarm: `honest` nodes, `attackers` (share of all identities, 0 <= x < 1), `flood` (pushes per
    attacker identity per round; an honest node sends 1), view size `v`, `k` slots re-seeded per round, `rounds`,
    `churn` (share of honest nodes leaving and joining per round), `boot` (directory rows a joiner starts from),
    `max_pushes` (pushes a node reads per round), `ticket_rounds` (rounds a ticket outlives its node), `hierarchical`
    (rank by network prefix first), `attacker_prefixes` (prefixes the attackers' ids sit in; 0: one each, a botnet),
    `per_prefix` (honest nodes per prefix), `seed`."""

    honest: int = 1000
    attackers: float = 0.0
    flood: float = 1.0
    v: int = 64
    k: int = 1
    rounds: int = 60
    churn: float = 0.0
    boot: int = 16
    max_pushes: int = 4
    ticket_rounds: int = 10
    hierarchical: bool = False
    attacker_prefixes: int = 0
    per_prefix: int = 4
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError for values out of range."""
        if not 2 <= self.honest <= 100_000 or not 0 <= self.attackers < 1 or not 0 <= self.flood <= 1000:
            raise ValueError("need 2 <= honest <= 100000, 0 <= attackers < 1 and 0 <= flood <= 1000")
        if not 0 <= self.churn < 0.5 or self.boot < 1 or self.max_pushes < 1 or self.rounds < 1:
            raise ValueError("need 0 <= churn < 0.5, boot >= 1, max_pushes >= 1 and rounds >= 1")


class MembershipSim:
    """The state of one Scenario: ids 0..H-1 honest (with room for joiners), then the attackers' ids."""

    def __init__(self, sc: Scenario, costs: Costs):
        """`sc`: the scenario (checked: ValueError); `costs`: byte sizes of the operations."""
        sc.check()
        self.sc, self.costs = sc, costs
        self.rng = np.random.default_rng(sc.seed)
        joiners = int(np.ceil(sc.churn * sc.honest)) * sc.rounds
        self.n_honest = sc.honest + joiners  # ids reserved for honest nodes, joiners included
        self.n_bad = int(round(sc.attackers * sc.honest / (1 - sc.attackers)))
        self.n_ids = self.n_honest + self.n_bad
        self.hash = self.rng.integers(0, 2**64, size=self.n_ids, dtype=np.uint64, endpoint=False)
        bad = np.arange(self.n_bad)
        prefix = np.concatenate(
            [
                np.arange(self.n_honest) // sc.per_prefix,
                self.n_honest + (bad % sc.attacker_prefixes if sc.attacker_prefixes else bad),
            ]
        )
        self.prefix_hash = self.rng.integers(0, 2**64, size=prefix.max() + 1, dtype=np.uint64)[prefix]
        self.alive = np.zeros(self.n_ids, bool)
        self.alive[: sc.honest] = True
        self.alive[self.n_honest :] = True  # attackers never leave
        self.left_at = np.full(self.n_ids, -1, np.int64)
        self.joined_at = np.zeros(self.n_ids, np.int64)
        self.views = BasaltViews(self.n_honest, sc.v, sc.k, seed=sc.seed + 1, hierarchical=sc.hierarchical)
        self.round = 0
        self.first_seen = np.full(self.n_ids, -1, np.int64)  # round a joiner first appeared in another view
        self.gone_at = np.full(self.n_ids, -1, np.int64)  # round a departed node was last dropped from every view
        self._bootstrap(np.arange(sc.honest))

    # -- helpers ---------------------------------------------------------------------------
    def _bad_ids(self, shape) -> np.ndarray:
        return self.n_honest + self.rng.integers(0, max(1, self.n_bad), size=shape)

    def _directory_rows(self, m: int, c: int) -> np.ndarray:
        """[m, c] ids read from the directory: uniform over live identities (a bucket holds honest and attacker
        tickets alike)."""
        live = np.flatnonzero(self.alive)
        return live[self.rng.integers(0, len(live), size=(m, c))]

    def _offer(self, rows: np.ndarray, ids: np.ndarray) -> None:
        ids = np.where(ids == rows[:, None], EMPTY, ids)  # nobody ranks itself
        at = np.maximum(ids, 0)
        self.views.offer(rows, ids, self.hash[at], self.prefix_hash[at])

    def _bootstrap(self, rows: np.ndarray) -> None:
        if len(rows):
            self._offer(rows, self._directory_rows(len(rows), self.sc.boot))

    # -- one round -------------------------------------------------------------------------
    def step(self) -> dict:
        """Run one round; returns its measurements (bytes per node: p50, p99, max; attacker shares; ...)."""
        sc, v = self.sc, self.views
        self.round += 1
        self._churn()
        rows = np.flatnonzero(self.alive[: self.n_honest])
        # expired tickets: a node that left ticket_rounds ago is dropped from every view
        expired = (self.left_at >= 0) & (self.round - self.left_at >= sc.ticket_rounds)
        v.forget(rows, expired)
        pull_from, push_to = v.select(rows), v.select(rows)
        snapshot = v.peers.copy()
        # pulls: a live honest peer answers with its view, an attacker with attacker ids, a departed one not at all
        honest_p = (pull_from >= 0) & (pull_from < self.n_honest)
        answered = (pull_from >= 0) & self.alive[np.maximum(pull_from, 0)]
        dead = np.zeros(self.n_ids, bool)
        dead[pull_from[(pull_from >= 0) & ~answered]] = True
        v.forget(rows, dead)
        got = np.full((len(rows), sc.v + 1), EMPTY, np.int64)
        hp = honest_p & answered
        got[hp, : sc.v] = snapshot[pull_from[hp]]
        bad_p = answered & ~honest_p
        got[bad_p, : sc.v] = self._bad_ids((int(bad_p.sum()), sc.v))
        got[answered, sc.v] = pull_from[answered]
        self._offer(rows, got)
        served = np.bincount(pull_from[hp], minlength=self.n_ids)
        # pushes: honest ones carry the sender's view and id; attackers' carry attacker ids
        pushed = (push_to >= 0) & (push_to < self.n_honest) & self.alive[np.maximum(push_to, 0)]
        src_rows = rows[pushed]
        n_flood = int(round(sc.flood * self.n_bad))
        dst = np.concatenate([push_to[pushed], rows[self.rng.integers(0, len(rows), size=n_flood)]])
        payload = np.full((len(dst), sc.v + 1), EMPTY, np.int64)
        payload[: len(src_rows), : sc.v] = snapshot[src_rows]
        payload[: len(src_rows), sc.v] = src_rows
        payload[len(src_rows) :] = self._bad_ids((n_flood, sc.v + 1))
        received = self._deliver(dst, payload)
        # re-seed k slots; their peers are the round's samples, each probed (the Health call a fetch makes anyway)
        samples = v.reset(rows)
        c = self.costs
        per_node = (
            c.pull + c.push + served[rows] * c.pull + received * c.push + (samples != EMPTY).sum(axis=1) * c.probe
        )
        held = v.peers[rows]
        nonempty = held != EMPTY
        bad_view = ((held >= self.n_honest) & nonempty).sum(axis=1) / np.maximum(1, nonempty.sum(axis=1))
        s_ok = samples != EMPTY
        self._track(held)
        return dict(
            round=self.round,
            live=len(rows),
            bytes_p50=float(np.percentile(per_node, 50)),
            bytes_p99=float(np.percentile(per_node, 99)),
            bytes_max=float(per_node.max()),
            attacker_share_view=float(bad_view.mean()),
            attacker_share_view_max=float(bad_view.max()),
            attacker_share_samples=float(((samples >= self.n_honest) & s_ok).sum() / max(1, s_ok.sum())),
            departed_in_views=int(((held >= 0) & ~self.alive[np.maximum(held, 0)]).sum()),
            uniformity=self._uniformity(held),
        )

    def _track(self, held: np.ndarray) -> None:
        """Join and leave times: a joiner's first round in another view, a departed node's first round in none."""
        indeg = np.bincount(held[held != EMPTY], minlength=self.n_ids)
        joined = (self.joined_at > 0) & (self.first_seen < 0) & (indeg > 0)
        self.first_seen[joined] = self.round
        gone = (self.left_at >= 0) & (self.gone_at < 0) & (indeg == 0)
        self.gone_at[gone] = self.round

    def _uniformity(self, held: np.ndarray) -> float:
        """How close the honest ids' in-degrees in honest views are to those of views drawn uniformly at random: the
        coefficient of variation a uniform draw gives (1/sqrt(mean in-degree)) over the measured one, at most 1."""
        live_honest = np.flatnonzero(self.alive[: self.n_honest])
        honest = held[(held >= 0) & (held < self.n_honest)]
        indeg = np.bincount(honest, minlength=self.n_honest)[live_honest].astype(float)
        mean = indeg.mean()
        if mean <= 0 or indeg.std() == 0:
            return 1.0 if mean > 0 else 0.0
        return float(min(1.0, (1 / np.sqrt(mean)) / (indeg.std() / mean)))

    def _churn(self) -> None:
        sc = self.sc
        if sc.churn <= 0 or self.round == 1:
            return
        live = np.flatnonzero(self.alive[: self.n_honest])
        n = int(np.ceil(sc.churn * sc.honest))
        leaving = self.rng.choice(live, size=min(n, len(live) - 2), replace=False)
        self.alive[leaving], self.left_at[leaving] = False, self.round
        fresh = np.flatnonzero(~self.alive[: self.n_honest] & (self.left_at < 0))[:n]
        self.alive[fresh], self.joined_at[fresh] = True, self.round
        self._bootstrap(fresh)

    def _deliver(self, dst: np.ndarray, payload: np.ndarray) -> np.ndarray:
        """Offer each push to its destination, at most max_pushes per destination (a random choice of them);
        returns the pushes read per live honest node."""
        order = self.rng.permutation(len(dst))
        dst, payload = dst[order], payload[order]
        order = np.argsort(dst, kind="stable")
        dst, payload = dst[order], payload[order]
        first = np.searchsorted(dst, dst, side="left")
        nth = np.arange(len(dst)) - first  # the how-many-th push to its destination
        for j in range(self.sc.max_pushes):
            at = nth == j
            if not at.any():
                break
            self._offer(dst[at], payload[at])
        kept = dst[nth < self.sc.max_pushes]
        rows = np.flatnonzero(self.alive[: self.n_honest])
        return np.bincount(kept, minlength=self.n_ids)[rows]


def simulate(sc: Scenario, costs: Costs, progress=None, every: int = 20) -> dict:
    """Run `sc` for sc.rounds rounds. Returns the scenario, the per-round measurements (`rounds`), the first round
    whose uniformity reached 0.75 (None if never), join latency (rounds from joining to appearing in another view;
    median and max, None without churn), leave latency (rounds from leaving to being in no view), the bootstrap
    bytes of a joiner and seconds per round. `progress(str)` hears every `every` rounds."""
    t0 = time.perf_counter()
    sim = MembershipSim(sc, costs)
    rows: list[dict] = []
    for r in range(1, sc.rounds + 1):
        rows.append(sim.step())
        if progress and (r % every == 0 or r == sc.rounds):
            last = rows[-1]
            progress(
                f"  {sc.honest} honest, {sc.attackers:.0%} attackers, flood {sc.flood:g}: round {r}, uniformity "
                f"{last['uniformity']:.2f}, attacker share {last['attacker_share_view']:.3f}, "
                f"{last['bytes_p50'] / 1e3:.1f} KB/node"
            )
    joined = (sim.joined_at > 0) & (sim.first_seen > 0)
    left = (sim.left_at > 0) & (sim.gone_at > 0)
    join = (sim.first_seen - sim.joined_at)[joined]
    leave = (sim.gone_at - sim.left_at)[left]
    return dict(
        scenario=dataclasses.asdict(sc),
        identities_attacker_share=sim.n_bad / max(1, sim.n_bad + sc.honest),
        rounds=rows,
        rounds_to_uniform=next((x["round"] for x in rows if x["uniformity"] >= 0.75), None),
        join_rounds=_spread(join),
        leave_rounds=_spread(leave),
        bootstrap_bytes=int(np.ceil(sc.boot / 64)) * costs.bucket_read,
        seconds_per_round=(time.perf_counter() - t0) / sc.rounds,
    )


def _spread(x: np.ndarray) -> dict | None:
    return None if len(x) == 0 else dict(median=float(np.median(x)), max=int(x.max()), n=int(len(x)))
