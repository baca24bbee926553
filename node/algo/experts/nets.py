"""Which net an expert and the router run: `mlp` (flow.TimeMLP over flattened pixels, for 8x8
digits) or `unet` (unet.UNet and unet.ConvRouter, for 28x28 images). Every net maps flattened
images (B, C*H*W) and times (B,) to (B, C*H*W) velocities or (B, K) logits, so the rest of
the experts' code never asks which one it holds.

Paper: McAllister et al., "Decentralized Diffusion Models", arXiv 2501.05450.
"""

from __future__ import annotations

import torch
from torch import nn

from node.algo.experts.flow import TimeMLP
from node.algo.experts.unet import ConvRouter, UNet

NETS = ("mlp", "unet")


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leaves the global RNG state untouched
        torch.manual_seed(seed)
        return build()


def _check(kind: str) -> None:
    if kind not in NETS:
        raise ValueError(f"unknown expert net {kind!r}; available: {', '.join(NETS)}")


def denoiser_net(kind: str, image_shape: tuple[int, ...], width: int, depth: int = 3, seed: int = 0) -> nn.Module:
    """A velocity net for images of `image_shape` (C, H, W), initialised from `seed`: `mlp` has `depth` hidden layers
    of `width` units, `unet` `width` channels at full resolution (`depth` unused). Raises ValueError for an unknown
    kind, or (unet) a shape or width the U-Net cannot take."""
    _check(kind)
    dim = int(torch.Size(image_shape).numel())
    if kind == "mlp":
        return _seeded(lambda: TimeMLP(dim, dim, width, depth), seed)
    return _seeded(lambda: UNet(tuple(image_shape), width), seed)


def router_net(
    kind: str, image_shape: tuple[int, ...], k: int, width: int, depth: int = 3, seed: int = 0
) -> nn.Module:
    """A router p(cluster | x_t, t) with `k` logits for images of `image_shape`, initialised from `seed` (see
    denoiser_net for `kind`, `width` and `depth`). Raises ValueError as denoiser_net does."""
    _check(kind)
    dim = int(torch.Size(image_shape).numel())
    if kind == "mlp":
        return _seeded(lambda: TimeMLP(dim, k, width, depth), seed)
    return _seeded(lambda: ConvRouter(tuple(image_shape), k, width), seed)
