//! One subscriber per (worker, dp rank): a ZMQ SUB socket on the rank's PUB endpoint, feeding
//! the index in sequence order.
//!
//! - A message whose seq follows the last one is applied.
//! - A gap is filled from the replay socket (a DEALER to the engine's ROUTER: `[empty, start
//!   seq]`, answered by `[empty, topic?, seq, payload]` per buffered batch, then seq -1). When
//!   the replay starts later than the gap (older than the engine's buffer), fails or times out,
//!   the rank's state is dropped and rebuilt from what follows: cold, never wrong.
//! - A seq at or below the last one, outside a replay's overlap, means the publisher restarted:
//!   the rank's state is dropped.
//! - A message that does not decode is counted and dropped.
//! - A fresh subscriber asks the replay socket for everything buffered as soon as it is
//!   connected (a replica that starts late knows idle workers' caches at once).
//! - A lost connection is reconnected with backoff (100 ms doubling to 5 s); routing never
//!   waits on any of this.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SocketSend};

use super::wire::{self, Message};
use super::KvState;

/// How long a connect or a replay may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REPLAY_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Target {
    pub base: String,
    pub rank: u16,
    pub endpoint: String,
    pub replay: Option<String>,
    pub topic: String,
}

/// Runs until `cancel`.
pub async fn run(kv: Arc<KvState>, t: Target, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut seq = Seq::default();
    loop {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&t.endpoint, &t.topic)) => match r {
                Ok(Ok(s)) => Some(s),
                Ok(Err(e)) => { note_error(&kv, &t, format!("connect {}: {e}", t.endpoint)); None }
                Err(_) => { note_error(&kv, &t, format!("connect {}: timed out", t.endpoint)); None }
            },
        };
        if let Some(mut sub) = connected {
            backoff = Duration::from_millis(100);
            kv.update_rank(&t.base, t.rank, |r| {
                r.connected = true;
                r.last_error = None;
            });
            tracing::info!(worker = %t.base, rank = t.rank, endpoint = %t.endpoint, "kv events: subscribed");
            if seq.last.is_none() {
                catch_up(&kv, &t, &mut seq, &cancel).await;
            }
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return,
                    m = sub.recv() => m,
                };
                match msg {
                    Ok(m) => match wire::message(frames(m)) {
                        Ok(m) => on_message(&kv, &t, &mut seq, m, &cancel).await,
                        Err(e) => malformed(&kv, &t, e),
                    },
                    Err(e) => {
                        note_error(&kv, &t, format!("receive: {e}"));
                        break;
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

/// A SUB socket on `endpoint`, subscribed to `topic` (the load subscribers' too).
pub(super) async fn connect(endpoint: &str, topic: &str) -> zeromq::ZmqResult<zeromq::SubSocket> {
    let mut sub = zeromq::SubSocket::new();
    sub.connect(endpoint).await?;
    sub.subscribe(topic).await?;
    Ok(sub)
}

pub(super) fn frames(m: zeromq::ZmqMessage) -> Vec<Vec<u8>> {
    m.into_vec().into_iter().map(|b| b.to_vec()).collect()
}

fn note_error(kv: &KvState, t: &Target, e: String) {
    tracing::debug!(worker = %t.base, rank = t.rank, error = %e, "kv events");
    kv.update_rank(&t.base, t.rank, |r| {
        r.connected = false;
        r.last_error = Some(e);
    });
}

fn malformed(kv: &KvState, t: &Target, e: wire::WireError) {
    kv.malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(worker = %t.base, rank = t.rank, error = %e, "kv events: malformed message dropped");
    kv.update_rank(&t.base, t.rank, |r| r.malformed += 1);
}

/// The sequence state of one rank.
#[derive(Debug, Default)]
pub struct Seq {
    /// The last seq applied.
    last: Option<i64>,
    /// After a replay, live messages in this range were applied already (the window closes
    /// at the first live message after it).
    replayed: Option<(i64, i64)>,
}

/// What to do with a live message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Apply,
    /// Applied already (a replay covered it).
    Duplicate,
    /// Messages are missing: replay from this seq.
    Replay(i64),
    /// The publisher restarted: drop the rank's state, then replay from 0 (what the new
    /// publisher sent before this message).
    Restarted,
}

impl Seq {
    pub fn step(&self, seq: i64) -> Step {
        match self.last {
            // First message: whatever the engine buffered before it is worth replaying.
            None if seq > 0 => Step::Replay(0),
            None => Step::Apply,
            Some(last) if seq == last + 1 => Step::Apply,
            Some(last) if seq > last => Step::Replay(last + 1),
            Some(_) if self.replayed.is_some_and(|(a, b)| (a..=b).contains(&seq)) => {
                Step::Duplicate
            }
            Some(_) => Step::Restarted,
        }
    }
}

async fn on_message(
    kv: &KvState,
    t: &Target,
    seq: &mut Seq,
    m: Message,
    cancel: &CancellationToken,
) {
    if !m.topic.starts_with(t.topic.as_bytes()) {
        return;
    }
    match seq.step(m.seq) {
        Step::Apply => {
            seq.replayed = None;
            apply(kv, t, seq, &m)
        }
        Step::Duplicate => {}
        Step::Restarted => {
            tracing::info!(worker = %t.base, rank = t.rank, seq = m.seq, "kv events: publisher restarted; state dropped");
            kv.reset_rank(&t.base, t.rank);
            *seq = Seq::default();
            if m.seq == 0 {
                apply(kv, t, seq, &m);
            } else {
                fill(kv, t, seq, 0, &m, cancel).await;
            }
        }
        Step::Replay(from) => fill(kv, t, seq, from, &m, cancel).await,
    }
    kv.update_rank(&t.base, t.rank, |r| r.last_seq = seq.last);
}

fn apply(kv: &KvState, t: &Target, seq: &mut Seq, m: &Message) {
    match wire::decode(&m.payload) {
        Ok(b) => kv.apply(&t.base, t.rank, b.events),
        Err(e) => malformed(kv, t, e),
    }
    seq.last = Some(m.seq);
}

/// A subscriber that has applied nothing yet asks for everything the engine buffered as soon
/// as it is connected, not at the first live message: a new router replica knows what an idle
/// worker's cache holds from its first second. Live messages the replay covered are then
/// duplicates; a failed replay leaves the rank to the first live message, as before.
async fn catch_up(kv: &KvState, t: &Target, seq: &mut Seq, cancel: &CancellationToken) {
    let Some(ep) = &t.replay else { return };
    let batches = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(REPLAY_TIMEOUT, replay(ep, 0)) => match r {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return tracing::debug!(worker = %t.base, rank = t.rank, error = %e, "kv events: no catch-up replay"),
            Err(_) => return tracing::debug!(worker = %t.base, rank = t.rank, "kv events: catch-up replay timed out"),
        },
    };
    for b in &batches {
        if seq.last.is_none_or(|l| b.seq > l) {
            apply(kv, t, seq, b);
        }
    }
    if let (Some(first), Some(last)) = (batches.first(), seq.last) {
        seq.replayed = Some((first.seq, last));
    }
    kv.replays.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    kv.update_rank(&t.base, t.rank, |r| {
        r.replays += 1;
        r.last_seq = seq.last;
    });
}

/// Fills the gap before `live` from the replay socket, or drops the rank's state when it
/// cannot be filled; `live` is applied either way.
async fn fill(
    kv: &KvState,
    t: &Target,
    seq: &mut Seq,
    from: i64,
    live: &Message,
    cancel: &CancellationToken,
) {
    let had_state = seq.last.is_some();
    let replayed = match &t.replay {
        None => Err("no replay endpoint".to_owned()),
        Some(ep) => tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(REPLAY_TIMEOUT, replay(ep, from)) => {
                r.unwrap_or_else(|_| Err("replay timed out".to_owned()))
            }
        },
    };
    let unfilled = match replayed {
        // The replay covers the gap when it starts where asked (a fresh subscriber takes
        // whatever the buffer still holds: it has nothing to be wrong about).
        Ok(batches) if batches.first().is_some_and(|b| b.seq == from || !had_state) => {
            for b in &batches {
                if seq.last.is_none_or(|l| b.seq > l) {
                    apply(kv, t, seq, b);
                }
            }
            seq.replayed = Some((from, seq.last.unwrap_or(from)));
            if seq.last.is_none_or(|l| live.seq > l) {
                if seq.last.is_some_and(|l| live.seq != l + 1) {
                    // Still a hole between the replay's end and the live message.
                    kv.reset_rank(&t.base, t.rank);
                }
                apply(kv, t, seq, live);
            }
            None
        }
        Ok(batches) => Some(format!(
            "older than the engine's buffer (its first buffered seq is {:?})",
            batches.first().map(|b| b.seq)
        )),
        Err(e) => Some(e),
    };
    if let Some(why) = unfilled {
        tracing::info!(worker = %t.base, rank = t.rank, from, why = %why, "kv events: gap not filled; state dropped");
        if had_state {
            kv.reset_rank(&t.base, t.rank);
        }
        apply(kv, t, seq, live);
    }
    // Counted once what the replay brought is applied.
    kv.replays.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    kv.update_rank(&t.base, t.rank, |r| r.replays += 1);
}

/// Asks the engine's replay socket for every buffered batch from `from` on.
async fn replay(endpoint: &str, from: i64) -> Result<Vec<Message>, String> {
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(endpoint).await.map_err(|e| format!("connect {endpoint}: {e}"))?;
    let mut req = zeromq::ZmqMessage::from(bytes::Bytes::new());
    req.push_back(bytes::Bytes::copy_from_slice(&from.to_be_bytes()));
    dealer.send(req).await.map_err(|e| format!("send to {endpoint}: {e}"))?;
    let mut out = Vec::new();
    loop {
        let m = dealer.recv().await.map_err(|e| format!("receive from {endpoint}: {e}"))?;
        let mut frames = frames(m);
        if frames.first().is_some_and(|f| f.is_empty()) {
            frames.remove(0);
        }
        let m = wire::message(frames).map_err(|e| format!("replay from {endpoint}: {e}"))?;
        if m.seq < 0 {
            return Ok(out);
        }
        if out.len() >= wire::MAX_EVENTS {
            return Err(format!("replay from {endpoint}: more than {} batches", wire::MAX_EVENTS));
        }
        out.push(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Feed;

    async fn send(p: &mut zeromq::PubSocket, seq: i64, hashes: &[i64]) {
        let mut e = wire::Encoder::new();
        e.stored(hashes, None, &[1, 2, 3, 4], 4);
        let mut m = zeromq::ZmqMessage::from(bytes::Bytes::new());
        m.push_back(bytes::Bytes::copy_from_slice(&seq.to_be_bytes()));
        m.push_back(bytes::Bytes::from(e.finish(0.0, None)));
        p.send(m).await.unwrap();
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// The pure-Rust zeromq crate's SUB socket across a publisher restart on the same port
    /// (an engine restarted): the subscriber sees the new publisher's seq start again, drops
    /// the old state and follows the new one.
    #[tokio::test]
    async fn a_publisher_restarted_on_the_same_port_is_followed() {
        let kv = Arc::new(KvState::default());
        let mut publ = zeromq::PubSocket::new();
        let bound = publ.bind("tcp://127.0.0.1:0").await.unwrap();
        let endpoint = bound.to_string();
        let base = "http://w:1";
        let feed = Feed {
            load: Vec::new(),
            capacity: None,
            endpoints: vec![endpoint.clone()],
            replay: vec![None],
            topic: String::new(),
            block_size: Some(4),
        };
        kv.track(base, &feed);
        let cancel = CancellationToken::new();
        let target = Target {
            base: base.into(),
            rank: 0,
            endpoint: endpoint.clone(),
            replay: None,
            topic: String::new(),
        };
        let task = tokio::spawn(run(kv.clone(), target, cancel.clone()));
        let blocks = || kv.worker_blocks(base).map_or(0, |r| r.blocks);
        until("connected", || kv.worker_blocks(base).is_some()).await;
        // A subscription reaches the publisher just after the connection: send until seen.
        for _ in 0..100 {
            send(&mut publ, 0, &[1, 2]).await;
            if blocks() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        send(&mut publ, 1, &[3]).await;
        until("the first publisher's blocks", || blocks() == 3).await;
        drop(publ);
        let mut again = zeromq::PubSocket::new();
        let mut rebound = false;
        for _ in 0..100 {
            if again.bind(&endpoint).await.is_ok() {
                rebound = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(rebound, "the port could not be bound again");
        for _ in 0..250 {
            send(&mut again, 0, &[9]).await;
            if blocks() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(blocks(), 1, "only the new publisher's block: {}", kv.status());
        assert!(kv.resets.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn sequence_steps() {
        let mut s = Seq::default();
        assert_eq!(s.step(0), Step::Apply);
        assert_eq!(s.step(5), Step::Replay(0), "a late joiner asks for what is buffered");
        s.last = Some(4);
        assert_eq!(s.step(5), Step::Apply);
        assert_eq!(s.step(9), Step::Replay(5));
        assert_eq!(s.step(3), Step::Restarted);
        s.replayed = Some((2, 4));
        assert_eq!(s.step(3), Step::Duplicate, "a live message the replay covered");
        assert_eq!(s.step(0), Step::Restarted, "below the replay's window");
    }
}
