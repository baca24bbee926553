"""Built-in language-model task: a small causal transformer over bytes, trained on the King
James Bible that the Debian packages `bible-kjv` and `bible-kjv-text` ship (4.4 MB of text,
read with their `bible` program), evaluated by held-out perplexity.

    task: node.task.text:kjv
    task_config: {context: 64, width: 128, layers: 2, heads: 4, split: books}

The text (verse references stripped) is cut into a held-out tail (`held_out`, default 2%) and
a training part. `split: books` gives node i of n the i-th contiguous stretch of the training
part (whole books: each node reads different books, the non-IID case); `split: iid` deals the
training windows round-robin. A sample is a window of `context + 1` bytes (stride
`context // 2`); the loss is next-byte cross-entropy; `evaluate` returns `perplexity` (the
reported metric, lower is better) and `bits_per_byte` on up to `eval_windows` held-out windows.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from node.protocol.data import DatasetMissing
from node.task import Task, TensorDataset

VOCAB = 256  # bytes


@functools.lru_cache(maxsize=1)
def kjv_text() -> bytes:
    """The whole King James Bible as UTF-8 bytes, one verse a line, references stripped.
    Raises DatasetMissing where the Debian packages are not installed."""
    exe = shutil.which("bible")
    if exe is None:
        raise DatasetMissing(
            "the King James Bible is not installed: apt-get install bible-kjv bible-kjv-text (Debian packages)"
        )
    out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, timeout=60, check=False)
    if out.returncode != 0 or len(out.stdout) < 1_000_000:
        raise DatasetMissing(f"`bible -f Gen1:1-Rev22:21` gave {len(out.stdout)} bytes: reinstall bible-kjv-text")
    return re.sub(rb"(?m)^\S+\d+:\d+ ", b"", out.stdout)


class CausalTransformer(nn.Module):
    """A GPT-style decoder over bytes: embeddings (token + learned position), `layers` pre-norm
    blocks of causal self-attention and an MLP, a final LayerNorm and a linear head.
    Input int64 (B, T) with T <= context; output logits float32 (B, T, 256)."""

    def __init__(self, context: int, width: int, layers: int, heads: int):
        """`context`: the longest input, in bytes (positions and causal mask); `width`: the embedding size; `layers`:
        decoder blocks; `heads`: attention heads per block, which must divide `width` (torch raises AssertionError
        otherwise)."""
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-byte logits (B, T, 256) for int64 tokens (B, T)."""
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position(torch.arange(t, device=tokens.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def windows(data: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    """uint8 (N, length) windows of the 1-d uint8 `data`, every `stride` bytes."""
    if len(data) < length:
        return torch.empty(0, length, dtype=torch.uint8)
    return data.unfold(0, length, stride).contiguous()


def next_byte_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of a batch of uint8 windows (B, T + 1)."""
    w = batch[0].long()
    logits = model(w[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1))


def perplexity(model: nn.Module, held: torch.Tensor) -> dict[str, float]:
    """`perplexity` and `bits_per_byte` of `model` on held-out uint8 windows `held` (N, T + 1),
    in eval mode, 64 windows at a time."""
    model.eval()
    dev = next(model.parameters()).device
    total = sum(float(next_byte_loss(model, (b.to(dev),))) * len(b) for b in held.split(64))
    nats = total / len(held)
    # a diverged model: a huge but finite perplexity (math.exp overflows past 709 nats)
    return {"perplexity": math.exp(min(nats, 700.0)), "bits_per_byte": nats / math.log(2)}


def settings(config: dict, defaults: dict) -> dict:
    """`defaults` updated with `config`; raises ValueError naming keys it does not know."""
    unknown = set(config) - set(defaults)
    if unknown:
        raise ValueError(f"unknown task_config keys {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **config}


def corpus(text: bytes, context: int, held_out: float, eval_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes uint8 (N,), held-out windows uint8 (W, context + 1)): the last `held_out`
    of `text` is held out, cut into at most `eval_windows` disjoint windows. Raises ValueError
    when no window fits."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    cut = int(len(data) * (1 - held_out))
    held = windows(data[cut:], context + 1, context + 1)[:eval_windows]
    if len(held) == 0:
        raise ValueError("no held-out window to evaluate: raise held_out or eval_windows")
    return data[:cut], held


def stretch(train: torch.Tensor, index: int, count: int, context: int) -> TensorDataset:
    """Node `index` of `count`'s contiguous stretch of `train` as windows of context + 1 bytes."""
    part = len(train) // count
    return TensorDataset(windows(train[index * part : (index + 1) * part], context + 1, context // 2))


def seeded_model(context: int, width: int, layers: int, heads: int, seed: int) -> CausalTransformer:
    """A CausalTransformer initialised from `seed` (the same on every node), without touching
    the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalTransformer(context, width, layers, heads)


def byte_task(name: str, model, train_data, held: torch.Tensor, exchanged=None) -> Task:
    """A next-byte task evaluated by perplexity on the held-out windows `held`."""
    return Task(
        name=name,
        model=model,
        train_data=train_data,
        loss=next_byte_loss,
        evaluate=functools.partial(perplexity, held=held),
        metric="perplexity",
        higher_is_better=False,
        exchanged=exchanged,
    )


def kjv(config: dict) -> Task:
    """The task (see the module docstring); raises DatasetMissing without the Debian packages,
    ValueError for a bad task_config."""
    c = settings(
        config,
        {
            "context": 64,
            "width": 128,
            "layers": 2,
            "heads": 4,
            "split": "books",
            "held_out": 0.02,
            "eval_windows": 256,
        },
    )
    shape = tuple(int(c[k]) for k in ("context", "width", "layers", "heads"))
    context = shape[0]
    if c["split"] not in ("books", "iid") or not 0 < float(c["held_out"]) < 0.5 or shape[1] % shape[3]:
        raise ValueError("split must be books or iid, held_out in (0, 0.5), width a multiple of heads")
    train, held = corpus(kjv_text(), context, float(c["held_out"]), int(c["eval_windows"]))

    def train_data(index: int, count: int, seed: int) -> TensorDataset:
        if c["split"] == "books":
            return stretch(train, index, count, context)
        return TensorDataset(windows(train, context + 1, context // 2)[index::count])

    return byte_task(f"kjv-bytes/{c['split']}", lambda seed: seeded_model(*shape, seed), train_data, held)


FORTUNES_DIR = Path("/usr/share/games/fortunes")
LORA_TARGETS = ["linear1", "linear2", "out_proj", "head"]  # the Linear layers of CausalTransformer


@functools.lru_cache(maxsize=1)
def fortunes_text() -> bytes:
    """Every fortune of the Debian package `fortunes` (its files in name order, the `%`
    separators as blank lines). Raises DatasetMissing where the package is not installed."""
    files = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
    if not files:
        raise DatasetMissing(f"no fortunes in {FORTUNES_DIR}: apt-get install fortunes (Debian package)")
    return re.sub(rb"(?m)^%\n", b"\n", b"".join(p.read_bytes() for p in files))


@functools.lru_cache(maxsize=4)
def _pretrained(context: int, width: int, layers: int, heads: int, steps: int, seed: int) -> dict:
    """The KJV model after `steps` Adam steps on the whole text (batch 32, lr 3e-3, a generator
    seeded with `seed`): every node computes the same base; cached per process."""
    model = seeded_model(context, width, layers, heads, seed)
    data = windows(torch.frombuffer(bytearray(kjv_text()), dtype=torch.uint8), context + 1, context // 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (32,), generator=gen)]
        opt.zero_grad(set_to_none=True)
        next_byte_loss(model, (batch,)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fortunes_lora(config: dict) -> Task:
    """LoRA fine-tuning (peft) of the KJV byte model, pretrained `pretrain_steps` steps from the
    seed, on the Debian `fortunes` corpus: only the adapters (`lora_` tensors of rank `rank` on
    the attention output, MLP and head Linear layers) train and travel. Node i of n reads the
    i-th contiguous stretch of the fortunes (other files); `perplexity` on a held-out tail."""
    from peft import LoraConfig, get_peft_model

    c = settings(
        config,
        {"context": 32, "width": 64, "layers": 2, "heads": 4, "rank": 4, "pretrain_steps": 200}
        | {"held_out": 0.05, "eval_windows": 256},
    )
    shape = tuple(int(c[k]) for k in ("context", "width", "layers", "heads"))
    if not 0 < float(c["held_out"]) < 0.5 or shape[1] % shape[3] or int(c["rank"]) < 1:
        raise ValueError("held_out must be in (0, 0.5), width a multiple of heads, rank >= 1")
    context = shape[0]
    train, held = corpus(fortunes_text(), context, float(c["held_out"]), int(c["eval_windows"]))

    def model(seed: int) -> nn.Module:
        base = CausalTransformer(*shape)
        base.load_state_dict(_pretrained(*shape, int(c["pretrain_steps"]), seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the adapters' init, the same on every node
            lora = LoraConfig(r=int(c["rank"]), lora_alpha=2 * int(c["rank"]), target_modules=LORA_TARGETS)
            return get_peft_model(base, lora)

    return byte_task(
        f"fortunes-lora/r{c['rank']}",
        model,
        lambda index, count, seed: stretch(train, index, count, context),
        held,
        exchanged=lambda name: "lora_" in name,
    )
