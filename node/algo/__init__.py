"""Algorithms: pure functions over tensors and state dicts, with no sockets, clocks or globals.

Mixing weights, topologies, gossip schedules, MoDeST's sample (comm/); robust aggregators
(aggregate/); trust signals and attack models (security/); distillation losses and filters
(distill/); flow-matching experts, clustering and the ensemble (experts/); FRL's rank voting
(frl.py); plain and variance-corrected averaging (averaging.py). These import only each other
and node/registry.py (plus the network layer's refusal type, p2pd/errors.py).
"""
