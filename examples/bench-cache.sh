#!/usr/bin/env bash
# Cache-aware routing benchmark (issue 4). Four simulated workers whose prefix caches are smaller
# than the working set; for each workload (shared-prefix, multi-turn) and each way of routing
# (routerd cache_aware, routerd round_robin, sglang-router 0.3.2 cache_aware, perfect affinity),
# fresh workers, then `routerctl bench`. Prints one table row per run.
#   examples/bench-cache.sh [ROUTES="routerd-ca routerd-rr sgl-ca affinity"] [WORKLOADS="shared-prefix multi-turn"]
set -euo pipefail
routes=${1:-"routerd-ca routerd-rr sgl-ca affinity"}
workloads=${2:-"shared-prefix multi-turn"}
cd "$(dirname "$0")/.."
python3 -c 'import sglang_router' 2>/dev/null || pip install -q "sglang-router==0.3.2"
cargo build --release -q -p routerd -p routerctl
B=target/release
SIM_FLAGS=${SIM_FLAGS:-"--speed 10 --cache-capacity-tokens 24000 --max-running-requests 16"}
BENCH_FLAGS=${BENCH_FLAGS:-"--concurrency 32 --system-chars 8000 --question-chars 200 --max-tokens 4"}
ports=(31301 31302 31303 31304)
RP=30300
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop_all EXIT
wait_up() { for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done; echo "$1 did not come up" >&2; return 1; }

printf "| %-13s | %-24s | %8s | %8s | %9s | %9s | %9s | %6s |\n" workload routing "hit rate" "req/s" "tok/s" "p50 ms" "ttft p50" failed
printf "|%s|\n" "---------------|--------------------------|----------|----------|-----------|-----------|-----------|--------"
for wl in $workloads; do
    case $wl in
        shared-prefix) wl_flags="--workload shared-prefix --groups 32 --questions 12" ;;
        multi-turn) wl_flags="--workload multi-turn --conversations 48 --turns 8" ;;
    esac
    for route in $routes; do
        urls=()
        for p in "${ports[@]}"; do
            # shellcheck disable=SC2086
            "$B/routerctl" sim-worker --port "$p" $SIM_FLAGS >/dev/null 2>&1 &
            pids+=($!); urls+=("http://127.0.0.1:$p")
        done
        for u in "${urls[@]}"; do wait_up "$u/health"; done
        extra=()
        case $route in
            routerd-ca|routerd-rr)
                policy=$([ "$route" = routerd-ca ] && echo cache_aware || echo round_robin)
                "$B/routerd" --port $RP --policy "$policy" --worker-urls "${urls[@]}" --log-level warn >/dev/null 2>&1 &
                pids+=($!); wait_up "http://127.0.0.1:$RP/readiness" ;;
            sgl-ca)
                python3 -m sglang_router.launch_router --port $RP --policy cache_aware --worker-urls "${urls[@]}" \
                    --log-level warn >/dev/null 2>&1 &
                pids+=($!); wait_up "http://127.0.0.1:$RP/health" ;;
            affinity) extra=(--affinity) ;;
        esac
        # shellcheck disable=SC2086
        json=$("$B/routerctl" bench --url "http://127.0.0.1:$RP" --workers "${urls[@]}" $wl_flags $BENCH_FLAGS "${extra[@]}" -o json || true)
        python3 - "$wl" "$route" "$json" <<'PY'
import json, sys
wl, route, raw = sys.argv[1], sys.argv[2], sys.argv[3]
names = {"routerd-ca": "routerd cache_aware", "routerd-rr": "routerd round_robin",
         "sgl-ca": "sglang-router cache_aware", "affinity": "perfect affinity"}
r = json.loads(raw)
hit = r["cache_hit_rate"]
print(f"| {wl:<13} | {names[route]:<24} | {hit*100:7.1f}% | {r['requests_per_sec']:8.1f} | {r['output_tokens_per_sec']:9.0f} "
      f"| {r['latency_p50_ms']:9.1f} | {r['ttft_p50_ms']:9.1f} | {r['failed']:6d} |")
PY
        stop_all
    done
done
