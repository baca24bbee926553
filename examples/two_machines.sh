#!/usr/bin/env bash
# Two machines joining one swarm by multiaddr (each with atoll installed: bash scripts/install.sh).
#
#   machine A:  ADVERTISE=192.0.2.10 examples/two_machines.sh first
#               (it prints "join with: ... --initial-peers MADDR" and waits for machine B)
#   machine B:  ADVERTISE=192.0.2.11 examples/two_machines.sh second MADDR
#
# ADVERTISE is the address the other machine reaches this one at. TCP ports DHT_PORT (4001) and
# GRPC_PORT (5001) must be reachable between the machines; metrics are served on METRICS_PORT
# (9101). HOST is the address to listen on (default: every interface). Both nodes wait for each
# other (node_count=2) for up to a minute before training, then train ROUNDS (50) rounds together.
set -euo pipefail
ROLE="${1:?usage: ADVERTISE=THIS_MACHINES_ADDRESS two_machines.sh first|second [MULTIADDR_OF_FIRST]}"
ADVERTISE="${ADVERTISE:?set ADVERTISE to the address the other machine reaches this one at}"
HOST="${HOST:-0.0.0.0}"
DHT_PORT="${DHT_PORT:-4001}" GRPC_PORT="${GRPC_PORT:-5001}" METRICS_PORT="${METRICS_PORT:-9101}"
ATOLL="${ATOLL:-.venv/bin/atoll}" ROUNDS="${ROUNDS:-50}"
COMMON=(--set net.swarm=mylab --set node_count=2 --set train.rounds="$ROUNDS" --set net.host="$HOST" --set net.advertise_host="$ADVERTISE"
        --set "net.dht_listen=[\"/ip4/$HOST/tcp/$DHT_PORT\"]" --set "net.announce_maddrs=[\"/ip4/$ADVERTISE/tcp/$DHT_PORT\"]"
        --set net.grpc_port="$GRPC_PORT" --metrics-port "$METRICS_PORT")

case "$ROLE" in
  first) exec "$ATOLL" node start "${COMMON[@]}" --set node_index=0 ;;
  second) exec "$ATOLL" node start "${COMMON[@]}" --set node_index=1 \
            --initial-peers "${2:?give the multiaddr the first machine printed under 'join with:'}" ;;
  *) echo "usage: ADVERTISE=ADDRESS $0 first|second [MULTIADDR_OF_FIRST]" >&2; exit 2 ;;
esac
