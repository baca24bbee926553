"""`atoll new task NAME`: the template written as NAME.py and a swarm file that loads, never over a user's files.
(The written task training in a real swarm: tests/test_task.py.)"""

from helpers import assert_one_line_error, cli

from node.config import load_swarm_config


def test_new_task_writes_a_task_and_a_swarm_file_that_loads(tmp_path):
    r = cli("new", "task", "mine", "--dir", str(tmp_path))
    assert r.exit_code == 0, r.stderr
    code, swarm = tmp_path / "mine.py", tmp_path / "mine.yaml"
    assert "def task" in code.read_text() and "NAME" not in code.read_text()
    cfg = load_swarm_config(swarm)
    assert cfg.nodes == 3 and cfg.node.task.endswith("mine.py:task") and cfg.node.net.swarm == "mine"
    before = code.read_text()
    assert_one_line_error(cli("new", "task", "mine", "--dir", str(tmp_path)), "already exist")
    assert code.read_text() == before  # never overwritten


def test_a_name_that_is_not_an_identifier_is_refused(tmp_path):
    assert_one_line_error(cli("new", "task", "9-lives", "--dir", str(tmp_path)), "9-lives")
    assert list(tmp_path.iterdir()) == []
