"""The `atoll` app: it wires one module per command group, lists the commands in a newcomer's order, and each
command group has a test module of its own (tests/test_cli_<group>.py)."""

from helpers import ROOT, cli

from node.app.cli.app import ORDER

HELPERS = {"__init__", "__main__", "app", "common", "roles"}  # wiring and what the command modules share


def test_every_command_module_has_its_test_module():
    modules = {p.stem for p in (ROOT / "node/app/cli").glob("*.py")} - HELPERS
    assert modules >= {"node", "swarm", "bench", "router", "expert"}
    missing = [m for m in sorted(modules) if not (ROOT / "tests" / f"test_cli_{m}.py").is_file()]
    assert not missing, f"command modules without tests/test_cli_<module>.py: {missing}"


def test_help_lists_every_command_in_order():
    r = cli("--help")
    assert r.exit_code == 0
    at = [r.stdout.index(f" {name} ") for name in ORDER]
    assert at == sorted(at), ORDER
    assert "bench" in r.stdout and "Train" in r.stdout and "Measure" in r.stdout
