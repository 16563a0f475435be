#!/usr/bin/env bash
# Installs a wheel into a fresh virtual environment and runs it as a user would: `routerd
# --version`, `python -m routerd.launch_router` in front of a simulated worker with one request
# through it, and `python -m routerd.launch_server --engine sim --dp-size 2` with one request.
#   examples/wheel-smoke.sh target/wheels/routerd-*.whl
set -euo pipefail
wheel=$1
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "$wheel"
bin=$tmp/venv/bin
echo "installed: $("$bin/routerd" --version), $("$bin/routerctl" --version)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 1 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 did not come up" >&2; return 1; }
ask() {
    curl -sf "$1/generate" -H 'content-type: application/json' \
        -d '{"text": "hello", "sampling_params": {"max_new_tokens": 2}}' | grep -q '"text"'
}

# launch_server's mapping of sglang_router.launch_server's arguments onto routerctl launch.
"$bin/python" - <<'PY'
from routerd.launch_server import plan
got = plan(["--model-path", "M", "--dp-size", "4", "--tp-size", "2", "--host", "0.0.0.0",
            "--port", "8000", "--router-policy", "cache_aware", "--router-cache-threshold=0.3",
            "--mem-fraction-static", "0.8"])
want = ["launch", "--with-router", "--router-host", "0.0.0.0", "--router-port", "8000",
        "--host", "0.0.0.0", "--base-port", "8001", "--dp-size", "4", "--model-path", "M",
        "--gpus-per-worker", "2", "--router-arg=--policy", "--router-arg=cache_aware",
        "--router-arg=--cache-threshold", "--router-arg=0.3", "--", "--mem-fraction-static", "0.8"]
assert got == want, got
print("launch_server: arguments mapped as sglang_router.launch_server takes them")
PY

# launch_router: routerd itself (exec'd: no Python left in the process) on a simulated worker.
wp=$(free_port); rp=$(free_port)
"$bin/routerctl" sim-worker --port "$wp" >"$tmp/sim.log" 2>&1 & pids+=($!)
wait_up "http://127.0.0.1:$wp/health"
"$bin/python" -m routerd.launch_router --worker-urls "http://127.0.0.1:$wp" --port "$rp" \
    --prometheus-port 0 >"$tmp/router.log" 2>&1 & pids+=($!)
wait_up "http://127.0.0.1:$rp/health"
ask "http://127.0.0.1:$rp" || { cat "$tmp/router.log" >&2; exit 1; }
[ "$(ps -o comm= -p "${pids[-1]}")" = routerd ] || { echo "launch_router left Python running" >&2; exit 1; }
echo "launch_router: one request answered through routerd"

# launch_server: routerctl launch --with-router, simulated engine, two workers.
lp=$(free_port)
(cd "$tmp" && exec "$bin/python" -m routerd.launch_server --engine sim --dp-size 2 --port "$lp" \
    --router-policy round_robin) >"$tmp/server.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do grep -q '^ready: 2 workers' "$tmp/server.log" && break; sleep 0.1; done
grep -q '^ready: 2 workers' "$tmp/server.log" || { cat "$tmp/server.log" >&2; exit 1; }
ask "http://127.0.0.1:$lp" || { cat "$tmp/server.log" >&2; exit 1; }
echo "launch_server: 2 simulated workers and routerd up, one request answered"
