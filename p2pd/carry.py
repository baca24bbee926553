"""What a node does for others beyond serving its own snapshots: it carries the snapshots of outbound-only
producers (the Push RPC: a producer no one can dial pushes each snapshot to a reachable neighbour, whose record and
signature it must carry unchanged) and dials a requester back to tell it whether it is reachable (the Reach RPC)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import grpc

from p2pd.context import CallContext
from p2pd.decoding import StreamDecoder
from p2pd.records import RecordRefused, open_record
from p2pd.refusals import UNDECODABLE
from p2pd.rpc import swarm_pb2 as pb
from p2pd.store import SnapshotStore
from p2pd.tensors import EncodedSnapshot, Limits, SnapshotKey, TensorStreamError

if TYPE_CHECKING:  # the servicer calls these functions with itself
    from p2pd.server import SwarmServicer


class CarriedSnapshots:
    """What a node carries for outbound-only producers (the Push RPC): per producer, its newest
    `keep` snapshots per kind and the newest signed record envelope that came with a push. At
    most `max_producers` producers and `max_bytes` wire bytes in all: a producer whose envelope
    expired (it stopped pushing here: gone, or it chose another carrier) is dropped first, and a
    push beyond the bounds is refused (busy)."""

    def __init__(self, max_producers: int = 4, keep: int = 2, max_bytes: int = 1 << 30):
        """`max_producers`: producers carried for at once; `keep`: snapshots kept per producer and kind; `max_bytes`:
        wire bytes held for all producers together."""
        self.max_producers, self.keep, self.max_bytes = max_producers, keep, max_bytes
        self._stores: dict[str, tuple[SnapshotStore, bytes, float]] = {}  # producer -> (store, envelope, expiry)
        self._lock = threading.Lock()

    def store(self, producer: str) -> tuple[SnapshotStore, bytes] | None:
        """(the producer's store, its newest envelope), or None when nothing is carried for it."""
        with self._lock:
            held = self._stores.get(producer)
            return (held[0], held[1]) if held is not None else None

    def put(self, producer: str, key: SnapshotKey, packed: EncodedSnapshot, envelope: bytes, record) -> bool:
        """Carry `packed` for `producer` with `envelope` (its signed `record`, a PeerRecord that
        signs the snapshot); an older envelope than the one held is not kept (a replayed push
        cannot roll the record back). False when over the bounds."""
        with self._lock:
            now = time.time()
            for gone in [p for p, (_, _, expiry) in self._stores.items() if expiry <= now]:
                del self._stores[gone]
            held = self._stores.get(producer)
            if held is None and len(self._stores) >= self.max_producers:
                return False
            others = sum(_bytes(st) for p, (st, _, _) in self._stores.items() if p != producer)
            store = held[0] if held is not None else SnapshotStore(keep=self.keep)
            if others + _bytes(store) + packed.wire_bytes > self.max_bytes:
                return False
            newer = held is None or record.expires_at >= held[2]
            self._stores[producer] = (store, envelope, record.expires_at) if newer else held
            store.put(key, packed)
        return True

    def producers(self) -> list[str]:
        """The peer ids this node carries snapshots for."""
        with self._lock:
            return sorted(self._stores)


def _bytes(store: SnapshotStore) -> int:
    return sum(packed.wire_bytes for packed in map(store.get, store.keys()) if packed is not None)


def receive_push(servicer: SwarmServicer, parts, context: CallContext) -> pb.PushReply:
    """Carry an outbound-only producer's snapshot: the first part is its signed request with
    the producer's signed record, which must name this node as its carrier and sign the
    snapshot's digest; the parts that follow are decoded and checked as a fetch is (limits,
    digest) and kept byte for byte. Refusals abort like Fetch's."""
    first = next(parts, UNDECODABLE)
    if first is UNDECODABLE or not first.HasField("request"):
        servicer._refuse(context, "bad_request", grpc.StatusCode.INVALID_ARGUMENT, "a push starts with its request")
    if servicer.carried is None or servicer.admission is None:
        servicer._refuse(context, "unsupported", grpc.StatusCode.UNIMPLEMENTED, "this node carries no snapshots")
    servicer._require_deadline(context, "push")
    request = first.request
    try:
        key = SnapshotKey.from_pb(request.key)
    except ValueError as e:
        servicer._refuse(context, "bad_request", grpc.StatusCode.INVALID_ARGUMENT, str(e))
    refusal = servicer.admission.check_push(request, key)
    if refusal is not None:
        servicer._refuse_admission(context, refusal)
    try:
        record = open_record(request.signed_record, now=time.time(), expected_peer_id=request.requester_peer_id)
    except RecordRefused as e:
        servicer._refuse(context, f"record_{e.reason}", grpc.StatusCode.PERMISSION_DENIED, f"record: {e}")
    if record.reachability != "outbound_only" or record.carrier != servicer.admission.server_peer_id:
        servicer._refuse(
            context, "not_carrier", grpc.StatusCode.PERMISSION_DENIED, "the record does not name this node carrier"
        )
    digest = record.snapshot_digest(key.kind, key.round, key.step)
    if digest is None:
        servicer._refuse(context, "unsigned", grpc.StatusCode.PERMISSION_DENIED, f"the record signs no {key}")
    if not servicer._fetch_slots.acquire(blocking=False):
        servicer._count("busy")
        servicer._refuse(context, "busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent transfers")
    stream = id(context)
    try:
        limits = Limits(max_total_bytes=servicer.carried.max_bytes)
        decoder, raw = StreamDecoder(limits, digest, expected_key=key.to_pb()), []
        for part in parts:  # the stall watchdog cancels a pusher that stops sending
            with servicer._lock:
                servicer._progress[stream] = (time.monotonic(), context)
            if part is UNDECODABLE or not part.HasField("snapshot_part"):
                servicer._refuse(context, "bad_request", grpc.StatusCode.INVALID_ARGUMENT, "not a snapshot part")
            decoder.feed_bytes(part.snapshot_part)
            raw.append(part.snapshot_part)
        decoder.finish()
    except TensorStreamError as e:
        servicer._refuse(context, f"push_{e.reason}", grpc.StatusCode.INVALID_ARGUMENT, e.detail)
    finally:
        with servicer._lock:
            servicer._progress.pop(stream, None)
        servicer._fetch_slots.release()
    packed = EncodedSnapshot(key.to_pb(), digest, decoder.header.total_bytes, tuple(raw))
    if not servicer.carried.put(request.requester_peer_id, key, packed, request.signed_record, record):
        servicer._refuse(context, "busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "carrying too much already")
    servicer._count("pushes_carried")
    return pb.PushReply(stored=True)


def dial_back(servicer: SwarmServicer, request: pb.ReachRequest, context: CallContext) -> pb.ReachReply:
    """Dial the requester back at the address its signed record advertises (the request
    names none, so nobody can point this node at a third party)."""
    if request is UNDECODABLE:
        servicer._refuse(context, "bad_request", grpc.StatusCode.INVALID_ARGUMENT, "undecodable request")
    if servicer.admission is None or servicer.dial is None:
        servicer._refuse(context, "unsupported", grpc.StatusCode.UNIMPLEMENTED, "this node does not dial back")
    refusal = servicer.admission.check_reach(request)
    if refusal is not None:
        servicer._refuse_admission(context, refusal)
    address = servicer.address_of(request.requester_peer_id)
    if address is None:
        return pb.ReachReply(reachable=False, detail="no live record of the requester")
    if not servicer._dials.acquire(blocking=False):
        servicer._refuse(context, "busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many dial-backs at once")
    try:
        answered = servicer.dial(address)
        libp2p = servicer.dial_libp2p is not None and servicer.dial_libp2p(request.requester_peer_id)
    finally:
        servicer._dials.release()
    if answered == request.requester_peer_id:
        return pb.ReachReply(reachable=True, address=address, libp2p_reachable=libp2p)
    return pb.ReachReply(
        reachable=False,
        address=address,
        detail="no answer there" if answered is None else "another node answers there",
        libp2p_reachable=libp2p,
    )
