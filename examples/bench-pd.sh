#!/usr/bin/env bash
# PD benchmark (issue 7): 2 simulated prefill + 2 decode workers behind routerd in PD mode,
# `routerctl bench` shared-prefix and multi-turn through it. The hit rate is the prefill
# workers' own (decode workers do no prefill). Each prefill cache holds 48k tokens, so the two
# together hold what the four workers of examples/bench-cache.sh do.
#   examples/bench-pd.sh [POLICY=cache_aware] [WORKLOADS="shared-prefix multi-turn"]
set -euo pipefail
policy=${1:-cache_aware}
workloads=${2:-"shared-prefix multi-turn"}
cd "$(dirname "$0")/.."
cargo build --release -q -p routerd -p routerctl
B=target/release
SIM_FLAGS=${SIM_FLAGS:-"--speed 10 --cache-capacity-tokens 48000 --max-running-requests 16"}
BENCH_FLAGS=${BENCH_FLAGS:-"--concurrency 32 --system-chars 8000 --question-chars 200 --max-tokens 4"}
RP=30600; pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop_all EXIT
wait_up() { for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done; echo "$1 did not come up" >&2; return 1; }
for wl in $workloads; do
    case $wl in
        shared-prefix) wl_flags="--workload shared-prefix --groups 32 --questions 12" ;;
        multi-turn) wl_flags="--workload multi-turn --conversations 48 --turns 8" ;;
    esac
    args=()
    for i in 1 2; do
        # shellcheck disable=SC2086
        "$B/routerctl" sim-worker --port $((31600 + i)) --role prefill --bootstrap-port $((31700 + i)) $SIM_FLAGS >/dev/null 2>&1 &
        pids+=($!); args+=(--prefill "http://127.0.0.1:$((31600 + i))" $((31700 + i)))
        # shellcheck disable=SC2086
        "$B/routerctl" sim-worker --port $((31650 + i)) --role decode $SIM_FLAGS >/dev/null 2>&1 &
        pids+=($!); args+=(--decode "http://127.0.0.1:$((31650 + i))")
    done
    for i in 1 2; do wait_up "http://127.0.0.1:$((31600 + i))/health"; wait_up "http://127.0.0.1:$((31650 + i))/health"; done
    "$B/routerd" --port $RP --pd-disaggregation --policy "$policy" "${args[@]}" --log-level warn >/dev/null 2>&1 &
    pids+=($!); wait_up "http://127.0.0.1:$RP/readiness"
    echo "== $wl, PD with prefill/decode policy $policy"
    # shellcheck disable=SC2086
    "$B/routerctl" bench --url "http://127.0.0.1:$RP" $wl_flags $BENCH_FLAGS | grep -E "requests|throughput|latency|ttft|cache hits|error"
    stop_all
done
