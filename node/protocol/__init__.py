"""Protocols: everything the simulator runs, and all a daemon adds to it is the network.

The round protocols (rounds/), the exchange seam they talk to and its in-memory implementation
(exchange/), the round engine (engine.py), one node's model, data and optimizer (worker.py,
train/, data/, models/, and the task contract in node/task/), the defence a node runs on what
it receives (defence.py), attack rehearsals (rehearsal.py), compressed gossip (compression.py)
and the simulator (sim.py). These import the algorithms, the config and the network layer's
wire types (so the simulator counts the daemons' bytes), never the runtime or the application.
"""
