//! The route table of everything that is not an inference route (those take the HTTP/1 fast
//! path in `front.rs`): health and info, sgl-router's management routes, the workers API and
//! the admin API. Handlers live with what they serve.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::app::App;
use crate::error::RouterError;
use crate::{admin, info};

/// Every route of the main listener but the inference ones.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.live().config.server.max_payload_size;
    Router::new()
        .route("/health", get(info::health))
        .route("/liveness", get(info::health))
        .route("/readiness", get(info::readiness))
        .route("/health_generate", get(info::passthrough))
        .route("/get_server_info", get(info::passthrough))
        .route("/get_model_info", get(info::passthrough))
        .route("/v1/models", get(info::passthrough))
        .route("/get_loads", get(info::get_loads))
        .route("/flush_cache", post(info::flush_cache))
        .route("/add_worker", post(admin::add_worker))
        .route("/remove_worker", post(admin::remove_worker))
        .route("/list_workers", get(admin::list_workers))
        .route("/workers", get(admin::workers).post(admin::create_worker))
        .route("/workers/{id}", get(admin::get_worker).delete(admin::delete_worker))
        .route("/admin/config", get(crate::reload::admin_config))
        .route("/admin/reload", post(crate::reload::admin_reload))
        .route("/admin/decisions", get(crate::decisions::admin_decisions))
        .route("/admin/stats", get(crate::stats::admin_stats))
        .route("/admin/discovery", get(crate::discovery::admin_discovery))
        .route("/admin/kv", get(crate::kv::admin_kv))
        .route("/admin/peers", get(crate::peers::admin_peers))
        .route("/admin/peers/routed", post(crate::peers::admin_routed))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

pub(crate) async fn not_found(uri: Uri) -> Response {
    RouterError::NotFound(uri.path().to_owned()).into_response()
}

async fn method_not_allowed(uri: Uri) -> Response {
    RouterError::MethodNotAllowed(uri.path().to_owned()).into_response()
}
