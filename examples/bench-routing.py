#!/usr/bin/env python3
"""Routing-quality scenarios (issue 21): simulated SGLang workers, one router at a time, the
same `routerctl bench` load, fresh processes for every run.

    examples/bench-routing.py [--scenarios a,b] [--routings a,b] [--seeds 1,2] [--replicas 1,2,3]
                              [--out FILE]

Scenarios: shared-prefix, multi-turn, shared-system, zipf, mixed-speed, restart, scale-out,
low-concurrency, long-docs, and (issue 24) flush (two workers' caches emptied mid-run behind the
router's back, `/sim/cache/flush`) and pressure (a zipf working set twice the fleet's cache),
pressure-mixed (the same on workers of two speeds), pressure-sizes (a working set about the
fleet's whole cache, on caches of two sizes) and pressure-even (its control: the same total
cache in four equal caches). BENCH_EXTRA="--groups 20" sets bench flags over a scenario's.
Routings: cost (routerd cost_aware), ca5 (routerd cache_aware,
defaults 0.5 / 32 / 1.0001), ca3 (routerd cache_aware with sglang-router's 0.3 / 64 / 1.5), rr
(routerd round_robin), affinity (routerctl bench --affinity: each group pinned to one worker,
no router), sgl (sglang-router 0.3.2 cache_aware, its defaults); and on a fleet that takes
prompts as token ids (`routerctl bench --input-ids`: one id per byte, sims with 16-token pages,
4x the cache tokens and 1/4 the prefill time per token, so the same text costs the same): ca5i
(cache_aware on its approximate tree; the sims publish events all the same, routerd does not
subscribe), ca5p (the same, with replicas telling each other what they routed: --peer-urls,
issue 25), evi (cache_aware on the sims' KV events), affi (perfect affinity). The chat scenarios (multi-turn, shared-system) send text, not ids: they are not run
with the i routings. The t routings run the same fleet with text prompts and a byte-level
tokenizer with a ChatML chat template on both sides (`--write-byte-tokenizer DIR`, then
`--tokenizer-path DIR` for the sims and routerd): ca5t (approximate tree, events off), evt
(KV events: routerd tokenizes text and renders chats through the template), afft (perfect
affinity); they run every scenario, chats included. Each run appends one JSON line
to --out (the bench report plus scenario, routing, seed); --table prints the markdown table of
a results file (mean of the seeds, and the largest relative spread between seeds).

PIN=1 runs the router alone on CPU 0 (one worker thread) and the simulated fleet and the load
on CPU 1, as a router on its own machine would be: on a shared 2-core box, the router's CPU
otherwise comes out of the simulated GPUs' time (event routing spends more router CPU per
request than the approximate tree; docs/kv-events.md).

Needs target/release/{routerd,routerctl} (cargo build --release -p routerd -p routerctl) and,
for `sgl`, `pip install sglang-router==0.3.2`.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target", "release"))
# SIM_SPEED: how much faster than real time the simulated GPUs run (10 makes the fleet and the
# load use up their CPU on this 2-core box; lower is a GPU-bound fleet).
SIM = ["--speed", os.environ.get("SIM_SPEED", "10"), "--cache-capacity-tokens", "24000",
       "--max-running-requests", "16"]
BENCH = ["--system-chars", "8000", "--question-chars", "200", "--max-tokens", "4"]
# BENCH_EXTRA="--groups 20": bench flags over the scenario's (the scenario's label says them).
BENCH_EXTRA = shlex.split(os.environ.get("BENCH_EXTRA", ""))

# name -> (workers, per-worker extra sim flags, bench flags, churn)
SCENARIOS = {
    "shared-prefix": dict(n=4, bench=["--workload", "shared-prefix", "--groups", "32",
                                      "--questions", "150", "--concurrency", "32"]),
    "multi-turn": dict(n=4, bench=["--workload", "multi-turn", "--conversations", "48",
                                   "--turns", "24", "--concurrency", "32"]),
    "shared-system": dict(n=4, bench=["--workload", "multi-turn", "--conversations", "64",
                                      "--turns", "16", "--shared-system-chars", "2048",
                                      "--system-chars", "3600", "--question-chars", "400",
                                      "--concurrency", "64"]),
    "zipf": dict(n=8, bench=["--workload", "zipf", "--groups", "64", "--questions", "96",
                             "--zipf-s", "1.1", "--concurrency", "128"]),
    "mixed-speed": dict(n=4, speeds=["10", "10", "5", "5"],
                        bench=["--workload", "shared-prefix", "--groups", "32",
                               "--questions", "150", "--concurrency", "128"]),
    "restart": dict(n=4, churn="restart",
                    bench=["--workload", "shared-prefix", "--groups", "32", "--questions",
                           "500", "--concurrency", "128"]),
    "scale-out": dict(n=4, churn="add",
                      bench=["--workload", "shared-prefix", "--groups", "40", "--questions",
                             "150", "--concurrency", "128"]),
    "low-concurrency": dict(n=4, bench=["--workload", "shared-prefix", "--groups", "32",
                                        "--questions", "32", "--concurrency", "4"]),
    "long-docs": dict(n=4, sim=["--cache-capacity-tokens", "16000"],
                      bench=["--workload", "shared-prefix", "--groups", "8", "--questions",
                             "64", "--system-chars", "30000", "--concurrency", "8"]),
    "flush": dict(n=4, churn="flush",
                  bench=["--workload", "shared-prefix", "--groups", "32", "--questions",
                         "300", "--concurrency", "128"]),
    "pressure": dict(n=4, sim=["--cache-capacity-tokens", "8000"],
                     bench=["--workload", "zipf", "--groups", "64", "--questions", "60",
                            "--zipf-s", "0.8", "--concurrency", "64"]),
    # Pressure on a fleet of mixed speeds: the slow workers' queues make the router move hot
    # prefixes to the fast ones, and the caches' LRU then keeps one copy or the other.
    "pressure-mixed": dict(n=4, speeds=["10", "10", "5", "5"],
                           sim=["--cache-capacity-tokens", "8000"],
                           bench=["--workload", "zipf", "--groups", "64", "--questions", "60",
                                  "--zipf-s", "0.8", "--concurrency", "128"]),
    # Pressure on caches of two sizes (two of 16000 tokens, two of 8000; the working set about
    # the fleet's whole cache): whoever places prefixes must know the sizes to fill each cache
    # in proportion, and not overflow the small ones.
    "pressure-sizes": dict(n=4, caps=["24000", "24000", "8000", "8000"],
                           bench=["--workload", "zipf", "--groups", "28", "--questions", "150",
                                  "--zipf-s", "0.8", "--concurrency", "64"]),
    # Its control: the same working set and the same total cache, in four equal caches.
    "pressure-even": dict(n=4, caps=["16000"] * 4,
                          bench=["--workload", "zipf", "--groups", "28", "--questions", "150",
                                 "--zipf-s", "0.8", "--concurrency", "64"]),
}
ROUTINGS = ["cost", "ca5", "ca3", "rr", "affinity", "sgl", "ca5i", "ca5p", "evi", "affi", "ca5t",
            "evt", "afft"]
IDS = ("ca5i", "ca5p", "evi", "affi")
TEXT = ("ca5t", "evt", "afft")
TOKENIZED = IDS + TEXT
ROUTERD = ("cost", "ca5", "ca3", "rr", "ca5i", "ca5p", "evi", "ca5t", "evt")
TOKENIZER_DIR = f"/tmp/bench-routing-tokenizer.{os.getpid()}"
CHAT = ("multi-turn", "shared-system")
EVENTS = '{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:0", "replay_endpoint": "tcp://127.0.0.1:0"}'
NAMES = {"cost": "routerd cost_aware", "ca5": "routerd cache_aware 0.5", "ca3":
         "routerd cache_aware 0.3/64/1.5", "rr": "routerd round_robin",
         "affinity": "perfect affinity", "sgl": "sglang-router 0.3.2 cache_aware",
         "ca5i": "ids: routerd cache_aware (approximate)",
         "ca5p": "ids: routerd cache_aware (approximate, replicas share as peers)",
         "evi": "ids: routerd cache_aware on KV events", "affi": "ids: perfect affinity",
         "ca5t": "tokenizer: routerd cache_aware (approximate)",
         "evt": "tokenizer: routerd cache_aware on KV events",
         "afft": "tokenizer: perfect affinity"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def wait_subscribed(router, n, timeout=30.0):
    """Until routerd follows the KV events of `n` workers."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(router + "/admin/kv", timeout=1) as r:
                ws = json.loads(r.read())["workers"]
            if len(ws) == n and all(rk["connected"] for w in ws for rk in w["ranks"]):
                time.sleep(0.2)
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{router} did not subscribe to {n} workers' KV events")


class Fleet:
    def __init__(self):
        self.procs = []

    def start(self, argv, log=None):
        err = open(log, "a") if log else subprocess.DEVNULL
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self.procs = []


PIN = os.environ.get("PIN") == "1"


def pinned(cpu, argv):
    return ["taskset", "-c", str(cpu), *argv] if PIN else argv


def merged(base, override):
    """`base` flag/value pairs, minus the flags `override` sets, then `override`."""
    kept = [x for i in range(0, len(base), 2) if base[i] not in override for x in base[i:i + 2]]
    return kept + override


def sim_argv(port, sc, i, routing=""):
    own = sc.get("sim", []) + (["--speed", sc["speeds"][i]] if "speeds" in sc else []) + \
        (["--cache-capacity-tokens", sc["caps"][i]] if "caps" in sc else [])
    args = merged(SIM, own)
    if routing in TOKENIZED:
        # One token per byte instead of per 4 characters: 4x the tokens, 1/4 the time each.
        k = args.index("--cache-capacity-tokens") + 1
        args[k] = str(int(args[k]) * 4)
        args = merged(args, ["--page-size", "16", "--prefill-us-per-token", "10"])
    if routing in ("evi", "ca5i", "ca5p", "evt", "ca5t"):
        # ca5i's fleet publishes too (routerd does not subscribe): the same simulated work.
        # Load reports too (issue 25: replicas add what the others sent).
        args += ["--kv-events-config", EVENTS, "--load-publish-endpoint", "auto"]
    if routing in TEXT:
        args += ["--tokenizer-path", TOKENIZER_DIR]
    return pinned(1, [f"{BIN}/routerctl", "sim-worker", "--port", str(port)] + args)


def run(scenario, routing, seed, replicas=1):
    sc = SCENARIOS[scenario]
    fleet = Fleet()
    try:
        ports = [free_port() for _ in range(sc["n"] + 1)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for i in range(sc["n"]):
            fleet.start(sim_argv(ports[i], sc, i, routing))
        for u in urls[:sc["n"]]:
            wait_up(u + "/health")
        rports = [free_port() for _ in range(replicas)]
        routers = [f"http://127.0.0.1:{p}" for p in rports]
        router = routers[0]
        workers = urls[:sc["n"]]
        # Both routers check health every second, so a restarted worker is seen alike.
        common = ["--host", "127.0.0.1", "--worker-urls", *workers,
                  "--health-check-interval-secs", "1", "--log-level",
                  os.environ.get("ROUTER_LOG_LEVEL", "warn")]
        mport = free_port()
        if routing in ROUTERD:
            policy = {"cost": ["--policy", "cost_aware"], "ca5": ["--policy", "cache_aware"],
                      "ca5i": ["--policy", "cache_aware"], "evi": ["--policy", "cache_aware"],
                      "ca5p": ["--policy", "cache_aware", "--peer-urls", *routers],
                      "ca5t": ["--policy", "cache_aware"], "evt": ["--policy", "cache_aware",
                                                                   "--tokenizer-path",
                                                                   TOKENIZER_DIR],
                      "ca3": ["--policy", "cache_aware", "--cache-threshold", "0.3",
                              "--balance-abs-threshold", "64",
                              "--balance-rel-threshold", "1.5"],
                      "rr": ["--policy", "round_robin"]}[routing]
            # ROUTER_LOG=FILE keeps the router's log (e.g. with RUST_LOG=info).
            threads = ["--worker-threads", "1"] if PIN else []
            if routing in ("ca5i", "ca5p", "ca5t"):
                off = f"/tmp/bench-routing-no-events.{os.getpid()}.toml"
                with open(off, "w") as f:
                    f.write("[kv_events]\nenabled = false\n")
                threads += ["--config", off]
            # ROUTER_EXTRA="--flag value ..." adds routerd flags (experiments).
            threads += shlex.split(os.environ.get("ROUTER_EXTRA", ""))
            # Replicas (issue 25): the same flags, each on its own ports; the first's metrics
            # are read below.
            for k, rp in enumerate(rports):
                metrics = ["--prometheus-port", str(mport if k == 0 else free_port())]
                fleet.start(pinned(0, [f"{BIN}/routerd", *common, "--port", str(rp), *metrics,
                                       *policy, *threads]),
                            os.environ.get("ROUTER_LOG"))
            for r in routers:
                wait_up(r + "/readiness")
                if routing in ("evi", "evt"):
                    wait_subscribed(r, sc["n"])
        elif routing == "sgl":
            fleet.start([sys.executable, "-m", "sglang_router.launch_router", *common,
                         "--port", str(rports[0]), "--policy", "cache_aware"])
            wait_up(router + "/health")
        affinity = ("affinity", "affi", "afft")
        extra = ["--affinity", "--workers", *workers] if routing in affinity else []
        if routing in IDS:
            extra += ["--input-ids"]
        churn = sc.get("churn")
        if churn == "restart":
            # SIGKILL the third worker and start it again on its port, empty.
            victim = fleet.procs[2]
            cmd = (f"kill -9 -{victim.pid}; sleep 0.5; "
                   f"setsid {shlex.join(sim_argv(ports[2], sc, 2, routing))} >/dev/null 2>&1 & "
                   f"echo $! > /tmp/bench-routing-restarted.{os.getpid()}")
            extra += ["--at-fraction", "0.4", "--exec", cmd]
        elif churn == "flush":
            # Two workers lose their whole cache at once, told to nobody but their own events.
            cmd = "; ".join(f"curl -sf -X POST {u}/sim/cache/flush >/dev/null" for u in workers[:2])
            extra += ["--at-fraction", "0.4", "--exec", cmd]
        elif churn == "add":
            new = urls[sc["n"]]
            fleet.start(sim_argv(ports[sc["n"]], sc, sc["n"], routing))
            wait_up(new + "/health")
            if routing in affinity:
                cmd = "true"
            elif routing == "sgl":
                cmd = f"curl -sf -X POST '{router}/add_worker?url={new}' >/dev/null"
            else:
                cmd = "; ".join(
                    f"curl -sf -X POST {r}/workers -H 'content-type: application/json' "
                    f"-d '{{\"url\": \"{new}\"}}' >/dev/null" for r in routers)
            extra += ["--at-fraction", "0.3", "--exec", cmd]
            if routing not in affinity:
                extra += ["--workers", *urls]
        # IDLE_REPLICAS=1 (a control): the replicas run and subscribe, the load goes to the
        # first only, so what the fleet spends publishing to them shows alone.
        if replicas > 1 and os.environ.get("IDLE_REPLICAS") != "1":
            extra += ["--targets", ",".join(routers)]
        argv = pinned(1, [f"{BIN}/routerctl", "bench", "--url", router, "--seed", str(seed),
                          *merged(merged(BENCH, sc["bench"]), BENCH_EXTRA), *extra, "-o", "json"])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if not out.stdout.strip():
            raise RuntimeError(f"bench printed nothing: {out.stderr[-2000:]}")
        rep = json.loads(out.stdout)
        label = " ".join([scenario, *BENCH_EXTRA])
        rep.update(scenario=label, routing=routing, seed=seed, pinned=PIN, replicas=replicas,
                   idle_replicas=os.environ.get("IDLE_REPLICAS") == "1",
                   sim_speed=os.environ.get("SIM_SPEED", "10"))
        if routing in ROUTERD:
            # routerd's own view of the run: its routing decisions by branch.
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2) as m:
                    text = m.read().decode()
                rep["decisions"] = by_label(text, "sgl_router_routing_decisions_total", "branch")
                # Where the prompts' tokens went (docs/metrics.md): hit, stale, policy, ...
                rep["accounting"] = by_label(text, "routerd_pool_cache_accounting_total", "part")
            except Exception:
                pass
        return rep
    finally:
        fleet.stop()
        pidfile = f"/tmp/bench-routing-restarted.{os.getpid()}"
        if os.path.exists(pidfile):
            try:
                pid = int(open(pidfile).read().strip())
                os.killpg(pid, signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
            os.remove(pidfile)


def by_label(text, metric, label):
    """A Prometheus exposition's `metric`, summed by the value of its `label`."""
    out = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            value = line.split(f'{label}="')[1].split('"')[0]
            out[value] = out.get(value, 0.0) + float(line.split()[-1])
    return out


def table(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = {}
    for r in rows:
        by.setdefault((r["scenario"], r["routing"], r.get("replicas", 1)), []).append(r)
    counts = sorted({k[2] for k in by})
    print("| scenario | routing | hit rate | req/s | ttft p50 ms | ttft p99 ms | seed spread | "
          "failed | per-worker shares |")
    print("|---|---|---|---|---|---|---|---|---|")
    # Scenarios in their order above; one run with BENCH_EXTRA after its scenario's plain runs.
    order = list(SCENARIOS)
    labels = sorted({k[0] for k in by}, key=lambda label: (
        order.index(label.split()[0]) if label.split()[0] in order else len(order), label))
    for sc in labels:
        for ro, nrep in [(ro, c) for ro in ROUTINGS for c in counts]:
            rs = by.get((sc, ro, nrep))
            if not rs:
                continue
            mean = lambda k: sum((r[k] or 0) for r in rs) / len(rs)
            rps = [r["requests_per_sec"] for r in rs]
            spread = (max(rps) - min(rps)) / (sum(rps) / len(rps)) if len(rps) > 1 else 0.0
            shares = {}
            for r in rs:
                total = sum(r["per_worker"].values()) or 1
                for i, (w, n) in enumerate(sorted(r["per_worker"].items())):
                    shares.setdefault(i, []).append(n / total)
            share = "/".join(f"{100 * sum(v) / len(v):.0f}" for v in shares.values())
            if ro == "sgl":
                share = "n/a (no worker header)"
            failed = sum(r["failed"] for r in rs)
            name = NAMES[ro] + (f", {nrep} replicas" if nrep > 1 else "")
            print(f"| {sc} | {name} | {100 * mean('cache_hit_rate'):.1f}% | "
                  f"{mean('requests_per_sec'):.0f} | {mean('ttft_p50_ms'):.1f} | "
                  f"{mean('ttft_p99_ms'):.1f} | {100 * spread:.0f}% | {failed} | {share} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--routings", default=",".join(ROUTINGS))
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--replicas", default="1",
                    help="router replicas, e.g. 1,2,3 (issue 25): routerctl bench --targets "
                         "spreads its clients over them")
    ap.add_argument("--out", default="bench-routing.jsonl")
    ap.add_argument("--table", metavar="FILE", help="print the table of a results file")
    a = ap.parse_args()
    if a.table:
        table(a.table)
        return
    if any(r in TEXT for r in a.routings.split(",")):
        subprocess.run([f"{BIN}/routerctl", "sim-worker", "--write-byte-tokenizer", TOKENIZER_DIR],
                       check=True, stdout=subprocess.DEVNULL)
    for seed in [int(s) for s in a.seeds.split(",")]:
        for sc in a.scenarios.split(","):
            for ro, n in [(ro, int(n)) for ro in a.routings.split(",")
                          for n in a.replicas.split(",")]:
                if ro in IDS and sc in CHAT:
                    continue
                if n > 1 and ro not in ROUTERD:
                    continue
                rep = None
                for attempt in (1, 2):  # a start-up failure (a port taken meanwhile) is retried
                    try:
                        rep = run(sc, ro, seed, n)
                        break
                    except Exception as e:  # one failed run must not end the sweep
                        print(f"{sc} {ro} seed {seed} (attempt {attempt}): {e}", file=sys.stderr)
                if rep is None:
                    continue
                with open(a.out, "a") as f:
                    f.write(json.dumps(rep) + "\n")
                print(f"{sc:16} {ro:9} x{n} seed {seed}: hit {100 * (rep['cache_hit_rate'] or 0):5.1f}% "
                      f"{rep['requests_per_sec']:7.1f} req/s ttft p50 {rep['ttft_p50_ms']:6.1f} "
                      f"p99 {rep['ttft_p99_ms']:7.1f} failed {rep['failed']}", flush=True)
    shutil.rmtree(TOKENIZER_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
