//! Inbound: a peer connects to this pod. A ClientHello offering `palisade/1`
//! is terminated with a required client certificate; anything else is the
//! app's own traffic, passed through in `permissive` mode and refused in
//! `strict` mode. Then the authorization policy, then the app.

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Instant};

use serde::Serialize;
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::{
    Proxy,
    buffers::ReadAhead,
    detect::{self, DetectError, Protocol},
    original_dst,
    prefixed::PrefixedIo,
    relay::relay,
};
use crate::{
    metrics::Direction::Inbound,
    tls::{failure_reason, spiffe_id},
};

/// What to do with traffic that is not mesh TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pass it to the app unchanged.
    Permissive,
    /// Refuse it.
    Strict,
}

/// Where inbound connections go.
#[derive(Clone, Debug, Serialize)]
pub enum InboundTarget {
    /// Captured by iptables: to the original destination (the app's port).
    Transparent {
        mode: Mode,
        /// Ports whose protocol speaks first from the server: no detection.
        server_first_ports: HashSet<u16>,
    },
    /// An explicit listener: mesh TLS only, to a fixed app address.
    Explicit { app: SocketAddr },
}

/// Handles one accepted inbound connection.
pub async fn handle(
    proxy: Arc<Proxy>,
    target: Arc<InboundTarget>,
    mut tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
) {
    let app = match &*target {
        InboundTarget::Explicit { app } => *app,
        InboundTarget::Transparent { .. } => match original_dst(&tcp) {
            Ok(dst) if Some(dst) != tcp.local_addr().ok() => dst,
            Ok(_) => {
                debug!("a direct connection to the inbound port (not redirected): closing");
                return;
            }
            Err(error) => {
                debug!(%error, "no original destination: closing");
                return;
            }
        },
    };
    let port = app.port();
    tracing::Span::current().record("dst", tracing::field::display(app));
    let mode = match &*target {
        InboundTarget::Explicit { .. } => Mode::Strict,
        InboundTarget::Transparent {
            mode,
            server_first_ports,
        } => {
            if server_first_ports.contains(&port) {
                // The client waits for the server: nothing to detect.
                if *mode == Mode::Strict {
                    proxy.metrics.handshake_failed(Inbound, "plaintext");
                    debug!(port, "strict mode refuses a server-first port's plaintext");
                } else {
                    plaintext(&proxy, tcp, Vec::new(), app).await;
                }
                return;
            }
            *mode
        }
    };

    let (protocol, prefix) = match detect::detect(&mut tcp, proxy.limits.detect).await {
        Ok(found) => found,
        Err(DetectError::Timeout(after)) => {
            proxy.metrics.handshake_failed(Inbound, "timeout");
            debug!(?after, "the client sent nothing");
            return;
        }
        // A connect-and-close (a TCP health check, a port scan) is no handshake.
        Err(DetectError::Closed(0)) => return,
        Err(DetectError::Closed(_)) => {
            proxy.metrics.handshake_failed(Inbound, "protocol");
            debug!("the client closed in the middle of its first message");
            return;
        }
        Err(DetectError::Io(error)) => {
            debug!(%error, "reading the first bytes failed");
            return;
        }
    };
    match (protocol, mode) {
        (Protocol::MeshTls, _) => mesh(&proxy, tcp, prefix, app).await,
        (_, Mode::Permissive) => plaintext(&proxy, tcp, prefix, app).await,
        (other, Mode::Strict) => {
            let reason = match other {
                Protocol::OtherTls => "no_alpn",
                Protocol::BadTls => "protocol",
                Protocol::NotTls | Protocol::MeshTls => "plaintext",
            };
            proxy.metrics.handshake_failed(Inbound, reason);
            debug!(reason, "strict mode refuses traffic that is not mesh TLS");
            // Tell a TLS client why instead of just hanging up.
            if other != Protocol::NotTls {
                let _ = tcp.write_all(&HANDSHAKE_FAILURE_ALERT).await;
            }
        }
    }
}

/// A fatal TLS `handshake_failure` alert record.
const HANDSHAKE_FAILURE_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

/// Terminates mesh TLS, authorizes the peer, and relays to the app.
async fn mesh(proxy: &Proxy, tcp: TcpStream, prefix: Vec<u8>, app: SocketAddr) {
    let Some(configs) = proxy.tls(Inbound) else {
        return;
    };
    let start = Instant::now();
    let acceptor = TlsAcceptor::from(configs.server());
    let accepted = tokio::time::timeout(
        proxy.limits.handshake,
        acceptor.accept(PrefixedIo::new(prefix, ReadAhead::new(tcp))),
    )
    .await;
    let mut tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let reason = failure_reason(&error);
            proxy.metrics.handshake_failed(Inbound, reason);
            debug!(reason, %error, "inbound handshake failed");
            return;
        }
        Err(_) => {
            proxy.metrics.handshake_failed(Inbound, "timeout");
            debug!("inbound handshake timed out");
            return;
        }
    };
    proxy.metrics.handshake_ok(Inbound, start.elapsed());
    // The verifier accepted exactly one SPIFFE ID; read it back.
    let Some(peer) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| spiffe_id(leaf).ok())
    else {
        return;
    };
    tracing::Span::current().record("identity", tracing::field::display(&peer));

    if !proxy.policy.current().allows(app.port(), Some(&peer)) {
        proxy.metrics.authz_denied(app.port(), peer.as_str());
        info!(%peer, port = app.port(), "authorization policy denied the connection");
        let _ = tokio::time::timeout(proxy.limits.handshake, tls.shutdown()).await;
        return;
    }
    to_app(proxy, tls, app, Some(peer.as_str())).await;
}

/// Passes traffic that is not mesh TLS to the app (permissive mode).
async fn plaintext(proxy: &Proxy, tcp: TcpStream, prefix: Vec<u8>, app: SocketAddr) {
    if !proxy.policy.current().allows(app.port(), None) {
        proxy.metrics.authz_denied(app.port(), "");
        info!(
            port = app.port(),
            "authorization policy denied a connection without identity"
        );
        return;
    }
    to_app(proxy, PrefixedIo::new(prefix, tcp), app, None).await;
}

/// Connects to the app and relays; `peer` is the verified identity, if any.
async fn to_app<C>(proxy: &Proxy, client: C, app: SocketAddr, peer: Option<&str>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let upstream = match super::connect(&app.to_string(), proxy.limits.connect).await {
        Ok(tcp) => tcp,
        Err(error) => {
            info!(%error, %app, "cannot connect to the app");
            return;
        }
    };
    let _active = proxy
        .metrics
        .opened(Inbound, peer.is_some(), peer.unwrap_or_default());
    debug!(peer = peer.unwrap_or_default(), "inbound connection open");
    match relay(
        client,
        upstream,
        &proxy.metrics.bytes(Inbound),
        proxy.limits.idle,
    )
    .await
    {
        Ok((sent, received)) => debug!(sent, received, "inbound connection closed"),
        Err(error) => debug!(%error, "inbound connection ended with an error"),
    }
}
