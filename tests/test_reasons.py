"""One vocabulary of refusal reasons (p2pd/reasons.py): docs/security.md's table lists exactly it,
every reason the code raises or counts as a literal is in it, and the retryable sets come from it."""

from __future__ import annotations

import ast
import re

from helpers import ROOT

from p2pd import reasons

# the calls whose first argument (or second, for a server's refusal) is a reason
RAISERS = {
    "TensorStreamError": "STREAM",
    "RecordRefused": "RECORD",
    "FetchRefused": "FETCH",
    "FetchTimeout": "FETCH",
    "BadSnapshot": "FETCH",
    "ReasonedError": "FETCH",
    "LogitsRefused": "FETCH",
    "CodecError": "STREAM",
    "SampleRefused": "SAMPLE",
}


def literal_reasons() -> list[tuple[str, str, str]]:
    """(vocabulary, reason, where) of every literal reason in node/ and p2pd/."""
    out = []
    for path in [*(ROOT / "p2pd").rglob("*.py"), *(ROOT / "node").rglob("*.py")]:
        if "_pb2" in path.name or path.name == "reasons.py":
            continue
        where = str(path.relative_to(ROOT))
        for n in ast.walk(ast.parse(path.read_text())):
            if not isinstance(n, ast.Call):
                continue
            fn = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            if fn in RAISERS and n.args and isinstance(n.args[0], ast.Constant):
                out.append((RAISERS[fn], n.args[0].value, where))
            elif fn in ("_refuse", "refuse") and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant):
                out.append(("REQUEST", n.args[1].value, where))
            elif fn == "labels":
                for kw in n.keywords:
                    if kw.arg == "reason" and isinstance(kw.value, ast.Constant):
                        metric = "DISCARDED" if "discarded" in ast.unparse(n.func) else "FETCH"
                        out.append((metric, kw.value.value, where))
    return out


def test_every_literal_reason_in_the_code_is_in_the_vocabulary():
    found = literal_reasons()
    assert len(found) > 40  # the scan sees the code
    unknown = [(v, r, w) for v, r, w in found if r not in getattr(reasons, v)]
    assert not unknown, unknown


def test_the_fetch_loop_and_the_aggregators_use_words_of_the_vocabulary():
    fetcher = (ROOT / "node/net/fetcher.py").read_text()
    for r in re.findall(r'reason = "([a-z_]+)"', fetcher) + re.findall(r'return "(no_[a-z_]+)"', fetcher):
        assert r in reasons.FETCH, r
    for path in (ROOT / "node/algo/aggregate").glob("*.py"):
        for r in re.findall(r'= "(clipped|not_selected|down_weighted|rejected|trimmed)"', path.read_text()):
            assert r in reasons.DISCARDED, (path.name, r)


def test_docs_security_lists_exactly_the_vocabulary():
    text = (ROOT / "docs/security.md").read_text().split("## Every reason a node counts", 1)[1].split("\n## ", 1)[0]
    tables = re.split(r"\n\*\*", text)[1:]
    listed = {
        t.split("}")[0].split("{")[0].split(":")[0].strip("*"): re.findall(r"^\| `([a-z0-9_]+)` \|", t, re.M)
        for t in tables
    }
    documented = {r for rows in listed.values() for r in rows}
    own_fetch = {r for r in reasons.FETCH if not r.startswith("record_") and r not in reasons.STREAM}
    everything = own_fetch | set(reasons.STREAM) | set(reasons.RECORD) | set(reasons.REQUEST) | set(reasons.DISCARDED)
    assert documented == everything | set(reasons.SAMPLE), documented ^ (everything | set(reasons.SAMPLE))
    assert listed["atoll_router_requests_total"] == list(reasons.SAMPLE)


def test_the_retryable_sets_come_from_the_vocabulary():
    from node.net import carrier, fetcher

    assert fetcher.RETRYABLE is reasons.RETRYABLE and carrier.FULL is reasons.FULL
    assert set(reasons.RETRYABLE) <= set(reasons.FETCH)
