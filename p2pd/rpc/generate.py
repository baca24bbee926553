"""Regenerate the committed gRPC stubs from ../../proto.

Run ``python -m p2pd.rpc.generate`` after editing a .proto file. The import path maps
``proto/`` to ``p2pd/rpc/`` so the generated modules import each other as ``p2pd.rpc.*``.
tests/test_proto_stubs.py regenerates into a temporary folder and fails when the committed
files differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTOS = ("swarm.proto", "router.proto")


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py and *_pb2_grpc.py for every proto into out_dir/p2pd/rpc; return them."""
    from grpc_tools import protoc  # dev dependency, only needed here

    for name in PROTOS:
        args = [
            "protoc",
            f"-Ip2pd/rpc={PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"p2pd/rpc/{name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {name}")
    stems = [Path(n).stem for n in PROTOS]
    return [out_dir / "p2pd" / "rpc" / f"{s}{suffix}" for s in stems for suffix in ("_pb2.py", "_pb2_grpc.py")]


def main() -> int:
    """Regenerate the committed stubs in place and print each file written; returns the exit status 0."""
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
