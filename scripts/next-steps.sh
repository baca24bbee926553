#!/usr/bin/env bash
# Print what a newcomer runs after `make demo`: the commands of the README's "After the demo"
# section (one source for both), ready to copy.
set -euo pipefail
cd "$(dirname "$0")/.."
echo
echo "Next steps (from $(pwd)):"
awk '/^## After the demo/ {on = 1; next} on && /^```bash/ {block = 1; next} block && /^```/ {exit} block {print "  " $0}' README.md
