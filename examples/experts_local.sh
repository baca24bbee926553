#!/usr/bin/env bash
# The diffusion experts and their router on this machine, in one command: one expert per
# cluster (K = 4) of Fashion-MNIST trained in isolation, a router trained on top, then a top-2
# query whose 16 images land in $OUT/grid.png. Everything started here stops at the end or on Ctrl-C.
#
#   examples/experts_local.sh                        # about 30 minutes on 2 cores
#   STEPS=300 examples/experts_local.sh --set experts.router_steps=300
#
# CONFIG: the experts' config (default examples/experts-fashion.yaml); STEPS: each expert's
# training steps (default 1200); HTTP_PORT: the router's HTTP API and page (default 0: a free
# port, printed); OUT: logs, keys, checkpoints and the grid (default out/experts; a second run
# reuses the trained checkpoints and the clustering); extra arguments (--set k=v ...) go to every
# expert and the router. The same by hand, a terminal each, is in the README's "Diffusion
# experts and the ensemble router".
set -euo pipefail
ATOLL="${ATOLL:-.venv/bin/atoll}" OUT="${OUT:-out/experts}" STEPS="${STEPS:-1200}" K=4
CONFIG="${CONFIG:-examples/experts-fashion.yaml}" HTTP_PORT="${HTTP_PORT:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # five processes share the machine's cores
mkdir -p "$OUT"
pids=()
declare -A pid_of
stop() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -eq 0 ] || kill -TERM "${pids[@]}" 2>/dev/null || true
  wait || true
}
trap stop EXIT
trap 'exit 130' INT TERM

start() {  # start NAME ARGS...: an atoll command in the background, its output in $OUT/NAME.log
  local name=$1; shift
  "$ATOLL" "$@" >"$OUT/$name.log" 2>&1 &
  pids+=($!)
  pid_of[$name]=$!
}

wait_for() {  # wait_for NAME PATTERN SECONDS: until the log shows PATTERN (fails if its process died)
  local i
  for ((i = 0; i < $3; i++)); do
    grep -qE "$2" "$OUT/$1.log" 2>/dev/null && return 0
    kill -0 "${pid_of[$1]}" 2>/dev/null || break
    sleep 1
  done
  echo "$1 stopped or did not get to '$2' within $3 s; its log ($OUT/$1.log) ends with:" >&2
  tail -n 5 "$OUT/$1.log" >&2
  exit 1
}

echo "training expert 0 of $K ($STEPS steps); logs in $OUT/"
start e0 expert train -c "$CONFIG" --cluster 0 --serve --identity "$OUT/e0.key" --checkpoint-dir "$OUT/ck" --steps "$STEPS" "$@"
wait_for e0 "serving on" 1800
MADDR=$(grep -m1 -oE '/ip4/127\.0\.0\.1/tcp/[0-9]+/p2p/[A-Za-z0-9]+' "$OUT/e0.log")
echo "expert 0 serving; the others and the router join through $MADDR"
for ((k = 1; k < K; k++)); do
  start "e$k" expert train -c "$CONFIG" --cluster "$k" --serve --identity "$OUT/e$k.key" --checkpoint-dir "$OUT/ck" \
    --steps "$STEPS" -p "$MADDR" "$@"
done
start router router serve -c "$CONFIG" --identity "$OUT/r.key" --checkpoint-dir "$OUT/ck" -p "$MADDR" \
  --http-port "$HTTP_PORT" "$@"
for name in e1 e2 e3 router; do wait_for "$name" "serving on" 3600; done
echo "every expert and the router serve; asking for 16 images, top-2"
for ((i = 0; i < 60; i++)); do  # until the router has read every expert's record
  "$ATOLL" router query -p "$MADDR" --n 1 --strategy top1 --steps 1 2>/dev/null | grep -q "$K of $K experts live" && break
  sleep 1
done
"$ATOLL" router query -p "$MADDR" --n 16 --strategy top2 --seed 0 --out "$OUT/grid.png"
grep -m1 -oE 'HTTP API and page: \S+' "$OUT/router.log" || true
echo "done: $OUT/grid.png; stopping the experts and the router"
