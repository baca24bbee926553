#!/usr/bin/env bash
# Run a command as if the Debian packages of scripts/system-packages.txt were not installed:
# in a private mount namespace, each package's probe is hidden (a program or file covered by
# /dev/null, a folder by an empty tmpfs). Nothing changes outside the command. Needs root.
#
#   scripts/without-system-packages.sh .venv/bin/python -m pytest -m "not slow" -q
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: hiding packages needs a mount namespace: run as root" >&2; exit 2; }
exec unshare --mount --propagation private bash -c '
  set -e
  while read -r pkg probe _; do
    case "$pkg" in ""|\#*) continue ;; esac
    what=${probe#*:}
    case "$probe" in
      cmd:*) p=$(command -v "$what" || true); [ -z "$p" ] || mount --bind /dev/null "$p" ;;
      dir:*) [ ! -d "$what" ] || mount -t tmpfs -o size=1m,mode=0755 atoll-hidden "$what" ;;
      file:*) [ ! -f "$what" ] || mount --bind /dev/null "$what" ;;
    esac
  done < scripts/system-packages.txt
  unset ATOLL_REQUIRE_SYSTEM_PACKAGES
  exec "$@"' bash "$@"
