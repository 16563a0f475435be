//! When and how long to wait before trying a request again: exponential backoff with jitter,
//! and a budget that lets retries add at most `budget_ratio` of the request rate (plus
//! `budget_min_per_sec`), so that an outage does not multiply the load on what is left.

use std::sync::Mutex;
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
/// quiet period cannot bank a burst.
#[derive(Debug, Default)]
pub struct Budget {
    inner: Mutex<Option<(f64, Instant)>>,
}

impl Budget {
    fn cap(cfg: &RetryConfig) -> f64 {
        (cfg.budget_min_per_sec * 10.0).max(10.0)
    }

    fn with<R>(&self, cfg: &RetryConfig, f: impl FnOnce(&mut f64) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, since) = g.get_or_insert((cfg.budget_min_per_sec, now));
        let earned = now.duration_since(*since).as_secs_f64() * cfg.budget_min_per_sec;
        *tokens = (*tokens + earned).min(Self::cap(cfg));
        *since = now;
        f(tokens)
    }

    pub fn deposit(&self, cfg: &RetryConfig) {
        self.with(cfg, |t| *t += cfg.budget_ratio);
    }

    /// Takes a token for one retry, if there is one.
    pub fn withdraw(&self, cfg: &RetryConfig) -> bool {
        self.with(cfg, |t| {
            let ok = *t >= 1.0;
            if ok {
                *t -= 1.0;
            }
            ok
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RetryConfig {
        RetryConfig {
            enabled: true,
            max_retries: 3,
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
}
