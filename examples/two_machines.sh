#!/usr/bin/env bash
# Two machines joining one swarm by multiaddr. Run the first part on machine A, the second on
# machine B (each with atoll installed: bash scripts/install.sh). Replace A_IP with machine A's
# address; the ports must be reachable between the machines.
set -euo pipefail
ROLE="${1:?usage: two_machines.sh first|second [MULTIADDR_OF_FIRST]}"
COMMON=(--set net.swarm=mylab --set node_count=2 --set net.host=0.0.0.0)

if [ "$ROLE" = first ]; then
  # Listens for DHT peers on TCP 4001 and serves gRPC on 5001; prints its multiaddr on start
  # ("join with: atoll node start --initial-peers /ip4/.../tcp/4001/p2p/12D3KooW...").
  .venv/bin/atoll node start "${COMMON[@]}" --set node_index=0 --set net.advertise_host=A_IP \
    --set 'net.dht_listen=["/ip4/0.0.0.0/tcp/4001"]' --set net.grpc_port=5001 \
    --set 'net.announce_maddrs=["/ip4/A_IP/tcp/4001"]' --metrics-port 9101
else
  MADDR="${2:?give the multiaddr printed by the first machine}"
  # replace B_IP with machine B's address
  .venv/bin/atoll node start "${COMMON[@]}" --set node_index=1 --set net.advertise_host=B_IP \
    --set 'net.announce_maddrs=["/ip4/B_IP/tcp/4001"]' \
    --set 'net.dht_listen=["/ip4/0.0.0.0/tcp/4001"]' --set net.grpc_port=5001 \
    --initial-peers "$MADDR" --metrics-port 9101
fi
