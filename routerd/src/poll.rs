//! Polls every worker's `/get_load` so that the load policies also see load from other
//! routers (where no load socket reports it: `kv::load`). A worker that does not answer falls
//! back to this router's own count.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::registry::{ReportSource, Worker};

fn published(w: &Worker) -> bool {
    w.report.fresh().is_some_and(|(_, _, s)| s == ReportSource::Published)
}

pub async fn poll_loads(app: Arc<App>, cancel: CancellationToken) {
    loop {
        // The interval is read each round, so a reload can turn polling on, off or change it.
        let every = app.live().config.policy.load_poll_interval;
        let pause = every.unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        let Some(every) = every else { continue };
        let workers = app.registry.snapshot().workers.clone();
        let polls = workers.iter().map(|w| async {
            match app
                .http
                .get_json(w, "/get_load", every)
                .await
                .as_ref()
                .and_then(|v| reported_requests(for_rank(v, w.dp_rank)?))
            {
                // A load socket's reports, more frequent, win over the poll's.
                _ if published(w) => {}
                Some(n) => w.report.set(
                    n,
                    w.in_flight.load(Relaxed),
                    (every * 3).max(Duration::from_secs(3)),
                    ReportSource::Polled,
                    &app.registry.share,
                ),
                None => w.report.clear(),
            }
        });
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = futures_util::future::join_all(polls) => {}
        }
    }
}

/// A DP worker may report one load per rank (a list, each with its `dp_rank`): the one of
/// `rank`. A single report stands for every rank.
fn for_rank(v: &Value, rank: Option<u32>) -> Option<&Value> {
    match (v, rank) {
        (Value::Array(items), Some(r)) => items
            .iter()
            .find(|i| i.get("dp_rank").and_then(Value::as_u64) == Some(u64::from(r)))
            .or_else(|| items.get(r as usize)),
        (Value::Array(items), None) => items.first(),
        (v, _) => Some(v),
    }
}

/// Requests running and waiting on the worker: `num_reqs + num_waiting_reqs` when reported,
/// else SGLang's `load`.
fn reported_requests(v: &Value) -> Option<u64> {
    let n = |k: &str| v.get(k).and_then(Value::as_u64);
    match (n("num_reqs"), n("num_waiting_reqs")) {
        (Some(r), w) => Some(r + w.unwrap_or(0)),
        _ => n("load"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_shapes() {
        assert_eq!(reported_requests(&serde_json::json!({"load": 7})), Some(7));
        assert_eq!(
            reported_requests(
                &serde_json::json!({"load": 900, "num_reqs": 2, "num_waiting_reqs": 3})
            ),
            Some(5)
        );
        assert_eq!(reported_requests(&serde_json::json!({"x": 1})), None);
        let per_rank = serde_json::json!([{"dp_rank": 1, "load": 5}, {"dp_rank": 0, "load": 9}]);
        assert_eq!(for_rank(&per_rank, Some(0)).and_then(reported_requests), Some(9));
        assert_eq!(for_rank(&per_rank, Some(1)).and_then(reported_requests), Some(5));
        let one = serde_json::json!({"load": 4});
        assert_eq!(for_rank(&one, Some(3)).and_then(reported_requests), Some(4));
    }
}
