"""A minimal atoll peer for integration tests: DHT discovery + gRPC server + one snapshot.

Prints JSON lines on stdout: {"event": "ready", ...} once, then {"event": "peers", ...}
whenever the set of live peers it sees changes. SIGTERM makes it leave cleanly.
"""

import argparse
import json
import signal
import threading

import torch

from p2pd.discovery import Discovery
from p2pd.identity import Identity
from p2pd.server import SnapshotStore, SwarmServer
from p2pd.tensors import SnapshotKey


def build_model(seed: int) -> torch.nn.Module:
    """About 12.6 MB of fp32 parameters, deterministic in `seed`."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 768),
        torch.nn.ReLU(),
        torch.nn.Linear(768, 10),
    )


def _sign_like_a_newer_release() -> None:
    """Make this process's records carry two fields this release does not know, as a later
    release of the same record version would."""
    import base64

    import p2pd.discovery
    from p2pd.records import DOMAIN

    def sign(record, identity):
        body = json.loads(record.model_dump_json(exclude={"record_version"}))
        body.update(reachability="direct", codecs=["fp16", "int8"])
        text = json.dumps(body, separators=(",", ":"))
        sig = base64.b64encode(identity.sign(DOMAIN + text.encode())).decode()
        return json.dumps({"body": text, "sig": sig}).encode()

    p2pd.discovery.sign_record = sign


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--key", required=True)
    ap.add_argument("--swarm", default="test")
    ap.add_argument("--initial-peers", nargs="*", default=[])
    ap.add_argument("--ttl", type=float, default=4.0)
    ap.add_argument("--poll", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--newer-release",
        action="store_true",
        help="sign records with fields a newer atoll release would add (mixed-version swarms)",
    )
    args = ap.parse_args()
    if args.newer_release:
        _sign_like_a_newer_release()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    identity = Identity.load_or_create(args.key)
    # the DHT forks: start it before any gRPC object exists in this process
    discovery = Discovery(identity, swarm=args.swarm, initial_peers=args.initial_peers, ttl=args.ttl).start()
    store = SnapshotStore()
    server = SwarmServer(store, discovery.signed_record)
    server.start()
    model = build_model(args.seed)
    packed = store.publish(SnapshotKey("model", 1), model.state_dict())
    discovery.announce(grpc_address=server.address, round=1, model_digest=packed.hexdigest, dataset_size=100)
    print(
        json.dumps(
            dict(
                event="ready",
                peer_id=identity.peer_id,
                grpc=server.address,
                maddrs=discovery.visible_maddrs(),
                digest=packed.hexdigest,
                dht_pid=discovery.pid,
            )
        ),
        flush=True,
    )
    seen = None
    while not stop.wait(args.poll):
        peers = sorted(p.peer_id for p in discovery.live_peers())
        if peers != seen:
            seen = peers
            print(json.dumps(dict(event="peers", peers=peers, refused=dict(discovery.refused))), flush=True)
    server.stop(0.5)
    discovery.close()


if __name__ == "__main__":
    main()
