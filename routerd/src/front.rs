//! The front door: every client connection of the main listener is served here. Each request is
//! read through the client session, admitted (API/admin key or loopback, CORS preflight, JSON
//! content type, body limit) and then either proxied (the inference routes, `proxy::forward`) or
//! handed to the axum router (everything else), whose answer is written back through the same
//! session. Cross-cutting rules live here once, for both paths.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::error::RouterError;
use crate::http1::head::Head;
use crate::http1::{cors, respond, BodyError, ClientSession, HeadLimits};
use crate::proxy::{self, Route};
use crate::tls::Conn;

/// Bodies of refused requests up to this size are read and dropped so the connection can
/// serve the next request; larger ones close it.
const DISCARD_LIMIT: usize = 64 * 1024;

fn inference_route(path: &str) -> Option<Route> {
    match path {
        "/generate" => Some(Route::Generate),
        "/v1/completions" => Some(Route::Completions),
        "/v1/chat/completions" => Some(Route::Chat),
        "/v1/embeddings" => Some(Route::Embeddings),
        _ => None,
    }
}

/// Serves one client connection until it closes, fails, or `drain` finds it idle.
pub async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Arc<App>,
    router: Router,
    drain: CancellationToken,
) {
    let stream = match &app.server_tls {
        None => Conn::Plain(stream),
        Some(tls) => {
            let timeout = app.live().config.server.header_read_timeout;
            match tokio::time::timeout(timeout, tls_handshake(stream, tls, peer)).await {
                Ok(Some(conn)) => conn,
                _ => return,
            }
        }
    };
    let mut c = ClientSession::new(stream, peer);
    let mut first = true;
    // Loaded once per request, after its head: the wait for the next head uses the limits
    // of the configuration the previous request saw.
    let mut live = app.live();
    loop {
        let limits = HeadLimits {
            head: live.config.server.header_read_timeout,
            idle: live.config.server.keep_alive_timeout,
            first: std::mem::take(&mut first),
        };
        let mut head = match c.read_head(&drain, limits).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                // A head that cannot be trusted: answer and close, whatever follows.
                let err = RouterError::Protocol(e.status, e.message);
                let v = axum::http::Version::HTTP_11;
                respond::write(&mut c, err.into_response(), v, false, false).await;
                return c.close_lingering().await;
            }
        };
        live = app.live();
        let read_timeout = live.config.server.header_read_timeout;
        let route = inference_route(head.path());
        if let Err(e) = admit(&live.config, &c, &head, route.is_some()) {
            // Refused before the body is read: a small one is skipped so the connection
            // can go on; a large one (or a broken one) is not worth reading.
            let keep = head.keep_alive
                && !drain.is_cancelled()
                && c.read_body(&head, DISCARD_LIMIT, read_timeout).await.is_ok();
            if !respond::write(&mut c, e.into_response(), head.version, keep, false).await {
                return c.close_lingering().await;
            }
            continue;
        }
        if live.config.security.api_key.is_some() {
            // The client's key is the router's: it is not passed on to workers.
            head.headers.remove(axum::http::header::AUTHORIZATION);
        }
        let limit = live.config.server.max_payload_size;
        let body = match c.read_body(&head, limit, read_timeout).await {
            Ok(body) => body,
            Err(BodyError::Closed) => return,
            Err(BodyError::Refused(e)) => {
                respond::write(&mut c, e.into_response(), head.version, false, false).await;
                return c.close_lingering().await;
            }
        };
        let keep = head.keep_alive && !drain.is_cancelled();
        c.set_cors_origin(cors::allowed(&live.config.server.cors_allowed_origins, &head.headers));
        if c.cors_origin().is_some() && cors::is_preflight(&head) {
            let keep = cors::preflight(&mut c, &head, keep);
            if !c.flush(Instant::now() + Duration::from_secs(60)).await || !keep {
                return;
            }
            continue;
        }
        let keep = match route {
            Some(route) if head.method == Method::POST => {
                proxy::forward(&app, &live, &mut c, route, &head, body, keep).await
            }
            Some(_) => {
                let e = RouterError::MethodNotAllowed(head.path().to_owned());
                respond::write(&mut c, e.into_response(), head.version, keep, false).await
            }
            None => fallback(&mut c, &router, head, body, keep).await,
        };
        if !keep {
            return;
        }
    }
}

/// The TLS handshake of a client of the HTTPS listener. A client speaking plain HTTP to it
/// gets a 400 that says so (as nginx answers), not a silent close.
async fn tls_handshake(
    stream: TcpStream,
    tls: &crate::tls::ServerTls,
    peer: SocketAddr,
) -> Option<Conn> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0] != 0x16 => {
            // Not a TLS handshake record: plain HTTP, most likely.
            let e = RouterError::Protocol(
                StatusCode::BAD_REQUEST,
                "this port serves HTTPS; the request was sent as plain HTTP".into(),
            );
            let mut c = ClientSession::new(Conn::Plain(stream), peer);
            respond::write(&mut c, e.into_response(), axum::http::Version::HTTP_11, false, false)
                .await;
            c.close_lingering().await;
            return None;
        }
        Ok(1) => {}
        _ => return None,
    }
    match tls.accept(stream).await {
        Ok(conn) => Some(conn),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS handshake with a client failed");
            None
        }
    }
}

/// Whether a request may be served at all, judged on its head: the API or admin key (or a
/// loopback peer) its route needs (docs/security.md), and a JSON content type on inference
/// routes. CORS preflights carry no credentials and are answered by the CORS rules.
fn admit(
    config: &crate::config::Config,
    c: &ClientSession,
    head: &Head,
    inference: bool,
) -> Result<(), RouterError> {
    if cors::is_preflight(head) {
        return Ok(());
    }
    crate::security::authorize(
        &config.security,
        &head.method,
        head.path(),
        &head.headers,
        c.peer(),
    )?;
    if inference && head.method == Method::POST {
        if let Some(ct) = head.headers.get(axum::http::header::CONTENT_TYPE) {
            if !is_json(ct.as_bytes()) {
                return Err(RouterError::UnsupportedMediaType(format!(
                    "the body must be JSON (Content-Type: application/json), not {:?}",
                    String::from_utf8_lossy(ct.as_bytes())
                )));
            }
        }
    }
    Ok(())
}

/// `application/json` or `application/<anything>+json`, parameters allowed.
fn is_json(content_type: &[u8]) -> bool {
    let essence = content_type.split(|b| *b == b';').next().unwrap_or(b"").trim_ascii();
    let Ok(essence) = std::str::from_utf8(essence) else { return false };
    let essence = essence.to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Any route but the inference ones: the axum router answers, the response is written here.
async fn fallback(
    c: &mut ClientSession,
    router: &Router,
    head: Head,
    body: Bytes,
    keep: bool,
) -> bool {
    let version = head.version;
    let head_only = head.method == Method::HEAD;
    let Ok(uri) = head.target.parse::<axum::http::Uri>() else {
        let e = RouterError::Protocol(StatusCode::BAD_REQUEST, "invalid request target".into());
        return respond::write(c, e.into_response(), version, false, false).await;
    };
    let mut req = Request::new(axum::body::Body::from(body));
    *req.method_mut() = head.method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = head.headers;
    req.extensions_mut().insert(ConnectInfo(c.peer()));
    let resp = {
        use tower_service::Service;
        let mut router = router.clone();
        router.call(req).await.unwrap_or_else(|e| match e {})
    };
    respond::write(c, resp, version, keep, head_only).await
}
