"""The gRPC side of a node: serve the snapshots it has published, and its signed record.

What it serves comes from its SnapshotStore (p2pd/store.py), encoded once at publish time, so
serving a fetch only writes ready bytes: the Fetch handler is registered with an identity
response serializer for that reason. Snapshots carried for outbound-only producers (Push) and
the dial-back check (Reach) are in p2pd/carry.py.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from p2pd.addresses import host_port, tcp_port_in_use
from p2pd.admission import Admission
from p2pd.carry import CarriedSnapshots, dial_back, receive_push
from p2pd.context import CallContext
from p2pd.refusals import UNDECODABLE, Refusals, lenient
from p2pd.rpc import swarm_pb2 as pb
from p2pd.sampling import Sampling, answer_probe, exchange_views
from p2pd.store import MAX_MESSAGE_BYTES, SnapshotStore
from p2pd.tensors import (
    SnapshotKey,
)

log = logging.getLogger(__name__)
# A fetch holds a server thread while the client reads, so every fetch must carry a deadline
# no longer than this: a peer that stops reading frees its thread when the deadline passes.
MAX_FETCH_SECONDS = 600.0
MAX_HEALTH_WAIT = 5.0  # seconds a Health call may wait for a snapshot
# An outbound-only node encodes its snapshots in parts of this size (it pushes them to its
# carrier, and the server's request limit must admit one part); the server's requests are
# otherwise tiny
PUSH_CHUNK_BYTES = 1024 * 1024
MAX_PUSH_MESSAGE_BYTES = PUSH_CHUNK_BYTES + 4096
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Swarm"].full_name  # "atoll.v1.Swarm"


@dataclass(frozen=True)
class TLSConfig:
    """PEM files. Server: cert + key. Client: ca (the cert that signed the server's)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None


class SwarmServicer:
    """Handlers for the atoll.v1.Swarm service (see proto/swarm.proto).

    Slots: at most `max_fetches` streams at once (the rest get RESOURCE_EXHAUSTED at once), at
    most `max_waits` Health calls waiting for a snapshot (the rest answer at once), so the
    server's threads always leave two for everything else, at most `per_identity` of them for one requester, and
    a stream whose reader stops reading for `stall_seconds` is cancelled, so one identity cannot
    hold every slot with streams it never reads. Refusals are counted in `refused` by reason."""

    def __init__(
        self,
        store: SnapshotStore,
        signed_record: Callable[[], bytes],
        max_fetches: int,
        max_waits: int = 1,
        admission: Admission | None = None,
        per_identity: int = 2,
        stall_seconds: float = 10.0,
        address_of: Callable[[str], str | None] = lambda peer_id: None,
        dial: Callable[[str], str | None] | None = None,
        dial_libp2p: Callable[[str], bool] | None = None,
        carried: CarriedSnapshots | None = None,
        sampling: Sampling | None = None,
        sign_probe: Callable[[bytes, str], bytes] | None = None,
    ):
        """`store`: this node's SnapshotStore; `signed_record()`: its signed record envelope (bytes); `max_fetches`:
        Fetch and Push streams served at once; `max_waits`: Health calls that may wait at once (at least 1);
        `admission`: checks every request, None serves anyone (Reach and Push are then refused); `per_identity`: Fetch
        streams at once per requester; `stall_seconds`: seconds without progress before a stream is cancelled;
        `address_of(peer_id)`: a requester's advertised address, None without a live record; `dial(address)`: the peer
        id answering there, or None (`dial` None: no dial-backs); `dial_libp2p(peer_id)`: whether it answers over
        libp2p (None: not checked); `carried`: what is carried for outbound-only producers, None carries nothing;
        `sampling`: the peer sampler whose view Health serves and takes pushes for (None: views are neither served nor
        read); `sign_probe(nonce, requester)`: this node's probe signature (p2pd/sampling.py; None: probes unanswered).
        Starts the stall watchdog thread."""
        self.store = store
        # Push: snapshots carried for outbound-only producers; None: this node carries none
        self.carried = carried
        # Reach over libp2p: dial_libp2p(peer_id) is whether that peer answers a libp2p Health stream
        self.dial_libp2p = dial_libp2p
        # Reach: the requester's advertised address (from its signed DHT record), and how to
        # check it; dial(address) returns the peer id that answered there, or None
        self.address_of, self.dial = address_of, dial
        self._dials = threading.BoundedSemaphore(2)  # dial-backs at once; the rest are refused as busy
        self.signed_record = signed_record
        self.sampling, self.sign_probe = sampling, sign_probe
        self.admission = admission  # None: serve anyone (tools and tests); daemons always pass one
        self._fetch_slots = threading.BoundedSemaphore(max_fetches)
        # Health calls that may wait for a snapshot at once; the rest answer at once, so waiting
        # neighbours never take the threads that serve fetches
        self._waits = threading.BoundedSemaphore(max(1, max_waits))
        self.per_identity, self.stall_seconds = per_identity, stall_seconds
        self._in_flight: Counter[str] = Counter()  # requester -> streams being served
        self._progress: dict[int, tuple[float, CallContext]] = {}  # stream -> (last progress, context)
        self.stats: Counter[str] = Counter()  # fetches_served, bytes_sent, not_found, bad_request, busy
        self._refusals = Refusals()
        self.refused = self._refusals.counts  # refusals by reason (admission's, busy_identity, stalled, ...)
        self._lock = threading.Lock()
        threading.Thread(target=self._cancel_stalled, name="atoll-stall-watch", daemon=True).start()

    def _refuse(self, context: CallContext, reason: str, code: grpc.StatusCode, details: str) -> None:
        """Count, log at most one line a minute, abort the call (raises)."""
        self._refusals.refuse(context, reason, code, details)

    def _refuse_admission(self, context: CallContext, refusal: str) -> None:
        """Abort a request admission refused: over its rate is RESOURCE_EXHAUSTED (back off and
        retry), anything else PERMISSION_DENIED."""
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if refusal == "rate" else grpc.StatusCode.PERMISSION_DENIED
        self._refuse(context, refusal, code, f"refused: {refusal}")

    def _cancel_stalled(self) -> None:
        while True:
            time.sleep(min(1.0, self.stall_seconds / 2))
            now = time.monotonic()
            with self._lock:
                stalled = [(k, ctx) for k, (t, ctx) in self._progress.items() if now - t > self.stall_seconds]
                for k, _ in stalled:
                    del self._progress[k]
                    self.refused["stalled"] += 1
            for _, ctx in stalled:
                ctx.cancel()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def Fetch(self, request: pb.FetchRequest, context: CallContext):
        """Stream the ready wire parts of the requested snapshot once the deadline, admission and slot checks pass;
        refusals abort with INVALID_ARGUMENT, PERMISSION_DENIED, NOT_FOUND or RESOURCE_EXHAUSTED."""
        if request is UNDECODABLE:
            self._refuse(context, "bad_request", grpc.StatusCode.INVALID_ARGUMENT, "undecodable request")
        self._require_deadline(context, "fetch")
        try:
            key = SnapshotKey.from_pb(request.key)
        except ValueError as e:
            self._refuse(context, "bad_request", grpc.StatusCode.INVALID_ARGUMENT, str(e))
        refusal = self.admission.check(request, key) if self.admission is not None else None
        if refusal is not None:
            self._refuse_admission(context, refusal)
        store = self._store_of(request.producer_peer_id)
        packed = store.get(key) if store is not None else None
        if packed is None:
            self._count("not_found")
            self._refuse(context, "not_found", grpc.StatusCode.NOT_FOUND, f"no snapshot {key}")
        requester = request.requester_peer_id
        with self._lock:
            over = self._in_flight[requester] >= self.per_identity
            if not over:
                self._in_flight[requester] += 1
        if over:
            self._refuse(
                context,
                "busy_identity",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self.per_identity} concurrent fetches per requester",
            )
        if not self._fetch_slots.acquire(blocking=False):
            self._release(requester, None)
            self._count("busy")
            self._refuse(context, "busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent fetches")
        stream = id(context)
        try:
            for part in packed.parts:
                if not context.is_active():  # client gave up, deadline passed, or stalled: stop producing
                    return
                with self._lock:
                    self._progress[stream] = (time.monotonic(), context)
                self._count("bytes_sent", len(part))
                yield part
            self._count("fetches_served")
        finally:
            self._release(requester, stream)
            self._fetch_slots.release()

    def _require_deadline(self, context: CallContext, call: str) -> None:
        """Refuse a transfer without a deadline of at most MAX_FETCH_SECONDS: it holds a server
        thread until the deadline passes."""
        remaining = context.time_remaining()
        if remaining is None or remaining > MAX_FETCH_SECONDS + 5:  # 5 s for clock and transit slack
            self._refuse(
                context,
                "bad_request",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a {call} needs a deadline of at most {MAX_FETCH_SECONDS:.0f} s",
            )

    def _store_of(self, producer: str) -> SnapshotStore | None:
        """This node's own store, or the one it carries for `producer` (None if none)."""
        if not producer:
            return self.store
        held = self.carried.store(producer) if self.carried is not None else None
        return held[0] if held is not None else None

    def Push(self, parts, context: CallContext) -> pb.PushReply:
        """Carry an outbound-only producer's snapshot (p2pd/carry.py: `receive_push`); refusals abort like Fetch's."""
        return receive_push(self, parts, context)

    def _release(self, requester: str, stream: int | None) -> None:
        with self._lock:
            self._in_flight[requester] -= 1
            if self._in_flight[requester] <= 0:
                del self._in_flight[requester]
            if stream is not None:
                self._progress.pop(stream, None)

    def Reach(self, request: pb.ReachRequest, context: CallContext) -> pb.ReachReply:
        """Dial the requester back at the address its signed record advertises (p2pd/carry.py: `dial_back`)."""
        return dial_back(self, request, context)

    def Health(self, request: pb.HealthRequest, context: CallContext) -> pb.HealthReply:
        """This node's signed record envelope and the keys of every snapshot it holds; with
        `wait_for`, once that snapshot is held (or a later one of its kind), or after
        `wait_seconds` (at most MAX_HEALTH_WAIT), or at once when every waiting slot is taken."""
        if request is UNDECODABLE:
            self._refuse(context, "bad_request", grpc.StatusCode.INVALID_ARGUMENT, "undecodable request")
        producer = request.producer_peer_id  # a producer this node carries for (see Push), "" for its own
        store = self._store_of(producer)
        if store is None:
            self._refuse(context, "not_found", grpc.StatusCode.NOT_FOUND, "carrying nothing for that producer")
        if request.HasField("wait_for") and request.wait_seconds > 0 and self._waits.acquire(blocking=False):
            try:
                key = SnapshotKey.from_pb(request.wait_for)
                wait = min(float(request.wait_seconds), MAX_HEALTH_WAIT, context.time_remaining() or 0.0)
                if math.isfinite(wait):
                    store.wait(key, wait)
            except ValueError:
                pass  # an unknown kind or a bad key: answer at once
            finally:
                self._waits.release()
        if self.sampling is not None and not producer and (request.view or request.want_view) and not request.nonce:
            return exchange_views(self.sampling, request)
        keys = store.keys()  # before the record: a key it shows is signed in the record (signed first)
        # a carrier answers with the newest envelope pushed: it signs every key held
        held = self.carried.store(producer) if producer else None
        record = self.signed_record() if not producer else held[1] if held is not None else b""
        reply = pb.HealthReply(signed_record=record, available=[k.to_pb() for k in keys])
        if self.sign_probe is not None and not producer:
            answer_probe(self.sign_probe, request, reply)
        return reply


class SwarmServer:
    """A gRPC server for one node. `start()` binds and returns the port."""

    def __init__(
        self,
        store: SnapshotStore,
        signed_record: Callable[[], bytes] = lambda: b"",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSConfig | None = None,
        max_workers: int = 12,
        admission: Admission | None = None,
        address_of: Callable[[str], str | None] = lambda peer_id: None,
        dial: Callable[[str], str | None] | None = None,
        dial_libp2p: Callable[[str], bool] | None = None,
        max_request_bytes: int = 64 * 1024,
        sampling: Sampling | None = None,
        sign_probe: Callable[[bytes, str], bytes] | None = None,
    ):
        """`store`: the snapshots served; `signed_record()`: the node's signed record envelope (bytes, default empty);
        `host`, `port`: where `start` binds (port 0: a free one); `tls`: cert and key files, None for plaintext;
        `max_workers`: server threads (>= 4: two stay free, about a third of the rest may wait in Health, the others
        serve fetches); `admission`, `address_of`, `dial`, `dial_libp2p`: as SwarmServicer takes them;
        `max_request_bytes`: the largest request accepted, bytes (never below MAX_PUSH_MESSAGE_BYTES); `sampling`,
        `sign_probe`: as SwarmServicer takes them. Raises
        ValueError when `max_workers` < 4."""
        if max_workers < 4:
            raise ValueError("max_workers must be >= 4 (two threads stay free for Health and other calls)")
        waits = max(1, (max_workers - 2) // 3)  # Health calls that may wait for a snapshot at once
        self.servicer = SwarmServicer(
            store,
            signed_record,
            max_fetches=max_workers - 2 - waits,
            max_waits=waits,
            admission=admission,
            address_of=address_of,
            dial=dial,
            dial_libp2p=dial_libp2p,
            carried=CarriedSnapshots(),
            sampling=sampling,
            sign_probe=sign_probe,
        )
        self.host, self._want_port, self.tls = host, port, tls
        self.port: int | None = None
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="atoll-grpc"),
            # beyond this many concurrent calls clients get RESOURCE_EXHAUSTED instead of queueing
            maximum_concurrent_rpcs=max_workers * 2,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Swarm requests are tiny but for pushed parts; roles serving Predict/Sample accept larger ones
                ("grpc.max_receive_message_length", max(max_request_bytes, MAX_PUSH_MESSAGE_BYTES)),
                ("grpc.so_reuseport", 0),
            ],
        )
        handlers = {
            # response_serializer=None: Fetch yields parts that are already serialized
            "Fetch": grpc.unary_stream_rpc_method_handler(
                self.servicer.Fetch, request_deserializer=lenient(pb.FetchRequest.FromString)
            ),
            "Health": grpc.unary_unary_rpc_method_handler(
                self.servicer.Health,
                request_deserializer=lenient(pb.HealthRequest.FromString),
                response_serializer=pb.HealthReply.SerializeToString,
            ),
            "Reach": grpc.unary_unary_rpc_method_handler(
                self.servicer.Reach,
                request_deserializer=lenient(pb.ReachRequest.FromString),
                response_serializer=pb.ReachReply.SerializeToString,
            ),
            "Push": grpc.stream_unary_rpc_method_handler(
                self.servicer.Push,
                request_deserializer=lenient(pb.PushPart.FromString),
                response_serializer=pb.PushReply.SerializeToString,
            ),
        }
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)])

    def add_service(self, register: Callable, servicer) -> None:
        """Serve another gRPC service on the same server, port, TLS and threads (an expert's
        Predict, a router's Sample): `register` is the generated add_*Servicer_to_server.
        Call before `start`."""
        register(servicer, self._server)

    def start(self) -> int:
        """Bind and serve; returns the port. Raises OSError naming the address and setting when
        the port is taken (gRPC itself would share it or log a cryptic bind error)."""
        bind = host_port(self.host, self._want_port)
        if tcp_port_in_use(self.host, self._want_port):
            raise OSError(
                f"cannot serve gRPC on {bind}: the port is in use by another process "
                f"(net.grpc_port; 0 picks a free port)"
            )
        if self.tls is not None:
            if not (self.tls.cert_file and self.tls.key_file):
                raise ValueError("TLS needs both cert_file and key_file")
            creds = grpc.ssl_server_credentials(
                [(Path(self.tls.key_file).read_bytes(), Path(self.tls.cert_file).read_bytes())]
            )
            self.port = self._server.add_secure_port(bind, creds)
        else:
            self.port = self._server.add_insecure_port(bind)
        if not self.port:
            raise OSError(f"could not bind the gRPC server to {bind} (net.host, net.grpc_port)")
        self._server.start()
        return self.port

    @property
    def address(self) -> str:
        """`host:port` of the bound server (an IPv6 host in brackets); meaningful after start()."""
        return host_port(self.host, self.port)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving, giving calls in flight `grace` seconds, and wait at most `grace + 5` s for the shutdown."""
        self._server.stop(grace).wait(grace + 5)
