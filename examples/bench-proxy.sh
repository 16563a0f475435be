#!/usr/bin/env bash
# Router overhead benchmark (issue 3): requests/s and p50/p99 at concurrency 1, 16, 64, 256 for
#   direct      wrk -> upstream (the load generators: wrk, oha)
#   nginx       wrk -> nginx reverse proxy (keep-alive upstream) -> upstream
#   routerd     wrk -> routerd --policy round_robin -> upstream
#   sgl-router  wrk -> sglang-router 0.3.2 --policy round_robin -> upstream
# Every proxy is pinned to core 0 with one worker thread; wrk and the upstream share core 1.
# The upstream is nginx answering /generate with a fixed SGLang-shaped body, so the proxies,
# not the upstream, are measured. Installs wrk, nginx and sglang-router==0.3.2 if missing.
# Each cell is run REPS times (interleaved) and the median reported. Then, unless RATE=0, every
# target gets a fixed rate of RATE requests/s over 64 connections (oha, latency counted from when
# each request was due), where the latency a proxy adds is not hidden by saturation.
# PROXY_THREADS=N (default 1) runs the proxies multi-threaded instead: routerd with N runtime
# threads and nginx with N worker processes, both unpinned (wrk and the upstream stay on core 1),
# the way they run by default. ROUTERD_BASE=path adds a target `routerd-base`: that routerd
# binary (an earlier build) with the same flags, measured in the same run.
#   examples/bench-proxy.sh [DURATION_SECS=10] [TARGETS="direct nginx routerd sgl-router"] [CONCS="1 16 64 256"]
# ROUTERD_ARGS adds flags to the `routerd` target only (e.g. --enable-trace ...).
#   env: REPS=3 RATE=5000 PROXY_THREADS=1 ROUTERD_BASE= ROUTERD_BIN=target/release/routerd ROUTERD_ARGS=
set -euo pipefail
dur=${1:-10}
targets=${2:-"direct nginx routerd sgl-router"}
concs=${3:-"1 16 64 256"}
reps=${REPS:-3}
rate=${RATE:-5000}
pthreads=${PROXY_THREADS:-1}
if [ -n "${ROUTERD_BASE:-}" ] && [[ " $targets " != *" routerd-base "* ]]; then
    targets="$targets routerd-base"
fi
# Pinned to core 0 with one thread, or unpinned with several.
if [ "$pthreads" -gt 1 ]; then pin=(); else pin=(taskset -c 0); fi
cd "$(dirname "$0")/.."
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq >/dev/null && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
python3 -c 'import sglang_router' 2>/dev/null || pip install -q "sglang-router==0.3.2"
if [ "$rate" -gt 0 ] && ! command -v oha >/dev/null; then
    cargo install --locked -q oha   # a few minutes on 2 cores, once
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# ROUTERD_BIN measures a given build instead of building this checkout.
rd_bin=${ROUTERD_BIN:-target/release/routerd}
[ -n "${ROUTERD_BIN:-}" ] || cargo build --release -q -p routerd

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$tmp/up.pid" ] && kill "$(cat "$tmp/up.pid")" 2>/dev/null || true
    [ -f "$tmp/px.pid" ] && kill "$(cat "$tmp/px.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

UP=${UP_PORT:-38001}; NGX=${NGX_PORT:-38002}; RD=${RD_PORT:-38003}; SGL=${SGL_PORT:-38004}; RB=${RB_PORT:-38005}
body='{"text":" Paris is the capital","output_ids":[1,2,3,4],"meta_info":{"id":"bench","finish_reason":{"type":"length","length":4},"prompt_tokens":6,"completion_tokens":4,"cached_tokens":0,"e2e_latency":0.001}}'
common="daemon on; error_log $tmp/err.log; events { worker_connections 4096; } "
cat >"$tmp/up.conf" <<NGINX
worker_processes 1; pid $tmp/up.pid; $common
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP;
    location = /generate { default_type application/json; return 200 '$body'; }
    location / { default_type application/json; return 200 '{}'; } } }
NGINX
cat >"$tmp/px.conf" <<NGINX
worker_processes $pthreads; pid $tmp/px.pid; $common
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 512; }
  server { listen 127.0.0.1:$NGX;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGINX
taskset -c 1 "$NGINX" -c "$tmp/up.conf" -p "$tmp"
wait_up() { for _ in $(seq 1 300); do curl -sf -o /dev/null "http://127.0.0.1:$1/health" && return 0; sleep 0.1; done; echo "port $1 did not come up" >&2; return 1; }
wait_up "$UP"
for t in $targets; do
    case $t in
        nginx) "${pin[@]}" "$NGINX" -c "$tmp/px.conf" -p "$tmp"; wait_up "$NGX" ;;
        routerd)
            "${pin[@]}" "$rd_bin" --worker-threads "$pthreads" --policy round_robin --port "$RD" --prometheus-port 0 \
                --worker-urls "http://127.0.0.1:$UP" --log-level warn ${ROUTERD_ARGS:-} >"$tmp/routerd.log" 2>&1 &
            pids+=($!); rd_pid=$!; wait_up "$RD" ;;
        routerd-base)
            "${pin[@]}" "$ROUTERD_BASE" --worker-threads "$pthreads" --policy round_robin --port "$RB" --prometheus-port 0 \
                --worker-urls "http://127.0.0.1:$UP" --log-level warn >"$tmp/routerd-base.log" 2>&1 &
            pids+=($!); wait_up "$RB" ;;
        sgl-router)
            "${pin[@]}" python3 -m sglang_router.launch_router --policy round_robin --port "$SGL" \
                --worker-urls "http://127.0.0.1:$UP" --max-concurrent-requests 100000 --log-level warn \
                >"$tmp/sgl.log" 2>&1 &
            pids+=($!); wait_up "$SGL" ;;
    esac
done

body_req='{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4}}'
cat >"$tmp/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$body_req'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %.2f %.4f %.4f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.timeout + e.status))
end
LUA
port_of() { case $1 in direct) echo "$UP";; nginx) echo "$NGX";; routerd) echo "$RD";; sgl-router) echo "$SGL";; routerd-base) echo "$RB";; esac; }
sample_rss() {
    local rss; rss=$(ps -o rss= -p "$rd_pid" | tr -d ' ')
    [ "$rss" -gt "$rss_max" ] && rss_max=$rss
    return 0
}

# The machine's own scheduling jitter, idle: the floor under every p99 below.
jitter() {
    taskset -c "$1" python3 - <<'PY'
import time
lat, end = [], time.perf_counter() + 3
while time.perf_counter() < end:
    t0 = time.perf_counter(); time.sleep(0.0002); lat.append(time.perf_counter() - t0 - 0.0002)
lat.sort(); n = len(lat)
print(f"p99 {lat[int(n * .99)] * 1e3:.2f} ms, max {lat[-1] * 1e3:.2f} ms, {sum(x > 1e-3 for x in lat) / 3:.1f} wake-ups/s late by more than 1 ms")
PY
}
echo "proxies: $([ "$pthreads" -gt 1 ] && echo "$pthreads threads/processes, unpinned" || echo "1 thread, pinned to core 0")"
echo "idle jitter of a 200 us sleep: core 0 $(jitter 0); core 1 $(jitter 1)"
echo

rss_max=0
results="$tmp/results"
# Concurrency outer, then repetitions, targets inner: machine drift hits every target alike.
for c in $concs; do
    for rep in $(seq 1 "$reps"); do
        for t in $targets; do
            threads=$(( c < 2 ? 1 : 2 ))
            out=$(taskset -c 1 wrk -t"$threads" -c"$c" -d"${dur}s" -s "$tmp/post.lua" "http://127.0.0.1:$(port_of "$t")/generate")
            [ "$t" = routerd ] && sample_rss
            echo "closed $t $c $(awk '/^RESULT/ {print $2, $3, $4, $5}' <<<"$out")" >>"$results"
        done
    done
done

# Open loop: a fixed request rate over 64 connections, latency measured from when each request
# was due (oha --latency-correction), so the added latency is not a restatement of throughput.
if [ "$rate" -gt 0 ]; then
    for rep in $(seq 1 "$reps"); do
        for t in $targets; do
            taskset -c 1 oha --no-tui -z "${dur}s" -c 64 -q "$rate" --latency-correction -m POST \
                -T application/json -d "$body_req" --output-format json \
                "http://127.0.0.1:$(port_of "$t")/generate" >"$tmp/oha.json"
            [ "$t" = routerd ] && sample_rss
            python3 - "$tmp/oha.json" "$t" "$rate" >>"$results" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s, p = d["summary"], d["latencyPercentiles"]
ok = d.get("statusCodeDistribution", {}).get("200", 0)
errors = sum(d.get("statusCodeDistribution", {}).values()) - ok + sum(
    n for e, n in d.get("errorDistribution", {}).items() if "deadline" not in e)
print("open", sys.argv[2], sys.argv[3], s["requestsPerSec"], p["p50"] * 1e3, p["p99"] * 1e3, errors)
PY
        done
    done
fi

python3 - "$results" "$reps" <<'PY'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    kind, target, conc, rps, p50, p99, errs = line.split()
    rows[(kind, target, int(conc))].append((float(rps), float(p50), float(p99), int(errs)))
def fmt(ms): return f"{ms * 1000:.0f}us" if ms < 1 else f"{ms:.2f}ms"
for kind, title, col in (("closed", "closed loop (wrk)", "conc"), ("open", "fixed rate over 64 connections (oha)", "rate/s")):
    keys = [k for k in rows if k[0] == kind]
    if not keys:
        continue
    print(f"{title}, median of {sys.argv[2]} runs; added p99 = p99 - direct's p99")
    print(f"| {'target':<12} | {col:>6} | {'requests/s':>10} | {'p50':>8} | {'p99':>8} | {'added p99':>9} | {'errors':>6} |")
    print("|--------------|--------|------------|----------|----------|-----------|--------|")
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] + [sum(x[3] for x in v)] for k, v in rows.items()}
    for k in sorted(keys, key=lambda k: (k[2], list(dict.fromkeys(t for _, t, _ in rows)).index(k[1]))):
        rps, p50, p99, errs = med[k]
        d = med.get((kind, "direct", k[2]))
        added = "-" if d is None or k[1] == "direct" else f"{(p99 - d[2]) * 1000:+.0f}us"
        print(f"| {k[1]:<12} | {k[2]:>6} | {rps:>10.0f} | {fmt(p50):>8} | {fmt(p99):>8} | {added:>9} | {errs:>6} |")
    print()
c64 = {t: v for (kind, t, c), v in rows.items() if kind == "closed" and c == 64}
rd = c64.get("routerd")
if rd:
    m = lambda t: statistics.median(x[0] for x in c64[t])
    for other in ("nginx", "sgl-router", "routerd-base"):
        if other in c64:
            print(f"concurrency 64: routerd moved {m('routerd') / m(other):.2f}x {other}'s requests/s")
PY
if [[ " $targets " == *" routerd "* ]]; then
    echo "routerd RSS: $(( rss_max / 1024 )) MiB at most, sampled after each run"
fi
