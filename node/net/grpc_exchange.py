"""A daemon's exchange (node/protocol/exchange/__init__.py's seam): snapshots served by this node's gRPC server
(p2pd/server.py), their digests signed into its DHT record (p2pd/discovery.py) before they become visible, the
neighbours' fetched on the path each record names (node/net/fetcher.py) from the view of the live members
(node/net/view.py), and the final merge by hivemind's all-reduce (node/net/merge.py). An outbound-only node pushes
each snapshot to a carrier (node/net/carrier.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from node.net.carrier import Pusher
from node.net.fetcher import Fetcher
from node.net.metrics import NodeMetrics
from node.net.view import MemberView
from node.protocol.exchange import Accept, Member
from p2pd.server import PUSH_CHUNK_BYTES, SnapshotStore
from p2pd.tensors import SnapshotKey

log = logging.getLogger("atoll.exchange")
SAMPLED_MERGE_GROUP = 16  # the final merge's largest group under sampled membership


class GrpcExchange:
    """Serves on a joined `runtime` (node/net/runtime.py: the node's DHT membership `discovery`,
    TLS and admission): the final merge's averager when `comm.final_merge` is set (`merger`,
    shaped like `model_state`) and the gRPC server (`server`). Forks the averager process first,
    before any gRPC object exists in this process (gRPC does not survive a fork). `stop` is set when the
    node is asked to stop. Raises OSError (ports in use) or TimeoutError (the averager did not start), one line."""

    def __init__(
        self, cfg, runtime, model_state: dict, metrics: NodeMetrics, stop: threading.Event, task_digest: str = ""
    ):
        """`cfg`: the node's NodeConfig; `runtime`: its joined Runtime, served on here; `model_state`: the model's
        state dict (name -> tensor), whose shapes the final merge's all-reduce takes; `metrics`: its NodeMetrics;
        `stop`: the Event set on a stop request; `task_digest`: the task's hex digest (node/task/load.py), part of the
        merge's group key ("" for none). Raises OSError when the gRPC port is in use, TimeoutError when the averager
        process does not start."""
        self.comm, self.record_ttl = cfg.comm, cfg.net.record_ttl
        self.runtime, self.identity = runtime, runtime.identity
        self.metrics, self.stop, self.me = metrics, stop, runtime.identity.peer_id
        self.discovery, self.tls = self.runtime.discovery, self.runtime.tls
        self.merger = None
        if cfg.comm.final_merge:
            from node.net.merge import FinalMerge

            c = cfg.comm
            client = cfg.net.reachability == "outbound_only"  # known before the fork only when configured
            # sampled membership: groups of at most SAMPLED_MERGE_GROUP, matched through the DHT's group keys (one
            # Moshpit step, arXiv:2103.03239), not one all-reduce of the whole swarm
            group = cfg.node_count if cfg.net.membership == "full" else min(cfg.node_count, SAMPLED_MERGE_GROUP)
            self.merger = FinalMerge(
                self.discovery.dht,
                cfg.net.swarm,
                model_state,
                group,
                c.merge_timeout,
                c.merge,
                task_digest,
                client,
            )
        self.store = SnapshotStore(keep=cfg.comm.keep_snapshots, keep_kinds={"join": 1})  # node/net/join.py
        try:
            self.runtime.serve(self.store)
        except BaseException:  # a port in use: the averager process must not outlive us
            if self.merger is not None:
                self.merger.close()
            raise
        self.server = self.runtime.server
        self.fetcher = Fetcher(cfg.comm, runtime, None, metrics, stop)
        if cfg.net.membership == "sampled":  # node/net/sampled_view.py
            from node.net.sampled_view import SampledView
            from node.net.sampler import PeerSampler

            net = cfg.net
            args = (net.view_size, net.sample_size, net.sample_by_prefix)
            sampler = PeerSampler(self.me, runtime.advertised, self.fetcher.client, *args)
            self.server.servicer.sampling = sampler
            self.fetcher.present_record = True
            self.view = SampledView(cfg.comm, runtime, metrics, stop, sampler)
        else:
            self.view = MemberView(cfg.comm, runtime, metrics, stop)
        self.fetcher.view = self.view
        self.reachability = "direct"  # this node's, as published (see reachable_as)
        self.pusher: Pusher | None = None  # outbound-only: hands each snapshot to a carrier

    @property
    def pushed_bytes(self) -> int:
        """Wire bytes of this node's snapshots pushed to its carrier (outbound-only nodes)."""
        return self.pusher.pushed_bytes if self.pusher is not None else 0

    @property
    def sent_bytes(self) -> int:
        """Wire bytes this node's server has sent (snapshots fetched from it)."""
        return self.server.servicer.stats["bytes_sent"]

    @property
    def received_bytes(self) -> int:
        """Snapshot bytes this node fetched from its neighbours."""
        return self.fetcher.received_bytes

    @property
    def paths(self) -> dict[str, int]:
        """Snapshots fetched, by path (direct, relay, pushed)."""
        return self.fetcher.paths

    @property
    def live(self) -> int:
        """Live members at the last look."""
        return self.view.live

    # -- the Exchange protocol ----------------------------------------------------------------
    def members(self, round_: int) -> list[Member]:
        """Live peers (node.protocol.exchange.Exchange.members) from a view of the DHT that a background
        thread refreshes, so no gossip step waits for the DHT (node/net/view.py)."""
        return self.view.members(round_)

    def publish(self, key: SnapshotKey, tensors: dict, **record: Any) -> None:
        """Serve `tensors` as `key`, its digest (with every other held one's) signed into the
        record before the snapshot becomes visible: peers refuse snapshots whose digest this
        node has not signed, and a peer that sees the key finds it signed."""

        def sign(index: tuple[str, ...], packed) -> None:
            fields = dict(round=key.round, step=key.step, model_digest=packed.hexdigest, snapshots=index)
            self.discovery.update(**fields, **record)

        packed = self.store.publish(key, tensors, before_visible=sign)
        if self.pusher is not None:
            self.pusher.push(key, packed)

    # -- reachability: the path neighbours take to this node ---------------------------------
    def reachable_as(self, state: str) -> None:
        """Publish this node's reachability (p2pd.records.Reachability, see node/net/netcheck.py);
        outbound_only: from now on every snapshot is pushed to a carrier named in the record."""
        self.reachability = state
        self.metrics.reachability.labels(state=state).set(1)
        for other in ("direct", "relayed", "outbound_only"):
            if other != state:
                self.metrics.reachability.labels(state=other).set(0)
        self.view.keep_connected = state == "relayed"
        if state != "outbound_only":
            self.discovery.update(reachability=state, carrier="")
            return
        self.store.chunk_bytes = PUSH_CHUNK_BYTES  # first: one part must fit the carrier's request limit
        if self.merger is not None and not self.merger.client_mode:
            log.warning(
                "the final merge's all-reduce started before this node knew nobody can dial it: peers may wait "
                "for its part; set net.reachability: outbound_only to make it a client there"
            )
        if self.pusher is None:
            args = (self.discovery, self.view.candidates, self.fetcher.client, self.metrics, self.stop)
            args += (self.comm.fetch_timeout,)
            self.pusher = Pusher(self.store, *args)
        self.discovery.update(reachability=state, carrier=self.pusher.choose())
        for key in self.store.keys():  # what it published before the verdict, if small enough
            self.pusher.push(key, self.store.get(key))

    def note(self, round_: int, step: int = 0, **record: Any) -> None:
        """Update the signed record without a new snapshot (node.protocol.exchange.Exchange.note)."""
        self.discovery.update(round=round_, step=step, **record)

    def fetch_many(self, peers: Sequence[str], key: SnapshotKey, accept: Accept) -> dict[str, Any]:
        """Fetch `key` from `peers` in parallel under one deadline, comm.fetch_timeout
        (node.protocol.exchange.Exchange.fetch_many; node/net/fetcher.py)."""
        return self.fetcher.fetch_many(peers, key, accept)

    def all_reduce(self, round_: int, state: dict, how: str):
        """hivemind's all-reduce once every live peer finished round `round_` (bounded by
        comm.merge_timeout). Members agree up to float rounding; every member adopts the copy of
        the group's first peer id, so they end bit-identical."""
        from node.net.merge import adopt_canonical

        self.view.wait_all_at(round_, self.comm.merge_timeout)
        if not self.view.anyone_else():
            log.info("final merge skipped: no other live node")
            result = ({k: v.clone() for k, v in state.items()}, [self.me])
        else:
            result = self.merger.run(state)
        self.metrics.merge_peers.set(len(result[1]) if result is not None else 0)
        if result is None or result[1][0] == self.me:
            return result
        merged, group = result
        self.view.members()  # the canonical member's address, fresh
        return adopt_canonical(self.fetcher, group[0], round_ + 1, merged, self.comm.fetch_timeout), group

    def linger(self, round_: int) -> None:
        """Serve until every live peer reached `round_`, at most fetch_timeout + 2 record TTLs."""
        self.view.wait_all_at(round_, self.comm.fetch_timeout + 2 * self.record_ttl)

    def stopping(self) -> bool:
        """Whether the node was asked to stop."""
        return self.stop.is_set()

    def wait_for_members(self, want: int, timeout: float, say) -> None:
        """Before the first round: wait (up to `timeout` s) until `want` nodes are live; calls
        `say(event)` with a "waiting" event once per change of the count (node/net/view.py)."""
        self.view.wait_for_members(want, timeout, say)

    def close(self) -> None:
        """Stop serving and leave the swarm (what was started, in reverse order)."""
        self.view.close()
        if self.pusher is not None:
            self.pusher.close()
        self.fetcher.close()
        if self.merger is not None:  # it averages through the DHT: before the runtime leaves
            self.merger.close()
        self.runtime.close()
