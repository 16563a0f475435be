#!/usr/bin/env python3
"""sglang-router 0.3.2 and routerd side by side: the same command line for both, the same requests
to simulated workers, and what each answered. Scenarios: failfast, queue, workers, manual.

    pip install sglang-router==0.3.2; cargo build --release
    python3 examples/compare-sglang-router.py failfast

Uses ports 43001-43022, 43100-43200 and 43190 on 127.0.0.1; stops everything it started."""
import json, os, signal, subprocess, sys, time, urllib.error, urllib.request

SIM = os.environ.get("ROUTERCTL", "target/release/routerctl"); RD = os.environ.get("ROUTERD", "target/release/routerd")
procs = []
def start(cmd, log):
    p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, preexec_fn=os.setsid); procs.append(p); return p
def stop_all():
    for p in procs:
        try: os.killpg(p.pid, signal.SIGTERM)
        except Exception: pass
    for p in procs: p.wait()
    procs.clear()
def wait_up(port):
    for _ in range(200):
        try: urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1); return
        except Exception: time.sleep(0.1)
def call(method, url, body=None, headers=None):
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None, headers=h)
    try:
        r = urllib.request.urlopen(req, timeout=30); status, hdrs, data = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, data = e.code, e.headers, e.read()
    return status, hdrs, data.decode(errors="replace")
def routers(args, sgl_port=43100, rd_port=43200):
    start(["python3", "-m", "sglang_router.launch_router", "--port", str(sgl_port), "--prometheus-port", str(sgl_port + 90)] + args, "/tmp/side-sgl.log")
    start([RD, "--port", str(rd_port), "--prometheus-port", "0"] + args, "/tmp/side-rd.log")
    wait_up(rd_port); time.sleep(3)
    return {"sglang-router 0.3.2": sgl_port, "routerd": rd_port}
gen = {"text": "hello", "sampling_params": {"max_new_tokens": 2}}
scenario = sys.argv[1]
try:
    if scenario == "failfast":
        start([SIM, "sim-worker", "--port", "43001", "--speed", "20", "--fault-error-rate", "1.0"], "/tmp/side-sim.log")
        rs = routers(["--policy", "round_robin", "--worker-urls", "http://127.0.0.1:43001", "--cb-failure-threshold", "3", "--health-check-interval-secs", "60"])
        for name, port in rs.items():
            codes = [call("POST", f"http://127.0.0.1:{port}/generate", gen)[0] for _ in range(6)]
            s, h, b = call("POST", f"http://127.0.0.1:{port}/generate", gen)
            print(f"{name}: statuses {codes} then {s} retry-after={h.get('retry-after')} body={b}")
        s, h, b = call("GET", "http://127.0.0.1:43001/sim/stats"); print("worker received", json.loads(b)["requests"], "requests from both routers together")
    elif scenario == "queue":
        start([SIM, "sim-worker", "--port", "43002", "--speed", "20", "--fault-latency-ms", "3000"], "/tmp/side-sim.log")
        rs = routers(["--policy", "round_robin", "--worker-urls", "http://127.0.0.1:43002", "--max-concurrent-requests", "1", "--queue-size", "10", "--queue-timeout-secs", "1"])
        import threading
        for name, port in rs.items():
            t = threading.Thread(target=call, args=("POST", f"http://127.0.0.1:{port}/generate", gen)); t.start(); time.sleep(0.3)
            s, h, b = call("POST", f"http://127.0.0.1:{port}/generate", gen)
            print(f"{name}: {s} content-type={h.get('content-type')} body={b!r}"); t.join()
    elif scenario == "workers":
        start([SIM, "sim-worker", "--port", "43003", "--speed", "20"], "/tmp/side-sim.log")
        start([SIM, "sim-worker", "--port", "43004", "--speed", "20"], "/tmp/side-sim2.log")
        rs = routers(["--policy", "round_robin", "--worker-urls", "http://127.0.0.1:43003"])
        for name, port in rs.items():
            base = f"http://127.0.0.1:{port}"
            s, h, b = call("POST", f"{base}/workers", {"url": "http://127.0.0.1:43004"})
            v = json.loads(b); wid = v["worker_id"]
            print(f"{name}: POST /workers -> {s} location={h.get('location')} keys={sorted(k for k in v)}")
            time.sleep(1.5)
            s, h, b = call("GET", f"{base}/workers/{wid}"); w = json.loads(b)
            print(f"{name}: GET /workers/id -> {s} is_healthy={w.get('is_healthy')} worker_type={w.get('worker_type')} id_matches={w.get('id') == wid}")
            s, h, b = call("GET", f"{base}/workers"); l = json.loads(b)
            print(f"{name}: GET /workers -> {s} total={l.get('total')} stats={l.get('stats')} every worker has id={all('id' in x for x in l['workers'])}")
            s, h, b = call("POST", f"{base}/workers", {"url": "http://127.0.0.1:43004"}); print(f"{name}: POST again -> {s}")
            s, h, b = call("DELETE", f"{base}/workers/{wid}"); print(f"{name}: DELETE /workers/id -> {s} {b}")
            time.sleep(1)
            s, h, b = call("GET", f"{base}/workers/{wid}"); print(f"{name}: GET deleted -> {s} {b}")
            s, h, b = call("DELETE", f"{base}/workers/{wid}"); print(f"{name}: DELETE again -> {s}")
    elif scenario == "manual":
        for i in range(3): start([SIM, "sim-worker", "--port", str(43010 + i), "--speed", "20"], f"/tmp/side-sim{i}.log")
        rs = routers(["--policy", "manual", "--assignment-mode", "min_group", "--worker-urls"] + [f"http://127.0.0.1:{43010 + i}" for i in range(3)])
        for name, port in rs.items():
            homes = {}
            for rnd in range(3):
                for k in range(6):
                    before = [json.loads(call("GET", f"http://127.0.0.1:{43010 + i}/sim/stats")[2])["requests"] for i in range(3)]
                    call("POST", f"http://127.0.0.1:{port}/generate", gen, {"X-SMG-Routing-Key": f"conv-{k}"})
                    after = [json.loads(call("GET", f"http://127.0.0.1:{43010 + i}/sim/stats")[2])["requests"] for i in range(3)]
                    w = [a - b for a, b in zip(after, before)].index(1)
                    homes.setdefault(k, set()).add(w)
            per = [sum(1 for v in homes.values() if i in v) for i in range(3)]
            print(f"{name}: each key stayed on one worker: {all(len(v) == 1 for v in homes.values())}; keys per worker {per}")
finally:
    stop_all()
