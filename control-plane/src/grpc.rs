//! The gRPC server on 15012: the `Identity` service and, when a discovery
//! source is configured, the `Discovery` service, over TLS with the control
//! plane's serving certificate ([`crate::ca::serving`]), accepted by the
//! loop both servers share ([`crate::tls`]).
//!
//! tonic keeps each connection's peer address and verified client
//! certificate beside every request on it; the discovery service reads who
//! the caller is from there ([`crate::discovery::Caller`]).

use std::{future::Future, sync::Arc, time::Duration};

use palisade_proto::{
    discovery::v1::discovery_server::DiscoveryServer, identity::v1::identity_server::IdentityServer,
};
use rustls::ServerConfig;
use tokio::net::TcpListener;

use crate::{
    discovery::DiscoveryService,
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
        let Established { tls, .. } = incoming.next().await?;
        Some((Ok::<_, std::io::Error>(tls), incoming))
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
