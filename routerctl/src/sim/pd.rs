//! Prefill/decode rendezvous. A prefill worker keeps the rooms of its requests and serves a
//! bootstrap route on its bootstrap port; a decode worker that receives the same
//! `bootstrap_room` long-polls that route until the prefill leg has computed the KV cache. Each
//! leg waits for the other only up to the bootstrap timeout and then fails as a real engine's
//! KV transfer does, so a router that loses one leg must cancel the other itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::error::SimError;
use super::server::SimState;

/// What the prefill leg hands to the decode leg with the KV cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Handoff {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

struct Room {
    decode_arrived: watch::Sender<bool>,
    ready: watch::Sender<Option<Handoff>>,
    created: Instant,
}

/// The rooms a prefill worker knows about.
#[derive(Default)]
pub struct Rooms {
    rooms: Mutex<HashMap<u64, Arc<Room>>>,
}

impl Rooms {
    fn get_or_create(&self, id: u64, ttl: Duration) -> Arc<Room> {
        let mut rooms = self.rooms.lock().expect("rooms lock");
        // Rooms whose legs both gave up are dropped lazily here, so the map stays bounded.
        rooms.retain(|_, r| r.created.elapsed() < ttl * 2);
        rooms
            .entry(id)
            .or_insert_with(|| {
                Arc::new(Room {
                    decode_arrived: watch::channel(false).0,
                    ready: watch::channel(None).0,
                    created: Instant::now(),
                })
            })
            .clone()
    }

    fn remove(&self, id: u64) {
        self.rooms.lock().expect("rooms lock").remove(&id);
    }

    pub fn open(&self) -> usize {
        self.rooms.lock().expect("rooms lock").len()
    }

    /// Prefill leg: wait for the decode leg to arrive in `id`.
    /// A prefill leg whose client goes away (the router cancelled it) leaves its room at once,
    /// as an engine aborting the request would.
    pub async fn await_decode(&self, id: u64, timeout: Duration) -> Result<(), SimError> {
        struct Leave<'a> {
            rooms: &'a Rooms,
            id: u64,
            armed: bool,
        }
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                if self.armed {
                    self.rooms.remove(self.id);
                }
            }
        }
        let room = self.get_or_create(id, timeout);
        let mut leave = Leave { rooms: self, id, armed: true };
        let mut rx = room.decode_arrived.subscribe();
        let arrived = matches!(tokio::time::timeout(timeout, rx.wait_for(|a| *a)).await, Ok(Ok(_)));
        if arrived {
            leave.armed = false;
            Ok(())
        } else {
            Err(SimError::bootstrap_timeout(id, timeout))
        }
    }

    /// Prefill leg: the KV cache for `id` is computed.
    pub fn mark_ready(&self, id: u64, handoff: Handoff, timeout: Duration) {
        let room = self.get_or_create(id, timeout);
        room.ready.send_replace(Some(handoff));
    }

    /// Decode leg (via the bootstrap route): announce arrival, wait for the prefill's KV.
    async fn decode_arrives(&self, id: u64, timeout: Duration) -> Option<Handoff> {
        let room = self.get_or_create(id, timeout);
        room.decode_arrived.send_replace(true);
        let mut rx = room.ready.subscribe();
        let got = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        let handoff = match got {
            Ok(Ok(h)) => h.clone(),
            _ => None,
        };
        self.remove(id);
        handoff
    }
}

#[derive(Deserialize)]
pub struct WaitQuery {
    timeout_ms: Option<u64>,
}

/// `POST /sim/bootstrap/{room}`: the decode worker's long poll on the prefill worker.
pub async fn bootstrap_route(
    State(state): State<Arc<SimState>>,
    Path(room): Path<u64>,
    Query(q): Query<WaitQuery>,
) -> Response {
    let timeout = q.timeout_ms.map(Duration::from_millis).unwrap_or(state.bootstrap_timeout());
    match state.rooms.decode_arrives(room, timeout).await {
        Some(h) => Json(h).into_response(),
        // The decode worker counts its own timeout; this worker had no request fail.
        None => SimError::bootstrap_timeout(room, timeout).into_response(),
    }
}

/// Decode leg: fetch the prefill's handoff for a room from `host:port`.
pub async fn fetch_handoff(
    client: &reqwest::Client,
    host: &str,
    port: u16,
    room: u64,
    timeout: Duration,
) -> Result<Handoff, SimError> {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let url =
        format!("http://{host}:{port}/sim/bootstrap/{room}?timeout_ms={}", timeout.as_millis());
    let resp =
        client.post(&url).timeout(timeout + Duration::from_secs(2)).send().await.map_err(|e| {
            SimError::bootstrap_failed(
                room,
                &format!("cannot reach bootstrap server {host}:{port}: {e}"),
            )
        })?;
    if !resp.status().is_success() {
        return Err(SimError::bootstrap_timeout(room, timeout));
    }
    resp.json::<Handoff>()
        .await
        .map_err(|e| SimError::bootstrap_failed(room, &format!("bad bootstrap answer: {e}")))
}
