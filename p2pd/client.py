"""Fetching from a peer: deadlines, bounded retries, typed errors, every byte checked.

Errors a caller handles (all ``FetchError``, each with a ``reason`` for metrics):
- ``FetchTimeout``  reason ``timeout``: the peer did not deliver within the deadline.
- ``FetchRefused``  reason ``not_found`` / ``unavailable`` / ``busy`` / ``rate_limited`` /
  ``denied`` / ``refused``: the peer said no (``denied``: its admission refused our signed
  request, see p2pd/admission.py), or could not be reached after the allowed retries.
- ``BadSnapshot``   reason from ``TensorStreamError`` (``truncated``, ``digest_mismatch``,
  ``oversize``, ``non_finite``, ...): the peer sent data that must not be used.

Only connection-level failures (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried, with
exponential backoff, and never past the overall deadline. Bad data is never retried: the
caller skips that peer for this step.
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from p2pd.admission import signed_push, signed_reach, signed_request
from p2pd.decoding import StreamDecoder
from p2pd.errors import ReasonedError
from p2pd.identity import Identity
from p2pd.rpc import swarm_pb2 as pb
from p2pd.rpc import swarm_pb2_grpc as pb_grpc
from p2pd.sampling import entries_of, to_pb
from p2pd.server import MAX_FETCH_SECONDS, MAX_MESSAGE_BYTES, MAX_PUSH_MESSAGE_BYTES, SERVICE_NAME, TLSConfig
from p2pd.tensors import Limits, SnapshotKey, TensorStreamError


class FetchError(ReasonedError):
    """Base of the three errors a fetch can end with."""


class FetchTimeout(FetchError):
    """The peer did not deliver within the deadline (reason `timeout`)."""

    pass


class FetchRefused(FetchError):
    """The peer said no, or could not be reached within the allowed retries (reason `not_found`, `unavailable`, `busy`,
    `rate_limited`, `denied` or `refused`)."""

    pass


class BadSnapshot(FetchError):
    """The peer sent data that must not be used (reason from TensorStreamError, or `oversize` for a message over the
    gRPC limit)."""

    pass


@dataclass(frozen=True)
class Snapshot:
    """A fetched and validated snapshot: its key, CPU tensors by name, BLAKE3 digest (32 bytes), payload bytes received
    and seconds taken."""

    key: SnapshotKey
    tensors: dict[str, torch.Tensor]
    digest: bytes
    nbytes: int  # payload bytes received
    seconds: float


_RETRYABLE = {grpc.StatusCode.UNAVAILABLE: "unavailable", grpc.StatusCode.RESOURCE_EXHAUSTED: "busy"}


def status_error(code: grpc.StatusCode, details: str, address: str, key: SnapshotKey | None) -> FetchError:
    """The FetchError a call about `key` to `address` ends with when its server answers `code`
    (over gRPC or libp2p, p2pd/libp2p.py); codes in _RETRYABLE (unavailable, busy) are worth
    retrying."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return FetchTimeout("timeout", f"{address} {key}")
    if code == grpc.StatusCode.NOT_FOUND:
        return FetchRefused("not_found", f"{address} has no {key}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return BadSnapshot("oversize", f"{address}: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return FetchRefused("denied", f"{address}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "refused: rate" in details:
        return FetchRefused("rate_limited", f"{address}: {details}")
    return FetchRefused(_RETRYABLE.get(code, "refused"), f"{address}: {code.name} {details}")


def _read_ahead(call, depth: int = 8):
    """Iterate `call` from a helper thread so the network keeps flowing while this thread
    copies, hashes and checks the previous parts (those steps release the GIL). The helper
    never blocks for good: every put gives up once the consumer has stopped."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def pump():
        try:
            for item in call:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # grpc.RpcError and friends travel to the consumer
            put(e)

    thread = threading.Thread(target=pump, name="atoll-fetch-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        call.cancel()
        while True:  # free buffered parts now, not when the thread object is collected
            try:
                q.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=5)


def open_channel(
    address: str, options: list[tuple[str, Any]], tls: TLSConfig | None = None, tls_server_name: str | None = None
) -> grpc.Channel:
    """A gRPC channel to `address` (host:port): TLS-secured when `tls` is given (trusting
    `tls.ca_file`, else the system's roots; `tls_server_name` overrides the name checked in
    the server's certificate), else plaintext. Every atoll client opens its channels here."""
    if tls is None:
        return grpc.insecure_channel(address, options)
    if tls_server_name:
        options = [*options, ("grpc.ssl_target_name_override", tls_server_name)]
    ca = Path(tls.ca_file).read_bytes() if tls.ca_file else None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options)


class SwarmClient:
    """A channel to one peer's SwarmServer. Cheap to keep open; thread-safe."""

    def __init__(
        self,
        address: str,
        *,
        limits: Limits = Limits(),
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.2,
        tls: TLSConfig | None = None,
        tls_server_name: str | None = None,
        identity: Identity | None = None,
        envelope: Callable[[], bytes] | None = None,
    ):
        """`address`: the peer's gRPC host:port; `limits`: what a fetched snapshot may hold; `timeout`: the default
        fetch deadline, seconds, in (0, MAX_FETCH_SECONDS]; `retries`: further attempts after an unavailable or busy
        answer; `backoff`: the first pause before a retry, seconds (doubled per attempt, jittered); `tls`: TLS files,
        None for plaintext; `tls_server_name`: the name checked in the server's certificate (None: the address's host);
        `identity`: signs requests, None sends unsigned fetches (reach and push then raise ValueError); `envelope()`:
        this node's signed record, presented with every fetch (sampled membership: p2pd/admission.py), None: not.
        Raises ValueError for a `timeout` out of range, OSError when `tls.ca_file` cannot be read."""
        if not 0 < timeout <= MAX_FETCH_SECONDS:
            raise ValueError(f"timeout must be in (0, {MAX_FETCH_SECONDS:.0f}] s (servers refuse longer fetches)")
        self.address = address
        self.limits, self.timeout, self.retries, self.backoff = limits, timeout, retries, backoff
        self.identity = identity  # signs every fetch request; None sends unsigned ones
        self.envelope = envelope
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_PUSH_MESSAGE_BYTES),  # requests, and pushed parts
            ("grpc.enable_retries", 0),  # retries are ours: bounded and deadline-aware
            ("grpc.http2.lookahead_bytes", 67108864),
            ("grpc.http2.max_frame_size", 16777215),
        ]
        self._channel = open_channel(address, options, tls, tls_server_name)
        self._stub = pb_grpc.SwarmStub(self._channel)
        # Fetch parts arrive as raw bytes: StreamDecoder.feed_bytes uses payloads in place
        self._fetch_raw = self._channel.unary_stream(
            f"/{SERVICE_NAME}/Fetch", request_serializer=pb.FetchRequest.SerializeToString, response_deserializer=None
        )

    def close(self) -> None:
        """Close the channel, ending any calls still in flight on it."""
        self._channel.close()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetch(
        self,
        key: SnapshotKey,
        *,
        expected_digest: bytes | None = None,
        timeout: float | None = None,
        into: Mapping[str, torch.Tensor] | None = None,
        server_peer_id: str = "",
        producer_peer_id: str = "",
    ) -> Snapshot:
        """Fetch and fully validate one snapshot; see the module docstring for errors.

        `into`: tensors to reuse as receive buffers where name, dtype and shape match (their
        contents are undefined if the fetch fails). `server_peer_id`: the peer we ask, named in
        the signed request so it cannot be replayed to another node. `producer_peer_id`: the
        outbound-only producer whose snapshot the server carries ("": the server's own)."""
        start = time.monotonic()
        deadline = start + min(timeout if timeout is not None else self.timeout, MAX_FETCH_SECONDS)
        if self.identity is not None:
            request = signed_request(self.identity, server_peer_id, key, time.time(), producer_peer_id)
            if self.envelope is not None:
                request.requester_record = self.envelope()
        else:
            request = pb.FetchRequest(key=key.to_pb(), producer_peer_id=producer_peer_id)
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchTimeout("timeout", f"{self.address} {key} after {attempt} attempts")
            decoder = StreamDecoder(self.limits, expected_digest, into, expected_key=key.to_pb())
            call = self._fetch_raw(request, timeout=remaining)
            try:
                for raw in _read_ahead(call):
                    decoder.feed_bytes(raw)
                tensors = decoder.finish()
            except TensorStreamError as e:
                call.cancel()
                raise BadSnapshot(e.reason, f"from {self.address}: {e.detail}") from e
            except grpc.RpcError as e:
                error = status_error(e.code(), e.details() or "", self.address, key)
                if error.reason in _RETRYABLE.values() and attempt < self.retries:  # unavailable, busy
                    sleep = min(self.backoff * 2**attempt * (1 + random.random()), deadline - time.monotonic())
                    if sleep > 0:
                        time.sleep(sleep)
                    continue
                raise error from e
            return Snapshot(key, tensors, decoder.digest, decoder.bytes_received, time.monotonic() - start)
        raise AssertionError("unreachable")  # the loop always returns or raises

    def reach(self, server_peer_id: str, timeout: float = 10.0) -> pb.ReachReply:
        """Ask the peer to dial this node back at its advertised address (needs `identity`)."""
        if self.identity is None:
            raise ValueError("reach needs an identity to sign the request")
        try:
            return self._stub.Reach(signed_reach(self.identity, server_peer_id, time.time()), timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise FetchTimeout("timeout", f"{self.address} reach") from e
            raise FetchRefused(_RETRYABLE.get(e.code(), "refused"), f"{self.address}: {e.code().name}") from e

    def health(
        self, timeout: float = 5.0, wait_for: SnapshotKey | None = None, wait: float = 0.0, producer_peer_id: str = ""
    ) -> tuple[bytes, list[SnapshotKey]]:
        """The peer's signed record envelope and the snapshot keys it can serve (of the producer
        it carries for, with `producer_peer_id`); with `wait_for`, answered once the peer serves
        that snapshot (or a later one of its kind) or after `wait` seconds (the server caps it at
        MAX_HEALTH_WAIT). Raises FetchTimeout or FetchRefused."""
        request = health_request(wait_for, wait, producer_peer_id)
        try:
            reply = self._stub.Health(request, timeout=timeout)
        except grpc.RpcError as e:
            raise status_error(e.code(), e.details() or "", self.address, wait_for) from e
        return health_answer(reply)

    def sample(
        self, push: Sequence[tuple[str, str]] = (), pull: bool = False, nonce: bytes = b"", timeout: float = 5.0
    ) -> tuple[bytes, list[tuple[str, str]], bytes]:
        """A Health call for peer sampling (p2pd/sampling.py): pushes the (peer id, address) entries `push`, asks for
        the peer's view when `pull`, and with `nonce` (16 to 64 bytes; needs `identity`, whom the signature names) asks
        for a probe signature. Returns (the peer's signed record envelope, its view's well-formed entries, the probe
        signature or b""). Raises FetchTimeout or FetchRefused."""
        request = pb.HealthRequest(view=to_pb(push), want_view=pull)
        if nonce:
            if self.identity is None:
                raise ValueError("a probe needs an identity: the reply's signature names the requester")
            request.nonce, request.requester_peer_id = nonce, self.identity.peer_id
        try:
            reply = self._stub.Health(request, timeout=timeout)
        except grpc.RpcError as e:
            raise status_error(e.code(), e.details() or "", self.address, None) from e
        return reply.signed_record, entries_of(reply.view), reply.probe_signature

    def push(self, server_peer_id: str, key: SnapshotKey, parts: Sequence[bytes], envelope: bytes, timeout: float):
        """Hand the snapshot `key` (its serialized `parts`) to the carrier `server_peer_id`, with
        `envelope`, this node's signed record that names the carrier and signs the snapshot's
        digest (needs `identity`). Raises FetchTimeout or FetchRefused."""
        if self.identity is None:
            raise ValueError("push needs an identity to sign the request")
        first = signed_push(self.identity, server_peer_id, key, time.time(), envelope)
        stream = itertools.chain([first], (pb.PushPart(snapshot_part=p) for p in parts))
        try:
            self._stub.Push(stream, timeout=min(timeout, MAX_FETCH_SECONDS))
        except grpc.RpcError as e:
            raise status_error(e.code(), e.details() or "", self.address, key) from e


def health_request(wait_for: SnapshotKey | None, wait: float, producer_peer_id: str = "") -> pb.HealthRequest:
    """A HealthRequest (see SwarmClient.health)."""
    request = pb.HealthRequest(producer_peer_id=producer_peer_id)
    if wait_for is not None and wait > 0:
        request.wait_for.CopyFrom(wait_for.to_pb())
        request.wait_seconds = wait
    return request


def health_answer(reply: pb.HealthReply) -> tuple[bytes, list[SnapshotKey]]:
    """The signed record envelope and the snapshot keys of a HealthReply (kinds this release
    does not know are left out)."""
    keys = []
    for k in reply.available:
        try:
            keys.append(SnapshotKey.from_pb(k))
        except ValueError:
            continue  # a kind this version does not know
    return reply.signed_record, keys
