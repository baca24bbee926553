"""One shape for every refusal in the network layer: a message plus a short `reason`.

`reason` is a low-cardinality label (e.g. "bad_signature", "truncated", "timeout") that
callers count in metrics; `detail` is for the log line.
"""

from __future__ import annotations


class ReasonedError(Exception):
    """An error with a low-cardinality `reason` label and a free-text `detail`; str() is `reason: detail`, or just
    `reason` without a detail."""

    def __init__(self, reason: str, detail: str = ""):
        """`reason`: the metric label, e.g. "timeout"; `detail`: free text for the log, "" for none."""
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
