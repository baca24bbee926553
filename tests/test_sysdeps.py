"""The Debian packages the suite needs: one list (scripts/system-packages.txt) that the shell
script, CI and the tests' markers all read; a test that needs a missing package skips naming
it (or fails, in CI); with every package hidden the marked tests skip and the summary counts them."""

import os
import subprocess
import sys

import pytest
import sysdeps
from helpers import ROOT
from sysdeps import no_mount_namespace

SCRIPT = ROOT / "scripts" / "system-packages.sh"


def test_ci_and_make_test_install_from_the_one_list():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/system-packages.sh install --require" in ci and "ATOLL_REQUIRE_SYSTEM_PACKAGES=1" in ci
    make = (ROOT / "Makefile").read_text()
    assert "test: install system-packages" in make and "scripts/system-packages.sh install" in make
    assert {"prometheus", "dataset-fashion-mnist", "bible-kjv", "bible-kjv-text", "fortunes"} <= set(sysdeps.probes())


def test_the_shell_script_and_the_markers_agree_on_what_is_missing():
    out = subprocess.run(["bash", str(SCRIPT), "missing"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [p for p in sysdeps.probes() if not sysdeps.present(p)]


def test_a_missing_package_is_a_named_skip_except_in_ci(monkeypatch, tmp_path):
    monkeypatch.setitem(sysdeps.probes(), "fortunes", f"dir:{tmp_path / 'nothing'}")
    monkeypatch.setitem(sysdeps.probes(), "bible-kjv", "cmd:surely-no-such-program-here")
    monkeypatch.delenv("ATOLL_REQUIRE_SYSTEM_PACKAGES", raising=False)
    reason = sysdeps.missing("fortunes", "bible-kjv")
    assert reason.startswith("missing system package: fortunes bible-kjv (apt-get install fortunes bible-kjv")
    (tmp_path / "nothing").mkdir()
    assert not sysdeps.present("fortunes")  # an empty folder is no package
    (tmp_path / "nothing" / "computers").write_text("%\n")
    assert sysdeps.present("fortunes") and sysdeps.missing("fortunes") is None
    monkeypatch.setenv("ATOLL_REQUIRE_SYSTEM_PACKAGES", "1")
    assert sysdeps.missing("bible-kjv") is None  # CI: the test runs and fails on its own
    with pytest.raises(KeyError):
        sysdeps.marks("no-such-package")


def test_install_without_apt_says_in_one_line_what_to_install(tmp_path):
    fake = tmp_path / "scripts"
    fake.mkdir()
    (fake / "system-packages.sh").write_text(SCRIPT.read_text())
    (fake / "system-packages.txt").write_text("atoll-test-pkg  cmd:surely-no-such-program-here  a test\n")
    env = {**os.environ, "ATOLL_NO_APT": "1"}
    r = subprocess.run(["bash", str(fake / "system-packages.sh"), "install"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [
        "missing Debian packages: atoll-test-pkg; the tests that need them will skip"
        " (install: sudo apt-get install atoll-test-pkg)"
    ]
    r = subprocess.run(
        ["bash", str(fake / "system-packages.sh"), "install", "--require"], capture_output=True, env=env
    )
    assert r.returncode == 1  # CI refuses to run without them


@pytest.mark.skipif(no_mount_namespace() is not None, reason=f"{no_mount_namespace()}")
def test_with_every_package_hidden_the_tests_that_need_one_skip_by_name():
    hide = ROOT / "scripts" / "without-system-packages.sh"
    r = subprocess.run(["bash", str(hide), "bash", str(SCRIPT), "missing"], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == list(sysdeps.probes()), r.stderr  # every probe really hidden
    run = [sys.executable, "-m", "pytest", "-m", "system_package and not slow", "-q", "-p", "no:cacheprovider"]
    r = subprocess.run(["bash", str(hide), *run], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
    summary = [line for line in r.stdout.splitlines() if "skipped for missing system packages" in line]
    assert summary, r.stdout[-3000:]
    for pkg in ("prometheus", "dataset-fashion-mnist", "bible-kjv", "fortunes"):
        assert f"{pkg} (" in summary[0], summary
    assert " passed" not in r.stdout.splitlines()[-1]  # everything selected needed a hidden package
