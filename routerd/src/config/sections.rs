//! Building the sections that tune failure handling and operations: `[health]`,
//! `[circuit_breaker]`, `[retry]`, `[metrics]` and the log format.

use std::time::Duration;

use super::{
    layered, millis, raw, secs, At, BreakerConfig, Builder, Flags, HealthConfig, LogFormat,
    MetricsConfig, RetryConfig,
};

impl Builder<'_> {
    pub(super) fn health(&mut self, h: raw::RawHealth, f: &Flags) -> HealthConfig {
        let endpoint = layered(
            f.health_check_endpoint.clone(),
            "--health-check-endpoint",
            h.endpoint.as_ref(),
            "/health".to_owned(),
        );
        if !endpoint.0.starts_with('/') || endpoint.0.parse::<http::uri::PathAndQuery>().is_err() {
            self.error(
                "health.endpoint",
                &endpoint.1,
                format!("{:?} must be a path starting with /", endpoint.0),
            );
        }
        let failures = layered(
            f.health_failure_threshold,
            "--health-failure-threshold",
            h.failure_threshold.as_ref(),
            3,
        );
        let successes = layered(
            f.health_success_threshold,
            "--health-success-threshold",
            h.success_threshold.as_ref(),
            2,
        );
        HealthConfig {
            enabled: !f.disable_health_check && h.enabled.unwrap_or(true),
            endpoint: endpoint.0,
            interval: self.duration(
                "health.interval",
                secs(f.health_check_interval_secs, "--health-check-interval-secs"),
                h.interval,
                Duration::from_secs(10),
            ),
            timeout: self.duration(
                "health.timeout",
                secs(f.health_check_timeout_secs, "--health-check-timeout-secs"),
                h.timeout,
                Duration::from_secs(5),
            ),
            failure_threshold: self.count("health.failure_threshold", failures, 3),
            success_threshold: self.count("health.success_threshold", successes, 2),
            startup_timeout: self.duration(
                "health.startup_timeout",
                secs(f.worker_startup_timeout_secs, "--worker-startup-timeout-secs"),
                h.startup_timeout,
                Duration::from_secs(600),
            ),
            startup_check_interval: self.duration(
                "health.startup_check_interval",
                secs(f.worker_startup_check_interval, "--worker-startup-check-interval"),
                h.startup_check_interval,
                Duration::from_secs(2),
            ),
        }
    }

    pub(super) fn breaker(&mut self, b: raw::RawBreaker, f: &Flags) -> BreakerConfig {
        let failures = layered(
            f.cb_failure_threshold,
            "--cb-failure-threshold",
            b.failure_threshold.as_ref(),
            5,
        );
        let successes = layered(
            f.cb_success_threshold,
            "--cb-success-threshold",
            b.success_threshold.as_ref(),
            2,
        );
        BreakerConfig {
            enabled: !f.disable_circuit_breaker && b.enabled.unwrap_or(true),
            failure_threshold: self.count("circuit_breaker.failure_threshold", failures, 5),
            success_threshold: self.count("circuit_breaker.success_threshold", successes, 2),
            timeout: self.duration(
                "circuit_breaker.timeout",
                secs(f.cb_timeout_duration_secs, "--cb-timeout-duration-secs"),
                b.timeout,
                Duration::from_secs(30),
            ),
            window: self.duration(
                "circuit_breaker.window",
                secs(f.cb_window_duration_secs, "--cb-window-duration-secs"),
                b.window,
                Duration::from_secs(60),
            ),
        }
    }

    pub(super) fn retry(&mut self, r: raw::RawRetry, f: &Flags) -> RetryConfig {
        let initial_backoff = self.duration(
            "retry.initial_backoff",
            millis(f.retry_initial_backoff_ms, "--retry-initial-backoff-ms"),
            r.initial_backoff,
            Duration::from_millis(100),
        );
        let max_backoff = self.duration(
            "retry.max_backoff",
            millis(f.retry_max_backoff_ms, "--retry-max-backoff-ms"),
            r.max_backoff,
            Duration::from_secs(10),
        );
        let multiplier = layered(
            f.retry_backoff_multiplier,
            "--retry-backoff-multiplier",
            r.backoff_multiplier.as_ref(),
            2.0,
        );
        if !(multiplier.0.is_finite() && multiplier.0 >= 1.0) {
            self.error(
                "retry.backoff_multiplier",
                &multiplier.1,
                format!("must be a number >= 1.0, got {}", multiplier.0),
            );
        }
        let jitter =
            layered(f.retry_jitter_factor, "--retry-jitter-factor", r.jitter_factor.as_ref(), 0.1);
        let jitter_factor = self.fraction("retry.jitter_factor", jitter, 0.1);
        let ratio = layered(None, "", r.budget_ratio.as_ref(), 0.2);
        let budget_ratio = self.fraction("retry.budget_ratio", ratio, 0.2);
        let min = layered(None, "", r.budget_min_per_sec.as_ref(), 10.0);
        if !(min.0.is_finite() && min.0 >= 0.0) {
            self.error(
                "retry.budget_min_per_sec",
                &min.1,
                format!("must be a number >= 0, got {}", min.0),
            );
        }
        RetryConfig {
            enabled: !f.disable_retries && r.enabled.unwrap_or(true),
            max_retries: f.retry_max_retries.or(r.max_retries).unwrap_or(3),
            migration_limit: f.migration_limit.or(r.migration_limit).unwrap_or(1),
            initial_backoff,
            max_backoff: max_backoff.max(initial_backoff),
            backoff_multiplier: multiplier.0.max(1.0),
            jitter_factor,
            budget_ratio,
            budget_min_per_sec: min.0.max(0.0),
        }
    }

    pub(super) fn metrics(&mut self, m: raw::RawMetrics, f: &Flags) -> Option<MetricsConfig> {
        let host = layered(
            f.prometheus_host.clone(),
            "--prometheus-host",
            m.host.as_ref(),
            "127.0.0.1".into(),
        );
        if host.0.trim().is_empty() {
            self.error("metrics.host", &host.1, "must not be empty".into());
        }
        let port = f.prometheus_port.or(m.port).unwrap_or(29000);
        m.enabled.unwrap_or(true).then_some(MetricsConfig { host: host.0, port })
    }

    pub(super) fn log_format(&mut self, f: &Flags) -> LogFormat {
        match f.log_format.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                let msg = format!("unknown log format {other:?}; expected text or json");
                self.error("log_format", &At::flag("--log-format"), msg);
                LogFormat::Text
            }
        }
    }
}
