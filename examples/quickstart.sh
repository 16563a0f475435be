#!/usr/bin/env bash
# routerd on a simulated fleet: two simulated SGLang workers and routerd in front of them on
# :30000 (cache_aware, the default policy). Ctrl-C stops everything. Needs no GPU.
#   examples/quickstart.sh [ROUTER_PORT=30000]
set -euo pipefail
port=${1:-30000}
cd "$(dirname "$0")/.."
cargo build --release -q -p routerd -p routerctl
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for p in 31001 31002; do
    target/release/routerctl sim-worker --port "$p" --speed 10 >/dev/null &
    pids+=($!)
done
target/release/routerd --port "$port" \
    --worker-urls http://127.0.0.1:31001 http://127.0.0.1:31002 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readiness" >/dev/null && break; sleep 0.1; done
cat <<MSG
routerd is up on http://127.0.0.1:$port with 2 simulated workers. Try:
  curl -s localhost:$port/generate -d '{"text": "Hello", "sampling_params": {"max_new_tokens": 8}}'
  curl -sN localhost:$port/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'
  curl -s localhost:$port/workers
Ctrl-C stops it.
MSG
wait
