"""Federated distillation: nodes with different architectures teach each other through their
predictions on a shared unlabeled proxy set (pure functions; no sockets, no clocks).

- `proxy`: the proxy set every node derives from (data set, seed) without coordination, its
  digest (nodes with different proxy sets never mix logits), and the logits payload a node
  publishes, with the checks a received payload must pass.
- `edgefd`: a node keeps only the proxy samples its KMeans density-ratio filter judges
  in-distribution for its own data, and speaks only for those.
- `knfu`: neighbours weighted by the similarity of their knowledge to the node's own,
  softmax with sharpness beta (about 10).
- `kd`: fusing the teachers' soft targets per proxy sample, the temperature-scaled loss, and
  the distillation steps.

- `fedd2s`: personalized distillation (FedD2S): deep-to-shallow layer dropping, the layers
  that still learn from the neighbours' knowledge in a round.

A method is a row filter plus a teacher weighting: EdgeFD = filter + equal weights, KnFu = all
rows + similarity weights, "edgefd+knfu" = both; FedD2S = all rows, equal weights, and only the
shallow layers distilled as rounds go on.
"""

from node.algo.distill.edgefd import edgefd_filter, speaking_rows
from node.algo.distill.fedd2s import dropped_layers, layers
from node.algo.distill.kd import distill_steps, distillation_loss, fused_targets, soft_targets
from node.algo.distill.knfu import knfu_weights
from node.algo.distill.proxy import LogitsRefused, check_logits, logits_payload, proxy_split


def uses_filter(method: str) -> bool:
    """Whether distillation method `method` applies the EdgeFD row filter (`edgefd`, `edgefd+knfu`)."""
    return method in ("edgefd", "edgefd+knfu")


def uses_knfu(method: str) -> bool:
    """Whether distillation method `method` weights teachers by KnFu similarity (`knfu`, `edgefd+knfu`)."""
    return method in ("knfu", "edgefd+knfu")


__all__ = [
    "LogitsRefused",
    "check_logits",
    "distill_steps",
    "distillation_loss",
    "dropped_layers",
    "layers",
    "edgefd_filter",
    "fused_targets",
    "knfu_weights",
    "logits_payload",
    "proxy_split",
    "soft_targets",
    "speaking_rows",
    "uses_filter",
    "uses_knfu",
]
