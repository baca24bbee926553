"""Field report: the container image (`pip install .`, no dev extras) failed at start with
`ModuleNotFoundError: No module named 'multiaddr'`: p2pd imported a package that only the dev
extra's libp2p pulled in. Every third-party module node/ and p2pd/ import must come from the
project's own dependencies or what they require, never from the dev extra alone."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata

from helpers import ROOT


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def runtime_closure() -> set[str]:
    """Distributions `pip install .` brings: the dependencies and, recursively, theirs (markers ignored)."""
    block = (ROOT / "pyproject.toml").read_text().split("\ndependencies = [", 1)[1].split("\n]", 1)[0]
    todo = [_name(r) for r in re.findall(r'^\s*"([^"]+)"', block, re.M)]
    assert "torch" in todo and "hivemind" in todo, todo
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def imported_modules() -> set[str]:
    """Top-level modules imported anywhere in node/ and p2pd/ (inside functions too)."""
    found = set()
    for top in ("node", "p2pd"):
        for path in (ROOT / top).rglob("*.py"):
            for n in ast.walk(ast.parse(path.read_text())):
                if isinstance(n, ast.Import):
                    found |= {a.name.split(".")[0] for a in n.names}
                elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                    found.add(n.module.split(".")[0])
    return found - {"node", "p2pd", "__future__"} - set(sys.stdlib_module_names)


def test_every_imported_package_is_a_runtime_dependency():
    closure = runtime_closure()
    owners = metadata.packages_distributions()
    missing = {}
    for module in sorted(imported_modules()):
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [])}
        if dists and not dists & closure:
            missing[module] = sorted(dists)
    assert not missing, f"imported by node/ or p2pd/ but not installed by `pip install .`: {missing}"
