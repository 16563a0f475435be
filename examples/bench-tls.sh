#!/usr/bin/env bash
# TLS benchmark (issue 22): requests/s and p50/p99 with keep-alive, closed loop (wrk), for
#   direct-tls      wrk -https-> upstream                       (the load generator's ceiling)
#   nginx-tls       wrk -https-> nginx (terminates TLS) -http-> upstream
#   routerd-tls     wrk -https-> routerd (terminates TLS) -http-> upstream
#   nginx-to-tls    wrk -http-> nginx -https (kept-alive, sessions reused)-> upstream
#   routerd-to-tls  wrk -http-> routerd -https (pooled)-> upstream
# Every proxy is pinned to core 0 with one worker thread/process; wrk and the upstream share
# core 1. The upstream is nginx answering /generate with a fixed SGLang-shaped body on a plain
# and a TLS port. Certificates: a throwaway CA and an EC P-256 server certificate (openssl).
# Each cell is run REPS times (interleaved) and the median reported.
#   examples/bench-tls.sh [DURATION_SECS=10] [TARGETS="direct-tls nginx-tls routerd-tls nginx-to-tls routerd-to-tls"] [CONCS="64"]
#   env: REPS=3 ROUTERD_BIN=target/release/routerd
set -euo pipefail
dur=${1:-10}
targets=${2:-"direct-tls nginx-tls routerd-tls nginx-to-tls routerd-to-tls"}
concs=${3:-"64"}
reps=${REPS:-3}
cd "$(dirname "$0")/.."
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq >/dev/null && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
rd_bin=${ROUTERD_BIN:-target/release/routerd}
[ -n "${ROUTERD_BIN:-}" ] || cargo build --release -q -p routerd

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for f in up px; do [ -f "$tmp/$f.pid" ] && kill "$(cat "$tmp/$f.pid")" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# A CA and a server certificate for 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$tmp/srv.key" -out "$tmp/srv.csr" 2>/dev/null
echo "subjectAltName=IP:127.0.0.1" >"$tmp/srv.ext"
openssl x509 -req -in "$tmp/srv.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
    -days 2 -extfile "$tmp/srv.ext" -out "$tmp/srv.pem" 2>/dev/null

UP=${UP_PORT:-38101}; UPS=${UPS_PORT:-38102}; NGT=${NGT_PORT:-38103}; RDT=${RDT_PORT:-38104}
NGU=${NGU_PORT:-38105}; RDU=${RDU_PORT:-38106}
body='{"text":" Paris is the capital","output_ids":[1,2,3,4],"meta_info":{"id":"bench","finish_reason":{"type":"length","length":4},"prompt_tokens":6,"completion_tokens":4,"cached_tokens":0,"e2e_latency":0.001}}'
common="daemon on; error_log $tmp/err.log; events { worker_connections 4096; } "
tls="ssl_certificate $tmp/srv.pem; ssl_certificate_key $tmp/srv.key; ssl_protocols TLSv1.2 TLSv1.3;"
cat >"$tmp/up.conf" <<NGINX
worker_processes 1; pid $tmp/up.pid; $common
http { access_log off; keepalive_requests 1000000; $tls
  server { listen 127.0.0.1:$UP; listen 127.0.0.1:$UPS ssl;
    location = /generate { default_type application/json; return 200 '$body'; }
    location / { default_type application/json; return 200 '{}'; } } }
NGINX
cat >"$tmp/px.conf" <<NGINX
worker_processes 1; pid $tmp/px.pid; $common
http { access_log off; keepalive_requests 1000000; $tls
  upstream up { server 127.0.0.1:$UP; keepalive 512; }
  upstream ups { server 127.0.0.1:$UPS; keepalive 512; }
  server { listen 127.0.0.1:$NGT ssl;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } }
  server { listen 127.0.0.1:$NGU;
    location / { proxy_pass https://ups; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_session_reuse on; proxy_ssl_verify on; proxy_ssl_trusted_certificate $tmp/ca.pem;
      proxy_ssl_name 127.0.0.1; } } }
NGINX
wait_up() { for _ in $(seq 1 300); do curl -sf -o /dev/null --cacert "$tmp/ca.pem" "$1/health" && return 0; sleep 0.1; done; echo "$1 did not come up" >&2; return 1; }
taskset -c 1 "$NGINX" -c "$tmp/up.conf" -p "$tmp"
wait_up "http://127.0.0.1:$UP"
wait_up "https://127.0.0.1:$UPS"
if [[ " $targets " == *" nginx-"* ]]; then
    taskset -c 0 "$NGINX" -c "$tmp/px.conf" -p "$tmp"
    wait_up "https://127.0.0.1:$NGT"
fi
rd_pids=()
if [[ " $targets " == *" routerd-tls "* ]]; then
    taskset -c 0 "$rd_bin" --worker-threads 1 --policy round_robin --port "$RDT" --prometheus-port 0 \
        --worker-urls "http://127.0.0.1:$UP" --tls-cert-path "$tmp/srv.pem" --tls-key-path "$tmp/srv.key" \
        --log-level warn >"$tmp/routerd-tls.log" 2>&1 &
    pids+=($!); rd_pids+=($!); wait_up "https://127.0.0.1:$RDT"
fi
if [[ " $targets " == *" routerd-to-tls "* ]]; then
    taskset -c 0 "$rd_bin" --worker-threads 1 --policy round_robin --port "$RDU" --prometheus-port 0 \
        --worker-urls "https://127.0.0.1:$UPS" --ca-cert-paths "$tmp/ca.pem" \
        --log-level warn >"$tmp/routerd-to-tls.log" 2>&1 &
    pids+=($!); rd_pids+=($!); wait_up "http://127.0.0.1:$RDU"
fi

url_of() {
    case $1 in
        direct-tls) echo "https://127.0.0.1:$UPS";; nginx-tls) echo "https://127.0.0.1:$NGT";;
        routerd-tls) echo "https://127.0.0.1:$RDT";; nginx-to-tls) echo "http://127.0.0.1:$NGU";;
        routerd-to-tls) echo "http://127.0.0.1:$RDU";;
    esac
}
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
rss_max=0
results="$tmp/results"
for c in $concs; do
    for rep in $(seq 1 "$reps"); do
        for t in $targets; do
            out=$(taskset -c 1 wrk -t2 -c"$c" -d"${dur}s" -s "$tmp/post.lua" "$(url_of "$t")/generate")
            echo "$t $c $(awk '/^RESULT/ {print $2, $3, $4, $5}' <<<"$out")" >>"$results"
            for p in "${rd_pids[@]}"; do
                rss=$(ps -o rss= -p "$p" | tr -d ' '); [ "$rss" -gt "$rss_max" ] && rss_max=$rss
            done
        done
    done
done
python3 - "$results" "$reps" <<'PY'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    target, conc, rps, p50, p99, errs = line.split()
    rows[(target, int(conc))].append((float(rps), float(p50), float(p99), int(errs)))
def fmt(ms): return f"{ms * 1000:.0f}us" if ms < 1 else f"{ms:.2f}ms"
print(f"closed loop (wrk, keep-alive), median of {sys.argv[2]} runs")
print("| target | conc | requests/s | p50 | p99 | errors |")
print("|---|---|---|---|---|---|")
med = {k: [statistics.median(x[i] for x in v) for i in range(3)] + [sum(x[3] for x in v)] for k, v in rows.items()}
order = list(dict.fromkeys(t for t, _ in rows))
for k in sorted(med, key=lambda k: (k[1], order.index(k[0]))):
    rps, p50, p99, errs = med[k]
    print(f"| {k[0]} | {k[1]} | {rps:.0f} | {fmt(p50)} | {fmt(p99)} | {errs} |")
print()
for c in sorted({c for _, c in rows}):
    m = lambda t: med[(t, c)][0] if (t, c) in med else None
    for a, b in (("routerd-tls", "nginx-tls"), ("routerd-to-tls", "nginx-to-tls")):
        if m(a) and m(b):
            print(f"concurrency {c}: {a} moved {m(a) / m(b):.2f}x {b}'s requests/s")
PY
[ "$rss_max" -gt 0 ] && echo "routerd RSS: $(( rss_max / 1024 )) MiB at most, sampled after each run"
exit 0
