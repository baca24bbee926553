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

from dataclasses import dataclass

from node.algo.distill.edgefd import edgefd_filter, speaking_rows
from node.algo.distill.fedd2s import dropped_layers, layers
from node.algo.distill.kd import distill_steps, distillation_loss, fused_targets, soft_targets
from node.algo.distill.knfu import knfu_weights
from node.algo.distill.proxy import LogitsRefused, check_logits, logits_payload, proxy_split
from node.registry import DISTILL_METHODS, check_registered


@dataclass(frozen=True)
class Method:
    """The distillation extension point: what a method (`distill.method`) does in a round. `row_filter`: whether a
    teacher speaks only for the proxy rows its EdgeFD filter keeps; `teacher_weights`: "equal" or "knfu" (similarity,
    softmax with sharpness `distill.knfu_beta`); `drops_layers`: whether deep layers stop distilling as rounds go on
    (FedD2S). A new method is a row here under its name in node.registry.DISTILL_METHODS."""

    row_filter: bool
    teacher_weights: str
    drops_layers: bool = False


METHODS: dict[str, Method] = {
    "edgefd": Method(row_filter=True, teacher_weights="equal"),
    "knfu": Method(row_filter=False, teacher_weights="knfu"),
    "edgefd+knfu": Method(row_filter=True, teacher_weights="knfu"),
    "fedd2s": Method(row_filter=False, teacher_weights="equal", drops_layers=True),
}
check_registered("distill.method", METHODS, DISTILL_METHODS)


def uses_filter(method: str) -> bool:
    """Whether distillation method `method` applies the EdgeFD row filter (`edgefd`, `edgefd+knfu`)."""
    return METHODS[method].row_filter


def uses_knfu(method: str) -> bool:
    """Whether distillation method `method` weights teachers by KnFu similarity (`knfu`, `edgefd+knfu`)."""
    return METHODS[method].teacher_weights == "knfu"


def drops_layers(method: str) -> bool:
    """Whether distillation method `method` stops distilling its deep layers as rounds go on (`fedd2s`)."""
    return METHODS[method].drops_layers


__all__ = [
    "LogitsRefused",
    "check_logits",
    "distill_steps",
    "distillation_loss",
    "METHODS",
    "Method",
    "drops_layers",
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
