"""The members a node sees with sampled membership (net.membership: sampled): itself and this round's probed sample
of its Basalt view (node/net/sampler.py), instead of every record in the DHT directory.

The round protocols see the same MemberView interface (node/net/view.py): `members(round)` is this node and the
round's sample (so with comm.topology complete, the sample is the neighbourhood: Epidemic Learning's s random
out-neighbours, de Vos et al. 2023, arXiv:2310.01972), `records` hold the probed records (fresh rounds and snapshot
digests), the background thread runs the sampler's view exchanges instead of re-reading the directory. Waiting for
the swarm before the first round counts the members the directory's buckets suggest (a few bucket reads), and waiting
for peers to reach a round asks the round's sample only.
"""

from __future__ import annotations

import logging
import threading
import time

from node.net.metrics import NodeMetrics
from node.net.sampler import SAMPLE_SECONDS, PeerSampler
from node.net.view import MemberView
from node.protocol.exchange import Member
from p2pd.discovery import DiscoveryError

log = logging.getLogger("atoll.exchange")


class SampledView(MemberView):
    """A MemberView over a PeerSampler (see the module docstring)."""

    def __init__(self, comm, runtime, metrics: NodeMetrics, stop: threading.Event, sampler: PeerSampler):
        """`comm`, `runtime`, `metrics`, `stop`: as MemberView takes them; `sampler`: the node's PeerSampler (also
        the gRPC server's Sampling hooks)."""
        super().__init__(comm, runtime, metrics, stop)
        self.sampler = sampler
        self._round: int | None = None  # the round of the current sample

    def _own(self) -> list:
        record = self.discovery.record
        return [record] if record is not None else []

    def members(self, round_: int | None = None) -> list[Member]:
        """This node and round `round_`'s probed sample (drawn once per round), as MemberView.members filters them."""
        if round_ is not None and round_ != self._round:
            self._round = round_
            self._set(self._own() + self.sampler.sample())
        return super().members(round_)

    def refresh(self) -> None:
        """Bootstrap from the directory while the view is empty, then probe a sample (raises DiscoveryError)."""
        self.sampler.bootstrap_if_empty(self.discovery)
        self._set(self._own() + self.sampler.sample())

    def _refresh_loop(self) -> None:
        while not self.stop.wait(SAMPLE_SECONDS) and not self._closed:
            try:
                self.sampler.bootstrap_if_empty(self.discovery)
                self.sampler.exchange()
            except DiscoveryError as e:
                if self.stop.is_set() or self._closed:
                    return
                log.warning("could not read the directory to bootstrap the view (%s); retrying", e)

    def anyone_else(self) -> bool:
        """Whether this node knows another member (its view is not empty)."""
        return bool(self.sampler.peers())

    def wait_all_at(self, round_: int, timeout: float) -> None:
        """Until every peer of the current sample has reached `round_` (probed again every half second), at most
        `timeout` s or a stop. A peer that stops answering leaves the sample."""
        deadline = time.monotonic() + timeout
        waiting = [p.peer_id for p in self._view or [] if p.peer_id != self.me]
        while waiting and time.monotonic() < deadline and not self.stop.is_set():
            probed = {p: self.sampler.probe(p) for p in waiting}
            waiting = [p for p, r in probed.items() if r is not None and r.round < round_]
            if waiting:
                self.stop.wait(0.5)

    def wait_for_members(self, want: int, timeout: float, say) -> None:
        """Before the first round: until the directory's buckets suggest `want` members (BOOT_BUCKETS bucket reads a
        second, scaled to the whole directory), at most `timeout` s; says "waiting" events as MemberView does."""
        deadline, said = time.monotonic() + timeout, None
        while not self.stop.is_set():
            try:
                estimate = self.sampler.bootstrap(self.discovery)
            except DiscoveryError:
                if self.stop.is_set():
                    return
                raise
            self.live = estimate
            self.metrics.peers_live.set(estimate)
            if estimate >= want:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "about %d of %d nodes live after %.0f s (comm.join_timeout); starting", estimate, want, timeout
                )
                return
            if said != estimate:
                said = estimate
                say(
                    dict(
                        event="waiting", live=estimate, want=want, seconds_left=round(left), peers=self.sampler.peers()
                    )
                )
            self.stop.wait(1.0)
