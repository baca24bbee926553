"""Classifier families with a width knob, so a swarm can mix model sizes."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Flatten, two hidden Linear+ReLU layers of `width` units, then a Linear to `num_classes` logits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 128):
        """`input_shape`: one sample's shape (its product is the first Linear's input); `num_classes`: logits out;
        `width`: units of each hidden layer."""
        d = 1
        for s in input_shape:
            d *= s
        super().__init__(
            nn.Flatten(),
            nn.Linear(d, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )


class SmallCNN(nn.Sequential):
    """For (C, H, W) inputs: two 3x3 convolutions of `width` channels with ReLU, a 2x2 max-pool, a Linear+ReLU of 2 *
    width units, then a Linear to `num_classes` logits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 32):
        """`input_shape`: one sample's (C, H, W); `num_classes`: logits out; `width`: channels of both convolutions
        (the hidden Linear has 2 * width units). Raises ValueError when `input_shape` does not have three
        dimensions."""
        c, h, w = input_shape
        super().__init__(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(width * (h // 2) * (w // 2), 2 * width),
            nn.ReLU(),
            nn.Linear(2 * width, num_classes),
        )


FAMILIES = {"mlp": MLP, "cnn": SmallCNN}


def build_model(family: str, input_shape: tuple[int, ...], num_classes: int, width: int, seed: int = 0) -> nn.Module:
    """Deterministic in `seed`: nodes that share a seed start from one shared init."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; available: {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FAMILIES[family](input_shape, num_classes, width)
