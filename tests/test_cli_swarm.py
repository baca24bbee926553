"""`atoll swarm up`: bad input is one line before any daemon starts. (Swarms it starts: tests/test_swarm.py,
test_first_hour.py, test_byzantine_swarm.py and others.)"""

import pytest
from helpers import assert_one_line_error, cli


@pytest.mark.parametrize(
    "args, words",
    [
        (["--config", "/nonexistent.yaml"], ["/nonexistent.yaml"]),
        (["--nodes", "2", "--set", "comm.topology=star"], ["node.comm.topology", "ring"]),
        (["--nodes", "2", "--set", "train.rounds"], ["--set"]),
        (["--nodes", "2", "--alpha", "-1"], ["data.alpha"]),
    ],
)
def test_bad_swarm_input_is_one_clear_line(args, words, tmp_path):
    assert_one_line_error(cli("swarm", "up", "--workdir", str(tmp_path), *args), *words)
    assert not list(tmp_path.glob("node-*"))  # no daemon was started


def test_typer_range_checks_name_the_option(tmp_path):
    r = cli("swarm", "up", "--nodes", "0", "--workdir", str(tmp_path))
    assert r.exit_code == 2 and "--nodes" in r.stderr and "Traceback" not in r.stderr
