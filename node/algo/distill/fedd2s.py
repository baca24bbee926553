"""FedD2S's deep-to-shallow layer dropping (Atapour et al., "FedD2S: Personalized Data-Free
Federated Knowledge Distillation"): as rounds go on, the deepest layers leave the shared
distillation one by one and stay personal (trained on the node's own data only), while the
shallow layers, which hold the more general features, keep learning from the neighbours'
knowledge.

At round r, floor(drop_rate * r) layers are dropped, deepest first, never the first layer
(something must still learn from the others). A layer is a module that holds parameters of
its own (Linear, Conv2d, LayerNorm, ...), in the order the model registers them. Dropped
layers get no gradient; BatchNorm running statistics, which are not parameters, still follow
the proxy batches (the built-in models have none).

Paper: "FedD2S: Personalized Data-Free Federated Knowledge Distillation", 2024.
"""

from __future__ import annotations

import math

from torch import nn


def layers(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that hold parameters directly, in registration order (shallow to deep)."""
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def dropped_layers(model: nn.Module, round_: int, drop_rate: float) -> list[nn.Module]:
    """The layers left out of round `round_`'s distillation: the deepest floor(drop_rate *
    round_) of them, at most all but the first."""
    ls = layers(model)
    k = min(len(ls) - 1, math.floor(drop_rate * round_))
    return ls[len(ls) - k :] if k > 0 else []
