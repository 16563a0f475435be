//! Starting a process until it is healthy, and keeping it running: a process that exits is
//! marked down (its worker deregistered), what is left of its group killed, and it is started
//! again after a backoff that doubles on each failed restart and resets once it has run long
//! enough to count as stable.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::child::{describe, kill_leftovers, Child};
use super::plan::ProcPlan;
use super::register::Registrar;

/// Lines of a process's log shown when it fails to start.
const TAIL_LINES: usize = 20;
/// A process that ran this long before exiting is restarted after the initial backoff again.
const STABLE_AFTER: Duration = Duration::from_secs(60);
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// A launched process and what the rest of launch needs to know about it.
pub struct Slot {
    pub plan: ProcPlan,
    up: AtomicBool,
    pid: AtomicU32,
    restarts: AtomicU32,
}

impl Slot {
    pub fn new(plan: ProcPlan) -> Self {
        Self {
            plan,
            up: AtomicBool::new(false),
            pid: AtomicU32::new(0),
            restarts: AtomicU32::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn pid(&self) -> u32 {
        self.pid.load(Relaxed)
    }

    fn set(&self, up: bool, pid: u32) {
        self.pid.store(pid, Relaxed);
        self.up.store(up, Relaxed);
    }
}

/// What starting and supervising need, shared by every process.
pub struct Ctx {
    pub http: reqwest::Client,
    pub startup_timeout: Duration,
    /// SIGTERM to SIGKILL.
    pub grace: Duration,
    pub backoff: (Duration, Duration),
    /// Cancelled by a second Ctrl-C: stop without waiting.
    pub force: CancellationToken,
    /// Registers workers as they come up; `None` for the router itself.
    pub registrar: Option<Arc<Registrar>>,
}

/// Why a start did not produce a healthy process.
pub enum StartError {
    /// It could not run, exited, or was not healthy in time; with its log's last lines.
    Failed { reason: String, tail: String },
    /// Launch is stopping.
    Cancelled,
}

impl StartError {
    pub fn report(&self, p: &ProcPlan) -> String {
        match self {
            StartError::Cancelled => format!("{}: start cancelled", p.name),
            StartError::Failed { reason, tail } if tail.is_empty() => {
                format!("{} ({}): {reason}; its log ({}) is empty", p.name, p.url, p.log.display())
            }
            StartError::Failed { reason, tail } => format!(
                "{} ({}): {reason}; last lines of {}:\n{}",
                p.name,
                p.url,
                p.log.display(),
                indent(tail)
            ),
        }
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// Starts `slot`'s process and waits until its health path answers 200. A process that
/// fails (or a start `cancel`led) is stopped, group and all, before this returns.
pub async fn start(
    slot: &Slot,
    ctx: &Ctx,
    why: &str,
    cancel: &CancellationToken,
) -> Result<Child, StartError> {
    let p = &slot.plan;
    let mut child = Child::spawn(&p.command, &p.log, why)
        .map_err(|reason| StartError::Failed { reason, tail: String::new() })?;
    slot.set(false, child.pid);
    let url = format!("{}{}", p.url, p.health_path);
    let deadline = Instant::now() + ctx.startup_timeout;
    let healthy = async {
        loop {
            let ok = ctx.http.get(&url).send().await.is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{url} did not answer 200 within {:?} (--startup-timeout-secs)",
                    ctx.startup_timeout
                ));
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    };
    let outcome = tokio::select! {
        r = healthy => r.map_err(Some),
        s = child.wait() => Err(Some(format!("exited ({}) before it was healthy", describe(s)))),
        _ = cancel.cancelled() => Err(None),
    };
    match outcome {
        Ok(()) => {
            slot.set(true, child.pid);
            Ok(child)
        }
        Err(reason) => {
            child.stop(ctx.grace, &ctx.force).await;
            slot.set(false, 0);
            match reason {
                Some(reason) => Err(StartError::Failed { reason, tail: child.tail(TAIL_LINES) }),
                None => Err(StartError::Cancelled),
            }
        }
    }
}

/// Keeps `child` (already healthy) running until `stop` is cancelled, then stops it. Once
/// `no_restart` is cancelled (launch is stopping) a process that exits stays down.
pub async fn supervise(
    slot: Arc<Slot>,
    mut child: Child,
    ctx: Arc<Ctx>,
    stop: CancellationToken,
    no_restart: CancellationToken,
) {
    let p = &slot.plan;
    let mut delay = ctx.backoff.0;
    loop {
        let status = tokio::select! {
            s = child.wait() => s,
            _ = stop.cancelled() => {
                let s = child.stop(ctx.grace, &ctx.force).await;
                slot.set(false, 0);
                println!("{} stopped ({})", p.name, describe(s));
                return;
            }
        };
        let ran = child.started.elapsed();
        kill_leftovers(child.pid);
        slot.set(false, 0);
        if no_restart.is_cancelled() {
            println!("{} exited ({}) while launch is stopping", p.name, describe(status));
            return;
        }
        let deregistered = match &ctx.registrar {
            Some(r) => match r.deregister(&slot).await {
                Ok(()) => "; deregistered",
                Err(_) => "; deregistration pending",
            },
            None => "",
        };
        if ran >= STABLE_AFTER {
            delay = ctx.backoff.0;
        }
        println!(
            "{} ({}) exited after {:.1}s ({}){deregistered}; restarting in {:.1}s; log {}",
            p.name,
            p.url,
            ran.as_secs_f64(),
            describe(status),
            delay.as_secs_f64(),
            child.log().display()
        );
        child = loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = no_restart.cancelled() => return,
            }
            delay = (delay * 2).min(ctx.backoff.1);
            let n = slot.restarts.fetch_add(1, Relaxed) + 1;
            match start(&slot, &ctx, &format!("restart {n}"), &no_restart).await {
                Ok(c) => break c,
                Err(StartError::Cancelled) => return,
                Err(e) => eprintln!(
                    "routerctl launch: {}\n  retrying in {:.1}s",
                    e.report(p),
                    delay.as_secs_f64()
                ),
            }
        };
        let registered = match &ctx.registrar {
            Some(r) => match r.register(&slot).await {
                Ok(()) => "; registered",
                Err(_) => "; registration pending",
            },
            None => "",
        };
        println!(
            "{} ({}) is up again, pid {}, restart {}{registered}",
            p.name,
            p.url,
            child.pid,
            slot.restarts.load(Relaxed)
        );
    }
}
