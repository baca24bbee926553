"""Basalt peer sampling (Auvolat, Bromberg, Frey, Mvondo, Taïani; Middleware 2023; arXiv:2102.04063), many views.

A view is `v` slots. Slot i holds a secret random seed s_i and, of every peer id it was ever offered, the one of
lowest rank(s_i, id): a *stubborn* choice. Offering a slot more ids, or the same ids more often, cannot move it but to
a lower rank, and the ranks are set by seeds the offerer never sees, so flooding a node with attacker ids wins an
attacker only the slots where one of its ids is the lowest-ranked of all ids the node has seen: in the limit, its share
of identities, not its share of messages. Each round a node pulls the view of the peer in its least-hit slot and pushes
its own view to the next least-hit; a slot's `hits` counts how often its peer was offered again (so over-advertised
peers are asked less) and how often it was picked. Every round, `k` slots (round-robin) get fresh seeds: the peers they
held are the round's samples (each held its slot for v/k rounds, long enough to converge to that seed's minimum), and
the slots refill from the rest of the view at once.

Ids are small integers the caller assigns (the daemon interns peer ids, the simulator numbers its virtual nodes), each
with a 64-bit hash the caller computes once (`peer_hash` for peer ids): rank(s, id) = mix(s XOR hash(id)). One class
holds `n` views as arrays, so the membership simulator (n = 10,000 virtual nodes, vectorised) and a daemon (n = 1) run
the same code.
"""

from __future__ import annotations

import hashlib

import numpy as np

EMPTY = -1  # a slot holding no peer
NO_RANK = np.uint64(2**64 - 1)  # an empty slot's rank: every offered id beats it
_MIX = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's first multiplier
_SHIFT = np.uint64(32)
_PREFIX_SALT = np.uint64(0x9E3779B97F4A7C15)
_LOW_BITS = np.uint64(24)
_HIGH = np.uint64(((1 << 24) - 1) << 40)


def peer_hash(peer_id: str) -> int:
    """The 64-bit hash of a peer id (str) that Basalt ranks it by: the first 8 bytes of its BLAKE2b digest (int)."""
    return int.from_bytes(hashlib.blake2b(peer_id.encode(), digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    x *= _MIX
    x ^= x >> _SHIFT
    return x


def rank(seeds: np.ndarray, hashes: np.ndarray, prefixes: np.ndarray | None = None) -> np.ndarray:
    """rank(seed, id) for broadcastable uint64 arrays `seeds` and `hashes` (ids' hashes): (seed ^ hash) * C,
    xor-shifted, a bijection of seed ^ hash, so for a uniform secret seed every id's rank is uniform whatever hash it
    ground. With `prefixes` (hashes of the network prefix each id was seen at, broadcastable like `hashes`) the rank is
    hierarchical,
    Basalt's defence against identities minted in bulk: the top 24 bits rank the prefix, the rest the id within it, so
    a slot first picks a prefix uniformly among the prefixes it saw, and a thousand ids in one prefix win no more slots
    than one id there."""
    x = _mix(np.bitwise_xor(seeds, hashes))
    if prefixes is None:
        return x
    p = _mix(np.bitwise_xor(np.bitwise_xor(seeds, prefixes), _PREFIX_SALT))
    return (p & _HIGH) | (x >> _LOW_BITS)


class BasaltViews:
    """`n` Basalt views of `v` slots each (see the module docstring): arrays `peers` (int64 ids, EMPTY when none),
    `hashes` (their uint64 hashes), `seeds`, `ranks` (uint64) and `hits` (int32), all of shape [n, v]."""

    def __init__(self, n: int, v: int = 64, k: int = 1, seed: int | None = None, hierarchical: bool = False):
        """`n`: views held (1 in a daemon); `v`: slots per view (>= 1); `k`: slots re-seeded per round (1 <= k <= v;
        a slot lives v/k rounds, and the longer it lives the closer its peer is to the lowest rank of all ids);
        `seed`: seeds the slots' seeds (None: from the OS, as a daemon must: an attacker who knows a node's seeds can
        grind ids that win its slots); `hierarchical`: rank by network prefix first (see `rank`), offers then carry
        prefix hashes. Raises ValueError on sizes out of range."""
        if n < 1 or v < 1 or not 1 <= k <= v:
            raise ValueError(f"need n >= 1, v >= 1 and 1 <= k <= v, got n={n}, v={v}, k={k}")
        self.n, self.v, self.k, self.hierarchical = n, v, k, hierarchical
        self._rng = np.random.default_rng(seed)
        self.seeds = self._rng.integers(0, 2**64, size=(n, v), dtype=np.uint64, endpoint=False)
        self.peers = np.full((n, v), EMPTY, np.int64)
        self.hashes = np.zeros((n, v), np.uint64)
        self.prefixes = np.zeros((n, v), np.uint64)  # hashes of the prefixes the peers were seen at (hierarchical)
        self.ranks = np.full((n, v), NO_RANK, np.uint64)
        self.hits = np.zeros((n, v), np.int32)
        self._cursor = np.zeros(n, np.int64)  # next slot each view re-seeds

    def offer(
        self,
        rows: np.ndarray,
        ids: np.ndarray,
        hashes: np.ndarray,
        prefixes: np.ndarray | None = None,
        chunk: int = 1024,
    ) -> None:
        """Offer candidate ids to views `rows` (int array [m], distinct): `ids` int64 [m, c] (EMPTY pads), `hashes`
        uint64 [m, c], `prefixes` uint64 [m, c] (hashes of their network prefixes; needed by a hierarchical view,
        ignored by a flat one). Each slot takes its lowest-ranked candidate if that beats its peer; a slot whose peer
        is offered again counts a hit per copy. The caller leaves a view's own id out of its candidates. Works in
        chunks of `chunk` rows (memory: chunk * v * c * 8 bytes)."""
        rows, ids, hashes = np.asarray(rows), np.asarray(ids, np.int64), np.asarray(hashes, np.uint64)
        if self.hierarchical and prefixes is None:
            raise ValueError("a hierarchical view needs the candidates' prefixes")
        prefixes = np.zeros_like(hashes) if prefixes is None else np.asarray(prefixes, np.uint64)
        if ids.shape != hashes.shape or ids.shape != prefixes.shape or ids.ndim != 2 or ids.shape[0] != len(rows):
            raise ValueError(f"ids {ids.shape}, hashes and prefixes must all be [len(rows)={len(rows)}, c]")
        for a in range(0, len(rows), chunk):
            r, cid, ch, cp = rows[a : a + chunk], ids[a : a + chunk], hashes[a : a + chunk], prefixes[a : a + chunk]
            by_prefix = cp[:, None, :] if self.hierarchical else None
            ranks = rank(self.seeds[r][:, :, None], ch[:, None, :], by_prefix)  # [m, v, c]
            ranks[np.broadcast_to((cid == EMPTY)[:, None, :], ranks.shape)] = NO_RANK
            best = ranks.argmin(axis=2)  # [m, v]
            best_rank = np.take_along_axis(ranks, best[:, :, None], axis=2)[:, :, 0]
            best_id = np.take_along_axis(cid, best, axis=1)
            best_hash = np.take_along_axis(ch, best, axis=1)
            best_prefix = np.take_along_axis(cp, best, axis=1)
            self.hits[r] += (cid[:, None, :] == self.peers[r][:, :, None]).sum(axis=2, dtype=np.int32)
            better = best_rank < self.ranks[r]
            rr, ss = np.nonzero(better)
            rr = r[rr]
            self.peers[rr, ss] = best_id[better]
            self.hashes[rr, ss] = best_hash[better]
            self.prefixes[rr, ss] = best_prefix[better]
            self.ranks[rr, ss] = best_rank[better]
            self.hits[rr, ss] = 0

    def select(self, rows: np.ndarray) -> np.ndarray:
        """For each view in `rows`, the peer of its least-hit non-empty slot (ties: the lower slot), whose hits then
        count one more; EMPTY for an empty view. Returns int64 [len(rows)]."""
        rows = np.asarray(rows)
        hits = np.where(self.peers[rows] == EMPTY, np.iinfo(np.int32).max, self.hits[rows])
        slot = hits.argmin(axis=1)
        chosen = self.peers[rows, slot]
        live = chosen != EMPTY
        self.hits[rows[live], slot[live]] += 1
        return chosen

    def reset(self, rows: np.ndarray) -> np.ndarray:
        """Re-seed the next k slots (round-robin) of views `rows` and refill them from the rest of each view. Returns
        the peers those slots held, the round's samples: int64 [len(rows), k] (EMPTY where a slot was empty)."""
        rows = np.asarray(rows)
        slots = (self._cursor[rows][:, None] + np.arange(self.k)[None, :]) % self.v  # [m, k]
        samples = np.take_along_axis(self.peers[rows], slots, axis=1).copy()
        rr = np.repeat(rows, self.k)
        ss = slots.reshape(-1)
        self.seeds[rr, ss] = self._rng.integers(0, 2**64, size=len(rr), dtype=np.uint64, endpoint=False)
        self.peers[rr, ss], self.ranks[rr, ss], self.hits[rr, ss] = EMPTY, NO_RANK, 0
        self._cursor[rows] = (self._cursor[rows] + self.k) % self.v
        self.offer(rows, self.peers[rows].copy(), self.hashes[rows].copy(), self.prefixes[rows].copy())
        return samples

    def forget(self, rows: np.ndarray, dead: np.ndarray) -> int:
        """Empty every slot of views `rows` holding an id for which `dead` (bool array indexed by id) is True: a peer
        whose probe failed or whose ticket expired. Returns the number of slots emptied."""
        rows = np.asarray(rows)
        held = self.peers[rows]
        gone = (held != EMPTY) & dead[np.maximum(held, 0)]
        rr, ss = np.nonzero(gone)
        rr = rows[rr]
        self.peers[rr, ss], self.ranks[rr, ss], self.hits[rr, ss] = EMPTY, NO_RANK, 0
        return len(rr)

    def oldest(self, row: int) -> list[int]:
        """The distinct peers of view `row`, oldest slot first: the slots next to be re-seeded, which have had the
        longest to reach their seed's lowest rank (Basalt's samples are the peers they hold when re-seeded)."""
        order = (self._cursor[row] + np.arange(self.v)) % self.v
        return [p for p in dict.fromkeys(self.peers[row, order].tolist()) if p != EMPTY]

    def view(self, row: int) -> np.ndarray:
        """The distinct peers view `row` holds (int64, sorted)."""
        held = self.peers[row]
        return np.unique(held[held != EMPTY])
