"""A link model that keeps time: what a swarm's rounds cost on given access links, replayed from what each node did.

Each node's run is a sequence of operations (a trace, recorded by the simulator's exchange and engine):

- `Compute(steps)`: local training, `steps * step_seconds[node]` seconds;
- `Idle()`: the gap between two rounds (evaluation, checkpoint hand-off), `idle_seconds[node]` seconds;
- `Publish(key)`: the node's snapshot `key` can be fetched from now on;
- `Fetch(items)`: the node fetches every (source, key, bytes) at once and waits for all of them; a transfer starts
  when both ends are there (the source may publish later);
- `AllReduce(tag, group, nbytes)`: a barrier of `group`, then a ring all-reduce of `nbytes` per member, which
  moves 2 (n - 1) / n of them through every member's uplink and downlink;
- `Linger(key)`: after its last round, the node keeps serving until every other node that publishes `key` has
  (a daemon lingers so that slower neighbours can still fetch its last snapshot).

Every node has an uplink and a downlink (bytes per second). Transfers at the same time share the links they cross
with max-min fairness (progressive filling, as TCP flows roughly share a bottleneck): a transfer runs at the rate
of its tightest link's fair share, and what a slower transfer leaves of a link goes to the others. There is no
latency and no per-message overhead: links have rates only. Nothing here reads a clock; the same traces and links
give the same times.

`replay` returns, per node, the seconds of computation, of communication while not computing (waiting for
fetches and all-reduces), of idle gaps, and when it ended (all in virtual seconds from a common start).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-9


@dataclass(frozen=True)
class Compute:
    """Local training of `steps` steps."""

    steps: int


@dataclass(frozen=True)
class Idle:
    """The gap between two rounds."""


@dataclass(frozen=True)
class Publish:
    """The node serves snapshot `key` from now on."""

    key: tuple


@dataclass(frozen=True)
class Fetch:
    """The node fetches every `(source, key, bytes)` in `items` in parallel and waits for all."""

    items: tuple[tuple[str, tuple, int], ...]


@dataclass(frozen=True)
class AllReduce:
    """A ring all-reduce of `nbytes` per member among `group` (peer ids), told apart from others by `tag`."""

    tag: tuple
    group: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class Linger:
    """The node waits until every other node that publishes `key` has."""

    key: tuple


Op = Compute | Idle | Publish | Fetch | AllReduce | Linger


@dataclass
class Spent:
    """Where one node's virtual time went, in seconds: `compute`, `comm` (waiting for transfers and all-reduces),
    `idle`, `end`, when its last operation finished, and `round_ends`, when each of its rounds ended (the start
    of each gap between rounds)."""

    compute: float = 0.0
    comm: float = 0.0
    idle: float = 0.0
    end: float = 0.0
    round_ends: list[float] = field(default_factory=list)

    @property
    def utilization(self) -> float:
        """compute / end, in [0, 1] (0.0 for a node that did nothing)."""
        return self.compute / self.end if self.end > 0 else 0.0


def max_min_rates(src: np.ndarray, dst: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Max-min fair rates (bytes/s, float64, shape (F,)) of F transfers, transfer f from node src[f] to dst[f]
    (int arrays of node indices), on uplinks `up` and downlinks `down` (bytes/s, shape (N,)), by progressive
    filling: raise every unfrozen rate together until a link is full, freeze the transfers crossing it, repeat."""
    n, f = len(up), len(src)
    rate = np.zeros(f)
    if f == 0:
        return rate
    res = np.stack([src, n + dst])  # (2, F): the two links each transfer crosses
    cap = np.concatenate([up, down]).astype(float)
    frozen = np.zeros(f, dtype=bool)
    for _ in range(2 * n + 1):  # each pass fills at least one link
        live = ~frozen
        if not live.any():
            break
        count = np.bincount(res[:, live].ravel(), minlength=2 * n)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(count > 0, cap / np.maximum(count, 1), np.inf)
        level = share.min()
        full = share <= level * (1 + 1e-12)
        now = live & (full[res[0]] | full[res[1]])
        rate[now] = level
        frozen |= now
        cap -= np.bincount(res[:, now].ravel(), minlength=2 * n) * level
        cap = np.maximum(cap, 0.0)
    return rate


@dataclass
class _Node:
    ops: Sequence[Op]
    pc: int = 0
    until: float | None = None  # a timer (compute, idle or all-reduce transfer) ends then
    waiting: set = field(default_factory=set)  # transfers it waits for
    barrier: tuple | None = None  # the all-reduce it waits in
    lingers: tuple | None = None  # the key every other publisher must have published
    since: float = 0.0  # when its current wait began
    spent: Spent = field(default_factory=Spent)
    done: bool = False


def replay(
    traces: Mapping[str, Sequence[Op]],
    up: Mapping[str, float],
    down: Mapping[str, float],
    step_seconds: Mapping[str, float],
    idle_seconds: Mapping[str, float] | None = None,
    max_events: int = 10_000_000,
) -> dict[str, Spent]:
    """Where each node's time goes when the `traces` (peer id -> its operations, see the module docstring) run on
    links `up`/`down` (peer id -> bytes per second, > 0) with `step_seconds` per local step and `idle_seconds` per
    gap between rounds (peer id -> seconds; default 0). Raises ValueError for a trace that cannot complete (a fetch
    of a snapshot its source never publishes, an all-reduce a member never joins) or a missing or non-positive rate,
    and RuntimeError past `max_events` events."""
    ids = sorted(traces)
    index = {p: i for i, p in enumerate(ids)}
    for p in ids:
        if not (up.get(p, 0) > 0 and down.get(p, 0) > 0):
            raise ValueError(f"node {p} needs a positive uplink and downlink rate")
    up_v = np.array([up[p] for p in ids], dtype=float)
    down_v = np.array([down[p] for p in ids], dtype=float)
    idle_seconds = idle_seconds or {}
    nodes = {p: _Node(traces[p]) for p in ids}
    published: dict[tuple[str, tuple], float] = {}
    flows: dict[int, list] = {}  # id -> [src index, dst index, bytes left, owner's peer id]: the active transfers
    pending: dict[tuple[str, tuple], dict[int, list]] = {}  # (source, key) -> transfers waiting for its publish
    arrived: dict[tuple, dict[str, float]] = {}
    publishers: dict[tuple, set[str]] = {}  # key -> the nodes whose traces publish it
    for p in ids:
        for op in traces[p]:
            if isinstance(op, Publish):
                publishers.setdefault(op.key, set()).add(p)
    lingering: list[str] = []
    next_flow, now, dirty, rates = 0, 0.0, True, {}

    def run(p: str) -> None:  # a ready node does its operations until one makes it wait
        nonlocal next_flow, dirty
        node = nodes[p]
        while node.pc < len(node.ops):
            op = node.ops[node.pc]
            node.pc += 1
            if isinstance(op, Compute | Idle):
                seconds = op.steps * step_seconds[p] if isinstance(op, Compute) else idle_seconds.get(p, 0.0)
                if isinstance(op, Compute):
                    node.spent.compute += seconds
                else:
                    node.spent.idle += seconds
                    node.spent.round_ends.append(now)
                if seconds > 0:
                    node.until = now + seconds
                    return
            elif isinstance(op, Linger):
                node.lingers, node.since = op.key, now
                lingering.append(p)
                return
            elif isinstance(op, Publish):
                published[(p, op.key)] = now
                waiting = pending.pop((p, op.key), {})
                flows.update(waiting)
                dirty = dirty or bool(waiting)
            elif isinstance(op, Fetch):
                for source, key, nbytes in op.items:
                    if nbytes <= 0 or source == p:
                        continue
                    fid, next_flow = next_flow, next_flow + 1
                    flow = [index[source], index[p], float(nbytes), p]
                    node.waiting.add(fid)
                    if (source, key) in published:
                        flows[fid] = flow
                        dirty = True
                    else:
                        pending.setdefault((source, key), {})[fid] = flow
                if node.waiting:
                    node.since = now
                    return
            else:  # AllReduce
                here = arrived.setdefault(op.tag, {})
                here[p] = now
                node.barrier, node.since = op.tag, now
                if set(op.group) <= set(here):
                    members = [index[m] for m in op.group]
                    n = len(members)
                    slowest = min(min(up_v[i], down_v[i]) for i in members)
                    end = now + (2 * (n - 1) / n * op.nbytes / slowest if n > 1 else 0.0)
                    for m in op.group:
                        nodes[m].barrier, nodes[m].until = None, end
                return
        node.done = True
        node.spent.end = now

    ready = list(ids)
    for _ in range(max_events):
        for p in ready:
            run(p)
        ready = []
        for p in list(lingering):  # a lingering node goes on once every other publisher of its key has published
            node = nodes[p]
            if all((q, node.lingers) in published for q in publishers.get(node.lingers, ()) if q != p):
                lingering.remove(p)
                node.spent.comm += now - node.since
                node.lingers = None
                ready.append(p)
        if ready:
            continue
        if all(n.done for n in nodes.values()):
            return {p: nodes[p].spent for p in ids}
        if dirty:
            fids = list(flows)
            src = np.array([flows[f][0] for f in fids], dtype=int)
            dst = np.array([flows[f][1] for f in fids], dtype=int)
            rates = dict(zip(fids, max_min_rates(src, dst, up_v, down_v)))
            dirty = False
        timers = [n.until for n in nodes.values() if n.until is not None]
        finishes = [now + flows[f][2] / rates[f] for f in flows if rates[f] > 0]
        if not timers and not finishes:
            stuck = sorted(p for p, n in nodes.items() if not n.done)
            raise ValueError(f"the traces cannot complete: {stuck[:5]} wait for snapshots or members that never come")
        t = float(min(timers + finishes))
        for f in list(flows):
            flows[f][2] -= rates[f] * (t - now)
        now = t
        for f in [f for f in flows if flows[f][2] <= EPS * max(1.0, rates[f])]:
            pid = flows.pop(f)[3]
            owner = nodes[pid]
            owner.waiting.discard(f)
            dirty = True
            if not owner.waiting:
                owner.spent.comm += now - owner.since
                ready.append(pid)
        for p, n in nodes.items():
            if n.until is not None and n.until <= now + EPS:
                if n.barrier is None and n.pc > 0 and isinstance(n.ops[n.pc - 1], AllReduce):
                    n.spent.comm += n.until - n.since
                n.until = None
                ready.append(p)
    raise RuntimeError(f"the replay did not finish within {max_events} events")
