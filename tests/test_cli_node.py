"""`atoll node start`: every mistake in its input is one line before it joins anything. (Nodes that start, train,
stop and resume: tests/test_swarm.py, test_field_reports.py, test_stop_signals.py and others.)"""

import pytest
from helpers import assert_one_line_error, cli


@pytest.mark.parametrize(
    "args, words",
    [
        (["--config", "/nonexistent.yaml"], ["/nonexistent.yaml"]),
        (["--set", "train.rounds=-1"], ["train.rounds"]),
        (["--set", "net.listen=nonsense"], ["net.listen"]),
        (["--initial-peers", "garbage"], ["net.initial_peers", "multiaddr"]),
        (["--set", "comm.exchange=logits", "--set", "security.aggregator=krum"], ["comm.exchange model"]),
        (["--set", "role=pilot"], ["role"]),
    ],
)
def test_bad_node_input_is_one_clear_line(args, words):
    assert_one_line_error(cli("node", "start", *args), *words)


def test_an_identity_others_can_read_is_refused_before_joining(tmp_path):
    key = tmp_path / "n.key"
    assert cli("identity", "show", "--key", str(key)).exit_code == 0
    key.chmod(0o644)
    assert_one_line_error(cli("node", "start", "--identity", str(key), "--set", "train.rounds=1"), "chmod 600")


def test_help_explains_the_command_and_its_options():
    r = cli("node", "start", "--help")
    assert r.exit_code == 0
    for option in ("--config", "--set", "--initial-peers", "--identity", "--json-events"):
        assert option in r.stdout, option
