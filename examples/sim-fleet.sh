#!/usr/bin/env bash
# Starts N simulated SGLang workers on consecutive ports and stops them all on Ctrl-C.
#   examples/sim-fleet.sh [N=4] [BASE_PORT=31001] [extra sim-worker flags...]
# Example: examples/sim-fleet.sh 4 31001 --speed 10 --cache-capacity-tokens 20000
set -euo pipefail
n=${1:-4}
base=${2:-31001}
shift $(( $# > 2 ? 2 : $# ))
cd "$(dirname "$0")/.."
cargo build --release -q -p routerctl
bin=target/release/routerctl
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for i in $(seq 0 $((n - 1))); do
    "$bin" sim-worker --port $((base + i)) "$@" &
    pids+=($!)
done
for i in $(seq 0 $((n - 1))); do
    url="http://127.0.0.1:$((base + i))"
    for _ in $(seq 1 100); do
        curl -sf "$url/health" >/dev/null && break
        sleep 0.1
    done
    echo "$url"
done
echo "fleet of $n simulated workers up; Ctrl-C stops them" >&2
wait
