"""Virtual environments of the systems atoll is measured against (Flower, torchft), each its own.

A baseline runs atoll's own `node.protocol.worker.Worker` (same model, init, data partition, sampler and
optimizer) inside an environment that has the baseline's package, the torch release atoll runs, and
WORKER_PACKAGES: what `node.config` and `node.protocol.worker` import besides torch, pinned to the releases
atoll's environment has. atoll's own environment never gets the baselines' packages. An environment is created on
first use; a marker file inside it lists its requirements after a finished installation, so an interrupted or
outdated one is redone.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from node.app.bench.swarm import BenchError

# what node.config (NodeConfig checks multiaddrs with multiaddr) and node.protocol.worker import besides torch;
# tests/test_cli_bench.py imports both with only these (and the standard library) to be found
WORKER_PACKAGES = ("numpy", "pydantic", "pyyaml", "blake3", "multiaddr")
CACHE = Path.home() / ".cache" / "atoll"


def requirements(*pins: str) -> list[str]:
    """pip requirements: `pins` (e.g. "flwr==1.42.0"), the torch release of this process (without its local tag
    such as +cpu), and WORKER_PACKAGES each pinned to the release installed here where there is one."""
    import torch

    out = [*pins, f"torch=={torch.__version__.split('+')[0]}"]
    for name in WORKER_PACKAGES:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def baseline_python(venv: Path, name: str, wanted: list[str], progress=print) -> Path:
    """The Python (`bin/python`) of the environment at `venv` for baseline `name`, created with `wanted` (pip
    requirements) on first use, or again when its marker lists others. `progress(message)` is told once before a
    creation (about a minute; pip takes wheels from its local cache where it has them). Raises BenchError with the
    last lines of venv's or pip's error output, or the step that ran past its time limit."""
    venv = Path(venv)
    python, marker = venv / "bin" / "python", venv / f"atoll-{name}-requirements.txt"
    if marker.exists() and marker.read_text().split() == wanted:
        return python
    progress(f"creating the {name} environment in {venv} (once; about a minute)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True, timeout=300
            )
        pip = [str(python), "-m", "pip", "install", "-q", *wanted]
        subprocess.run(pip, check=True, capture_output=True, text=True, timeout=1800)
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[-3:]
        raise BenchError(f"could not create the {name} environment in {venv}: {' / '.join(tail)}") from None
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"could not create the {name} environment in {venv}: ran past {e.timeout:.0f} s") from None
    marker.write_text("\n".join(wanted) + "\n")
    return python
