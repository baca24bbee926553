"""`atoll expert train`: bad input is one line before any training. (Experts that train, checkpoint, resume and
serve: tests/test_experts.py, test_operator_week.py.)"""

import pytest
from helpers import assert_one_line_error, cli


@pytest.mark.parametrize(
    "args, words",
    [
        (["--cluster", "9", "--clusters", "4"], ["experts.cluster 9", "experts.clusters 4"]),
        (["--cluster", "0", "--steps", "-3"], ["experts.steps"]),
        (["--cluster", "0", "--clusters", "1"], ["experts.clusters"]),
        (["--cluster", "0", "--config", "/nonexistent.yaml"], ["/nonexistent.yaml"]),
        (["--cluster", "0", "--initial-peers", "garbage", "--serve"], ["multiaddr"]),
    ],
)
def test_bad_expert_input_is_one_clear_line(args, words, tmp_path):
    assert_one_line_error(cli("expert", "train", "--checkpoint-dir", str(tmp_path), *args), *words)
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written
