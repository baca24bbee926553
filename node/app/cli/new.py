"""`atoll new task NAME`: a task of your own from the template."""

from __future__ import annotations

from pathlib import Path

import typer

from node.app.cli.common import (
    fail,
)

new_app = typer.Typer(help="Start something of your own from a template.", no_args_is_help=True)


@new_app.command("task")
def new_task(
    name: str = typer.Argument(..., metavar="NAME", help="Name of the task: NAME.py and NAME.yaml are written."),
    directory: Path = typer.Option(Path("."), "--dir", help="Where to write them."),
) -> None:
    """Write NAME.py (a task: model, data, loss, metrics; see node/task) and NAME.yaml (a
    3-node swarm on it). Then: `atoll swarm up -c NAME.yaml` from that folder."""
    import importlib.util

    if not name.isidentifier():
        fail(f"task name {name!r} must be a Python identifier (letters, digits, _)")
    code, swarm_file = directory / f"{name}.py", directory / f"{name}.yaml"
    existing = [str(p) for p in (code, swarm_file) if p.exists()]
    if existing:
        fail(f"{', '.join(existing)} already exist: choose another name or folder")
    template = Path(importlib.util.find_spec("node.task.template").origin).read_text()
    directory.mkdir(parents=True, exist_ok=True)
    code.write_text(template.replace("NAME", name))
    swarm_file.write_text(
        f"# A 3-node swarm on your task: atoll swarm up -c {name}.yaml (task paths: relative to this file)\n"
        "nodes: 3\n"
        "node:\n"
        f"  task: ./{name}.py:task\n"
        "  task_config: {dim: 20, per_node: 16}\n"
        "  optim: {name: sgd, lr: 0.02, momentum: 0.9, batch_size: 8, schedule: constant}\n"
        "  train: {rounds: 30, local_steps: 5}\n"
        f"  net: {{swarm: {name}}}\n"
    )
    typer.echo(f"wrote {code} and {swarm_file}; run it with: atoll swarm up -c {swarm_file}")
