//! The accept loop every HTTP listener of the project runs on: one task per connection, all of
//! them tracked, so a drain lets in-flight requests and streams finish within a grace period,
//! and an abort drops every connection at once (what a crashing process looks like to peers).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::tls::Conn;

/// How a server stops: `drain` stops accepting and lets open requests finish for up to
/// `grace`; `abort` drops every connection immediately.
#[derive(Clone, Debug)]
pub struct Stop {
    pub drain: CancellationToken,
    pub abort: CancellationToken,
    pub grace: Duration,
}

impl Stop {
    pub fn new(grace: Duration) -> Self {
        Self { drain: CancellationToken::new(), abort: CancellationToken::new(), grace }
    }
}

/// How `serve` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every connection finished within the grace period.
    Drained,
    /// The grace period ran out; the remaining connections were dropped.
    GraceExpired,
    /// `abort` was cancelled.
    Aborted,
}

/// Serves `app` on `listener` with hyper until `stop` says otherwise. Handlers can extract
/// `ConnectInfo<SocketAddr>` for the peer address.
pub async fn serve(listener: TcpListener, app: Router, stop: Stop) -> Ended {
    accept_loop(listener, stop, move |stream, peer, drain| {
        connection(Conn::Plain(stream), peer, app.clone(), drain)
    })
    .await
}

/// Serves `app` like `serve`, over TLS: each connection's handshake first (within 10 s).
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    stop: Stop,
    tls: Arc<crate::tls::ServerTls>,
) -> Ended {
    accept_loop(listener, stop, move |stream, peer, drain| {
        let (app, tls) = (app.clone(), tls.clone());
        async move {
            match tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await {
                Ok(Ok(conn)) => connection(conn, peer, app, drain).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    })
    .await
}

/// Serves routerd's own routes: inference on its HTTP/1 fast path, the rest through `router`.
pub async fn serve_router(
    listener: TcpListener,
    app: Arc<App>,
    router: Router,
    stop: Stop,
) -> Ended {
    accept_loop(listener, stop, move |stream, peer, drain| {
        crate::front::connection(stream, peer, app.clone(), router.clone(), drain)
    })
    .await
}

/// Accepts connections and runs `conn` for each, tracked, until `stop`.
async fn accept_loop<F, Fut>(listener: TcpListener, stop: Stop, conn: F) -> Ended
where
    F: Fn(TcpStream, SocketAddr, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.abort.cancelled() => {
                conns.abort_all();
                return Ended::Aborted;
            }
            _ = stop.drain.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(conn(stream, peer, stop.drain.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let drained = async { while conns.join_next().await.is_some() {} };
    tokio::select! {
        _ = drained => Ended::Drained,
        _ = tokio::time::sleep(stop.grace) => {
            conns.abort_all();
            Ended::GraceExpired
        }
        _ = stop.abort.cancelled() => {
            conns.abort_all();
            Ended::Aborted
        }
    }
}

async fn connection(stream: Conn, peer: SocketAddr, app: Router, drain: CancellationToken) {
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move {
            use tower_service::Service;
            Ok::<_, Infallible>(app.call(req).await.unwrap_or_else(|e: Infallible| match e {}))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = drain.cancelled() => {}
    }
    // Finish the request in flight (streams included), then close instead of keeping alive.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}
