#!/usr/bin/env bash
# Router overhead benchmark (issue 3): requests/s and p50/p99 at concurrency 1, 16, 64, 256 for
#   direct      wrk -> upstream
#   nginx       wrk -> nginx reverse proxy (keep-alive upstream) -> upstream
#   routerd     wrk -> routerd --policy round_robin -> upstream
#   sgl-router  wrk -> sglang-router 0.3.2 --policy round_robin -> upstream
# Every proxy is pinned to core 0 with one worker thread; wrk and the upstream share core 1.
# The upstream is nginx answering /generate with a fixed SGLang-shaped body, so the proxies,
# not the upstream, are measured. Installs wrk, nginx and sglang-router==0.3.2 if missing.
#   examples/bench-proxy.sh [DURATION_SECS=10] [TARGETS="direct nginx routerd sgl-router"]
set -euo pipefail
dur=${1:-10}
targets=${2:-"direct nginx routerd sgl-router"}
cd "$(dirname "$0")/.."
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq >/dev/null && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
python3 -c 'import sglang_router' 2>/dev/null || pip install -q "sglang-router==0.3.2"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release -q -p routerd

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

UP=${UP_PORT:-38001}; NGX=${NGX_PORT:-38002}; RD=${RD_PORT:-38003}; SGL=${SGL_PORT:-38004}
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
worker_processes 1; pid $tmp/px.pid; $common
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
        nginx) taskset -c 0 "$NGINX" -c "$tmp/px.conf" -p "$tmp"; wait_up "$NGX" ;;
        routerd)
            taskset -c 0 target/release/routerd --worker-threads 1 --policy round_robin --port "$RD" --prometheus-port 0 \
                --worker-urls "http://127.0.0.1:$UP" --log-level warn >"$tmp/routerd.log" 2>&1 &
            pids+=($!); rd_pid=$!; wait_up "$RD" ;;
        sgl-router)
            taskset -c 0 python3 -m sglang_router.launch_router --policy round_robin --port "$SGL" \
                --worker-urls "http://127.0.0.1:$UP" --max-concurrent-requests 100000 --log-level warn \
                >"$tmp/sgl.log" 2>&1 &
            pids+=($!); wait_up "$SGL" ;;
    esac
done

cat >"$tmp/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4}}'
LUA
port_of() { case $1 in direct) echo "$UP";; nginx) echo "$NGX";; routerd) echo "$RD";; sgl-router) echo "$SGL";; esac; }
printf "| %-10s | %5s | %12s | %9s | %9s | %6s |\n" target conc "requests/s" p50 p99 errors
printf "|%s|\n" "------------|-------|--------------|-----------|-----------|--------"
rss_max=0
# Concurrency outer, targets inner: machine drift over the run hits every target alike.
for c in 1 16 64 256; do
    for t in $targets; do
        threads=$(( c < 2 ? 1 : 2 ))
        out=$(taskset -c 1 wrk -t"$threads" -c"$c" -d"${dur}s" --latency -s "$tmp/post.lua" "http://127.0.0.1:$(port_of "$t")/generate")
        if [ "$t" = routerd ]; then
            rss=$(ps -o rss= -p "$rd_pid" | tr -d ' '); [ "$rss" -gt "$rss_max" ] && rss_max=$rss
        fi
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        p50=$(awk '$1=="50%" {print $2}' <<<"$out")
        p99=$(awk '$1=="99%" {print $2}' <<<"$out")
        errs=$(awk '/Non-2xx/ {n+=$NF} /Socket errors/ {gsub(",", ""); n+=$4+$6+$8+$10} END {print n+0}' <<<"$out")
        printf "| %-10s | %5s | %12s | %9s | %9s | %6s |\n" "$t" "$c" "$rps" "$p50" "$p99" "$errs"
    done
done
if [[ " $targets " == *" routerd "* ]]; then
    echo
    echo "routerd RSS: $(( rss_max / 1024 )) MiB max sampled after each run (idle at start: see log)"
fi
