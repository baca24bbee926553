"""atoll's node, in layers that show in the folders (docs/architecture.md); imports only go down:

- node/algo/: algorithms, pure functions over tensors;
- node/protocol/ and node/task/: round protocols, the exchange seam, the engine, the worker and
  the simulator;
- node/net/: the runtime of a live node: gRPC + DHT exchange, membership, checkpoints,
  metrics, the daemon, `Peer`;
- node/app/: the command line, the local swarm launcher, console, benchmarks;
- node/registry.py and node/config.py: the names and settings every layer reads.

The network layer below all of them is p2pd/.
"""
