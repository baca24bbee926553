"""The image's HEALTHCHECK: exit 0 while this container's node answers on its metrics port.

The entrypoint fixes that port (9100, or ATOLL_METRICS_PORT); a node serves it from start-up
until it exits, so a node that hangs before that or dies is reported unhealthy.
"""

import os
import sys
import urllib.request

port = int(os.environ.get("ATOLL_METRICS_PORT", "9100"))
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=4) as r:
        sys.exit(0 if r.status == 200 and b"atoll_" in r.read() else 1)
except OSError as e:
    print(f"metrics on port {port}: {e}", file=sys.stderr)
    sys.exit(1)
