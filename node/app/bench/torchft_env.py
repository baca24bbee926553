"""The virtual environment of the torchft DiLoCo baseline (node/app/bench/torchft_app.py).

torchft runs in an environment of its own, created on first use with torchft, the torch atoll
runs and what `node.protocol.worker` needs at import; atoll's own environment never gets torchft.
This module is imported from atoll's environment and does not import torchft. The torchft wheel
carries the Lighthouse (its quorum server, written in Rust) as the console script
`torchft_lighthouse`.
"""

from __future__ import annotations

from pathlib import Path

from node.app.bench.swarm import BenchError
from node.app.bench.venvs import CACHE, baseline_python, requirements

TORCHFT_VERSION = "0.2.0"
DEFAULT_VENV = CACHE / "torchft-venv"


def torchft_python(venv: Path = DEFAULT_VENV, progress=print) -> Path:
    """The Python of the torchft environment at `venv` (default ~/.cache/atoll/torchft-venv), created on first use
    with torchft TORCHFT_VERSION and what atoll's Worker needs (node/app/bench/venvs.py). `progress(message)`: told
    once before a creation. Raises BenchError when the environment cannot be created."""
    return baseline_python(Path(venv), "torchft", requirements(f"torchft=={TORCHFT_VERSION}"), progress)


def lighthouse_command(python: Path, bind: str, min_replicas: int, join_timeout_ms: int = 5000) -> list[str]:
    """The command line that starts torchft's Lighthouse of the environment whose Python is `python`.

    `python`: what torchft_python returned (the console script `torchft_lighthouse` lies beside it);
    `bind`: HOST:PORT the Lighthouse listens on (replicas reach it at http://HOST:PORT); `min_replicas`:
    replica groups a quorum needs (>= 1); `join_timeout_ms`: milliseconds a quorum waits for more
    replicas to join once it has `min_replicas`. Raises ValueError for `min_replicas` < 1 and
    BenchError when the environment has no Lighthouse.
    """
    if min_replicas < 1:
        raise ValueError(f"min_replicas must be >= 1, got {min_replicas}")
    exe = Path(python).parent / "torchft_lighthouse"
    if not exe.exists():
        raise BenchError(f"no torchft_lighthouse beside {python}: remove {Path(python).parents[1]} to recreate it")
    return [
        str(exe),
        "--min_replicas",
        str(min_replicas),
        "--bind",
        bind,
        "--join_timeout_ms",
        str(join_timeout_ms),
        "--quorum_tick_ms",
        "100",
    ]
