#!/usr/bin/env bash
# Fault drill (issues 6, 26): four simulated workers behind routerd under steady streaming
# load; one is killed (SIGKILL) mid-run and restarted on the same port a few seconds later.
# Reports what clients saw (failures before and after the first token, answers that differ
# from the simulated model's own: a token missing or repeated), the streams routerd continued
# on another worker and the pause at each seam, how many requests routerd sent to the dead
# worker before ejecting it, and how long the restarted worker took to be routable. Runs once
# with mid-stream failover (--migration-limit 1, the default) and once without (0).
#   examples/fault-drill.sh [KILL_AT_SECS=5] [DOWN_SECS=6] [RATE=150]
#   MIGRATION="1 0" (the limits to run), MAX_TOKENS=32 (per request), ROUTERD_FLAGS (more routerd flags)
set -euo pipefail
kill_at=${1:-5}; down=${2:-6}; rate=${3:-150}
cd "$(dirname "$0")/.."
cargo build --release -q -p routerd -p routerctl
B=target/release
drill() {
migration=$1
echo "== --migration-limit $migration"
ports=(31501 31502 31503 31504); RP=30500; R="http://127.0.0.1:$RP"
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
wait_up() { for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done; echo "$1 did not come up" >&2; return 1; }
sim() { "$B/routerctl" sim-worker --port "$1" --speed 4 >/dev/null 2>&1 & echo $!; }
urls=()
for p in "${ports[@]}"; do pids+=("$(sim "$p")"); urls+=("http://127.0.0.1:$p"); done
for u in "${urls[@]}"; do wait_up "$u/health"; done
"$B/routerd" --port $RP --worker-urls "${urls[@]}" --log-level info --migration-limit "$migration" \
    ${ROUTERD_FLAGS:-} >"$tmp/routerd.log" 2>&1 &
pids+=($!); wait_up "$R/readiness"
total=$(( rate * (kill_at + down + 20) ))
"$B/routerctl" bench --url $R --rate "$rate" --concurrency 256 --groups 16 --questions $(( total / 16 )) \
    --max-tokens "${MAX_TOKENS:-32}" --check-answers -o json >"$tmp/bench.json" 2>/dev/null &
bench=$!
sleep "$kill_at"
victim=${urls[1]}
kill -9 "${pids[1]}"; t_kill=$(date +%s.%N)
echo "killed $victim at $(date +%T)"
sleep "$down"
view() { curl -s "$R/workers" | python3 -c "import json,sys; w=[w for w in json.load(sys.stdin)['workers'] if w['url']=='$victim'][0]; print(json.dumps(w))"; }
at_restart=$(view)
pids[1]=$(sim "${ports[1]}"); t_back=$(date +%s.%N)
echo "restarted it at $(date +%T)"
while [ "$(view | python3 -c 'import json,sys; print(json.load(sys.stdin)["routable"])')" != True ]; do sleep 0.02; done
t_ok=$(date +%s.%N)
until [ "$(view | python3 -c 'import json,sys; w=json.load(sys.stdin); print(w["circuit"])')" = closed ]; do
    kill -0 "$bench" 2>/dev/null || { echo "the load ended before the circuit closed" >&2; break; }
    sleep 0.02
done
t_closed=$(date +%s.%N)
wait "$bench" || true
python3 - "$tmp/bench.json" "$at_restart" "$t_kill" "$t_back" "$t_ok" "$t_closed" "$tmp/routerd.log" <<'PY'
import json, re, sys
b = json.load(open(sys.argv[1])); w = json.loads(sys.argv[2])
t_kill, t_back, t_ok, t_closed = map(float, sys.argv[3:7])
seams = sorted(float(m) for m in re.findall(r"seam_ms=([0-9.]+)", open(sys.argv[7]).read()))
pick = lambda p: seams[min(len(seams) - 1, round(p / 100 * (len(seams) - 1)))]
print(f"requests            {b['requests']} ({b['ok']} ok) at {b['requests_per_sec']:.0f} req/s")
print(f"client failures     {b['failed'] - b['failed_mid_stream']} before the first token, "
      f"{b['failed_mid_stream']} streams cut mid-way by the kill")
print(f"answers checked     {b['ok']} ok, {b.get('wrong_answers')} differ from the model's own "
      "(a token missing or repeated)")
if seams:
    print(f"streams continued   {len(seams)} on another worker; pause at the seam "
          f"p50 {pick(50):.1f} ms, p99 {pick(99):.1f} ms (failure noticed -> next event sent)")
else:
    print("streams continued   0")
cut = b['failed_mid_stream'] + len(seams)
print(f"dead worker         {w['errors_total']} failed attempts while down: {cut} streams it was "
      f"serving, {w['errors_total'] - cut} refused connections (each retried elsewhere); "
      f"circuit {w['circuit']}, healthy {w['healthy']}, opened {w['circuit_opened_total']}x")
print(f"recovery            routable {t_ok - t_back:.2f} s after restart, circuit closed after {t_closed - t_back:.2f} s")
for e in b['first_errors'][:3]:
    print(f"error               {e[:160]}")
PY
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
pids=(); rm -rf "$tmp"
}
for m in ${MIGRATION:-1 0}; do drill "$m"; done
