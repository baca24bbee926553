"""The layers show in the folders and imports only go down: a module may import its own layer
and the layers below it, never one above (docs/architecture.md). This test reads every import
of node/ and p2pd/, those inside functions included, and names each one that goes up."""

from __future__ import annotations

import ast

from helpers import ROOT

# layer -> the layers its modules may import (besides its own)
BELOW = {
    "network": set(),  # p2pd/: identity, records, DHT, tensor streams, transports
    "foundation": {"network"},  # node/registry.py, node/config.py: names and settings everyone reads
    "algorithms": {"foundation"},  # node/algo/: pure maths over tensors
    "protocols": {"algorithms", "foundation", "network"},  # node/protocol/, node/task/: what the simulator runs
    "runtime": {"protocols", "algorithms", "foundation", "network"},  # node/net/: sockets, threads, clocks
    "application": {"runtime", "protocols", "algorithms", "foundation", "network"},  # node/app/
}
# the algorithms may raise the network layer's refusal type, nothing else of it
ALGORITHMS_MAY_USE = {"p2pd.errors"}


def layer(module: str) -> str | None:
    """The layer of a module of this repository (dotted name), None for the node package itself."""
    if module == "p2pd" or module.startswith("p2pd."):
        return "network"
    parts = module.split(".")
    if parts[0] != "node" or len(parts) == 1:
        return None
    return {
        "registry": "foundation",
        "config": "foundation",
        "algo": "algorithms",
        "protocol": "protocols",
        "task": "protocols",
        "net": "runtime",
        "app": "application",
    }.get(parts[1], "unplaced")


def modules() -> dict[str, tuple]:
    out = {}
    for top in ("node", "p2pd"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path) -> list[tuple[int, str]]:
    """(line, imported module) of every import of node or p2pd in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] in ("node", "p2pd")]


def test_every_module_sits_in_a_layer_folder():
    unplaced = [name for name in modules() if layer(name) == "unplaced"]
    assert not unplaced, f"modules outside the layer folders: {unplaced}"


def test_imports_only_go_down():
    known = modules()
    wrong = []
    for name, path in known.items():
        mine = layer(name)
        for line, target in imports(path):
            if target not in known:  # an attribute of a module (from node.x import Name)
                continue
            theirs = layer(target)
            if theirs in (None, mine) or theirs in BELOW[mine]:
                continue
            if mine == "algorithms" and target in ALGORITHMS_MAY_USE:
                continue
            wrong.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_the_check_itself_sees_an_upward_import(tmp_path):
    """The test above cannot pass by reading nothing."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from node.app.cli import main\n")
    assert imports(bad) == [(2, "node.app.cli"), (2, "node.app.cli.main")]
    assert layer("node.algo.comm.mixing") == "algorithms" and "application" not in BELOW["algorithms"]
    assert len(modules()) > 80


def test_modules_and_classes_stay_small():
    """One job each: no module of node/ or p2pd/ over 400 lines, no class over 200 (generated stubs aside)."""
    big = []
    for path in modules().values():
        text = path.read_text()
        if text.count("\n") > 400:
            big.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                big.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} class {node.name}: {node.end_lineno - node.lineno + 1}"
                )
    assert not big, "\n".join(big)
