//! Errors the simulated worker answers with, in SGLang's shape:
//! `{"object": "error", "message", "type", "param": null, "code"}`.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct SimError {
    pub status: StatusCode,
    pub message: String,
}

impl SimError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn bootstrap_timeout(room: u64, timeout: Duration) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "KVTransferError(bootstrap_room={room}): Request {room} timed out after {:.1}s in KVPoll.Bootstrapping",
                timeout.as_secs_f64()
            ),
        )
    }

    pub fn bootstrap_failed(room: u64, why: &str) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("KVTransferError(bootstrap_room={room}): {why}"),
        )
    }

    pub fn body(&self) -> serde_json::Value {
        json!({
            "object": "error",
            "message": self.message,
            "type": self.status.canonical_reason().unwrap_or("Error"),
            "param": null,
            "code": self.status.as_u16(),
        })
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
