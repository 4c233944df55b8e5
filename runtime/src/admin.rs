//! The admin server both binaries run (sidecar 15020, control plane 15014),
//! plain HTTP/1.1 for kubelet and Prometheus.
//!
//! What a connection is served depends on the address the client dialled
//! ([`Scope`]). On loopback (from inside the pod, or `kubectl port-forward`,
//! which dials the pod's loopback) everything: `/metrics`, `/ready`, `/live`,
//! `/config` and the binary's own routes ([`AdminState::routes`]). On any
//! other address (the pod's, reachable from the whole pod network) only
//! `/metrics`, `/ready`, `/live` and the binary's own routes; `/config`
//! answers `404` there, like a path that does not exist. The dialled address
//! is the socket's local address, which the client cannot choose beyond
//! picking one of the host's; its source address decides nothing.
//!
//! The server is bounded like the others ([`AdminLimits`]): a slot is taken
//! before each `accept`, so connections beyond the limit wait in the
//! kernel's backlog rather than in memory; a client has a few seconds to
//! send each request head, and no connection outlives its maximum age.
//! Nothing here is counted by path or method, so no label grows with what a
//! client sends.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinSet,
};
use tracing::{Instrument, debug, info_span, warn};

/// Connections served at once, all addresses together. Kubelet opens one per
/// probe and Prometheus keeps one or two; 64 leaves room for a burst of
/// probes while keeping what one client can hold small.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client has to send a whole request head, counted from the
/// connection's start and again after each response: a silent or trickling
/// client, and an idle keep-alive connection, hold a slot only this long.
/// Kubelet and Prometheus send theirs in one packet.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection this old is asked to close after its current response
/// (keep-alive clients reconnect), and cut [`DRAIN`] later: a client that
/// never reads its response holds a slot no longer than this. Longer than
/// any probe timeout kubelet would be configured with.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// On shutdown, and past [`MAX_CONNECTION_AGE`], an open connection has this
/// long to finish its response.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Largest request head (request line and headers) read, in bytes; a larger
/// one is answered `431`. Keeps each connection's read buffer small (hyper's
/// default is about 400 KiB).
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Whether the process is ready for traffic; asked on every `/ready`.
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The running configuration as JSON, served on loopback only.
    pub config: Arc<serde_json::Value>,
    /// Routes of the binary's own, served beside these on every address:
    /// they must reveal nothing that `/config` would not.
    pub routes: Router,
    /// Bounds of the server.
    pub limits: AdminLimits,
}

/// Bounds of the admin server; [`Default`] gives the constants above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections served at once; the next `accept` waits for a slot.
    pub max_connections: usize,
    /// Time allowed for each request head.
    pub header_read_timeout: Duration,
    /// Age at which a connection is asked to close.
    pub max_connection_age: Duration,
    /// Time a connection asked to close has to finish.
    pub drain: Duration,
}

/// Which endpoints a connection is served: decided by the address the client
/// dialled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Dialled on loopback: from inside the pod. Everything.
    Loopback,
    /// Dialled on any other address: from the network. Health, metrics and
    /// the binary's own routes only.
    Network,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A readiness flag for [`AdminState::ready`].
pub fn flag(ready: &Arc<AtomicBool>) -> Arc<dyn Fn() -> bool + Send + Sync> {
    let ready = ready.clone();
    Arc::new(move || ready.load(Ordering::Acquire))
}

// === impl AdminLimits ===

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connection_age: MAX_CONNECTION_AGE,
            drain: DRAIN,
        }
    }
}

// === impl Scope ===

impl Scope {
    /// The scope of a connection whose local address is `local`. An
    /// IPv4-mapped IPv6 loopback address (`::ffff:127.0.0.1`, what a
    /// dual-stack socket sees) is loopback too.
    pub fn of(local: SocketAddr) -> Self {
        let loopback = match local.ip() {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        };
        if loopback {
            Self::Loopback
        } else {
            Self::Network
        }
    }
}

/// The routes served to a connection of `scope`.
pub fn router(state: &AdminState, scope: Scope) -> Router {
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/live", get(|| async { "live\n" }));
    if scope == Scope::Loopback {
        app = app.route("/config", get(config));
    }
    app.with_state(state.clone()).merge(state.routes.clone())
}

/// Serves the admin endpoints on `listener` until `shutdown`, then gives
/// open connections [`AdminLimits::drain`] to finish.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let limits = state.limits;
    let loopback = router(&state, Scope::Loopback);
    let network = router(&state, Scope::Network);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(%error, "the admin server failed to accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        // Without a local address, serve the least.
        let scope = tcp.local_addr().map_or(Scope::Network, Scope::of);
        let app = match scope {
            Scope::Loopback => loopback.clone(),
            Scope::Network => network.clone(),
        };
        let span = info_span!("admin", %peer, ?scope);
        connections.spawn(connection(tcp, app, limits, stopped.clone(), slot).instrument(span));
    }
    drop(listener);
    let _ = stop.send(true);
    // Each connection ends within `drain` of the signal.
    while connections.join_next().await.is_some() {}
}

/// Serves one connection; `_slot` is released when it ends.
async fn connection(
    tcp: TcpStream,
    app: Router,
    limits: AdminLimits,
    mut stopped: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app));
    tokio::pin!(conn);
    let ended = tokio::select! {
        result = conn.as_mut() => Some(result),
        () = tokio::time::sleep(limits.max_connection_age) => None,
        _ = stopped.wait_for(|stopped| *stopped) => None,
    };
    let result = match ended {
        Some(result) => result,
        None => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.drain, conn).await {
                Ok(result) => result,
                Err(_) => {
                    debug!("closed an admin connection that did not finish in time");
                    return;
                }
            }
        }
    };
    if let Err(error) = result {
        // A header timeout lands here too.
        debug!(%error, "admin connection ended with an error");
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if (state.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn config(State(state): State<AdminState>) -> axum::Json<serde_json::Value> {
    axum::Json((*state.config).clone())
}

#[cfg(test)]
mod tests;
