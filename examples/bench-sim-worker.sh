#!/usr/bin/env bash
# Measures how many requests/s one simulated worker serves with zero simulated compute, so that
# benchmarks know when it is (not) the bottleneck. The worker is pinned to core 0, wrk to core 1.
#   examples/bench-sim-worker.sh [DURATION_SECS=8]
set -euo pipefail
dur=${1:-8}
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
    echo "installing wrk (Debian package)" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null
fi
cargo build --release -q -p routerctl
tmp=$(mktemp -d)
port=${PORT:-31999}
taskset -c 0 target/release/routerctl sim-worker --port "$port" --zero-compute >"$tmp/sim.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
script() { # name, max_new_tokens, stream
    cat >"$tmp/$1.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"text": "The capital of France is a city of lights and", "stream": $3, "sampling_params": {"max_new_tokens": $2}}'
LUA
}
script tok1 1 false
script tok16 16 false
script stream16 16 true
printf "%-22s %5s %12s %10s %10s\n" workload conc "requests/s" p50 p99
for w in tok1 tok16 stream16; do
    for c in 1 64; do
        out=$(taskset -c 1 wrk -t1 -c"$c" -d"${dur}s" --latency -s "$tmp/$w.lua" "http://127.0.0.1:$port/generate")
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        p50=$(awk '$1=="50%" {print $2}' <<<"$out")
        p99=$(awk '$1=="99%" {print $2}' <<<"$out")
        printf "%-22s %5s %12s %10s %10s\n" "$w" "$c" "$rps" "$p50" "$p99"
    done
done
echo "worker RSS after the run: $(ps -o rss= -p $pid | tr -d ' ') KiB"
