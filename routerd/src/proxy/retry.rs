//! When and how long to wait before trying a request again: exponential backoff with jitter,
//! and a budget that lets retries add at most `budget_ratio` of the request rate (plus
//! `budget_min_per_sec`), so that an outage does not multiply the load on what is left.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::config::RetryConfig;

/// Statuses worth another worker's try: overload and server-side failures.
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// The wait before retry number `n` (1-based).
pub fn backoff(cfg: &RetryConfig, n: u32) -> Duration {
    let exp = cfg.backoff_multiplier.powi(n.saturating_sub(1) as i32);
    let base = (cfg.initial_backoff.as_secs_f64() * exp).min(cfg.max_backoff.as_secs_f64());
    let jitter = if cfg.jitter_factor > 0.0 {
        rand::rng().random_range(-cfg.jitter_factor..=cfg.jitter_factor)
    } else {
        0.0
    };
    Duration::from_secs_f64((base * (1.0 + jitter)).max(0.0))
}

/// Tokens: each request deposits `budget_ratio`, time deposits `budget_min_per_sec` per
/// second, a retry takes one. It starts with one second's worth and is capped at ten, so a
/// quiet period cannot bank a burst. Lock-free: the tokens are an `f64` in an atomic updated
/// by compare-and-swap, and each stretch of time is credited once (to whoever swaps the clock).
#[derive(Debug)]
pub struct Budget {
    /// `f64` bits; NaN until the first use (which starts it at one second's worth).
    tokens: AtomicU64,
    /// Milliseconds since `origin` of the last time credit.
    credited_ms: AtomicU64,
    origin: Instant,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            tokens: AtomicU64::new(f64::NAN.to_bits()),
            credited_ms: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }
}

impl Budget {
    fn cap(cfg: &RetryConfig) -> f64 {
        (cfg.budget_min_per_sec * 10.0).max(10.0)
    }

    /// Applies `f` to the tokens (after crediting the time since the last call); `f` returns
    /// the new amount, or `None` to leave it. Returns whether `f` changed it.
    fn update(&self, cfg: &RetryConfig, f: impl Fn(f64) -> Option<f64>) -> bool {
        let now = self.origin.elapsed().as_millis() as u64;
        let last = self.credited_ms.swap(now, Relaxed);
        let earned = now.saturating_sub(last) as f64 / 1000.0 * cfg.budget_min_per_sec;
        let cap = Self::cap(cfg);
        let mut cur = self.tokens.load(Relaxed);
        loop {
            let have = f64::from_bits(cur);
            let have = if have.is_nan() { cfg.budget_min_per_sec } else { have };
            let have = (have + earned).min(cap);
            let (next, changed) = match f(have) {
                Some(v) => (v.min(cap), true),
                None => (have, false),
            };
            match self.tokens.compare_exchange_weak(cur, next.to_bits(), Relaxed, Relaxed) {
                Ok(_) => return changed,
                Err(now) => cur = now,
            }
        }
    }

    pub fn deposit(&self, cfg: &RetryConfig) {
        self.update(cfg, |t| Some(t + cfg.budget_ratio));
    }

    /// Takes a token for one retry, if there is one.
    pub fn withdraw(&self, cfg: &RetryConfig) -> bool {
        self.update(cfg, |t| (t >= 1.0).then_some(t - 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RetryConfig {
        RetryConfig {
            enabled: true,
            max_retries: 3,
            migration_limit: 1,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            backoff_multiplier: 2.0,
            jitter_factor: 0.1,
            budget_ratio: 0.2,
            budget_min_per_sec: 0.0,
        }
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        let c = cfg();
        for _ in 0..100 {
            let ms = |n| backoff(&c, n).as_secs_f64() * 1000.0;
            assert!((90.0..=110.0).contains(&ms(1)), "{}", ms(1));
            assert!((180.0..=220.0).contains(&ms(2)), "{}", ms(2));
            assert!((315.0..=385.0).contains(&ms(3)), "{}", ms(3));
            assert!((315.0..=385.0).contains(&ms(9)), "capped: {}", ms(9));
        }
    }

    #[test]
    fn budget_allows_a_fraction_of_requests() {
        let c = cfg();
        let b = Budget::default();
        let mut granted = 0;
        for _ in 0..100 {
            b.deposit(&c);
            granted += b.withdraw(&c) as u32;
            granted += b.withdraw(&c) as u32;
        }
        assert_eq!(granted, 20, "0.2 retries per request");
        let generous = RetryConfig { budget_min_per_sec: 1000.0, ..c };
        std::thread::sleep(Duration::from_millis(20));
        assert!(b.withdraw(&generous), "time refills the budget");
    }

    #[test]
    fn threads_share_the_budget_exactly() {
        let c = cfg();
        let b = std::sync::Arc::new(Budget::default());
        let granted: u32 = (0..4)
            .map(|_| {
                let (b, c) = (b.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    for _ in 0..1000 {
                        b.deposit(&c);
                        n += b.withdraw(&c) as u32;
                    }
                    n
                })
            })
            .map(|h| h.join().unwrap())
            .sum();
        // 4000 deposits of 0.2 make 800 tokens, less what is still held (under one).
        assert!((799..=800).contains(&granted), "{granted}");
    }
}
