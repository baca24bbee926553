"""Loading a task from a reference, as Flower resolves its `module:attr` apps.

- `my_pkg.tasks:regression` imports `my_pkg.tasks` with the current folder (the project) first
  on `sys.path`;
- `./my_task.py:task` (any reference whose module part ends in `.py` or holds a `/`) loads that
  file, relative to the current folder, with its own folder on `sys.path` so it can import
  its neighbours.

The attribute is a `Task`, or a callable that takes the `task_config` dict and returns one.
Every failure is a TaskError of one line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import blake3

from node.task import Checked, Task, TaskError


def load(ref: str, config: dict[str, Any] | None = None, base: Path | None = None) -> Checked:
    """The task `ref` names, built with `config`, its hooks checked. Raises TaskError."""
    config = dict(config or {})
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise TaskError(f"task {ref}: expected module:attribute or path/to/file.py:attribute")
    base = (base or Path.cwd()).resolve()
    module = _file_module(ref, target, base) if target.endswith(".py") or "/" in target else _module(ref, target, base)
    obj = getattr(module, attr, None)
    if obj is None:
        raise TaskError(f"task {ref}: {target} has no attribute {attr!r}")
    if isinstance(obj, Task):
        if config:
            raise TaskError(f"task {ref}: is a Task, not a function of task_config; remove task_config")
        return Checked(obj, ref)
    if not callable(obj):
        raise TaskError(f"task {ref}: {attr} is a {type(obj).__name__}, expected a Task or a function returning one")
    try:
        task = obj(config)
    except TaskError:
        raise
    except Exception as e:  # user code
        raise TaskError(f"task {ref}: building it from task_config raised {type(e).__name__}: {e}") from e
    return Checked(task, ref)


def _module(ref: str, name: str, base: Path):
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise TaskError(f"task {ref}: no module named {e.name!r} (searched {base} and the installed packages)") from e
    except Exception as e:
        raise TaskError(f"task {ref}: importing {name} raised {type(e).__name__}: {e}") from e


def _file_module(ref: str, target: str, base: Path):
    path = (base / target).resolve()
    if not path.is_file():
        raise TaskError(f"task {ref}: file {path} not found")
    name = "atoll_task_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"task {ref}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise TaskError(f"task {ref}: importing {path.name} raised {type(e).__name__}: {e}") from e
    return module


def digest(task: Task, shared: dict[str, Any]) -> str:
    """Hex BLAKE3 of what two nodes must share to exchange models: the task's name and the
    name, shape and dtype of every tensor that travels (`shared`, what Worker.state returns),
    signed into the peer record. Not task_config: nodes may differ in it (their data)."""
    shapes = [(k, list(v.shape), str(v.dtype)) for k, v in shared.items()]
    blob = json.dumps({"name": task.name, "shapes": shapes}, sort_keys=True)
    return blake3.blake3(blob.encode()).hexdigest()
