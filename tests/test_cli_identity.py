"""`atoll identity show`: a node key made on first use and reused after, and a key others can read refused."""

from helpers import assert_one_line_error, cli


def test_identity_show_creates_then_reuses_key(tmp_path):
    key = tmp_path / "n.key"
    first = cli("identity", "show", "--key", str(key))
    second = cli("identity", "show", "--key", str(key))
    assert first.exit_code == 0 and first.stdout.strip().startswith("12D3KooW")
    assert first.stdout == second.stdout and key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)
    assert_one_line_error(cli("identity", "show", "--key", str(key)), "chmod 600")


def test_a_key_that_is_not_a_key_is_refused(tmp_path):
    key = tmp_path / "junk.key"
    key.write_bytes(b"not a key at all")
    key.chmod(0o600)
    r = cli("identity", "show", "--key", str(key))
    assert_one_line_error(r, str(key))
