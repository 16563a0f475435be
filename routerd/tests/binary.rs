//! The `routerd` binary as operators run it: `check`, exit codes, startup, SIGTERM. Also parses
//! every example in config/, so none can drift from the parser.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_routerd");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn tempdir() -> std::path::PathBuf {
    let d =
        std::env::temp_dir().join(format!("routerd-test-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Starts routerd with `args` (which must include `--port 0`); returns it and its URL from the
/// startup line.
fn spawn_routerd(args: &[&str]) -> (Proc, String) {
    // Tests run side by side: each router's metrics listener takes any free port.
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--prometheus-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    (Proc(child), url)
}

/// Starts routerd on port 0 with `args` and `env`, its stderr into `err`; returns it and the
/// URL it serves on (127.0.0.1 and the port of its startup line).
fn spawn_logging(args: &[&str], env: &[(&str, &str)], err: &Path) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(["--port", "0", "--prometheus-port", "0"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().rsplit(':').next().unwrap().to_owned();
    (Proc(child), format!("http://127.0.0.1:{port}"))
}

/// The exit code once `p` has exited, within `within`.
fn wait_exit(p: &mut Proc, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s.code();
        }
        assert!(Instant::now() < deadline, "routerd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_example_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 1, "no example configs found in {}", dir.display());
}

#[test]
fn check_reports_every_error_with_file_line_col() {
    let d = tempdir();
    let f = write(&d, "bad.toml", "[policy]\nname = \"fastest\"\n[[workers]]\nurl = \"nope\"\n");
    let out = Command::new(BIN).args(["check", "--config", &f]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{f}:2:8: policy.name: unknown policy \"fastest\"")), "{err}");
    assert!(err.contains(&format!("{f}:4:7: workers[0].url:")), "{err}");
    assert!(err.contains("2 errors"), "{err}");
    let good = write(&d, "good.toml", "[policy]\nname = \"random\"\n");
    let out = Command::new(BIN).args(["check", "--config", &good]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // Starting with an invalid file is exit 1 too, with nothing bound.
    let out = Command::new(BIN).args(["--config", &f, "--port", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    std::fs::remove_dir_all(d).ok();
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(BIN).arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // sgl-router's flags for what routerd does not do are named, not ignored.
    for (args, says) in [
        (&["--worker-urls", "http://w:1", "--mcp-config-path", "mcp.yaml"][..], "MCP"),
        (&["--history-backend", "oracle"][..], "history"),
        (&["--worker-urls", "grpc://w:1", "--tokenizer-cache-enable-l0"][..], "gRPC"),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says) && err.contains("does not implement"), "{err}");
    }
}

#[test]
fn cannot_bind_exits_3() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let out =
        Command::new(BIN).args(["--policy", "round_robin", "--port", &port]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on 127.0.0.1:"));
}

#[test]
fn serves_then_exits_0_on_sigterm() {
    let (mut p, url) = spawn_routerd(&[
        "--policy",
        "round_robin",
        "--port",
        "0",
        "--worker-urls",
        "http://127.0.0.1:9",
    ]);
    let http = reqwest::blocking::Client::builder().no_proxy().build().unwrap();
    assert_eq!(http.get(format!("{url}/health")).send().unwrap().status(), 200);
    let listed: serde_json::Value =
        http.get(format!("{url}/list_workers")).send().unwrap().json().unwrap();
    assert_eq!(listed["urls"][0], "http://127.0.0.1:9");
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(p.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    assert_eq!(wait_exit(&mut p, Duration::from_secs(10)), Some(0), "clean exit after SIGTERM");
}

#[test]
fn sighup_reloads_the_config_file() {
    let d = tempdir();
    let f = write(
        &d,
        "r.toml",
        "[policy]\nname = \"random\"\n[[workers]]\nurl = \"http://127.0.0.1:9\"\n",
    );
    let (p, url) = spawn_routerd(&["--config", &f, "--port", "0", "--no-watch-config"]);
    let http = reqwest::blocking::Client::builder().no_proxy().build().unwrap();
    write(&d, "r.toml", "[policy]\nname = \"random\"\n[[workers]]\nurl = \"http://127.0.0.1:9\"\n[[workers]]\nurl = \"http://127.0.0.1:10\"\n");
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(p.0.id() as libc::pid_t, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed: serde_json::Value =
            http.get(format!("{url}/list_workers")).send().unwrap().json().unwrap();
        if listed["urls"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload: {listed}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cfg: serde_json::Value =
        http.get(format!("{url}/admin/config")).send().unwrap().json().unwrap();
    assert_eq!(cfg["generation"], 2);
    drop(p);
    std::fs::remove_dir_all(d).ok();
}

/// The JSON access log lines routerd wrote, once one for `request_id` shows up.
fn access_lines(read: impl Fn() -> String, request_id: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<serde_json::Value> = read()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if lines.iter().any(|l| l["request_id"] == request_id) {
            return lines;
        }
        assert!(Instant::now() < deadline, "no access line for {request_id}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn json_logs_to_stderr_and_to_daily_files() {
    let dir = std::env::temp_dir().join(format!("routerd-logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let err = dir.join("stderr.log");
    std::fs::create_dir_all(&dir).unwrap();
    let spawn = |extra: &[&str]| {
        let args: Vec<&str> = ["--log-format", "json"].iter().chain(extra).copied().collect();
        spawn_logging(&args, &[], &err)
    };
    let call = |url: &str, id: &str| {
        let resp = reqwest::blocking::Client::new()
            .post(format!("{url}/generate"))
            .header("x-request-id", id)
            .body(r#"{"text": "secret prompt"}"#)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 503, "no workers");
    };

    let (mut p, url) = spawn(&[]);
    call(&url, "req-to-stderr");
    let lines = access_lines(|| std::fs::read_to_string(&err).unwrap_or_default(), "req-to-stderr");
    let access = lines.iter().find(|l| l["request_id"] == "req-to-stderr").unwrap();
    assert_eq!(access["target"], "routerd::access");
    assert_eq!(
        (access["route"].as_str(), access["status"].as_u64()),
        (Some("/generate"), Some(503))
    );
    assert_eq!(access["worker"], "-");
    assert!(access["latency_ms"].as_f64().is_some());
    assert!(
        !std::fs::read_to_string(&err).unwrap().contains("secret prompt"),
        "prompts are never logged"
    );
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    let code = wait_exit(&mut p, Duration::from_secs(5));
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());

    let logs = dir.join("files");
    let (mut p, url) = spawn(&["--log-dir", logs.to_str().unwrap()]);
    call(&url, "req-to-file");
    let read_files = || {
        std::fs::read_dir(&logs)
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok()).collect::<String>()
            })
            .unwrap_or_default()
    };
    access_lines(read_files, "req-to-file");
    let names: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("routerd.log.")), "{names:?}");
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    let code = wait_exit(&mut p, Duration::from_secs(5));
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn warns_at_startup_when_listening_beyond_loopback_and_never_logs_secrets() {
    let dir = tempdir();
    let err = dir.join("stderr.log");
    let key_file = write(&dir, "admin.key", "admin-file-secret\n");
    let start = |args: &[&str], env: &[(&str, &str)]| {
        let args: Vec<&str> = ["--log-level", "debug"].iter().chain(args).copied().collect();
        spawn_logging(&args, env, &err)
    };
    let stop = |mut p: Proc| {
        unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
        assert_eq!(wait_exit(&mut p, Duration::from_secs(5)), Some(0));
        std::fs::read_to_string(&err).unwrap()
    };

    // Beyond loopback, no keys: both warnings.
    let (p, _) = start(&["--host", "0.0.0.0"], &[]);
    let logs = stop(p);
    assert!(logs.contains("changes only from loopback"), "{logs}");
    assert!(logs.contains("without an API key"), "{logs}");

    // Keys from the environment and a file; a worker (down) that gets the client key; every
    // route that handles keys is called. No key appears in the debug logs.
    let (p, url) = start(
        &[
            "--host",
            "0.0.0.0",
            "--admin-api-key-file",
            &key_file,
            "--worker-urls",
            "http://127.0.0.1:9",
        ],
        &[("ROUTERD_API_KEY", "client-env-secret")],
    );
    let c = reqwest::blocking::Client::new();
    let gen = |key: &str| {
        c.post(format!("{url}/generate"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(r#"{"text": "x"}"#)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(gen("wrong-guess-secret"), 401);
    assert!(gen("client-env-secret") >= 500, "the worker is down");
    let add = c
        .post(format!("{url}/workers"))
        .bearer_auth("admin-file-secret")
        .json(
            &serde_json::json!({"url": "http://127.0.0.1:10", "api_key": "runtime-worker-secret"}),
        )
        .send()
        .unwrap();
    assert_eq!(add.status(), 202, "sglang-router 0.3: accepted");
    let cfg = c.get(format!("{url}/admin/config")).bearer_auth("admin-file-secret").send().unwrap();
    assert!(!cfg.text().unwrap().contains("secret\""), "no secret in /admin/config");
    std::thread::sleep(Duration::from_millis(300));
    let logs = stop(p);
    assert!(!logs.contains("changes only from loopback"), "an admin key is set: {logs}");
    assert!(logs.contains("DEBUG") || logs.contains("debug"), "debug logs were on: {logs}");
    for secret in ["client-env-secret", "admin-file-secret", "runtime-worker-secret"] {
        assert!(!logs.contains(secret), "{secret} logged: {logs}");
    }

    // `--help` shows that the env variable exists, not its value.
    let help =
        Command::new(BIN).arg("--help").env("ROUTERD_API_KEY", "help-secret").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("ROUTERD_API_KEY") && !help.contains("help-secret"), "{help}");
    // A usage error naming the key flag does not print the key either.
    let out = Command::new(BIN)
        .args(["--api-key", "usage-secret", "--api-key-file", "/nonexistent", "check"])
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("--api-key") && !text.contains("usage-secret"), "{text}");
}

/// Every flag of sglang-router 0.3.2 (`tests/data/sglang-router-0.3.2-flags.txt`, from its
/// `--help`) is implemented with the same name, or refused by name at startup with exit code 2
/// and the feature named: never clap's generic "unexpected argument".
#[test]
fn every_sglang_router_0_3_2_flag_is_implemented_or_refused_by_name() {
    use clap::CommandFactory;
    let list = include_str!("data/sglang-router-0.3.2-flags.txt");
    let cmd = routerd::config::Cli::command();
    let known: Vec<String> = cmd
        .get_arguments()
        .flat_map(|a| a.get_long().into_iter().chain(a.get_all_aliases().unwrap_or_default()))
        .map(|l| format!("--{l}"))
        .collect();
    let (mut implemented, mut refused) = (0, 0);
    for flag in list.lines().filter(|l| l.starts_with("--")) {
        if flag == "--help" || known.iter().any(|k| k == flag) {
            implemented += 1;
            continue;
        }
        let msg = routerd::config::unsupported_flag(&[flag])
            .unwrap_or_else(|| panic!("{flag}: neither implemented nor refused by name"));
        assert!(msg.contains(flag), "{msg}");
        let out = Command::new(BIN).args([flag, "x"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains("does not implement"), "{flag}: {stderr}");
        assert!(!stderr.contains("unexpected argument"), "{flag}: {stderr}");
        refused += 1;
    }
    assert_eq!(implemented + refused, 98, "the list has 98 flags");
    assert!(implemented >= 56, "{implemented} implemented (56 when written), {refused} refused");
}
