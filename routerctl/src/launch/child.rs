//! One supervised process: started in its own process group with its output appended to its
//! log file, waited for, and stopped as a group (SIGTERM, then SIGKILL after a grace period),
//! so an engine's helper processes (SGLang's scheduler and detokenizer) never outlive it.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::plan::CommandLine;

/// A started process (the leader of its own process group) and where its output goes.
pub struct Child {
    inner: tokio::process::Child,
    pub pid: u32,
    log: PathBuf,
    /// Where this run's output starts in the log, for the tail shown on failure.
    log_start: u64,
    pub started: Instant,
}

impl Child {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to `log`, after a line
    /// saying what is started and why.
    pub fn spawn(cmd: &CommandLine, log: &Path, why: &str) -> Result<Self, String> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create the log directory {}: {e}", dir.display()))?;
        }
        let open_err = |e: std::io::Error| format!("cannot open {}: {e}", log.display());
        let mut out = OpenOptions::new().create(true).append(true).open(log).map_err(open_err)?;
        writeln!(out, "==> routerctl launch: {why}: {}", cmd.display()).map_err(open_err)?;
        let log_start = out.seek(SeekFrom::End(0)).map_err(open_err)?;
        let err = out.try_clone().map_err(open_err)?;
        let inner = tokio::process::Command::new(&cmd.program)
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own group: a terminal's Ctrl-C reaches routerctl only, which stops the
            // workers in order, and the whole group can be signalled at once.
            .process_group(0)
            // A last resort if routerctl itself unwinds without stopping it.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", cmd.program.display()))?;
        let pid = inner.id().ok_or("the process exited before it could be tracked")?;
        Ok(Self { inner, pid, log: log.to_owned(), log_start, started: Instant::now() })
    }

    /// Waits until the process exits and reaps it. Cancel-safe.
    pub async fn wait(&mut self) -> ExitStatus {
        match self.inner.wait().await {
            Ok(s) => s,
            // Only if the child was already reaped elsewhere, which nothing here does.
            Err(_) => ExitStatus::from_raw(0),
        }
    }

    /// Stops the whole group: SIGTERM, then SIGKILL if it has not exited within `grace` or
    /// once `force` is cancelled (a second Ctrl-C); then any helper process left in the group
    /// is killed too. Returns how the leader ended.
    pub async fn stop(&mut self, grace: Duration, force: &CancellationToken) -> ExitStatus {
        signal_group(self.pid, libc::SIGTERM);
        let status = tokio::select! {
            s = self.wait() => Some(s),
            _ = tokio::time::sleep(grace) => None,
            _ = force.cancelled() => None,
        };
        let status = match status {
            Some(s) => s,
            None => {
                signal_group(self.pid, libc::SIGKILL);
                self.wait().await
            }
        };
        kill_leftovers(self.pid);
        status
    }

    /// The last `lines` lines this run wrote to its log.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, self.log_start, lines)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// Kills what is left of the group `pgid` after its leader exited (engine helper processes
/// that would otherwise hold GPU memory).
pub fn kill_leftovers(pgid: u32) {
    signal_group(pgid, libc::SIGKILL);
}

/// The processes of group `pgid` that are still running (zombies waiting to be reaped do not
/// count), from /proc. Empty where /proc is absent.
pub fn live_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid pgrp ...`; comm may contain spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            out.push(pid);
        }
    }
    out
}

fn signal_group(pgid: u32, sig: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    // SAFETY: kill(2) with a negative pid signals a process group; it touches no memory.
    // ESRCH (no process left in the group) is the expected outcome once it is gone.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// How a process ended, as an operator reads it.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}{}", signal_name(s)),
        _ => status.to_string(),
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        _ => "",
    }
}

/// The last `lines` lines of `path` from byte `from` on, reading at most the last 64 KiB.
fn tail(path: &Path, from: u64, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let end = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let start = from.max(end.saturating_sub(64 * 1024));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> CommandLine {
        CommandLine {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("GREETING".into(), "hello".into())],
        }
    }

    #[tokio::test]
    async fn output_goes_to_the_log_and_the_tail_is_this_runs() {
        let dir = std::env::temp_dir().join(format!("launch-child-{}", std::process::id()));
        let log = dir.join("w.log");
        let mut first = Child::spawn(&sh("echo first run"), &log, "starting").unwrap();
        assert_eq!(describe(first.wait().await), "exit code 0");
        let mut c =
            Child::spawn(&sh("echo $GREETING; echo oops >&2; exit 3"), &log, "restart").unwrap();
        assert_eq!(describe(c.wait().await), "exit code 3");
        assert_eq!(c.tail(5), "hello\noops");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.starts_with(
            "==> routerctl launch: starting: GREETING=hello sh -c \"echo first run\""
        ));
        assert!(text.contains("first run\n==> routerctl launch: restart: GREETING=hello sh"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn stop_ends_the_whole_group_even_when_sigterm_is_ignored() {
        let dir = std::env::temp_dir().join(format!("launch-group-{}", std::process::id()));
        // The leader ignores SIGTERM and leaves a helper in its group, as engines do.
        let script = "trap '' TERM; sleep 30 & echo helper $!; while :; do sleep 1; done";
        let mut c = Child::spawn(&sh(script), &dir.join("g.log"), "starting").unwrap();
        let pgid = c.pid;
        let deadline = Instant::now() + Duration::from_secs(5);
        let started = || {
            let log = std::fs::read_to_string(dir.join("g.log")).unwrap();
            log.lines().any(|l| l.starts_with("helper "))
        };
        while !started() {
            assert!(Instant::now() < deadline, "the script did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(live_members(pgid).len() >= 2, "the leader and its helper run in one group");
        let status = c.stop(Duration::from_millis(200), &CancellationToken::new()).await;
        assert_eq!(describe(status), "signal 9 (SIGKILL)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !live_members(pgid).is_empty() {
            assert!(Instant::now() < deadline, "a process of the group is still running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
