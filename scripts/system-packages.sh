#!/usr/bin/env bash
# The Debian packages the test suite needs (listed once, in scripts/system-packages.txt).
#
#   scripts/system-packages.sh missing          print the missing packages, one line (empty: none)
#   scripts/system-packages.sh install          install the missing ones where this machine allows
#                                               it (root or password-less sudo, and apt-get); else
#                                               say in one line what to install and go on (exit 0):
#                                               the tests that need them skip, naming the package
#   scripts/system-packages.sh install --require  the same, but exit 1 if any is still missing (CI)
#
# ATOLL_NO_APT=1 never calls apt-get (install then only reports what is missing).
set -uo pipefail
cd "$(dirname "$0")/.."
LIST=scripts/system-packages.txt

missing() {
  local pkg probe p _ out=()
  while read -r pkg probe _; do
    case "$pkg" in ""|\#*) continue ;; esac
    case "$probe" in
      cmd:*) p=$(command -v "${probe#cmd:}" 2>/dev/null) && [ -f "$p" ] || out+=("$pkg") ;;
      dir:*) [ -n "$(ls -A "${probe#dir:}" 2>/dev/null)" ] || out+=("$pkg") ;;
      file:*) [ -f "${probe#file:}" ] || out+=("$pkg") ;;
      *) echo "system-packages.txt: bad probe '$probe' for $pkg" >&2; exit 2 ;;
    esac
  done < "$LIST"
  echo "${out[*]:-}"
}

apt_prefix() {  # how this machine may run apt-get: "" (root), "sudo -n", or nothing possible (exit 1)
  [ "${ATOLL_NO_APT:-0}" = 1 ] && return 1
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ "$(id -u)" = 0 ]; then echo ""; return 0; fi
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && { echo "sudo -n"; return 0; }
  return 1
}

cmd=${1:-missing}
need=$(missing) || exit 2
case "$cmd" in
  missing) echo "$need"; exit 0 ;;
  install) ;;
  *) echo "usage: $0 missing | install [--require]" >&2; exit 2 ;;
esac
[ -z "$need" ] && exit 0
if prefix=$(apt_prefix); then
  echo "installing the Debian packages the tests need: $need"
  # shellcheck disable=SC2086  # $prefix and $need are word lists
  $prefix env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && $prefix env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null \
    || echo "apt-get could not install: $need" >&2
  # the prometheus package enables a server where systemd runs: the tests only need its binaries
  case " $need " in *" prometheus "*) $prefix systemctl disable --now prometheus >/dev/null 2>&1 || true ;; esac
  need=$(missing)
fi
[ -z "$need" ] && exit 0
echo "missing Debian packages: $need; the tests that need them will skip (install: sudo apt-get install $need)"
[ "${2:-}" = --require ] && { echo "CI needs every system package: $need is missing" >&2; exit 1; }
exit 0
