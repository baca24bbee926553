"""The data plane's fallback for peers that cannot be dialled over gRPC (behind NAT): the same
Fetch and Health calls over libp2p streams, through the daemon the node's DHT already runs
(hivemind's go-libp2p-daemon: an open connection, hole punching or a circuit relay).

One servicer serves both transports (p2pd/server.py's SwarmServicer: admission, limits, slots
and the producer's signed digest are the same), and the receiver checks what arrives exactly as
a gRPC fetch does (p2pd/decoding.py's StreamDecoder against the digest signed in the producer's
record). Framing (see proto/swarm.proto, StreamRequest): hivemind's 8-byte length prefix per
frame; the caller sends one StreamRequest, the server one StreamStatus, then a HealthReply or
the snapshot's serialized parts and an empty frame. libp2p authenticates the remote peer id,
and the DHT's daemon runs with the node's own key (p2pd/identity.py), so a server also checks
that the stream comes from the peer id that signed the request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch
from hivemind.p2p import P2P, PeerID
from multiaddr import Multiaddr

from p2pd.admission import signed_request
from p2pd.client import (
    BadSnapshot,
    FetchError,
    FetchRefused,
    FetchTimeout,
    Snapshot,
    health_answer,
    health_request,
    status_error,
)
from p2pd.decoding import StreamDecoder
from p2pd.identity import Identity
from p2pd.records import RecordRefused, open_record
from p2pd.rpc import swarm_pb2 as pb
from p2pd.server import MAX_FETCH_SECONDS, MAX_MESSAGE_BYTES
from p2pd.tensors import Limits, SnapshotKey, TensorStreamError

log = logging.getLogger(__name__)

FETCH, HEALTH = "atoll/fetch/1", "atoll/health/1"  # libp2p protocol names of the two calls
MAX_REQUEST_BYTES = 64 * 1024
MAX_CALLS = 16  # libp2p streams served at once (the servicer's own slots bound fetches further)
_HEADER = P2P.HEADER_LEN


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _StreamContext:
    """A call over a libp2p stream, as p2pd/context.py's CallContext: what SwarmServicer may ask of gRPC's
    ServicerContext."""

    def __init__(self, deadline: float, peer: str):
        self.deadline, self._peer, self.cancelled = deadline, peer, False

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Aborted(code, details)

    def is_active(self) -> bool:
        return not self.cancelled and time.monotonic() < self.deadline

    def time_remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def peer(self) -> str:
        return self._peer

    def cancel(self) -> None:
        self.cancelled = True


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One length-prefixed frame of at most `limit` bytes (a longer one raises ValueError
    before anything is buffered)."""
    n = int.from_bytes(await reader.readexactly(_HEADER), P2P.BYTEORDER)
    if n > limit:
        raise ValueError(f"frame of {n} bytes > {limit}")
    return await reader.readexactly(n) if n else b""


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(_HEADER, P2P.BYTEORDER)


class Libp2pPlane:
    """A node's libp2p side of the data plane: an asyncio loop in a thread of this process that
    drives a replica of the DHT's P2P (the same daemon, hence the same peer id and connections).
    `dht`: the node's running hivemind.DHT. Raises TimeoutError, or hivemind's P2PDaemonError,
    when the daemon does not answer within `timeout` s."""

    def __init__(self, dht, timeout: float = 30.0):
        """Starts the plane's event loop thread and replicates the DHT's P2P. `dht`: the node's running hivemind.DHT;
        `timeout`: seconds to wait for its daemon. Raises TimeoutError after `timeout`, or hivemind's P2PDaemonError,
        when the daemon does not answer (the plane is closed first)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="atoll-libp2p", daemon=True)
        self._thread.start()
        # calls into the servicer block (a Health that waits, a fetch's writes): off the loop
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="atoll-libp2p-serve")
        self._servicer, self._dht, self._closed = None, dht, False
        self._calls = threading.BoundedSemaphore(MAX_CALLS)  # streams served at once; the rest are closed
        try:
            self.p2p: P2P = self.run(dht.replicate_p2p(), timeout)
        except BaseException:
            self.close()
            raise
        self.peer_id = self.p2p.peer_id.to_base58()

    def run(self, coro: Coroutine, timeout: float) -> Any:
        """Run `coro` on the plane's loop, waiting at most `timeout` s (TimeoutError after);
        RuntimeError once the plane is closed."""
        if self._closed:
            coro.close()
            raise RuntimeError("the libp2p plane is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=max(0.0, timeout))
        except TimeoutError:
            future.cancel()
            raise

    def serve(self, servicer) -> None:
        """Serve `servicer` (a p2pd.server.SwarmServicer) to libp2p peers: its Fetch and Health."""
        self._servicer = servicer
        self.run(self.p2p.add_binary_stream_handler(FETCH, self._handle), 10.0)
        self.run(self.p2p.add_binary_stream_handler(HEALTH, self._handle), 10.0)

    def client(self, peer_id: str, identity: Identity | None = None, limits: Limits = Limits()) -> Libp2pClient:
        """A client of `peer_id`'s data plane over libp2p (see Libp2pClient)."""
        return Libp2pClient(self, peer_id, identity=identity, limits=limits)

    def connect(self, peer_id: str, maddrs, timeout: float = 10.0) -> bool:
        """Open (or keep) a libp2p connection from this node to `peer_id` at `maddrs` (its signed
        record's dht_maddrs); whether it is open. A node that cannot be dialled opens one to each
        neighbour: they reach it back over that connection (connection reversal)."""
        return self.connect_many([(peer_id, maddrs)], timeout).get(peer_id, False)

    def connect_many(self, peers, timeout: float = 10.0) -> dict[str, bool]:
        """connect() to several (peer id, multiaddrs) at once, in `timeout` s; peer id -> open."""

        async def one(peer_id: str, maddrs) -> bool:
            try:
                target = PeerID.from_base58(peer_id), [Multiaddr(m) for m in maddrs]
                await asyncio.wait_for(self.p2p._client.connect(*target), timeout)
                return True
            except Exception:  # unreachable addresses, a daemon error, a timeout: no connection
                return False

        async def all_() -> list[bool]:
            return await asyncio.gather(*(one(p, m) for p, m in peers))

        try:
            return dict(zip((p for p, _ in peers), self.run(all_(), timeout + 5.0)))
        except (TimeoutError, RuntimeError):
            return {}

    def connected(self, timeout: float = 10.0) -> set[str]:
        """The peer ids this node's daemon has an open connection to."""
        return {p.peer_id.to_base58() for p in self.run(self.p2p.list_peers(), timeout)}

    def answers(self, peer_id: str, timeout: float = 10.0) -> bool:
        """Whether `peer_id` answers a Health call over libp2p with a record of its own id (the
        dial-back of a reachability check)."""
        try:
            envelope, _ = self.client(peer_id).health(timeout=timeout)
            return open_record(envelope, now=None).peer_id == peer_id
        except (FetchError, RecordRefused, RuntimeError, ValueError):  # no answer, junk, or closing
            return False

    def close(self) -> None:
        """Stop serving and stop the loop (the daemon belongs to the DHT and stays)."""
        if self._servicer is not None and self._loop.is_running():
            for name in (FETCH, HEALTH):
                try:
                    self.run(self.p2p.remove_binary_stream_handler(name), 5.0)
                except Exception:  # the daemon may be gone with the DHT already
                    pass
            self._servicer = None
        if self._loop.is_running():
            try:
                self.run(self._shutdown(), 10.0)
            except Exception:  # a daemon that is gone already
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._closed = True
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        # hivemind caches the replica on the DHT object: a later plane must build its own
        if getattr(self._dht, "_p2p_replica", None) is getattr(self, "p2p", None):
            self._dht._p2p_replica = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self) -> None:
        """Close the replica's sockets (not the daemon: it is the DHT's) and end its tasks."""
        if getattr(self, "p2p", None) is not None:
            await self.p2p.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- serving -----------------------------------------------------------------------------
    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._calls.acquire(blocking=False):  # as gRPC's maximum_concurrent_rpcs: no queue
            writer.close()
            return
        try:
            await self._serve_stream(info, reader, writer)
        finally:
            self._calls.release()

    async def _serve_stream(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            raw = await asyncio.wait_for(_read_frame(reader, MAX_REQUEST_BYTES), 10.0)
            request = pb.StreamRequest.FromString(raw)
            which = request.WhichOneof("call")
            call = getattr(request, which) if which else None
            if call is None:
                raise ValueError("no call")
        except Exception:  # junk, a frame too large, a peer that sent nothing: close without a word
            writer.close()
            return
        timeout = request.timeout_seconds
        if not 0 < timeout <= MAX_FETCH_SECONDS + 5:
            timeout = 0.0 if which == "fetch" else 10.0  # a fetch needs a deadline, as over gRPC
        context = _StreamContext(time.monotonic() + timeout, f"libp2p:{info.peer_id.to_base58()}")
        try:
            if which == "fetch" and call.requester_peer_id != info.peer_id.to_base58():
                raise _Aborted(grpc.StatusCode.PERMISSION_DENIED, "refused: the stream is not from the signer")
            if which == "fetch" and timeout <= 0:
                raise _Aborted(grpc.StatusCode.INVALID_ARGUMENT, "a fetch needs a deadline")
            if which == "health":
                reply = await loop.run_in_executor(self._pool, self._servicer.Health, call, context)
                writer.write(_framed(pb.StreamStatus().SerializeToString(), reply.SerializeToString()))
                await writer.drain()
                return
            parts = self._servicer.Fetch(call, context)
            first = await loop.run_in_executor(self._pool, next, parts, None)  # refusals raise here
            writer.write(_framed(pb.StreamStatus().SerializeToString()))
            part = first
            while part is not None:
                writer.write(_frame(part))
                writer.write(part)
                # a reader that stops reading is dropped after the servicer's stall_seconds, as over gRPC
                stall = min(context.time_remaining(), self._servicer.stall_seconds)
                await asyncio.wait_for(writer.drain(), stall)
                part = await loop.run_in_executor(self._pool, next, parts, None)
            writer.write(_frame(b""))
            await writer.drain()
        except _Aborted as e:
            writer.write(_framed(pb.StreamStatus(code=e.code.name, detail=e.details).SerializeToString()))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            context.cancel()  # the reader went away or stalled: the servicer's generator stops
        except Exception as e:  # a bug of ours: the caller sees the stream end, the log says why
            context.cancel()
            log.warning("libp2p %s call from %s failed: %r", which, context.peer(), e)
        finally:
            writer.close()


def _framed(*frames: bytes) -> bytes:
    return b"".join(_frame(f) + f for f in frames)


class Libp2pClient:
    """The Fetch and Health calls of SwarmClient (p2pd/client.py), same arguments, errors and
    checks, to the peer `peer_id` over libp2p streams of `plane`. `identity` signs fetches."""

    def __init__(self, plane: Libp2pPlane, peer_id: str, *, identity: Identity | None = None, limits=Limits()):
        """`plane`: the node's Libp2pPlane, which opens the streams; `peer_id`: the peer's base58 id; `identity`: signs
        fetches, None sends unsigned ones; `limits`: what a fetched snapshot may hold. Raises ValueError for a
        `peer_id` that is not base58."""
        self.plane, self.peer_id, self.identity, self.limits = plane, peer_id, identity, limits
        self.address = f"libp2p:{peer_id[:16]}"
        self._peer = PeerID.from_base58(peer_id)

    def close(self) -> None:
        """Nothing to close: every call opens its own stream."""

    def _open(self, name: str, request: pb.StreamRequest, deadline: float, key: SnapshotKey | None):
        """Open a stream to the peer, send `request`, read its status; returns (reader, writer)."""

        async def open_():
            _, reader, writer = await self.plane.p2p.call_binary_stream_handler(self._peer, name)
            try:
                writer.write(_framed(request.SerializeToString()))
                await writer.drain()
            except BaseException:  # cancelled by the deadline, or the stream broke: do not leak it
                writer.close()
                raise
            return reader, writer

        try:
            reader, writer = self.plane.run(open_(), deadline - time.monotonic())
        except TimeoutError:
            raise FetchTimeout("timeout", f"{self.address}: no stream") from None
        except Exception as e:  # the daemon could not reach the peer, or it serves no such protocol
            raise FetchRefused("unavailable", f"{self.address}: {str(e)[:200]}") from None
        status = self._parse(pb.StreamStatus, self._frame(reader, writer, deadline, 4096, key), writer)
        if status.code:
            self.plane._loop.call_soon_threadsafe(writer.close)
            code = grpc.StatusCode.__members__.get(status.code, grpc.StatusCode.UNKNOWN)
            raise status_error(code, status.detail, self.address, key)
        return reader, writer

    def _parse(self, message, raw: bytes, writer):
        """`message` parsed from a frame the peer sent; junk is BadSnapshot("malformed")."""
        try:
            return message.FromString(raw)
        except Exception as e:  # protobuf's DecodeError
            self.plane._loop.call_soon_threadsafe(writer.close)
            raise BadSnapshot("malformed", f"{self.address}: {type(e).__name__}") from None

    def _frame(self, reader, writer, deadline: float, limit: int, key) -> bytes:
        try:
            return self.plane.run(_read_frame(reader, limit), deadline - time.monotonic())
        except TimeoutError:
            self.plane._loop.call_soon_threadsafe(writer.close)
            raise FetchTimeout("timeout", f"{self.address} {key or 'health'}") from None
        except ValueError as e:
            self.plane._loop.call_soon_threadsafe(writer.close)
            raise BadSnapshot("oversize", f"{self.address}: {e}") from None
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self.plane._loop.call_soon_threadsafe(writer.close)
            raise FetchRefused("unavailable", f"{self.address}: stream ended ({type(e).__name__})") from None

    def health(
        self, timeout: float = 5.0, wait_for: SnapshotKey | None = None, wait: float = 0.0, producer_peer_id: str = ""
    ) -> tuple[bytes, list[SnapshotKey]]:
        """See SwarmClient.health."""
        deadline = time.monotonic() + timeout
        request = pb.StreamRequest(health=health_request(wait_for, wait, producer_peer_id), timeout_seconds=timeout)
        reader, writer = self._open(HEALTH, request, deadline, None)
        try:
            raw = self._frame(reader, writer, deadline, 64 * 1024, None)
            return health_answer(self._parse(pb.HealthReply, raw, writer))
        finally:
            self.plane._loop.call_soon_threadsafe(writer.close)

    def fetch(
        self,
        key: SnapshotKey,
        *,
        expected_digest: bytes | None = None,
        timeout: float | None = None,
        into: dict[str, torch.Tensor] | None = None,
        server_peer_id: str = "",
        producer_peer_id: str = "",
    ) -> Snapshot:
        """See SwarmClient.fetch (one attempt: the exchange retries)."""
        if self.identity is None:
            raise ValueError("a fetch over libp2p needs an identity: the server checks the stream's peer id")
        start = time.monotonic()
        timeout = min(timeout if timeout is not None else 30.0, MAX_FETCH_SECONDS)
        deadline = start + timeout
        fetch = signed_request(self.identity, server_peer_id or self.peer_id, key, time.time(), producer_peer_id)
        reader, writer = self._open(FETCH, pb.StreamRequest(fetch=fetch, timeout_seconds=timeout), deadline, key)
        decoder = StreamDecoder(self.limits, expected_digest, into, expected_key=key.to_pb())
        try:
            while raw := self._frame(reader, writer, deadline, MAX_MESSAGE_BYTES, key):
                decoder.feed_bytes(raw)
            tensors = decoder.finish()
        except TensorStreamError as e:
            raise BadSnapshot(e.reason, f"from {self.address}: {e.detail}") from e
        finally:
            self.plane._loop.call_soon_threadsafe(writer.close)
        return Snapshot(key, tensors, decoder.digest, decoder.bytes_received, time.monotonic() - start)
