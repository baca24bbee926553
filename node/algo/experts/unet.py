"""Convolutional nets for 28x28 images: a small U-Net denoiser and a conv router.

Both take and return flattened images, (B, C*H*W) rows in [-1, 1] space, like the MLPs of
flow.py, so the ensemble sampler, the gRPC Predict messages and checkpoints do not care which
net an expert runs. The time t in [0, 1] enters every residual block as a per-channel bias
(the DDPM U-Net's way, Ho et al., arXiv 2006.11239); resolutions are H, H/2 and H/4, so H and
W must be divisible by 4 (28x28 Fashion-MNIST: 28, 14, 7).

Paper: U-Net, Ronneberger et al., arXiv 1505.04597; used as the denoiser of flow matching
(Lipman et al., arXiv 2210.02747) as in Decentralized Diffusion Models (arXiv 2501.05450).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from node.algo.experts.flow import time_embedding


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, plus the time's per-channel bias, twice, with a 1x1 skip."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        """`c_in`, `c_out`: channels in and out; `t_dim`: features of the time vector each block projects."""
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x (B, c_in, H, W), temb (B, t_dim) -> (B, c_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class _ImageNet(nn.Module):
    """Shared by both nets: the image shape, the time MLP and flat <-> image reshaping."""

    def __init__(self, image_shape: tuple[int, int, int], width: int, t_dim: int):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"the conv nets need H and W divisible by 4, got {h}x{w}")
        if width < 8 or width % 8:
            raise ValueError(f"width must be a multiple of 8 (GroupNorm of 8 groups), got {width}")
        self.image_shape, self.width, self.t_dim = (c, h, w), width, t_dim
        self.dim = c * h * w
        self.temb = nn.Sequential(nn.Linear(t_dim, 4 * width), nn.SiLU(), nn.Linear(4 * width, 4 * width))

    def _inputs(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.reshape(len(x), *self.image_shape), self.temb(time_embedding(t, self.t_dim))


class UNet(_ImageNet):
    """The denoiser: velocity (B, D) of flattened images x_t (B, D) at times t (B,).

    Encoder: a 3x3 conv to `width` channels, a block at H x W, a strided conv to H/2 with
    2 * width channels, a block, a strided conv to H/4, a middle block; the decoder mirrors
    it with nearest-neighbour upsampling and the encoder's features concatenated at each
    resolution. About 0.4M parameters at width 32, 0.1M at width 16.
    """

    def __init__(self, image_shape: tuple[int, int, int], width: int = 32, t_dim: int = 32):
        """`image_shape`: (C, H, W) of one image, H and W divisible by 4; `width`: channels at full resolution (a
        multiple of 8; 2 * width below); `t_dim`: features of the sinusoidal time embedding. Raises ValueError for
        other shapes or widths."""
        super().__init__(image_shape, width, t_dim)
        c, w2, td = image_shape[0], 2 * width, 4 * width
        self.inp = nn.Conv2d(c, width, 3, padding=1)
        self.enc1 = ResBlock(width, width, td)
        self.down1 = nn.Conv2d(width, w2, 3, stride=2, padding=1)
        self.enc2 = ResBlock(w2, w2, td)
        self.down2 = nn.Conv2d(w2, w2, 3, stride=2, padding=1)
        self.mid = ResBlock(w2, w2, td)
        self.dec2 = ResBlock(2 * w2, w2, td)
        self.dec1 = ResBlock(w2 + width, width, td)
        self.out = nn.Sequential(_norm(width), nn.SiLU(), nn.Conv2d(width, c, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity (B, D) float32 for flattened x_t (B, D) and t (B,) in [0, 1]."""
        img, temb = self._inputs(x, t)
        h1 = self.enc1(self.inp(img), temb)  # H
        h2 = self.enc2(self.down1(h1), temb)  # H/2
        h = self.mid(self.down2(h2), temb)  # H/4
        h = self.dec2(torch.cat([F.interpolate(h, size=h2.shape[-2:]), h2], dim=1), temb)
        h = self.dec1(torch.cat([F.interpolate(h, size=h1.shape[-2:]), h1], dim=1), temb)
        return self.out(h).reshape(len(x), -1)


class ConvRouter(_ImageNet):
    """The router: cluster logits (B, K) of flattened x_t (B, D) at times t (B,); the U-Net's encoder, then global
    average pooling and a Linear."""

    def __init__(self, image_shape: tuple[int, int, int], k: int, width: int = 32, t_dim: int = 32):
        """`image_shape`: (C, H, W), H and W divisible by 4; `k`: clusters (logits out); `width`: channels at full
        resolution (a multiple of 8); `t_dim`: time embedding features. Raises ValueError for other shapes or
        widths."""
        super().__init__(image_shape, width, t_dim)
        w2, td = 2 * width, 4 * width
        self.inp = nn.Conv2d(image_shape[0], width, 3, padding=1)
        self.enc1 = ResBlock(width, width, td)
        self.down1 = nn.Conv2d(width, w2, 3, stride=2, padding=1)
        self.enc2 = ResBlock(w2, w2, td)
        self.down2 = nn.Conv2d(w2, w2, 3, stride=2, padding=1)
        self.mid = ResBlock(w2, w2, td)
        self.head = nn.Sequential(_norm(w2), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w2, k))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) float32 for flattened x_t (B, D) and t (B,) in [0, 1]."""
        img, temb = self._inputs(x, t)
        h = self.enc1(self.inp(img), temb)
        h = self.enc2(self.down1(h), temb)
        return self.head(self.mid(self.down2(h), temb))
