"""The proxy set, and the logits payload nodes exchange about it.

Payload (a `logits` snapshot, sent over the same data plane and checks as models):
    mask   uint8 [n_proxy]   1 for the proxy rows the sender speaks for (EdgeFD filter), else 0
    logits float16 [k, C]    its logits for those rows, in row order; k = mask.sum() >= 1
float16 halves the bytes; logits are clamped to +-1e4 first so they stay finite.
"""

from __future__ import annotations

import blake3
import numpy as np
import torch

from p2pd.errors import ReasonedError

LOGIT_CLAMP = 1e4


class LogitsRefused(ReasonedError, ValueError):
    """A logits payload that must not be used; `reason` is a metric label."""


def proxy_split(n_train: int, size: int, seed: int, dataset: str) -> tuple[np.ndarray, str]:
    """(sorted indices of the proxy samples within the training split, hex digest)."""
    if not 0 < size < n_train:
        raise ValueError(f"proxy size must be in (0, {n_train}), got {size}")
    idx = np.sort(np.random.default_rng([seed, 0x70B0]).choice(n_train, size=size, replace=False))
    digest = blake3.blake3(f"{dataset}:{seed}:{n_train}:".encode() + idx.astype("<i8").tobytes()).hexdigest()
    return idx, digest


@torch.no_grad()
def logits_payload(model: torch.nn.Module, proxy_x: torch.Tensor, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """What a node publishes: its logits for `rows` of the proxy set (on the CPU)."""
    if len(rows) == 0:
        raise ValueError("a logits payload needs at least one proxy row")
    model.eval()
    idx = torch.as_tensor(rows, dtype=torch.long)
    out = model(proxy_x[idx.to(proxy_x.device)]).float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    mask = torch.zeros(len(proxy_x), dtype=torch.uint8)
    mask[idx] = 1
    return {"mask": mask, "logits": out.to(device="cpu", dtype=torch.float16)}


def check_logits(
    tensors: dict[str, torch.Tensor], n_proxy: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, float32 logits) of a received payload, or LogitsRefused saying why.
    (The transport has already refused NaN/Inf, oversize and undigested streams.)"""
    if set(tensors) != {"mask", "logits"}:
        raise LogitsRefused("logits_schema", f"expected tensors mask and logits, got {sorted(tensors)[:4]}")
    mask, logits = tensors["mask"], tensors["logits"]
    if mask.dtype != torch.uint8 or logits.dtype not in (torch.float16, torch.float32):
        raise LogitsRefused("logits_schema", f"dtypes {mask.dtype}/{logits.dtype}, expected uint8/float16")
    if mask.shape != (n_proxy,):
        raise LogitsRefused("logits_shape", f"mask shape {tuple(mask.shape)} != proxy size ({n_proxy},)")
    if bool((mask > 1).any()):
        raise LogitsRefused("logits_schema", "mask holds values other than 0 and 1")
    rows = torch.nonzero(mask).flatten()
    if len(rows) == 0 or logits.shape != (len(rows), num_classes):
        raise LogitsRefused("logits_shape", f"logits shape {tuple(logits.shape)} != ({len(rows)}, {num_classes})")
    out = logits.float()
    if not bool(torch.isfinite(out).all()):
        raise LogitsRefused("non_finite", "logits hold NaN or Inf")
    return rows, out
