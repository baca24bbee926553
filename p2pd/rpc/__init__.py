"""Generated protobuf/gRPC stubs (do not edit; see generate.py)."""
