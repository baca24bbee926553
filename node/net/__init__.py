"""Runtime: what a live node adds to the protocols, everything with a socket, a thread or a clock.

The gRPC + DHT exchange (grpc_exchange.py, carrier.py), membership and reachability
(runtime.py, membership.py, netcheck.py), the final merge's all-reduce (merge.py),
checkpoints (checkpoint.py), Prometheus metrics (metrics.py), the training daemon
(daemon.py), atoll inside a user's own loop (peer.py), and the expert and router roles
(experts/). These import the protocols and the network layer, never the application.
"""
