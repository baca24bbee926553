"""What a handler of atoll's servicers may ask of its call: the part of gRPC's ServicerContext that the
libp2p plane (p2pd/libp2p.py) also provides, so one servicer serves both transports. A handler that
used anything else would break only when a libp2p peer calls it; tests/test_call_context.py reads
every handler and keeps them to this interface."""

from __future__ import annotations

from typing import Protocol

import grpc


class CallContext(Protocol):
    """One call being served: gRPC's ServicerContext, or the libp2p plane's stream context."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with status `code` and `details` (raises; never returns)."""

    def is_active(self) -> bool:
        """Whether the caller still waits: False once it cancelled, its deadline passed, or the call was cancelled."""

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline; None for a call without one (gRPC only)."""

    def peer(self) -> str:
        """Who calls, as the transport names it (gRPC's "ipv4:host:port", or a libp2p peer id)."""

    def cancel(self) -> None:
        """Cancel the call from the server's side (a stalled reader)."""
