//! `routerctl sim-worker` as a user runs it: a real process, its startup line, SIGTERM, an
//! injected crash, and bad flags.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_routerctl"))
        .arg("sim-worker")
        .args(["--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn routerctl");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in startup line {line:?}"))
        .to_owned();
    (Proc(child), url)
}

fn wait_exit(p: &mut Proc, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().no_proxy().build().unwrap()
}

#[test]
fn serves_and_drains_on_sigterm() {
    let (mut p, url) = spawn(&["--role", "prefill", "--bootstrap-port", "0", "--zero-compute"]);
    let info: serde_json::Value =
        http().get(format!("{url}/get_server_info")).send().unwrap().json().unwrap();
    assert_eq!(info["disaggregation_mode"], "prefill");
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(p.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    assert_eq!(wait_exit(&mut p, Duration::from_secs(10)), 0, "clean exit after SIGTERM");
}

#[test]
fn injected_crash_exits_non_zero() {
    let (mut p, url) = spawn(&["--fault-crash-after", "1", "--zero-compute"]);
    let body = serde_json::json!({"text": "x"});
    assert_eq!(http().post(format!("{url}/generate")).json(&body).send().unwrap().status(), 200);
    assert!(http().post(format!("{url}/generate")).json(&body).send().is_err());
    assert_eq!(wait_exit(&mut p, Duration::from_secs(10)), 1);
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_routerctl"))
        .args(["sim-worker", "--role", "both"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--role"));
    let out = Command::new(env!("CARGO_BIN_EXE_routerctl"))
        .args(["sim-worker", "--port", "0", "--fault-error-rate", "1.5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error_rate"), "{out:?}");
}
