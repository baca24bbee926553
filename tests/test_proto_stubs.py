"""The committed stubs under p2pd/rpc must match a fresh generation from proto/."""

import pytest

from p2pd.rpc.generate import ROOT, generate

grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the stubs")


def test_committed_stubs_are_current(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "no stubs generated"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python -m p2pd.rpc.generate"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale against proto/: run python -m p2pd.rpc.generate"
        )


def test_generated_modules_import_as_package():
    from p2pd.rpc import swarm_pb2, swarm_pb2_grpc

    assert swarm_pb2.DESCRIPTOR.package == "atoll.v1"
    assert hasattr(swarm_pb2_grpc, "SwarmStub")
