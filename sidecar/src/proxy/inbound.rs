//! Inbound: a peer connects to this pod. A ClientHello offering `palisade/1`
//! is terminated with a required client certificate; anything else is the
//! app's own traffic, passed through in `permissive` mode and refused in
//! `strict` mode. Then the deny list and the authorization policy, then the
//! app. A connection whose peer the deny list comes to name later is closed.

use std::{collections::HashSet, net::SocketAddr, sync::Arc};

use palisade_proto::SpiffeId;
use serde::Serialize;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::{debug, info, warn};

use super::{
    Proxy,
    access::Entry,
    buffers::ReadAhead,
    detect::{self, DetectError, Protocol},
    handshake::{self, Ready, Refusal, Secured},
    original_dst,
    prefixed::PrefixedIo,
    relay::{Activity, relay_tallied},
};
use crate::{
    metrics::{Direction::Inbound, HandshakeFailure, InboundRefusal, LabelValue, Security},
    policy::{DENY_LIST, Decision, Verdict},
    tls::spiffe_id,
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

/// A client connection as detection left it: the bytes it read come first.
type Client = PrefixedIo<TcpStream>;

/// The mesh TLS handshake with a client, still to drive.
type Accept = tokio_rustls::Accept<PrefixedIo<ReadAhead<TcpStream>>>;

/// Handles one accepted inbound connection.
pub async fn handle(proxy: Arc<Proxy>, target: Arc<InboundTarget>, tcp: TcpStream) {
    let app = match &*target {
        InboundTarget::Explicit { app } => *app,
        InboundTarget::Transparent { .. } => match original_dst(&tcp) {
            Ok(dst) if !proxy.local.contains(dst.ip()) => {
                // Relaying it would make the sidecar (uid 1337, never
                // captured) a proxy into whatever the sender names.
                warn!(%dst, "refused an inbound connection for an address that is not the pod's");
                proxy
                    .metrics
                    .inbound_refused(InboundRefusal::ForeignDestination);
                return;
            }
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
    tracing::Span::current().record("dst", tracing::field::display(app));
    let ready = classify(&proxy, &target, tcp, app.port()).await;
    match handshake::run(&proxy, Inbound, ready).await {
        Some(Secured::Mesh(tls)) => mesh(&proxy, tls, app).await,
        Some(Secured::Plain(client)) => plaintext(&proxy, client, app).await,
        None => {}
    }
}

/// Decides what the connection is from its first bytes and the mode: mesh
/// TLS to terminate, plaintext to pass (permissive), or a refusal.
async fn classify(
    proxy: &Proxy,
    target: &InboundTarget,
    mut tcp: TcpStream,
    port: u16,
) -> Result<Ready<Client, Accept>, Refusal> {
    let mode = match target {
        InboundTarget::Explicit { .. } => Mode::Strict,
        InboundTarget::Transparent {
            mode,
            server_first_ports,
        } => {
            // A delivered policy sets the mode; else the sidecar's own.
            let mode = &proxy.policy.current().mode().unwrap_or(*mode);
            // On a server-first port the app's own clients wait for the
            // server, while a mesh client always speaks first. Strict mode
            // detects as on any port (silence is refused after the detect
            // timeout); permissive mode waits briefly for a first byte and
            // takes silence for the app's own client.
            if *mode == Mode::Permissive
                && server_first_ports.contains(&port)
                && tokio::time::timeout(proxy.limits.server_first_wait, tcp.peek(&mut [0; 1]))
                    .await
                    .is_err()
            {
                debug!(
                    port,
                    "a silent client on a server-first port: the app's own"
                );
                return Ok(Ready::Plain(PrefixedIo::new(Vec::new(), tcp)));
            }
            *mode
        }
    };

    let (protocol, prefix) = match detect::detect(&mut tcp, proxy.limits.detect).await {
        Ok(found) => found,
        Err(DetectError::Timeout(after)) => {
            debug!(?after, "the client sent nothing");
            return Err(Refusal::from(HandshakeFailure::Timeout).closing(tcp));
        }
        // A connect-and-close (a TCP health check, a port scan) is no handshake.
        Err(DetectError::Closed(0)) => return Err(Refusal::uncounted()),
        Err(DetectError::Closed(_)) => {
            debug!("the client closed in the middle of its first message");
            return Err(Refusal::from(HandshakeFailure::Protocol).closing(tcp));
        }
        Err(DetectError::Io(error)) => {
            debug!(%error, "reading the first bytes failed");
            return Err(Refusal::uncounted());
        }
    };
    match (protocol, mode) {
        (Protocol::MeshTls, _) => {
            let configs = match proxy.configs() {
                Ok(configs) => configs,
                Err(reason) => return Err(Refusal::from(reason).closing(tcp)),
            };
            let acceptor = TlsAcceptor::from(configs.server());
            Ok(Ready::Tls(
                acceptor.accept(PrefixedIo::new(prefix, ReadAhead::new(tcp))),
            ))
        }
        (_, Mode::Permissive) => Ok(Ready::Plain(PrefixedIo::new(prefix, tcp))),
        (other, Mode::Strict) => {
            let reason = match other {
                Protocol::OtherTls => HandshakeFailure::NoAlpn,
                Protocol::BadTls => HandshakeFailure::Protocol,
                Protocol::NotTls | Protocol::MeshTls => HandshakeFailure::Plaintext,
            };
            debug!(
                reason = reason.as_str(),
                "strict mode refuses traffic that is not mesh TLS"
            );
            let refusal = Refusal::from(reason);
            Err(if other == Protocol::NotTls {
                refusal.closing(tcp)
            } else {
                refusal.alerting(tcp)
            })
        }
    }
}

/// Authorizes the peer of an established mesh TLS stream and relays to the app.
async fn mesh(
    proxy: &Proxy,
    mut tls: TlsStream<PrefixedIo<ReadAhead<TcpStream>>>,
    app: SocketAddr,
) {
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

    let Some(decision) = authorize(proxy, app.port(), Some(&peer)) else {
        let _ = tokio::time::timeout(proxy.limits.handshake, tls.shutdown()).await;
        return;
    };
    to_app(proxy, tls, app, Some(&peer), &decision).await;
}

/// Passes traffic that is not mesh TLS to the app (permissive mode).
async fn plaintext(proxy: &Proxy, client: Client, app: SocketAddr) {
    let Some(decision) = authorize(proxy, app.port(), None) else {
        return;
    };
    to_app(proxy, client, app, None, &decision).await;
}

/// Judges a connection by the deny list, then the policy; counts and logs
/// the decision. The decision when it may go on (an audit-mode refusal
/// may), `None` when refused.
fn authorize(proxy: &Proxy, port: u16, peer: Option<&SpiffeId>) -> Option<Decision> {
    let policy = proxy.policy.current();
    let decision = match peer {
        Some(peer) if proxy.policy.denied(peer) => Decision {
            verdict: Verdict::Deny,
            policy: Arc::from(DENY_LIST),
        },
        _ => policy.decide(port, peer),
    };
    proxy.metrics.authz(&decision, policy.labelled_port(port));
    let peer_id = peer.map(SpiffeId::as_str).unwrap_or_default();
    match decision.verdict {
        Verdict::Allow => Some(decision),
        Verdict::AuditDeny => {
            info!(peer = peer_id, port, policy = %decision.policy, "an audit-mode policy would refuse the connection; letting it through");
            Some(decision)
        }
        Verdict::Deny => {
            info!(peer = peer_id, port, policy = %decision.policy, "authorization refused the connection");
            proxy
                .access_log
                .write(&Entry::inbound(peer.map(SpiffeId::as_str), port, &decision));
            None
        }
    }
}

/// Resolves once the deny list names `peer` (never without a peer).
async fn revoked(proxy: &Proxy, peer: Option<&SpiffeId>) {
    let Some(peer) = peer else {
        return std::future::pending().await;
    };
    let mut deny_list = proxy.policy.deny_list();
    loop {
        if deny_list.borrow_and_update().denies(peer) {
            return;
        }
        if deny_list.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Connects to the app and relays; `peer` is the verified identity, if any.
async fn to_app<C>(
    proxy: &Proxy,
    client: C,
    app: SocketAddr,
    peer: Option<&SpiffeId>,
    decision: &Decision,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let upstream = match super::connect(&app.to_string(), proxy.limits.connect).await {
        Ok(tcp) => tcp,
        Err(error) => {
            info!(%error, %app, "cannot connect to the app");
            return;
        }
    };
    let security = if peer.is_some() {
        Security::Mtls
    } else {
        Security::Plaintext
    };
    let peer_id = peer.map(SpiffeId::as_str).unwrap_or_default();
    let _active = proxy.metrics.opened(Inbound, security, peer_id);
    debug!(peer = peer_id, "inbound connection open");
    let bytes = proxy.metrics.bytes(Inbound);
    let tally = Arc::new(Activity::new());
    tokio::select! {
        relayed = relay_tallied(client, upstream, &bytes, proxy.limits.idle, &tally) => match relayed {
            Ok((sent, received)) => debug!(sent, received, "inbound connection closed"),
            Err(error) => debug!(%error, "inbound connection ended with an error"),
        },
        // Dropping the relay closes both sides.
        () = revoked(proxy, peer) => {
            proxy.metrics.connection_revoked();
            info!(peer = peer_id, "the deny list names the peer: closed its open connection");
        }
    }
    let (from_peer, from_app) = tally.moved();
    proxy.access_log.write(
        &Entry::inbound(peer.map(SpiffeId::as_str), app.port(), decision).relayed(
            from_peer,
            from_app,
            tally.elapsed(),
        ),
    );
}
