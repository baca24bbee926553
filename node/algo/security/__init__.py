"""Byzantine and sybil security: attack models (for tests and benchmarks) and the per-neighbour
trust signals a node exports as metrics.

- ``attacks``: what a malicious node publishes instead of its honest model;
- ``trust``: per-neighbour signals (update distance, cosine to the robust consensus update,
  history similarity), a trust score in [0, 1] with flags, and sybil clusters.
Robust aggregators live in ``node.algo.aggregate``.
"""

from node.algo.aggregate.vectors import flatten, unflatten
from node.algo.security.attacks import ATTACKS, Attack, flip_labels
from node.algo.security.trust import TrustTracker

__all__ = ["ATTACKS", "Attack", "flip_labels", "TrustTracker", "flatten", "unflatten"]
