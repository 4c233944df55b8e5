//! The webhook's HTTPS server: `POST /inject` on 15017.
//!
//! It shares the control plane's self-issued serving certificate (the
//! Service's DNS names are among `--server-name`), so the API server verifies
//! it with the trust bundle the control plane writes into the webhook's
//! `caBundle`, and the accept loop of [`crate::tls`]: handshakes and open
//! connections are bounded in time and number; on shutdown, in-flight
//! reviews finish.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::IntoResponse,
    routing::post,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::{Entry, Injector};
use crate::tls::{AcceptLimits, Established, Incoming};

/// The API server sends objects of at most 3 MiB; leave room for the envelope.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// Limits of the webhook server.
#[derive(Clone, Copy, Debug)]
pub struct WebhookLimits {
    /// A TLS handshake is abandoned after this long.
    pub handshake_timeout: Duration,
    /// At most this many connections at once; further ones wait in the backlog.
    pub max_connections: usize,
    /// On shutdown, open connections get this long to finish.
    pub drain: Duration,
}

/// ALPN of the webhook: h2 and http/1.1 (the API server uses either).
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The routes: `POST /inject` and `POST /enforce` ([`Entry`]).
pub fn router(injector: Arc<Injector>) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .route("/enforce", post(enforce))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(injector)
}

async fn inject(State(injector): State<Arc<Injector>>, body: Bytes) -> impl IntoResponse {
    answer(&injector, Entry::Inject, &body)
}

async fn enforce(State(injector): State<Arc<Injector>>, body: Bytes) -> impl IntoResponse {
    answer(&injector, Entry::Enforce, &body)
}

fn answer(injector: &Injector, entry: Entry, body: &[u8]) -> impl IntoResponse + use<> {
    let reply = injector.review_at(entry, body);
    let status = StatusCode::from_u16(reply.status.as_u16()).unwrap_or(StatusCode::OK);
    (status, Json(reply.body()))
}

/// Serves the webhook on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    injector: Arc<Injector>,
    limits: WebhookLimits,
    shutdown: impl Future<Output = ()>,
) {
    let service = router(injector);
    let accept = AcceptLimits {
        slots: limits.max_connections,
        handshake_timeout: limits.handshake_timeout,
    };
    let mut incoming = Incoming::start(listener, tls, accept, "webhook");
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let Established { tls, peer, slot } = tokio::select! {
            () = &mut shutdown => break,
            next = incoming.next() => match next { Some(conn) => conn, None => break },
        };
        let service = TowerToHyperService::new(service.clone());
        let watcher = graceful.watcher();
        let timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            // The slot bounds open connections: held until this one ends.
            let _slot = slot;
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // A client that never finishes its headers holds a slot only this long.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(conn.into_owned()).await {
                debug!(%peer, %error, "webhook connection ended with an error");
            }
        });
    }
    drop(incoming);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("webhook connections still open after the drain time; closing them");
    }
}
