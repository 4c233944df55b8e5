//! The admin server on 15014: `/metrics` (Prometheus text), `/ready`, `/live`,
//! and `/config` (the running configuration, which holds no secrets), beside
//! the routes of the binary's own ([`AdminState::routes`]).

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Whether the process is ready for traffic; asked on every `/ready`.
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The running configuration as JSON.
    pub config: Arc<serde_json::Value>,
    /// Routes of the binary's own, served beside these.
    pub routes: Router,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// A readiness flag for [`AdminState::ready`].
pub fn flag(ready: &Arc<AtomicBool>) -> Arc<dyn Fn() -> bool + Send + Sync> {
    let ready = ready.clone();
    Arc::new(move || ready.load(Ordering::Acquire))
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/live", get(|| async { "live\n" }))
        .route("/config", get(config))
        .with_state(state.clone())
        .merge(state.routes);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
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
