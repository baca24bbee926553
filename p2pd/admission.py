"""Who may fetch from a node: signed requests, known identities, a rate per identity.

A fetch carries the requester's peer id, its clock and an Ed25519 signature over
``fetch_message(server, requester, key, issued_at)``. Naming the server stops a request
recorded at one node being replayed to another; the clock bounds replays to the same node to
``max_skew`` seconds. The server then refuses, with a reason it counts:

- ``unsigned``: no or an invalid signature, or a peer id that is not an Ed25519 key;
- ``stale``: issued_at further than ``max_skew`` from the server's clock;
- ``unknown``: a valid identity without a live record in the swarm's DHT (``is_known``) and
  without one presented: a request may carry the requester's signed record (sampled membership,
  where a server has not read every member's record), which admits it while the record is valid;
- ``rate``: the identity spent its token bucket (``rate`` per second, ``burst`` deep).

What this does and does not buy is written up in docs/security.md: identities are free
Ed25519 keys, so a rate per identity bounds what one identity costs a server, not how many
identities an attacker brings.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable

import blake3
from hivemind.utils import get_dht_time

from p2pd.identity import Identity, verify
from p2pd.records import RecordRefused, open_record
from p2pd.rpc import swarm_pb2 as pb
from p2pd.tensors import SnapshotKey

DOMAIN = b"atoll/fetch/v1\x00"
MAX_PRESENTED = 100_000  # presented records remembered (oldest forgotten first)
PREDICT_SCALE = 50  # Predict calls allowed per fetch (security.fetch_rate and fetch_burst)


def fetch_message(
    server_peer_id: str, requester_peer_id: str, key: SnapshotKey, issued_at: float, producer_peer_id: str = ""
) -> bytes:
    """The bytes a fetch request signs: DOMAIN, then the server and requester peer ids, the key's kind, round and step,
    and `issued_at` (Unix seconds), joined by `|`; a fetch of a carried snapshot (see push_message) adds
    `carried` and its producer's peer id."""
    fields = [server_peer_id, requester_peer_id, key.kind, str(key.round), str(key.step), repr(float(issued_at))]
    if producer_peer_id:
        fields += ["carried", producer_peer_id]
    return DOMAIN + "|".join(fields).encode()


def push_message(
    server_peer_id: str, requester_peer_id: str, key: SnapshotKey, issued_at: float, envelope: bytes
) -> bytes:
    """The bytes a Push request (an outbound-only node handing its snapshot `key` to its carrier) signs: DOMAIN,
    then the carrier's and the producer's peer ids, `push`, the key's kind, round and step, `issued_at` and the
    BLAKE3 of the record `envelope` it carries (so a recorded request cannot carry another envelope)."""
    fields = (
        server_peer_id,
        requester_peer_id,
        "push",
        key.kind,
        str(key.round),
        str(key.step),
        repr(float(issued_at)),
        blake3.blake3(envelope).hexdigest(),
    )
    return DOMAIN + "|".join(fields).encode()


def reach_message(server_peer_id: str, requester_peer_id: str, issued_at: float) -> bytes:
    """The bytes a dial-back (Reach) request signs: DOMAIN, then the server and requester peer ids, `reach` and
    `issued_at` (Unix seconds), joined by `|`."""
    return DOMAIN + "|".join((server_peer_id, requester_peer_id, "reach", repr(float(issued_at)))).encode()


def predict_message(server_peer_id: str, request) -> bytes:
    """The bytes a Predict request (router_pb2.PredictRequest) signs: DOMAIN, then the expert and requester peer ids,
    `predict`, the clustering digest, `issued_at` (Unix seconds) and the BLAKE3 of its x and t, joined by `|`: a
    signature seen on the wire cannot carry other inputs."""
    payload = blake3.blake3(request.x.SerializeToString() + array("f", request.t).tobytes()).hexdigest()
    parts = (
        server_peer_id,
        request.requester_peer_id,
        "predict",
        request.cluster_digest,
        repr(float(request.issued_at)),
        payload,
    )
    return DOMAIN + "|".join(parts).encode()


def sign_predict(identity: Identity, server_peer_id: str, request, now: float) -> None:
    """Fill `request` (a router_pb2.PredictRequest, x and t already set) with `identity`'s signature for the expert
    `server_peer_id`, issued at `now` (Unix seconds)."""
    request.requester_peer_id, request.issued_at = identity.peer_id, now
    request.signature = identity.sign(predict_message(server_peer_id, request))


def signed_reach(identity: Identity, server_peer_id: str, now: float) -> pb.ReachRequest:
    """A ReachRequest from `identity` to `server_peer_id`, issued at `now` (Unix seconds) and Ed25519-signed over
    `reach_message`."""
    sig = identity.sign(reach_message(server_peer_id, identity.peer_id, now))
    return pb.ReachRequest(requester_peer_id=identity.peer_id, issued_at=now, signature=sig)


def signed_request(
    identity: Identity, server_peer_id: str, key: SnapshotKey, now: float, producer_peer_id: str = ""
) -> pb.FetchRequest:
    """A FetchRequest for `key` from `identity` to `server_peer_id` (of the snapshot it carries for
    `producer_peer_id`, if given), issued at `now` (Unix seconds) and Ed25519-signed over `fetch_message`."""
    sig = identity.sign(fetch_message(server_peer_id, identity.peer_id, key, now, producer_peer_id))
    return pb.FetchRequest(
        key=key.to_pb(),
        requester_peer_id=identity.peer_id,
        issued_at=now,
        signature=sig,
        producer_peer_id=producer_peer_id,
    )


def signed_push(identity: Identity, server_peer_id: str, key: SnapshotKey, now: float, envelope: bytes):
    """The first PushPart of a push of `key` to the carrier `server_peer_id`: a PushRequest from `identity` issued at
    `now`, Ed25519-signed over `push_message`, with `envelope` (the producer's signed record)."""
    sig = identity.sign(push_message(server_peer_id, identity.peer_id, key, now, envelope))
    request = pb.PushRequest(
        requester_peer_id=identity.peer_id, issued_at=now, signature=sig, key=key.to_pb(), signed_record=envelope
    )
    return pb.PushPart(request=request)


class TokenBuckets:
    """One token bucket per identity; the least recently used are forgotten beyond `max_keys`
    (a forgotten identity starts again with a full bucket, which costs the attacker a fresh
    DHT record per identity: see ``unknown``)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 4096, clock: Callable[[], float] = time.monotonic):
        """`rate`: tokens refilled per second per identity; `burst`: tokens a full bucket holds; `max_keys`: identities
        remembered; `clock()`: the time in seconds (time.monotonic). Raises ValueError when `rate` <= 0 or
        `burst` < 1."""
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # id -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        """Spend one token from `key`'s bucket (refilled at `rate` per second, capped at `burst`); False, spending
        nothing, when it holds less than one."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return ok


class Admission:
    """The server-side check of one FetchRequest: None to serve it, or the refusal reason."""

    def __init__(
        self,
        server_peer_id: str,
        is_known: Callable[[str], bool],
        rate: float,
        burst: int,
        max_skew: float = 30.0,
        clock: Callable[[], float] = time.time,
        presented: bool = False,
    ):
        """`server_peer_id`: this node's peer id, which every signed request must name; `is_known(peer_id)`: whether a
        requester has a live record in the DHT; `rate`, `burst`: each requester's requests per second and bucket depth
        (Predict has a bucket of its own, PREDICT_SCALE times both); `max_skew`: seconds a request's issued_at may
        differ from `clock()`, Unix seconds (time.time); `presented`: a fetch's requester_record (the requester's
        signed record, valid and unexpired) admits it as known (sampled membership). Raises ValueError unless
        `rate` > 0 and `burst` >= 1."""
        self.server_peer_id, self.is_known, self.max_skew, self.clock = server_peer_id, is_known, max_skew, clock
        self.buckets = TokenBuckets(rate, burst)
        self.presented: OrderedDict[str, float] | None = OrderedDict() if presented else None  # peer id -> expiry
        # a router calls an expert once per sampling step: Predict gets a bucket of its own,
        # PREDICT_SCALE times the fetch rate, so a long sampling run is not cut off halfway
        self.predict_buckets = TokenBuckets(rate * PREDICT_SCALE, burst * PREDICT_SCALE)

    def check(self, request: pb.FetchRequest, key: SnapshotKey) -> str | None:
        """None to serve the fetch of `key`, else the refusal reason: `unsigned`, `stale`, `unknown` or `rate`."""
        return self._check(
            request,
            lambda: fetch_message(
                self.server_peer_id, request.requester_peer_id, key, request.issued_at, request.producer_peer_id
            ),
        )

    def check_push(self, request: pb.PushRequest, key: SnapshotKey) -> str | None:
        """The same checks for a Push of `key` (see SwarmServicer.Push); it spends a fetch token."""
        return self._check(
            request,
            lambda: push_message(
                self.server_peer_id, request.requester_peer_id, key, request.issued_at, request.signed_record
            ),
        )

    def check_reach(self, request: pb.ReachRequest) -> str | None:
        """The same checks for a dial-back request (see SwarmServicer.Reach)."""
        return self._check(
            request, lambda: reach_message(self.server_peer_id, request.requester_peer_id, request.issued_at)
        )

    def check_predict(self, request) -> str | None:
        """The same checks for an expert's Predict request (a router_pb2.PredictRequest), with
        its own token bucket (see PREDICT_SCALE)."""
        return self._check(request, lambda: predict_message(self.server_peer_id, request), self.predict_buckets)

    def _check(self, request, message: Callable[[], bytes], buckets: TokenBuckets | None = None) -> str | None:
        requester = request.requester_peer_id
        if not request.signature or len(requester) > 128:
            return "unsigned"
        if not math.isfinite(request.issued_at) or abs(self.clock() - request.issued_at) > self.max_skew:
            return "stale"
        if not verify(requester, message(), request.signature):
            return "unsigned"
        if not self._presented(request) and not self.is_known(requester):
            return "unknown"
        if not (buckets or self.buckets).take(requester):
            return "rate"
        return None

    def _presented(self, request) -> bool:
        """Whether the (signed, checked) request's requester is admitted by a record it presented, now or before."""
        if self.presented is None:
            return False
        requester, now = request.requester_peer_id, get_dht_time()
        envelope = getattr(request, "requester_record", b"")
        if envelope and self.presented.get(requester, 0.0) <= now:
            try:
                record = open_record(envelope, now=now, expected_peer_id=requester)
            except RecordRefused:
                return False
            self.presented[requester] = record.expires_at
            self.presented.move_to_end(requester)
            while len(self.presented) > MAX_PRESENTED:
                self.presented.popitem(last=False)
        return self.presented.get(requester, 0.0) > now
