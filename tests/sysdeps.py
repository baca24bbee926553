"""The Debian packages some tests need, read from the one list `scripts/system-packages.txt`
(the same list `make test` installs from and `.ci/run` requires).

    from sysdeps import needs

    @needs("fortunes", "bible-kjv")
    def test_...

A marked test skips with the reason ``missing system package: NAME (apt-get install NAME)``
where a package's probe fails, so a machine without them still passes `make test`; the
session's summary counts those skips (conftest.py). In CI (``ATOLL_REQUIRE_SYSTEM_PACKAGES=1``,
set by .ci/run) nothing skips: a missing package then fails the test that needs it.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

LIST = Path(__file__).resolve().parents[1] / "scripts" / "system-packages.txt"
REASON = "missing system package"  # every skip for a missing package starts so (conftest counts them)


@functools.cache
def probes() -> dict[str, str]:
    """package -> probe (``cmd:NAME``, ``dir:D`` or ``file:F``), from scripts/system-packages.txt."""
    out = {}
    for line in LIST.read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            if not fields[1].startswith(("cmd:", "dir:", "file:")):
                raise ValueError(f"{LIST}: bad probe {fields[1]!r} for {fields[0]}")
            out[fields[0]] = fields[1]
    return out


def present(package: str) -> bool:
    """Whether `package`'s probe holds on this machine. KeyError for a package not in the list."""
    kind, _, what = probes()[package].partition(":")
    if kind == "cmd":
        return shutil.which(what) is not None
    if kind == "dir":
        return Path(what).is_dir() and any(Path(what).iterdir())
    return Path(what).is_file()


def required() -> bool:
    """CI mode: tests never skip for a missing package."""
    return os.environ.get("ATOLL_REQUIRE_SYSTEM_PACKAGES") == "1"


def missing(*packages: str) -> str | None:
    """The skip reason for the first of `packages` that is missing, or None (also in CI mode)."""
    absent = [p for p in packages if not present(p)]
    if not absent or required():
        return None
    return f"{REASON}: {' '.join(absent)} (apt-get install {' '.join(absent)}, or `make test` as root)"


def marks(*packages: str) -> list:
    """The marks of a test that needs these Debian packages (a module's ``pytestmark``)."""
    for p in packages:
        probes()[p]  # a typo in a package name fails at collection
    reason = missing(*packages)
    return [pytest.mark.system_package(*packages), pytest.mark.skipif(reason is not None, reason=reason or "")]


def needs(*packages: str):
    """Decorate a test that needs these Debian packages."""

    def mark(fn):
        for m in marks(*packages):
            fn = m(fn)
        return fn

    return mark


@functools.cache
def no_mount_namespace() -> str | None:
    """Why this machine cannot give a test a private mount namespace (`unshare --mount`, root), or None."""
    import subprocess

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a private mount namespace needs root"
    r = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True, timeout=30)
    return None if r.returncode == 0 else f"no mount namespace here: {r.stderr.strip()}"
