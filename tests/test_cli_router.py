"""`atoll router serve` and `atoll router query`: bad input is one line before anything starts or connects.
(A router answering queries in a real swarm: tests/test_operator_week.py and tests/test_netns.py.)"""

import pytest
from helpers import assert_one_line_error, cli


@pytest.mark.parametrize(
    "args, words",
    [
        (["serve", "--set", "experts.clusters=1"], ["experts.clusters"]),
        (["serve", "--set", "experts.router_steps=zero"], ["experts.router_steps"]),
        (["serve", "--set", "experts.net=unet", "--set", "experts.width=12"], ["multiple of 8"]),
        (["serve", "--set", "experts.max_pending=100"], ["experts.max_pending"]),
        (["query"], ["--router", "--peers"]),
        (["query", "--router", "127.0.0.1:1", "--strategy", "top0"], ["--strategy", "top0"]),
        (["query", "--router", "127.0.0.1:1", "--strategy", "best"], ["--strategy"]),
        (["query", "--router", "localhost"], ["HOST:PORT"]),
        (["query", "--peers", "garbage"], ["garbage", "multiaddr"]),
        (["query", "--router", "127.0.0.1:1", "--timeout", "1"], ["127.0.0.1:1", "UNAVAILABLE"]),
        (["query", "--router", "127.0.0.1:1", "--tls-ca", "/nonexistent.pem"], ["--tls-ca"]),
    ],
)
def test_bad_router_input_is_one_clear_line(args, words):
    assert_one_line_error(cli("router", *args), *words)


def test_typer_range_checks_name_the_option():
    r = cli("router", "query", "--router", "127.0.0.1:1", "--n", "0")
    assert r.exit_code == 2 and "--n" in r.stderr and "Traceback" not in r.stderr
    r = cli("router", "serve", "--http-port", "70000")
    assert r.exit_code == 2 and "--http-port" in r.stderr and "Traceback" not in r.stderr
