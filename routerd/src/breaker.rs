//! Per-worker circuit breakers, fed by the outcome of every request sent to the worker.
//! Closed: requests flow; `failure_threshold` consecutive failures (each within `window` of the
//! first) open it. Open: the worker is skipped for `timeout`, then trial requests are let
//! through. A trial's success moves it to half-open, `success_threshold` successes close it;
//! any failure while half-open (or a failed trial) opens it again for another `timeout`.
//! The state is read on every routing decision, so reads are single atomic loads.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Circuit::Open,
            2 => Circuit::HalfOpen,
            _ => Circuit::Closed,
        }
    }
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

#[derive(Debug, Default)]
struct Streak {
    failures: u32,
    first_failure_ms: u64,
    successes: u32,
}

#[derive(Debug, Default)]
pub struct Breaker {
    state: AtomicU8,
    /// While open: when trial requests may go through (ms since `EPOCH`).
    retry_at_ms: AtomicU64,
    /// Whether the current streak has failures (so a success in closed state skips the lock).
    failing: AtomicU8,
    streak: Mutex<Streak>,
    pub opened_total: AtomicU64,
}

impl Breaker {
    /// An open circuit whose timeout has passed (or whose worker passed a health check)
    /// lets trial requests through: it is half-open.
    pub fn state(&self) -> Circuit {
        match Circuit::from_u8(self.state.load(Relaxed)) {
            Circuit::Open if now_ms() >= self.retry_at_ms.load(Relaxed) => Circuit::HalfOpen,
            c => c,
        }
    }

    /// Whether a request may go to the worker now.
    pub fn allows(&self) -> bool {
        self.state() != Circuit::Open
    }

    /// While open: how long until trial requests may go through.
    pub fn open_for(&self) -> Option<std::time::Duration> {
        let left = self.retry_at_ms.load(Relaxed).saturating_sub(now_ms());
        (self.state() == Circuit::Open && left > 0).then(|| std::time::Duration::from_millis(left))
    }

    fn set(&self, c: Circuit) {
        self.state.store(c as u8, Relaxed);
    }

    fn open(&self, cfg: &BreakerConfig, st: &mut Streak) {
        if self.state() != Circuit::Open {
            self.opened_total.fetch_add(1, Relaxed);
        }
        self.retry_at_ms.store(now_ms() + cfg.timeout.as_millis() as u64, Relaxed);
        self.set(Circuit::Open);
        *st = Streak::default();
        self.failing.store(0, Relaxed);
    }

    pub fn record_success(&self, cfg: &BreakerConfig) {
        if self.state() == Circuit::Closed && self.failing.load(Relaxed) == 0 {
            return;
        }
        if !cfg.enabled {
            // Breakers were turned off (a reload): forget what this one held.
            *self.streak.lock().unwrap_or_else(|p| p.into_inner()) = Streak::default();
            self.failing.store(0, Relaxed);
            self.set(Circuit::Closed);
            return;
        }
        let mut st = self.streak.lock().unwrap_or_else(|p| p.into_inner());
        match self.state() {
            Circuit::Closed => {
                *st = Streak::default();
                self.failing.store(0, Relaxed);
            }
            Circuit::Open | Circuit::HalfOpen => {
                st.successes += 1;
                if st.successes >= cfg.success_threshold {
                    *st = Streak::default();
                    self.set(Circuit::Closed);
                } else {
                    self.set(Circuit::HalfOpen);
                }
            }
        }
    }

    /// Returns whether this failure opened the circuit.
    pub fn record_failure(&self, cfg: &BreakerConfig) -> bool {
        if !cfg.enabled {
            return false;
        }
        let was_open = self.state() == Circuit::Open;
        let mut st = self.streak.lock().unwrap_or_else(|p| p.into_inner());
        match self.state() {
            Circuit::Closed => {
                let now = now_ms();
                if st.failures == 0 || now - st.first_failure_ms > window_ms(cfg.window) {
                    st.failures = 0;
                    st.first_failure_ms = now;
                }
                st.failures += 1;
                self.failing.store(1, Relaxed);
                if st.failures >= cfg.failure_threshold {
                    self.open(cfg, &mut st);
                }
            }
            Circuit::Open | Circuit::HalfOpen => self.open(cfg, &mut st),
        }
        !was_open && self.state() == Circuit::Open
    }

    /// An active health check passed: an open circuit lets trial requests through now rather
    /// than at the end of its timeout, so a worker that came back recovers within one check.
    pub fn probe_passed(&self) {
        if self.state() == Circuit::Open {
            self.retry_at_ms.store(now_ms(), Relaxed);
        }
    }
}

fn window_ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(timeout_ms: u64) -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            failure_threshold: 3,
            success_threshold: 2,
            timeout: Duration::from_millis(timeout_ms),
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_trials() {
        let c = cfg(30);
        let b = Breaker::default();
        b.record_failure(&c);
        b.record_failure(&c);
        b.record_success(&c);
        b.record_failure(&c);
        b.record_failure(&c);
        assert_eq!(b.state(), Circuit::Closed, "a success breaks the streak");
        b.record_failure(&c);
        assert_eq!((b.state(), b.allows()), (Circuit::Open, false));
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allows(), "trial requests after the timeout");
        b.record_success(&c);
        assert_eq!(b.state(), Circuit::HalfOpen);
        b.record_success(&c);
        assert_eq!(b.state(), Circuit::Closed);
        assert_eq!(b.opened_total.load(Relaxed), 1);
    }

    #[test]
    fn a_failed_trial_reopens_and_disabled_never_opens() {
        let c = cfg(10_000);
        let b = Breaker::default();
        for _ in 0..3 {
            b.record_failure(&c);
        }
        b.retry_at_ms.store(0, Relaxed);
        b.record_success(&c);
        assert_eq!(b.state(), Circuit::HalfOpen);
        b.record_failure(&c);
        assert_eq!((b.state(), b.allows()), (Circuit::Open, false));
        let off = BreakerConfig { enabled: false, ..c };
        let b = Breaker::default();
        for _ in 0..10 {
            b.record_failure(&off);
        }
        assert_eq!(b.state(), Circuit::Closed);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let c = BreakerConfig { window: Duration::from_millis(20), ..cfg(1000) };
        let b = Breaker::default();
        b.record_failure(&c);
        b.record_failure(&c);
        std::thread::sleep(Duration::from_millis(30));
        b.record_failure(&c);
        assert_eq!(b.state(), Circuit::Closed);
    }
}
