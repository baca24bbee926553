"""Network namespaces on one Linux machine for tests and benchmarks that need real links: hosts on a bridge with
their own shaped uplink and downlink (`testbed`), named mixes of link rates (`profiles`), and the namespace
plumbing they share with the tests' NAT topology (`namespaces`). Needs root, iproute2 and `tc`; `unavailable()`
says why not where it cannot be built. Addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range)."""
