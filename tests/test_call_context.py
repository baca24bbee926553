"""One servicer serves gRPC and libp2p calls (p2pd/libp2p.py runs SwarmServicer's handlers with a stream context):
every method a handler calls on its context is declared in p2pd/context.py's CallContext, and gRPC's context and the
libp2p plane's both provide all of them. (tests/test_libp2p.py fetches and asks Health over both transports.)"""

from __future__ import annotations

import ast
import inspect

import grpc
from helpers import ROOT

from p2pd.context import CallContext
from p2pd.libp2p import _StreamContext

HANDLERS = ["p2pd/server.py", "p2pd/carry.py", "p2pd/refusals.py"]


def context_calls() -> set[str]:
    """Methods called on a handler's `context` (or `ctx`) in the servicer's modules."""
    called = set()
    for rel in HANDLERS:
        for n in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                target = n.func.value
                if isinstance(target, ast.Name) and target.id in ("context", "ctx"):
                    called.add(n.func.attr)
    return called


def declared() -> set[str]:
    return {name for name, _ in inspect.getmembers(CallContext, inspect.isfunction) if not name.startswith("_")}


def test_handlers_ask_their_call_only_what_both_transports_give():
    called = context_calls()
    assert {"abort", "is_active", "time_remaining", "peer", "cancel"} <= called  # the scan sees the handlers
    assert called <= declared(), called - declared()
    for name in declared():
        assert callable(getattr(grpc.ServicerContext, name, None)), f"gRPC's context has no {name}"
        assert callable(getattr(_StreamContext, name, None)), f"the libp2p stream context has no {name}"
