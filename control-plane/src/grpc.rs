//! The gRPC server on 15012: the `Identity` service and, when a discovery
//! source is configured, the `Discovery` service, over TLS with the control
//! plane's serving certificate ([`crate::ca::serving`]), accepted by the
//! loop both servers share ([`crate::tls`]).
//!
//! Each connection carries who its TLS handshake says the caller is
//! ([`Caller`]: the address, and the identity of a verified client
//! certificate when one was presented) into every request on it.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use palisade_proto::{
    discovery::v1::discovery_server::DiscoveryServer, identity::v1::identity_server::IdentityServer,
};
use palisade_runtime::verifier::spiffe_id;
use rustls::{ServerConfig, pki_types::CertificateDer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::{
    discovery::{Caller, DiscoveryService},
    service::IdentityService,
    tls::{AcceptLimits, Established, Incoming},
};

/// ALPN of the gRPC port.
pub const ALPN: &[&[u8]] = &[b"h2"];

/// Limits of the gRPC server.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// A Certify call is cancelled after this long.
    pub request_timeout: Duration,
    /// A TLS handshake is abandoned after this long.
    pub handshake_timeout: Duration,
    /// At most this many handshakes run at once; further connections wait.
    pub max_pending_handshakes: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

/// A discovery snapshot of a large cluster is one message: 10,000 pods
/// take about 600 KB.
const MAX_DISCOVERY_MESSAGE: usize = 16 * 1024 * 1024;

/// One accepted connection and who is on the other end of it.
#[derive(Debug)]
pub struct Connection {
    tls: TlsStream<TcpStream>,
    caller: Caller,
}

/// Serves `Identity` (and `Discovery`, when given) on `listener` until
/// `shutdown`, then drains in-flight calls.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    service: IdentityService,
    discovery: Option<DiscoveryService>,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let accept = AcceptLimits {
        slots: limits.max_pending_handshakes,
        handshake_timeout: limits.handshake_timeout,
    };
    let incoming = Incoming::start(listener, tls, accept, "grpc");
    // A slot bounds handshakes in progress: it is released once tonic has
    // the connection.
    let connections = futures::stream::unfold(incoming, |mut incoming| async move {
        let Established { tls, peer, .. } = incoming.next().await?;
        let caller = Caller {
            addr: peer,
            certificate: tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(certificate_facts),
        };
        Some((Ok::<_, io::Error>(Connection { tls, caller }), incoming))
    });
    tonic::transport::Server::builder()
        .timeout(limits.request_timeout)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(
            IdentityServer::new(service)
                .max_decoding_message_size(64 * 1024)
                .max_encoding_message_size(1024 * 1024),
        )
        .add_optional_service(discovery.map(|d| {
            DiscoveryServer::new(d)
                .max_decoding_message_size(1024)
                .max_encoding_message_size(MAX_DISCOVERY_MESSAGE)
        }))
        .serve_with_incoming_shutdown(connections, shutdown)
        .await
}

/// The identity and notAfter of a client certificate the handshake has
/// verified (chain, usage, one SPIFFE ID of the trust domain).
fn certificate_facts(leaf: &CertificateDer<'_>) -> Option<(palisade_proto::SpiffeId, SystemTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let identity = spiffe_id(leaf).ok()?;
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some((identity, SystemTime::UNIX_EPOCH + Duration::from_secs(secs)))
}

// === impl Connection ===

impl Connected for Connection {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}
