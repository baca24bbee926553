"""Bytes of one membership operation, measured on the wire: the numbers the membership simulator charges.

A real SwarmServer (p2pd/server.py) on 127.0.0.1 serves a view of `v` entries (real Ed25519 peer ids, addresses in
198.18.0.0/15) and a daemon's signed record (four snapshot digests, a task digest, two multiaddrs); a SwarmClient
calls it through a TCP relay that counts every byte both ways, HTTP/2 and gRPC framing included. Each operation is
repeated on one warm connection and the median bytes per call kept (a node keeps its channels open). The DHT's bucket
read comes from membership_dht (real hivemind DHT processes).
"""

from __future__ import annotations

import socket
import statistics
import threading

from p2pd.identity import Identity
from p2pd.records import PeerRecord, sign_record
from p2pd.sampling import new_nonce, sign_probe


class CountingRelay:
    """A TCP relay on 127.0.0.1 to `target` (host, port) that counts the bytes it carries (`bytes`, both ways)."""

    def __init__(self, target: tuple[str, int]):
        """`target`: where to relay to. Listens at once on a free port (`port`)."""
        self.target, self.bytes = target, 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop listening (open connections end with their peers)."""
        self._listener.close()


def daemon_record(identity: Identity, issued_at: float = 1.0e9, ttl: float = 300.0) -> bytes:
    """The signed record envelope of a typical training daemon (four snapshot digests, task digest, two multiaddrs),
    issued at `issued_at` (DHT time, s) for `ttl` s."""
    digest = "ab" * 32
    record = PeerRecord(
        peer_id=identity.peer_id,
        grpc_address="198.18.0.10:50051",
        dht_maddrs=(
            f"/ip4/198.18.0.10/tcp/40001/p2p/{identity.peer_id}",
            f"/ip4/198.18.0.10/udp/40001/quic/p2p/{identity.peer_id}",
        ),
        dataset_size=1200,
        round=1234,
        step=0,
        model_digest=digest,
        snapshots=tuple(f"model:{r}:0:{digest}" for r in range(1231, 1235)),
        task_digest=digest,
        codec="int8",
        issued_at=issued_at,
        expires_at=issued_at + ttl,
    )
    return sign_record(record, identity)


class _FixedView:
    def __init__(self, entries):
        self.entries = entries

    def view(self):
        return self.entries

    def pushed(self, entries):
        pass


def measure(v: int = 64, repeats: int = 20) -> dict[str, int]:
    """Median bytes on the wire (both ways) of a pull, a push (each carrying `v` entries) and a probe over one warm
    gRPC connection: {"pull": ..., "push": ..., "probe": ..., "record": signed record bytes, "entry": bytes per view
    entry in the message}. Raises OSError if no port can be bound."""
    from p2pd.client import SwarmClient
    from p2pd.server import SwarmServer
    from p2pd.store import SnapshotStore

    me, caller = Identity.generate(), Identity.generate()
    entries = [(Identity.generate().peer_id, f"198.18.{i // 250}.{i % 250 + 1}:50051") for i in range(v)]
    record = daemon_record(me)
    server = SwarmServer(
        SnapshotStore(),
        lambda: record,
        sampling=_FixedView(entries),
        sign_probe=lambda nonce, requester: sign_probe(me, nonce, requester),
    )
    port = server.start()
    relay = CountingRelay(("127.0.0.1", port))
    client = SwarmClient(f"127.0.0.1:{relay.port}", identity=caller)
    calls = {
        "pull": lambda: client.sample(pull=True),
        "push": lambda: client.sample(push=entries),
        "probe": lambda: client.sample(nonce=new_nonce()),
    }
    try:
        client.sample()  # open the connection: its set-up is paid once per neighbour, not per round
        out: dict[str, int] = {}
        for name, call in calls.items():
            sizes = []
            for _ in range(repeats):
                before = relay.bytes
                call()
                sizes.append(_settled(relay, before))
            out[name] = int(statistics.median(sizes))
    finally:
        client.close()
        relay.close()
        server.stop(0)
    out["record"] = len(record)
    out["entry"] = len(b"".join(p.SerializeToString() for p in _entries_pb(entries))) // max(1, v) + 2
    return out


def _entries_pb(entries):
    from p2pd.sampling import to_pb

    return to_pb(entries)


def _settled(relay: CountingRelay, before: int) -> int:
    """Bytes the relay carried since `before`, once it stopped moving (the reply's last frames, HTTP/2 window updates
    and pings may trail the call's return by a moment)."""
    import time

    last, still = relay.bytes, 0
    for _ in range(40):  # at most 0.4 s
        time.sleep(0.01)
        now = relay.bytes
        still = still + 1 if now == last else 0
        last = now
        if still >= 3:
            break
    return last - before
