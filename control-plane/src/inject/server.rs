//! The webhook's HTTPS server: `POST /inject` on 15017.
//!
//! It shares the control plane's self-issued serving certificate (the
//! Service's DNS names are among `--server-name`), so the API server verifies
//! it with the trust bundle the control plane writes into the webhook's
//! `caBundle`. Handshakes are bounded in time and number; on shutdown,
//! in-flight reviews finish.

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
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::Injector;
use crate::grpc::ServingCert;

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

/// TLS for the webhook: TLS 1.2 and 1.3, ALPN h2 and http/1.1 (the API
/// server uses either), no client certificate.
pub fn server_tls(cert: Arc<ServingCert>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The routes: `POST /inject`.
pub fn router(injector: Arc<Injector>) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(injector)
}

async fn inject(State(injector): State<Arc<Injector>>, body: Bytes) -> impl IntoResponse {
    let reply = injector.review(&body);
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
    let acceptor = TlsAcceptor::from(tls);
    let service = router(injector);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    warn!(%error, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(service.clone());
        let watcher = graceful.watcher();
        let timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => return debug!(%peer, %error, "webhook TLS handshake failed"),
                Err(_) => return debug!(%peer, "webhook TLS handshake timed out"),
            };
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
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("webhook connections still open after the drain time; closing them");
    }
}
