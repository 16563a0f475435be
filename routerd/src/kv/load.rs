//! Load subscribers: one per (worker, dp rank) whose engine publishes its load (SGLang's
//! `--load-publish-endpoint`: a ZMQ PUB socket, topic `load`, frames `[topic, seq, msgpack
//! LoadStat]`). Each report (requests running + waiting) lands on the worker's
//! [`LoadReport`](crate::registry::LoadReport) with this router's in-flight count at that
//! moment, so the load policies add what other routers sent there: every replica balances on
//! the fleet's load, not only its own.
//!
//! A gauge needs no replay: a lost message is superseded by the next (SGLang re-sends an
//! unchanged one every second). A report counts for [`VALID`]; a worker whose socket goes
//! quiet falls back to `/get_load` polling (when configured) or this router's own count. A
//! dp-aware worker (`URL@rank`) takes its rank's report; a worker routed as one takes the sum
//! of its ranks'.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zeromq::SocketRecv;

use super::{subscriber, wire, KvState, LoadSeen};
use crate::registry::{split_rank, Registry, ReportSource};

/// How long a report counts: three of SGLang's one-second heartbeats.
pub const VALID: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// SGLang's load topic.
pub const TOPIC: &str = "load";

/// One worker's ranks' last reports (requests), shared by its ranks' subscribers.
pub type RankLoads = Arc<Mutex<Vec<Option<u64>>>>;

#[derive(Debug, Clone)]
pub struct Target {
    pub base: String,
    pub rank: u16,
    pub endpoint: String,
    pub ranks: RankLoads,
}

/// Runs until `cancel`.
pub async fn run(app: Arc<crate::app::App>, t: Target, cancel: CancellationToken) {
    let (kv, registry) = (&*app.kv, &app.registry);
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, subscriber::connect(&t.endpoint, TOPIC)) => match r {
                Ok(Ok(s)) => Some(s),
                Ok(Err(e)) => { note_error(kv, &t, format!("connect {}: {e}", t.endpoint)); None }
                Err(_) => { note_error(kv, &t, format!("connect {}: timed out", t.endpoint)); None }
            },
        };
        if let Some(mut sub) = connected {
            backoff = Duration::from_millis(100);
            kv.update_rank(&t.base, t.rank, |r| r.load_connected = Some(true));
            tracing::info!(worker = %t.base, rank = t.rank, endpoint = %t.endpoint, "load reports: subscribed");
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return,
                    m = sub.recv() => m,
                };
                let m = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        note_error(kv, &t, format!("receive: {e}"));
                        break;
                    }
                };
                match wire::message(subscriber::frames(m)).and_then(|m| {
                    if m.topic.starts_with(TOPIC.as_bytes()) {
                        wire::decode_load(&m.payload).map(Some)
                    } else {
                        Ok(None)
                    }
                }) {
                    Ok(Some(stat)) => on_report(kv, registry, &t, stat),
                    Ok(None) => {}
                    Err(e) => {
                        kv.malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(worker = %t.base, rank = t.rank, error = %e, "load reports: malformed message dropped");
                        kv.update_rank(&t.base, t.rank, |r| r.malformed += 1);
                    }
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn note_error(kv: &KvState, t: &Target, e: String) {
    tracing::debug!(worker = %t.base, rank = t.rank, error = %e, "load reports");
    kv.update_rank(&t.base, t.rank, |r| r.load_connected = Some(false));
}

/// Puts a rank's report on the registry's worker for it: the rank's own entry when routed
/// dp-aware, else the whole worker's, with the sum over the ranks that reported.
pub fn on_report(kv: &KvState, registry: &Registry, t: &Target, stat: wire::LoadStat) {
    let requests = stat.running + stat.waiting;
    let total: u64 = {
        let mut ranks = t.ranks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = ranks.get_mut(t.rank as usize) {
            *slot = Some(requests);
        }
        ranks.iter().flatten().sum()
    };
    for w in registry.snapshot().workers.iter() {
        let n = match split_rank(w.url()) {
            (base, Some(r)) if base == t.base && r == u32::from(t.rank) => requests,
            (base, None) if base == t.base => total,
            _ => continue,
        };
        let own = w.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        w.report.set(n, own, VALID, ReportSource::Published, &registry.share);
    }
    kv.update_rank(&t.base, t.rank, |r| {
        r.load_connected = Some(true);
        r.load_reports = Some(r.load_reports.unwrap_or(0) + 1);
        r.load = Some(LoadSeen {
            running: stat.running,
            waiting: stat.waiting,
            tokens: stat.tokens,
            max_tokens: stat.max_tokens,
        });
    });
}
