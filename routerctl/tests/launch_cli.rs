//! `routerctl launch` as an operator runs it: real worker processes (simulated, or a stand-in
//! `python` on PATH for the sglang engine), a real routerd, signals, and a check that nothing
//! is left running afterwards. The `--with-router` tests need the routerd binary next to
//! routerctl, which the workspace's test command builds.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use routerctl::launch::child::live_members;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

/// A running `routerctl launch`, its output lines as they come, and its stderr.
struct Launch {
    child: tokio::process::Child,
    pid: i32,
    out: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    err: std::sync::Arc<std::sync::Mutex<String>>,
    err_reader: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Launch {
    fn drop(&mut self) {
        // A failed test still stops the fleet: two signals stop it at once.
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.pid, libc::SIGTERM);
            signal(self.pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a process this test started.
    unsafe { libc::kill(pid, sig) };
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("routerctl-launch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Launch {
    /// Runs `routerctl launch ARGS` with `path` first on PATH and `env` set.
    fn spawn(args: &[&str], log_dir: &Path, path: Option<&Path>, env: &[(&str, &str)]) -> Self {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_routerctl"));
        cmd.arg("launch")
            .args(["--base-port", "0", "--log-dir"])
            .arg(log_dir)
            .args(args)
            .env_remove("ROUTERCTL_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .envs(env.iter().copied())
            .kill_on_drop(true);
        if let Some(dir) = path {
            let old = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{old}", dir.display()));
        }
        let mut child = cmd.spawn().expect("spawn routerctl launch");
        let (tx, out) = mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
        let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = err.clone();
        let mut errs = BufReader::new(child.stderr.take().unwrap()).lines();
        let err_reader = tokio::spawn(async move {
            while let Ok(Some(l)) = errs.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        let pid = child.id().unwrap() as i32;
        Self { child, pid, out, seen: Vec::new(), err, err_reader: Some(err_reader) }
    }

    /// The next output line that contains `needle` (earlier lines are kept in `seen`).
    async fn line(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.out.recv()).await {
                Ok(Some(l)) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                _ => panic!(
                    "no line with {needle:?}; output:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.err.lock().unwrap()
                ),
            }
        }
    }

    /// Waits for the ready line; returns the table rows by name (`name -> columns`) and the
    /// router's URL.
    async fn ready(&mut self) -> (Vec<Vec<String>>, String) {
        let ready = self.line("ready: ").await;
        let router = ready.split_whitespace().find(|w| w.starts_with("http://")).unwrap();
        let router = router.trim_end_matches(';').to_owned();
        let header = self.seen.iter().position(|l| l.starts_with("NAME ")).expect("a table");
        let rows = self.seen[header + 1..self.seen.len() - 1]
            .iter()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect();
        (rows, router)
    }

    async fn exit(&mut self, within: Duration) -> i32 {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("routerctl launch did not exit")
            .unwrap();
        // What is left of its output, for the assertions that follow.
        while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(1), self.out.recv()).await
        {
            self.seen.push(l);
        }
        // And all of its stderr: the reader may not have taken the last lines yet (it ends when
        // the pipe closes, which a worker still holding it would delay).
        if let Some(reader) = self.err_reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        }
        status.code().unwrap_or(-1)
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }
}

fn pid_of(rows: &[Vec<String>], name: &str) -> u32 {
    let row = rows.iter().find(|r| r[0] == name).unwrap_or_else(|| panic!("no row {name}"));
    row[5].parse().unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

async fn workers(router: &str) -> Vec<Value> {
    let v: Value =
        http().get(format!("{router}/workers")).send().await.unwrap().json().await.unwrap();
    v["workers"].as_array().unwrap().clone()
}

async fn generate(router: &str) -> reqwest::Response {
    let body = serde_json::json!({"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4}});
    http().post(format!("{router}/generate")).json(&body).send().await.unwrap()
}

/// Each process group in `pgids` has nothing running any more.
async fn all_gone(pgids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for &g in pgids {
        while !live_members(g).is_empty() {
            assert!(
                Instant::now() < deadline,
                "process group {g} still runs {:?}",
                live_members(g)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

const WITH_ROUTER: [&str; 6] = [
    "--with-router",
    "--router-port",
    "0",
    "--router-arg=--prometheus-port=0",
    "--router-arg=--policy",
    "--router-arg=round_robin",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_fleet_behind_its_own_router_survives_a_killed_worker_and_stops_cleanly() {
    let logs = temp_dir("regular");
    let mut args = vec!["--engine", "sim", "--dp-size", "2", "--restart-backoff-secs", "0.2"];
    args.extend(WITH_ROUTER);
    args.extend(["--", "--zero-compute"]);
    let mut l = Launch::spawn(&args, &logs, None, &[]);
    let (rows, router) = l.ready().await;
    let listed = workers(&router).await;
    assert_eq!(listed.len(), 2);
    for w in &listed {
        assert_eq!((w["source"].as_str(), w["role"].as_str()), (Some("launch"), Some("regular")));
    }
    for _ in 0..6 {
        let r = generate(&router).await;
        assert_eq!(r.status(), 200);
    }
    let listed = workers(&router).await;
    assert!(listed.iter().all(|w| w["requests_total"] == 3), "round robin over both: {listed:?}");

    // A worker killed under it is deregistered, restarted and registered again.
    let first = pid_of(&rows, "worker-1");
    signal(first as i32, libc::SIGKILL);
    let exited = l.line("worker-1 (").await;
    assert!(
        exited.contains("exited") && exited.contains("SIGKILL") && exited.contains("deregistered"),
        "{exited}"
    );
    let again = l.line("worker-1 (").await;
    assert!(again.contains("is up again") && again.ends_with("registered"), "{again}");
    let second: u32 =
        again.split("pid ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    assert_ne!(first, second);
    assert!(live_members(first).is_empty(), "the killed worker's group is gone");
    let listed = workers(&router).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    for _ in 0..4 {
        assert_eq!(generate(&router).await.status(), 200);
    }
    let log = std::fs::read_to_string(logs.join("worker-1.log")).unwrap();
    assert!(log.contains("==> routerctl launch: restart 1: "), "{log}");

    // A router that dies comes back on its port and is given the launched workers again.
    signal(pid_of(&rows, "routerd") as i32, libc::SIGKILL);
    assert!(l.line("routerd (").await.contains("exited"));
    let back = l.line("routerd (").await;
    assert!(back.contains("is up again"), "{back}");
    let router_pid: u32 =
        back.split("pid ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let deadline = Instant::now() + WAIT;
    while workers(&router).await.len() < 2 {
        assert!(Instant::now() < deadline, "the workers were not registered again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(generate(&router).await.status(), 200);

    // Ctrl-C: everything stops, in order, and nothing is left running.
    signal(l.pid, libc::SIGINT);
    assert_eq!(l.exit(WAIT).await, 0, "{}", l.stderr());
    let stopped = l.seen.iter().filter(|s| s.ends_with("stopped (exit code 0)")).count();
    assert_eq!(stopped, 3, "{:?}", l.seen);
    all_gone(&[pid_of(&rows, "worker-0"), first, second, pid_of(&rows, "routerd"), router_pid])
        .await;
    std::fs::remove_dir_all(logs).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_fleet_is_registered_in_its_pools_and_serves() {
    let logs = temp_dir("pd");
    let mut args = vec!["--engine", "sim", "--prefill", "2", "--decode", "1"];
    args.extend(["--base-bootstrap-port", "0"]);
    args.extend(WITH_ROUTER);
    args.extend(["--", "--zero-compute"]);
    let mut l = Launch::spawn(&args, &logs, None, &[]);
    let (rows, router) = l.ready().await;
    let listed = workers(&router).await;
    let role = |r: &str| listed.iter().filter(|w| w["role"] == r).count();
    assert_eq!((role("prefill"), role("decode")), (2, 1), "{listed:?}");
    let ports: Vec<u64> = listed.iter().filter_map(|w| w["bootstrap_port"].as_u64()).collect();
    assert_eq!(ports.len(), 2);
    assert_ne!(ports[0], ports[1], "distinct bootstrap ports");
    for (name, port) in [("prefill-0", 3), ("prefill-1", 3)] {
        let row = rows.iter().find(|r| r[0] == name).unwrap();
        assert!(ports.contains(&row[port].parse().unwrap()), "{row:?}");
    }
    let r = generate(&router).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-routerd-prefill-worker"));

    signal(l.pid, libc::SIGTERM);
    assert_eq!(l.exit(WAIT).await, 0, "{}", l.stderr());
    let groups: Vec<u32> = ["prefill-0", "prefill-1", "decode-0", "routerd"]
        .iter()
        .map(|n| pid_of(&rows, n))
        .collect();
    all_gone(&groups).await;
    std::fs::remove_dir_all(logs).unwrap();
}

/// An in-process routerd with no workers (in PD mode if asked).
fn router(pd: bool) -> (routerd::run::Running, String) {
    let flags = routerd::config::Flags { pd_disaggregation: pd, ..Default::default() };
    let config = routerd::config::Config::build(None, &flags).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let running = routerd::run::start(listener, config).unwrap();
    let url = running.url();
    (running, url)
}

/// A stand-in `python` that records its command line and GPUs, then serves as a simulated
/// worker on the port it was given; it fails as a broken engine would when asked to.
fn stand_in_python(dir: &Path, record: &Path) {
    let script = format!(
        r#"#!/bin/sh
echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $*" >> {record}
if [ "$CUDA_VISIBLE_DEVICES" = "$FAIL_ON_GPUS" ]; then
    echo "RuntimeError: CUDA error: out of memory" >&2
    exit 1
fi
port=; prev=
for a in "$@"; do [ "$prev" = "--port" ] && port=$a; prev=$a; done
exec {routerctl} sim-worker --port "$port" --zero-compute
"#,
        record = record.display(),
        routerctl = env!("CARGO_BIN_EXE_routerctl"),
    );
    let path = dir.join("python");
    std::fs::write(&path, script).unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
}

fn port_of(rows: &[Vec<String>], name: &str) -> String {
    let row = rows.iter().find(|r| r[0] == name).unwrap();
    row[2].rsplit(':').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_engine_runs_the_exact_command_lines_with_one_gpu_group_each() {
    let dir = temp_dir("sglang");
    let record = dir.join("record.txt");
    stand_in_python(&dir, &record);
    let (r, url) = router(false);
    let args = [
        "--model-path",
        "org/model-8b",
        "--dp-size",
        "2",
        "--gpus-per-worker",
        "2",
        "--base-gpu-id",
        "4",
        "--router",
        &url,
        "--",
        "--mem-fraction-static",
        "0.7",
    ];
    let mut l = Launch::spawn(&args, &dir.join("logs"), Some(&dir), &[]);
    let (rows, registered_with) = l.ready().await;
    assert_eq!(registered_with, url);
    let mut lines: Vec<String> =
        std::fs::read_to_string(&record).unwrap().lines().map(str::to_owned).collect();
    lines.sort();
    let expect = |gpus: &str, name: &str| {
        format!(
            "CUDA_VISIBLE_DEVICES={gpus} -m sglang.launch_server --model-path org/model-8b \
             --host 127.0.0.1 --port {} --tp-size 2 --mem-fraction-static 0.7",
            port_of(&rows, name)
        )
    };
    assert_eq!(lines, [expect("4,5", "worker-0"), expect("6,7", "worker-1")]);
    assert_eq!(rows.iter().map(|r| r[4].as_str()).collect::<Vec<_>>(), ["4,5", "6,7"]);
    assert_eq!(workers(&url).await.len(), 2);

    // Stopping deregisters them from a router launch did not start, which keeps running.
    signal(l.pid, libc::SIGTERM);
    assert_eq!(l.exit(WAIT).await, 0, "{}", l.stderr());
    assert!(workers(&url).await.is_empty());
    all_gone(&[pid_of(&rows, "worker-0"), pid_of(&rows, "worker-1")]).await;
    r.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_pd_workers_get_disaggregation_flags_and_their_pools() {
    let dir = temp_dir("sglang-pd");
    let record = dir.join("record.txt");
    stand_in_python(&dir, &record);
    let (r, url) = router(true);
    let args = [
        "--model-path",
        "org/model-8b",
        "--prefill",
        "1",
        "--decode",
        "1",
        "--base-bootstrap-port",
        "0",
        "--router",
        &url,
    ];
    let mut l = Launch::spawn(&args, &dir.join("logs"), Some(&dir), &[]);
    let (rows, _) = l.ready().await;
    let prefill = rows.iter().find(|r| r[0] == "prefill-0").unwrap();
    let lines = std::fs::read_to_string(&record).unwrap();
    let want_prefill = format!(
        "CUDA_VISIBLE_DEVICES=0 -m sglang.launch_server --model-path org/model-8b --host \
         127.0.0.1 --port {} --disaggregation-mode prefill --disaggregation-bootstrap-port {}",
        port_of(&rows, "prefill-0"),
        prefill[3]
    );
    let want_decode = format!(
        "CUDA_VISIBLE_DEVICES=1 -m sglang.launch_server --model-path org/model-8b --host \
         127.0.0.1 --port {} --disaggregation-mode decode",
        port_of(&rows, "decode-0")
    );
    assert!(lines.lines().any(|l| l == want_prefill), "{lines}");
    assert!(lines.lines().any(|l| l == want_decode), "{lines}");
    let listed = workers(&url).await;
    let p = listed.iter().find(|w| w["role"] == "prefill").unwrap();
    assert_eq!(p["bootstrap_port"].to_string(), prefill[3]);
    assert!(listed.iter().any(|w| w["role"] == "decode"));
    signal(l.pid, libc::SIGINT);
    assert_eq!(l.exit(WAIT).await, 0, "{}", l.stderr());
    r.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_fails_to_start_stops_the_launch_with_its_log_tail() {
    let dir = temp_dir("fail");
    let record = dir.join("record.txt");
    stand_in_python(&dir, &record);
    let (r, url) = router(false);
    let args = ["--model-path", "m", "--dp-size", "2", "--router", &url];
    // GPU 1's worker dies at once, as an engine out of memory does.
    let fail = [("FAIL_ON_GPUS", "1")];
    let mut l = Launch::spawn(&args, &dir.join("logs"), Some(&dir), &fail);
    assert_eq!(l.exit(WAIT).await, 1);
    let err = l.stderr();
    assert!(err.contains("worker-1 (http://127.0.0.1:"), "{err}");
    assert!(err.contains("exited (exit code 1) before it was healthy"), "{err}");
    assert!(err.contains("RuntimeError: CUDA error: out of memory"), "{err}");
    assert!(!l.seen.iter().any(|s| s.starts_with("ready")), "{:?}", l.seen);
    // The other worker, up or still starting, was deregistered and stopped with it.
    assert!(workers(&url).await.is_empty());
    // If worker-0's engine got as far as starting (it may have been stopped before it ran at
    // all), it no longer listens.
    let record = std::fs::read_to_string(&record).unwrap_or_default();
    if let Some(started) = record.lines().find(|l| l.starts_with("CUDA_VISIBLE_DEVICES=0 ")) {
        let port = started.split("--port ").nth(1).unwrap().split(' ').next().unwrap();
        let gone = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await;
        assert!(gone.is_err(), "worker-0 still listens on {port}");
    }
    r.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_before_anything_starts() {
    let dir = temp_dir("usage");
    for (args, says) in [
        (&["--dp-size", "1"][..], "--model-path is required with --engine sglang"),
        (&["--prefill", "1", "--engine", "sim"][..], "--decode"),
        (&["--engine", "sim"][..], "--dp-size"),
        (&["--engine", "sim", "--dp-size", "1", "--router-port", "1"][..], "--with-router"),
    ] {
        let mut l = Launch::spawn(args, &dir, None, &[]);
        assert_eq!(l.exit(WAIT).await, 2, "{args:?}");
        assert!(l.stderr().contains(says), "{args:?}: {}", l.stderr());
    }
    std::fs::remove_dir_all(dir).unwrap();
}
