#!/usr/bin/env bash
# Set up atoll in a virtual environment (default .venv, or $ATOLL_VENV) on a fresh machine.
# Installs torch==2.13.0 first when the venv has no torch: on these machines that pin is a CPU
# build on local disk, while an unpinned torch would pull a CUDA build of several GB. The
# package itself accepts any torch >= 2.3, so a GPU user's own torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ATOLL_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "installing torch==2.13.0"
  "${PIP[@]}" install -q torch==2.13.0
fi
echo "installing atoll and its test dependencies"
# one resolver run for everything, so pip picks a grpcio-tools that matches the protobuf
"${PIP[@]}" install -q -e ".[dev]"
"$VENV/bin/atoll" version >/dev/null
echo "ok: $VENV/bin/atoll is ready"
