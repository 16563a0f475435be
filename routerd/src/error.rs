//! The router's errors. Each knows its HTTP status, whose fault it is and whether another
//! worker could succeed where this one failed; one `IntoResponse` turns any of them into
//! `{"error": {"message", "type", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Router,
    Worker,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid request body: {0}")]
    BadRequest(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed on {0}")]
    MethodNotAllowed(String),
    #[error("No available workers (all circuits open or unhealthy)")]
    NoWorkers,
    #[error("No available {0} workers (all circuits open or unhealthy)")]
    NoPoolWorkers(&'static str),
    #[error("too many requests: the admission queue is full")]
    QueueFull,
    #[error("timed out waiting for an admission slot")]
    QueueTimeout,
    #[error("the router is shutting down")]
    ShuttingDown,
    #[error("worker {worker} failed: {reason}")]
    WorkerFailed { worker: String, reason: String },
    #[error("worker {worker} did not answer within {}", humantime::format_duration(*after))]
    WorkerTimeout { worker: String, after: std::time::Duration },
    #[error("{1}")]
    Protocol(StatusCode, String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    UnknownWorker(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
}

impl RouterError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound(_) | Self::UnknownWorker(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::NoWorkers | Self::NoPoolWorkers(_) | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            // As sgl-router answers a request that waited too long for an admission slot.
            Self::QueueTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            Self::WorkerFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::WorkerTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Protocol(status, _) => *status,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            Self::BadRequest(_)
            | Self::PayloadTooLarge(_)
            | Self::NotFound(_)
            | Self::MethodNotAllowed(_)
            | Self::Conflict(_)
            | Self::Protocol(..)
            | Self::UnknownWorker(_)
            | Self::Unauthorized(_)
            | Self::Forbidden(_)
            | Self::UnsupportedMediaType(_) => Fault::Client,
            Self::NoWorkers
            | Self::NoPoolWorkers(_)
            | Self::QueueFull
            | Self::QueueTimeout
            | Self::ShuttingDown => Fault::Router,
            Self::WorkerFailed { .. } | Self::WorkerTimeout { .. } => Fault::Worker,
        }
    }

    /// Whether the same request could succeed on another worker.
    pub fn retryable(&self) -> bool {
        self.fault() == Fault::Worker
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "invalid_request_error",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::NoWorkers | Self::NoPoolWorkers(_) => "no_available_workers",
            Self::QueueFull => "rate_limited",
            Self::QueueTimeout => "queue_timeout",
            Self::ShuttingDown => "shutting_down",
            Self::WorkerFailed { .. } => "worker_error",
            Self::WorkerTimeout { .. } => "worker_timeout",
            Self::Conflict(_) => "conflict",
            Self::Protocol(..) => "invalid_http_request",
            Self::UnknownWorker(_) => "unknown_worker",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
        }
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match self {
            // sgl-router 0.3's exact body, which scripts and alerts match on.
            Self::NoWorkers | Self::NoPoolWorkers(_) => json!({"error": {
                "message": self.to_string(), "type": "Service Unavailable", "code": self.kind()}}),
            _ => {
                json!({"error": {"message": self.to_string(), "type": self.kind(), "code": status.as_u16()}})
            }
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
