"""A peer that joins a logit-exchange swarm and serves broken logits, for integration tests.

It announces a signed record (with the swarm's proxy digest, or another one in mode
`proxy`) and publishes a `logits` snapshot for every round up front, malformed per --mode:
  shape  one class too few
  nan    a NaN inside an otherwise consistent, correctly digested stream
  proxy  well-formed logits about another proxy set (its record names a different digest)
  unsigned  well-formed logits whose digests its record does not sign
Prints {"event": "ready", ...} once; SIGTERM makes it leave.
"""

import argparse
import json
import signal
import threading

import torch

from node.algo.distill import proxy_split
from node.protocol.data import load_dataset
from p2pd.discovery import Discovery
from p2pd.identity import Identity
from p2pd.server import SnapshotStore, SwarmServer
from p2pd.tensors import SnapshotKey


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--key", required=True)
    ap.add_argument("--swarm", required=True)
    ap.add_argument("--mode", choices=("shape", "nan", "proxy", "unsigned"), required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--proxy-size", type=int, default=300)
    ap.add_argument("--initial-peers", nargs="*", default=[])
    ap.add_argument("--ttl", type=float, default=4.0)
    args = ap.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ds = load_dataset("digits", seed=0)
    _, digest = proxy_split(len(ds.y_train), args.proxy_size, 1 if args.mode == "proxy" else 0, "digits")
    mask = torch.ones(args.proxy_size, dtype=torch.uint8)
    classes = ds.num_classes - 1 if args.mode == "shape" else ds.num_classes
    logits = torch.randn(args.proxy_size, classes, generator=torch.Generator().manual_seed(0)).half()
    if args.mode == "nan":
        logits[7, 3] = float("nan")

    identity = Identity.load_or_create(args.key)
    # the DHT forks: start it before any gRPC object exists in this process
    discovery = Discovery(identity, swarm=args.swarm, initial_peers=args.initial_peers, ttl=args.ttl).start()
    store = SnapshotStore(keep=args.rounds + 1)
    server = SwarmServer(store, discovery.signed_record)
    server.start()
    for r in range(args.rounds + 1):
        store.publish(SnapshotKey("logits", r, 0), {"mask": mask, "logits": logits})
    # "ahead" of everyone, so honest nodes neither wait for it nor for it at the end
    signed = () if args.mode == "unsigned" else store.index()
    discovery.announce(
        grpc_address=server.address, round=args.rounds + 1, proxy_digest=digest, dataset_size=100, snapshots=signed
    )
    print(
        json.dumps(
            dict(event="ready", peer_id=identity.peer_id, maddrs=discovery.visible_maddrs(), dht_pid=discovery.pid)
        ),
        flush=True,
    )
    stop.wait(600)  # bounded: the test stops it long before
    server.stop(0.5)
    discovery.close()


if __name__ == "__main__":
    main()
