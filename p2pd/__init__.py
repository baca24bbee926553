"""atoll's network layer: identity, signed peer records, DHT discovery, tensors on gRPC."""

__version__ = "0.1.0"
