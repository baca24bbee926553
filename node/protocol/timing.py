"""Where a node's time goes: local computation, communication while not computing, and idle.

A round's wall time splits into its training (`RoundStats.seconds`: the local steps) and the rest of the round
(publishing, waiting for and fetching the neighbours' snapshots, mixing: communication while not computing).
Time between rounds (evaluation, checkpoint hand-off, events) is idle. Compute utilization is computation over
all three, the figure INTELLECT-1 (arXiv 2412.01152) and OpenDiLoCo (arXiv 2407.07852) report for training over
the internet. The engine (node/protocol/engine.py) keeps one `TimeSplit` per node; a daemon exports it
(atoll_compute_seconds_total, atoll_comm_seconds_total, atoll_idle_seconds_total), and the simulator's timeline
(node/algo/comm/links.py) predicts the same split from a link model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TimeSplit:
    """Seconds of computation, communication and idle time (all >= 0, wall-clock seconds)."""

    compute: float = 0.0
    comm: float = 0.0
    idle: float = 0.0

    def add_round(self, wall: float, training: float) -> TimeSplit:
        """Count one round of `wall` seconds of which `training` were local steps; returns that round's split."""
        compute = min(max(training, 0.0), max(wall, 0.0))
        part = TimeSplit(compute, max(wall, 0.0) - compute, 0.0)
        self.compute += part.compute
        self.comm += part.comm
        return part

    def add_idle(self, seconds: float) -> None:
        """Count `seconds` between rounds."""
        self.idle += max(seconds, 0.0)

    @property
    def wall(self) -> float:
        """All the seconds counted."""
        return self.compute + self.comm + self.idle

    @property
    def utilization(self) -> float:
        """Computation over wall time, in [0, 1] (0.0 before anything was counted)."""
        return self.compute / self.wall if self.wall > 0 else 0.0

    def as_event(self) -> dict[str, float]:
        """compute_s, comm_s, idle_s and utilization, rounded, for a JSON event."""
        return dict(
            compute_s=round(self.compute, 3),
            comm_s=round(self.comm, 3),
            idle_s=round(self.idle, 3),
            utilization=round(self.utilization, 4),
        )
