#!/bin/sh
# Container entrypoint: run `atoll "$@"` with this container's identity on /data, joining the
# swarm through ATOLL_INITIAL_PEERS (a multiaddr) or, when ATOLL_BOOTSTRAP_FILE names a file
# on a shared volume, through the multiaddr the bootstrap node wrote there. A node started
# with ATOLL_WRITE_BOOTSTRAP=1 writes its own multiaddr (at ATOLL_ANNOUNCE_HOST) to that file.
# Kubernetes: ATOLL_INDEX_FROM_HOSTNAME=1 takes node_index from the StatefulSet ordinal, and
# the pod with ordinal 0 adopts the pre-generated key ATOLL_BOOTSTRAP_KEY (so its peer id,
# hence the bootstrap multiaddr in the ConfigMap, is known before it starts).
set -eu
KEY=/data/node.key
HOSTNAME_=$(hostname)
case "$HOSTNAME_" in
  *-0) if [ -n "${ATOLL_BOOTSTRAP_KEY:-}" ] && [ -f "$ATOLL_BOOTSTRAP_KEY" ] && [ ! -f "$KEY" ]; then
         install -m 600 "$ATOLL_BOOTSTRAP_KEY" "$KEY"
       fi
       [ -n "${ATOLL_BOOTSTRAP_KEY:-}" ] && unset ATOLL_INITIAL_PEERS ;;  # the bootstrap joins nobody
esac
ID=$(atoll identity show --key "$KEY")  # creates the key on first start
HOST=${ATOLL_ANNOUNCE_HOST:-$HOSTNAME_}
if [ "${ATOLL_INDEX_FROM_HOSTNAME:-0}" = 1 ]; then
  set -- "$@" --set "node_index=${HOSTNAME_##*-}"
fi
set -- "$@" --set net.identity_path=$KEY --set checkpoint_dir=/data/checkpoints \
  --set net.host=0.0.0.0 --set net.advertise_host="$HOST" --set net.grpc_port=7000 --set metrics_port=9100 \
  --set "net.dht_listen=[/ip4/0.0.0.0/tcp/7001]" --set "net.announce_maddrs=[/dns4/$HOST/tcp/7001]"
if [ "${ATOLL_WRITE_BOOTSTRAP:-0}" = 1 ] && [ -n "${ATOLL_BOOTSTRAP_FILE:-}" ]; then
  echo "/dns4/$HOST/tcp/7001/p2p/$ID" > "$ATOLL_BOOTSTRAP_FILE"
elif [ -n "${ATOLL_BOOTSTRAP_FILE:-}" ]; then
  i=0
  while [ ! -s "$ATOLL_BOOTSTRAP_FILE" ] && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
  ATOLL_INITIAL_PEERS=$(cat "$ATOLL_BOOTSTRAP_FILE")
fi
if [ -n "${ATOLL_INITIAL_PEERS:-}" ]; then
  set -- "$@" --set "net.initial_peers=[$ATOLL_INITIAL_PEERS]"
fi
exec atoll "$@"
