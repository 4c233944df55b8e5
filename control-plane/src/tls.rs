//! TLS for the control plane's two servers, the identity API (gRPC, 15012)
//! and the injection webhook (HTTPS, 15017): one configuration builder and
//! one accept loop, so both bound their handshakes the same way.
//!
//! The accept loop takes a slot before each `accept`, so connections beyond
//! the limit wait in the kernel's backlog rather than in memory; each TLS
//! handshake runs in its own task under a timeout, so a client that stalls
//! its handshake holds nothing but its own slot, and only for that long.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use palisade_runtime::verifier::SpiffeClientVerifier;
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::{debug, warn};

use crate::ca::serving::ServingCert;

/// A server configuration presenting the control plane's serving
/// certificate: TLS 1.3 and 1.2 (callers outside the mesh: the API server,
/// grpcurl), `alpn` in preference order. Without `clients` no client
/// certificate is asked for (the webhook's caller is the API server); with
/// it, a client may present a mesh certificate, which must then verify
/// (the gRPC port: `Certify` callers have none yet, discovery callers must).
pub fn server_config(
    cert: Arc<ServingCert>,
    alpn: &[&[u8]],
    clients: Option<Arc<SpiffeClientVerifier>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let builder = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Bounds of an accept loop.
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    /// Connections holding a slot at once; the next `accept` waits for one.
    pub slots: usize,
    /// A TLS handshake is abandoned after this long.
    pub handshake_timeout: Duration,
}

/// A connection whose TLS handshake completed, with the slot it holds.
#[derive(Debug)]
pub struct Established {
    /// The TLS stream.
    pub tls: TlsStream<TcpStream>,
    /// Who connected, for logs.
    pub peer: SocketAddr,
    /// Released when dropped: the gRPC server lets go after the handshake,
    /// the webhook at the end of the connection.
    pub slot: OwnedSemaphorePermit,
}

/// Established connections of one listener; the accept loop stops when this
/// is dropped.
#[derive(Debug)]
pub struct Incoming {
    established: mpsc::Receiver<Established>,
    accept_loop: JoinHandle<()>,
}

// === impl Incoming ===

impl Incoming {
    /// Starts accepting on `listener`; `what` names the server in logs.
    pub fn start(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        limits: AcceptLimits,
        what: &'static str,
    ) -> Self {
        let slots = limits.slots.max(1);
        let (tx, established) = mpsc::channel(slots);
        let accept_loop = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(config),
            Arc::new(Semaphore::new(slots)),
            limits.handshake_timeout,
            tx,
            what,
        ));
        Self {
            established,
            accept_loop,
        }
    }

    /// The next established connection; `None` once the loop has stopped.
    pub async fn next(&mut self) -> Option<Established> {
        self.established.recv().await
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    slots: Arc<Semaphore>,
    handshake_timeout: Duration,
    established: mpsc::Sender<Established>,
    what: &'static str,
) {
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(%error, server = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, established) = (acceptor.clone(), established.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = established.send(Established { tls, peer, slot }).await;
                }
                Ok(Err(error)) => debug!(%peer, %error, server = what, "TLS handshake failed"),
                Err(_) => debug!(%peer, server = what, "TLS handshake timed out"),
            }
        });
    }
}
