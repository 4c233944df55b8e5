//! The one place a mesh handshake is timed, classified and counted.
//!
//! Inbound and outbound first decide what a connection is (protocol
//! detection, strict mode, our own certificate, the connect to the peer) and
//! hand the outcome to [`run`]: a refusal with its reason, plaintext to pass
//! through, or a rustls handshake still to drive. [`run`] drives it within
//! the handshake timeout, turns a failure into a [`HandshakeFailure`], and
//! counts the outcome exactly once. Handlers never touch the handshake
//! counters themselves.

use std::{future::Future, io, time::Instant};

use rustls::{CertificateError, Error};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::{debug, warn};

use super::Proxy;
use crate::{
    metrics::{Direction, HandshakeFailure, LabelValue},
    tls::IdentityError,
};

/// What a connection turned out to be, before any byte is relayed.
#[derive(Debug)]
pub enum Ready<P, H> {
    /// Not mesh traffic, passed through as it is (permissive inbound): no
    /// handshake, nothing counted.
    Plain(P),
    /// A TLS handshake still to drive: the future of rustls' acceptor or
    /// connector.
    Tls(H),
}

/// What got through [`run`].
#[derive(Debug)]
pub enum Secured<P, S> {
    /// Plaintext passed through.
    Plain(P),
    /// An established mesh TLS stream with a verified peer.
    Mesh(S),
}

/// Why a connection went no further, and what to do with it after counting.
#[derive(Debug)]
pub struct Refusal {
    /// The `reason` label; `None` when no handshake was attempted (a TCP
    /// health check that connects and closes), which is not counted.
    reason: Option<HandshakeFailure>,
    /// The client connection, closed only after the refusal is counted, so a
    /// client that sees the close also sees the counter.
    tcp: Option<TcpStream>,
    /// Tell a TLS client why (a `handshake_failure` alert) instead of just
    /// hanging up.
    alert: bool,
}

/// A fatal TLS `handshake_failure` alert record.
const HANDSHAKE_FAILURE_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

/// Counts `ready`: a refusal under its reason, or the TLS handshake it holds,
/// driven within the handshake timeout and timed. Returns what got through.
pub async fn run<P, H, S>(
    proxy: &Proxy,
    direction: Direction,
    ready: Result<Ready<P, H>, Refusal>,
) -> Option<Secured<P, S>>
where
    H: Future<Output = io::Result<S>>,
{
    let handshake = match ready {
        Ok(Ready::Plain(plain)) => return Some(Secured::Plain(plain)),
        Ok(Ready::Tls(handshake)) => handshake,
        Err(refusal) => {
            if let Some(reason) = refusal.reason {
                proxy.metrics.handshake(direction, Err(reason));
                debug!(reason = reason.as_str(), "refused before the TLS handshake");
            }
            if let (Some(mut tcp), true) = (refusal.tcp, refusal.alert) {
                let _ = tcp.write_all(&HANDSHAKE_FAILURE_ALERT).await;
            }
            return None;
        }
    };
    let start = Instant::now();
    let outcome = match tokio::time::timeout(proxy.limits.handshake, handshake).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => {
            let reason = classify(&error);
            if reason == HandshakeFailure::UnexpectedIdentity {
                // An impersonation, or discovery and the peer disagree: an
                // operator must see it (the span names the destination; the
                // error, the expected and the presented identity).
                warn!(reason = reason.as_str(), %error, "refused: the peer is not the identity required here");
            } else {
                debug!(reason = reason.as_str(), %error, "the TLS handshake failed");
            }
            Err(reason)
        }
        Err(_) => {
            debug!(limit = ?proxy.limits.handshake, "the TLS handshake timed out");
            Err(HandshakeFailure::Timeout)
        }
    };
    proxy.metrics.handshake(
        direction,
        outcome.as_ref().map(|_| start.elapsed()).map_err(|r| *r),
    );
    outcome.ok().map(Secured::Mesh)
}

/// The reason of a failed rustls handshake, from the I/O error tokio-rustls
/// returns: a small closed set an operator can act on, never free text.
pub fn classify(error: &io::Error) -> HandshakeFailure {
    if error.kind() == io::ErrorKind::TimedOut {
        return HandshakeFailure::Timeout;
    }
    match error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(e) => classify_tls(e),
        None => match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => HandshakeFailure::Closed,
            _ => HandshakeFailure::Protocol,
        },
    }
}

/// The reason of a rustls error, including our verifiers' identity checks.
pub fn classify_tls(error: &Error) -> HandshakeFailure {
    use HandshakeFailure as F;
    match error {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => F::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => F::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                F::NotYetValid
            }
            CertificateError::Other(other) => match other.0.downcast_ref::<IdentityError>() {
                Some(IdentityError::ForeignTrustDomain { .. }) => F::WrongTrustDomain,
                Some(IdentityError::Unexpected { .. }) => F::UnexpectedIdentity,
                Some(_) => F::BadIdentity,
                None => F::BadCertificate,
            },
            _ => F::BadCertificate,
        },
        Error::NoCertificatesPresented => F::NoClientCert,
        Error::PeerIncompatible(_) => F::Incompatible,
        Error::NoApplicationProtocol => F::NoAlpn,
        Error::AlertReceived(_) => F::RejectedByPeer,
        _ => F::Protocol,
    }
}

// === impl Refusal ===

impl Refusal {
    /// A connection that ends without a handshake worth counting.
    pub fn uncounted() -> Self {
        Self {
            reason: None,
            tcp: None,
            alert: false,
        }
    }

    /// Closes `tcp` only once the refusal is counted.
    pub fn closing(mut self, tcp: TcpStream) -> Self {
        self.tcp = Some(tcp);
        self
    }

    /// Sends `tcp` a TLS alert once the refusal is counted, then closes it.
    pub fn alerting(self, tcp: TcpStream) -> Self {
        Self {
            alert: true,
            ..self.closing(tcp)
        }
    }
}

impl From<HandshakeFailure> for Refusal {
    fn from(reason: HandshakeFailure) -> Self {
        Self {
            reason: Some(reason),
            tcp: None,
            alert: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use palisade_proto::TrustDomain;
    use prometheus::Registry;

    use super::*;
    use crate::{
        metrics::Metrics,
        policy::{Policy, PolicyStore},
        proxy::Limits,
        tls::CertStore,
    };

    fn proxy() -> (Proxy, Registry) {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).expect("metrics");
        let td = TrustDomain::parse("cluster.local").expect("valid");
        let limits = Limits {
            handshake: Duration::from_secs(10),
            detect: Duration::from_secs(5),
            server_first_wait: Duration::from_millis(100),
            connect: Duration::from_secs(5),
            idle: None,
        };
        let proxy = Proxy::new(
            Arc::new(CertStore::new(td, Vec::new())),
            Arc::new(PolicyStore::fixed(Policy::allow_all())),
            metrics,
            limits,
            16,
        );
        (proxy, registry)
    }

    /// Handshakes counted under `result`/`reason` in `direction`.
    fn counted(registry: &Registry, direction: &str, result: &str, reason: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "palisade_tls_handshakes_total")
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                let labels: Vec<_> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                labels.contains(&("direction", direction))
                    && labels.contains(&("result", result))
                    && labels.contains(&("reason", reason))
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    fn total(registry: &Registry) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "palisade_tls_handshakes_total")
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    type Never = std::future::Pending<io::Result<()>>;

    #[tokio::test]
    async fn each_outcome_is_counted_once_under_its_reason() {
        let (proxy, registry) = proxy();
        let ok = run::<(), _, _>(
            &proxy,
            Direction::Inbound,
            Ok(Ready::Tls(async { io::Result::Ok(7) })),
        )
        .await;
        assert!(matches!(ok, Some(Secured::Mesh(7))));
        assert_eq!(counted(&registry, "inbound", "success", "ok"), 1);

        let refused = io::Error::other(Error::NoCertificatesPresented);
        let failed = run::<(), _, ()>(
            &proxy,
            Direction::Inbound,
            Ok(Ready::Tls(async { Err(refused) })),
        )
        .await;
        assert!(failed.is_none());
        assert_eq!(
            counted(&registry, "inbound", "failure", "no_client_cert"),
            1
        );

        let before = run::<(), Never, ()>(
            &proxy,
            Direction::Outbound,
            Err(HandshakeFailure::Connect.into()),
        )
        .await;
        assert!(before.is_none());
        assert_eq!(counted(&registry, "outbound", "failure", "connect"), 1);
        assert_eq!(total(&registry), 3, "one count per outcome, nothing else");

        // Neither plaintext passed through nor a connect-and-close is a handshake.
        let plain =
            run::<_, Never, ()>(&proxy, Direction::Inbound, Ok(Ready::Plain("bytes"))).await;
        assert!(matches!(plain, Some(Secured::Plain("bytes"))));
        let silent =
            run::<(), Never, ()>(&proxy, Direction::Inbound, Err(Refusal::uncounted())).await;
        assert!(silent.is_none());
        assert_eq!(total(&registry), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_that_never_ends_is_a_timeout() {
        let (proxy, registry) = proxy();
        let hung = run::<(), Never, ()>(
            &proxy,
            Direction::Outbound,
            Ok(Ready::Tls(std::future::pending())),
        )
        .await;
        assert!(hung.is_none());
        assert_eq!(counted(&registry, "outbound", "failure", "timeout"), 1);
        assert_eq!(counted(&registry, "outbound", "success", "ok"), 0);
    }

    #[test]
    fn io_errors_without_a_rustls_error_are_closed_or_protocol() {
        let closed = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(classify(&closed), HandshakeFailure::Closed);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(classify(&reset), HandshakeFailure::Closed);
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(classify(&timed_out), HandshakeFailure::Timeout);
        let other = io::Error::other("garbage");
        assert_eq!(classify(&other), HandshakeFailure::Protocol);
        let no_alpn = io::Error::other(Error::NoApplicationProtocol);
        assert_eq!(classify(&no_alpn), HandshakeFailure::NoAlpn);
    }
}
