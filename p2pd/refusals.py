"""How a gRPC service of atoll refuses a request: counted by reason, logged at most one line a
minute (an anonymous client must not be able to flood the log), then aborted with a status.

Undecodable bytes never reach gRPC's own deserializer error path (which logs a full traceback
and answers INTERNAL "Exception deserializing request!" each time): services are registered
with `add_lenient_service`, whose deserializers hand the handler UNDECODABLE instead, and the
handler refuses it as `bad_request` like any other bad input.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc

from p2pd.context import CallContext

log = logging.getLogger("atoll.p2pd")
UNDECODABLE = object()  # what a lenient deserializer hands a handler for bytes that are no request
LOG_EVERY_SECONDS = 60.0


def lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A request deserializer that returns UNDECODABLE for undecodable bytes instead of raising."""

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception:  # protobuf's DecodeError, or anything a malformed message triggers
            return UNDECODABLE

    return deserialize


def add_lenient_service(server: grpc.Server, service: str, methods: dict[str, tuple[Callable, type, type]]) -> None:
    """Register the unary-unary `methods` of `service` (e.g. "atoll.v1.Router") on `server`: name -> (handler,
    request message class, reply message class); undecodable requests reach the handler as UNDECODABLE."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=lenient(request.FromString), response_serializer=reply.SerializeToString
        )
        for name, (handler, request, reply) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


class Refusals:
    """Refusals of one service: `counts` by reason (a metric label), one log line a minute at most."""

    def __init__(self, what: str = "a request"):
        """`what`: how the log line names a refused call, e.g. "a Sample request"."""
        self.what = what
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._last_log = -LOG_EVERY_SECONDS

    def refuse(self, context: CallContext, reason: str, code: grpc.StatusCode, details: str) -> None:
        """Count `reason`, log at most one line a minute, abort the call with `code` and `details` (raises)."""
        now = time.monotonic()
        with self._lock:
            self.counts[reason] += 1
            quiet = now - self._last_log < LOG_EVERY_SECONDS
            self._last_log = self._last_log if quiet else now
        if not quiet:
            log.info(
                "refused %s from %s: %s (further refusals are only counted for a minute)",
                self.what,
                context.peer(),
                reason,
            )
        context.abort(code, details)

    def refuse_undecodable(self, request: Any, context: CallContext) -> None:
        """Refuse (raises) when `request` is UNDECODABLE: `bad_request`, INVALID_ARGUMENT."""
        if request is UNDECODABLE:
            self.refuse(context, "bad_request", grpc.StatusCode.INVALID_ARGUMENT, "undecodable request")
