//! The simulated worker's KV-event publisher, on SGLang's wire (`--kv-events-config`): a ZMQ
//! PUB socket sending `[topic, seq (8 bytes, big-endian), msgpack batch]` for what the
//! simulated cache stored, evicted and flushed, and a ROUTER replay socket that answers
//! `[empty, start seq]` with every buffered batch from that seq on (`[empty, topic, seq,
//! payload]`) and an end marker (seq -1). Batches are cut every 5 ms, as an engine's scheduler
//! step would. `/sim/faults`' `kv_drop_next` drops the next N batches from the live stream (they
//! stay in the replay buffer), to test how a subscriber fills gaps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use routerd::kv::wire::Encoder;

use super::cache::{CacheEvent, PrefixCache};

/// SGLang's `--kv-events-config` JSON (the keys the simulator uses; others are ignored).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct KvEventsConfig {
    pub publisher: String,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    #[serde(default)]
    pub topic: String,
    #[serde(default)]
    pub replay_endpoint: Option<String>,
    #[serde(default = "default_buffer")]
    pub buffer_steps: usize,
}

fn default_endpoint() -> String {
    "tcp://*:5557".into()
}

fn default_buffer() -> usize {
    10_000
}

impl KvEventsConfig {
    pub fn parse(json: &str) -> Result<Self, String> {
        let c: Self = serde_json::from_str(json)
            .map_err(|e| format!("--kv-events-config is not SGLang's JSON: {e}"))?;
        if c.publisher != "zmq" {
            return Err(format!("--kv-events-config: publisher {:?} is not \"zmq\"", c.publisher));
        }
        for ep in std::iter::once(&c.endpoint).chain(&c.replay_endpoint) {
            if !ep.starts_with("tcp://") {
                return Err(format!("--kv-events-config: {ep:?} is not a tcp:// endpoint"));
            }
        }
        Ok(c)
    }
}

/// A running publisher: where it listens, and its counters.
#[derive(Debug)]
pub struct Publisher {
    pub port: u16,
    pub replay_port: Option<u16>,
    pub topic: String,
    pub block_size: usize,
    /// Batches published (sent or dropped), i.e. the next seq.
    pub batches: AtomicU64,
    pub replays: AtomicU64,
    /// Batches still to drop from the live stream.
    pub drop_next: AtomicU64,
}

type Buffer = Arc<Mutex<VecDeque<(i64, Bytes)>>>;

/// A live message as SGLang frames it: `[topic, seq (8 bytes, big-endian), payload]` (KV
/// events and load reports alike).
fn live_message(topic: Bytes, seq: i64, payload: Bytes) -> ZmqMessage {
    let mut m = ZmqMessage::from(topic);
    m.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
    m.push_back(payload);
    m
}

/// `*` as an address to bind: every interface.
fn bindable(ep: &str) -> String {
    ep.replace("://*:", "://0.0.0.0:")
}

fn port_of(ep: &zeromq::Endpoint) -> Option<u16> {
    match ep {
        zeromq::Endpoint::Tcp(_, port) => Some(*port),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

pub async fn start(
    cfg: &KvEventsConfig,
    cache: Arc<Mutex<PrefixCache>>,
    stop: CancellationToken,
) -> anyhow::Result<Arc<Publisher>> {
    let mut publ = zeromq::PubSocket::new();
    let bound = publ
        .bind(&bindable(&cfg.endpoint))
        .await
        .map_err(|e| anyhow::anyhow!("kv events: cannot bind {}: {e}", cfg.endpoint))?;
    let mut router = None;
    let mut replay_port = None;
    if let Some(ep) = &cfg.replay_endpoint {
        let mut r = zeromq::RouterSocket::new();
        let b = r
            .bind(&bindable(ep))
            .await
            .map_err(|e| anyhow::anyhow!("kv events: cannot bind {ep}: {e}"))?;
        replay_port = port_of(&b);
        router = Some(r);
    }
    let block_size = cache.lock().expect("cache lock").page_size();
    let p = Arc::new(Publisher {
        port: port_of(&bound).unwrap_or(0),
        replay_port,
        topic: cfg.topic.clone(),
        block_size,
        batches: AtomicU64::new(0),
        replays: AtomicU64::new(0),
        drop_next: AtomicU64::new(0),
    });
    let buffer: Buffer = Arc::new(Mutex::new(VecDeque::new()));
    tokio::spawn(publish(
        publ,
        cache,
        p.clone(),
        buffer.clone(),
        cfg.buffer_steps.max(1),
        stop.clone(),
    ));
    if let Some(r) = router {
        tokio::spawn(replay(r, p.clone(), buffer, stop));
    }
    Ok(p)
}

async fn publish(
    mut publ: zeromq::PubSocket,
    cache: Arc<Mutex<PrefixCache>>,
    p: Arc<Publisher>,
    buffer: Buffer,
    keep: usize,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut enc = Encoder::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let events = cache.lock().expect("cache lock").take_events();
        if events.is_empty() {
            continue;
        }
        for e in events {
            match e {
                CacheEvent::Stored { hashes, parent, tokens } => {
                    enc.stored(&hashes, parent, &tokens, p.block_size)
                }
                CacheEvent::Removed { hashes } => enc.removed(&hashes),
                CacheEvent::Cleared => enc.cleared(),
            }
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let payload = Bytes::from(enc.finish(ts, None));
        let seq = p.batches.fetch_add(1, Relaxed) as i64;
        {
            let mut b = buffer.lock().expect("buffer lock");
            b.push_back((seq, payload.clone()));
            while b.len() > keep {
                b.pop_front();
            }
        }
        let dropped = p.drop_next.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_ok();
        if dropped {
            continue;
        }
        let m = live_message(Bytes::from(p.topic.clone().into_bytes()), seq, payload);
        // A PUB socket with no subscriber drops the message, as ZMQ does.
        let _ = publ.send(m).await;
    }
}

async fn replay(
    mut router: zeromq::RouterSocket,
    p: Arc<Publisher>,
    buffer: Buffer,
    stop: CancellationToken,
) {
    loop {
        let req = tokio::select! {
            _ = stop.cancelled() => return,
            r = router.recv() => r,
        };
        let Ok(req) = req else { continue };
        let frames = req.into_vec();
        // [identity, empty, start seq]
        let (Some(id), Some(start)) = (frames.first(), frames.last()) else { continue };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else { continue };
        let start = i64::from_be_bytes(start);
        p.replays.fetch_add(1, Relaxed);
        let batches: Vec<(i64, Bytes)> = buffer
            .lock()
            .expect("buffer lock")
            .iter()
            .filter(|(s, _)| *s >= start)
            .cloned()
            .collect();
        for (seq, payload) in batches {
            let mut m = ZmqMessage::from(id.clone());
            m.push_back(Bytes::new());
            m.push_back(Bytes::from(p.topic.clone().into_bytes()));
            m.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
            m.push_back(payload);
            if router.send(m).await.is_err() {
                break;
            }
        }
        let mut end = ZmqMessage::from(id.clone());
        end.push_back(Bytes::new());
        end.push_back(Bytes::copy_from_slice(&(-1i64).to_be_bytes()));
        end.push_back(Bytes::new());
        let _ = router.send(end).await;
    }
}

/// Where `--load-publish-endpoint` binds (`None`: off). `auto` packs the load port after the
/// KV-event range as SGLang does (past the replay socket when it is next; port 0 when the
/// events' port is 0).
pub fn load_endpoint(spec: &str, kv: Option<&str>) -> Result<Option<String>, String> {
    let spec = spec.trim();
    if spec.is_empty() || spec.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let port = |ep: &str| ep.rsplit_once(':').and_then(|(_, p)| p.parse::<u32>().ok());
    if spec.eq_ignore_ascii_case("auto") {
        let Some(kv) = kv else { return Ok(Some("tcp://*:0".into())) };
        let c = KvEventsConfig::parse(kv)?;
        let head = c.endpoint.rsplit_once(':').map_or("tcp://*", |(h, _)| h);
        let base = match port(&c.endpoint) {
            None | Some(0) => 0,
            Some(p) => match c.replay_endpoint.as_deref().and_then(port) {
                Some(r) if r == p + 1 => r + 1,
                _ => p + 1,
            },
        };
        if base > 65535 {
            return Err(
                "--load-publish-endpoint auto: the port after the KV events' is past 65535".into(),
            );
        }
        return Ok(Some(format!("{head}:{base}")));
    }
    match port(spec) {
        Some(p) if spec.starts_with("tcp://") && p <= 65535 => Ok(Some(spec.to_owned())),
        _ => Err(format!("--load-publish-endpoint: {spec:?} is not auto, off or tcp://HOST:PORT")),
    }
}

/// A running load publisher.
#[derive(Debug)]
pub struct LoadPublisher {
    pub port: u16,
    /// Reports sent.
    pub sent: AtomicU64,
}

/// What the simulated scheduler reports: requests running and waiting, KV tokens held by
/// running requests, the KV capacity.
pub type LoadNow = Box<dyn Fn() -> routerd::kv::wire::LoadStat + Send + Sync>;

/// Publishes `now()` as SGLang's scheduler does: at once when it changed (checked every
/// 25 ms: SGLang publishes at most every 5 scheduler steps), else every second.
pub async fn start_load(
    endpoint: &str,
    now: LoadNow,
    stop: CancellationToken,
) -> anyhow::Result<Arc<LoadPublisher>> {
    let mut publ = zeromq::PubSocket::new();
    let bound = publ
        .bind(&bindable(endpoint))
        .await
        .map_err(|e| anyhow::anyhow!("load publisher: cannot bind {endpoint}: {e}"))?;
    let p = Arc::new(LoadPublisher { port: port_of(&bound).unwrap_or(0), sent: AtomicU64::new(0) });
    let pc = p.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(25));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last: Option<(routerd::kv::wire::LoadStat, tokio::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let stat = now();
            if last.is_some_and(|(s, at)| s == stat && at.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            let seq = pc.sent.fetch_add(1, Relaxed) as i64;
            let payload = Bytes::from(routerd::kv::wire::encode_load(&stat));
            let m = live_message(Bytes::from_static(b"load"), seq, payload);
            let _ = publ.send(m).await;
            last = Some((stat, tokio::time::Instant::now()));
        }
    });
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json() {
        let c = KvEventsConfig::parse(
            r#"{"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv", "replay_endpoint": "tcp://*:5558", "buffer_steps": 100}"#,
        )
        .unwrap();
        assert_eq!((c.topic.as_str(), c.buffer_steps), ("kv", 100));
        assert!(KvEventsConfig::parse(r#"{"publisher": "null"}"#).unwrap_err().contains("zmq"));
        assert!(KvEventsConfig::parse("{").unwrap_err().contains("SGLang's JSON"));
        assert_eq!(bindable("tcp://*:5557"), "tcp://0.0.0.0:5557");
    }

    #[test]
    fn load_endpoints_as_sglang_packs_them() {
        let kv = r#"{"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}"#;
        assert_eq!(load_endpoint("auto", Some(kv)).unwrap().as_deref(), Some("tcp://*:5559"));
        let kv2 = r#"{"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:6000"}"#;
        assert_eq!(load_endpoint("auto", Some(kv2)).unwrap().as_deref(), Some("tcp://*:5558"));
        let kv0 = r#"{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:0"}"#;
        assert_eq!(load_endpoint("auto", Some(kv0)).unwrap().as_deref(), Some("tcp://127.0.0.1:0"));
        assert_eq!(load_endpoint("off", Some(kv)).unwrap(), None);
        assert_eq!(load_endpoint("tcp://*:7000", None).unwrap().as_deref(), Some("tcp://*:7000"));
        assert!(load_endpoint("7000", None).unwrap_err().contains("auto, off or tcp://"));
    }
}
