//! Outbound: the app connects out. Destinations in the mesh networks get mesh
//! TLS to the same address and port, verified against the bundle and the
//! trust domain (and, for explicit listeners, the expected identity); other
//! destinations and excluded ports are relayed as they are.

use std::{collections::HashSet, convert::Infallible, net::SocketAddr, sync::Arc};

use ipnet::IpNet;
use palisade_proto::SpiffeId;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::{
    Proxy,
    buffers::ReadAhead,
    connect,
    handshake::{self, Ready, Refusal, Secured},
    original_dst,
    relay::relay,
};
use crate::{
    metrics::{Direction::Outbound, HandshakeFailure, Security},
    tls::spiffe_id,
};

/// Where outbound connections go.
#[derive(Clone, Debug, Serialize)]
pub enum OutboundTarget {
    /// Captured by iptables: to the original destination.
    Transparent {
        /// Destinations inside these networks are mesh peers.
        mesh_networks: Vec<IpNet>,
        /// Destination ports never wrapped in mesh TLS.
        exclude_ports: HashSet<u16>,
    },
    /// An explicit listener: always mesh TLS to `upstream`, which must be `identity`.
    Explicit {
        upstream: String,
        identity: SpiffeId,
    },
}

/// The mesh TLS handshake with a peer, still to drive.
type Connect = tokio_rustls::Connect<ReadAhead<TcpStream>>;

/// Handles one accepted outbound connection.
pub async fn handle(proxy: Arc<Proxy>, target: Arc<OutboundTarget>, tcp: TcpStream) {
    let (dst, expected, mesh) = match &*target {
        OutboundTarget::Explicit { upstream, identity } => (upstream.clone(), Some(identity), true),
        OutboundTarget::Transparent {
            mesh_networks,
            exclude_ports,
        } => {
            let dst = match original_dst(&tcp) {
                Ok(dst) if Some(dst) != tcp.local_addr().ok() => dst,
                Ok(_) => {
                    debug!("a direct connection to the outbound port (not redirected): closing");
                    return;
                }
                Err(error) => {
                    debug!(%error, "no original destination: closing");
                    return;
                }
            };
            let mesh = !exclude_ports.contains(&dst.port()) && in_networks(mesh_networks, dst);
            (dst.to_string(), None, mesh)
        }
    };
    tracing::Span::current().record("dst", tracing::field::display(&dst));

    if !mesh {
        passthrough(&proxy, tcp, &dst).await;
        return;
    }
    let ready = connect_mesh(&proxy, &dst, expected).await;
    let Some(Secured::Mesh(tls)) = handshake::run(&proxy, Outbound, ready).await else {
        return;
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| spiffe_id(leaf).ok());
    let peer_label = peer.as_ref().map(SpiffeId::as_str).unwrap_or_default();
    tracing::Span::current().record("identity", tracing::field::display(peer_label));
    let _active = proxy.metrics.opened(Outbound, Security::Mtls, peer_label);
    debug!(peer = peer_label, "outbound mTLS connection open");
    match relay(tcp, tls, &proxy.metrics.bytes(Outbound), proxy.limits.idle).await {
        Ok((sent, received)) => debug!(sent, received, "outbound connection closed"),
        Err(error) => debug!(%error, "outbound connection ended with an error"),
    }
}

/// Connects to a mesh peer and prepares the TLS handshake that must find
/// `expected` there (any identity of the trust domain when `None`).
async fn connect_mesh(
    proxy: &Proxy,
    dst: &str,
    expected: Option<&SpiffeId>,
) -> Result<Ready<Infallible, Connect>, Refusal> {
    let configs = proxy.configs()?;
    let upstream = connect(dst, proxy.limits.connect).await.map_err(|error| {
        debug!(%error, "cannot connect to the peer");
        HandshakeFailure::Connect
    })?;
    let peer_ip = upstream.peer_addr().map_err(|_| Refusal::uncounted())?.ip();
    let connector = TlsConnector::from(configs.client(expected));
    Ok(Ready::Tls(connector.connect(
        ServerName::IpAddress(peer_ip.into()),
        ReadAhead::new(upstream),
    )))
}

/// Relays a connection to a destination outside the mesh as it is.
async fn passthrough(proxy: &Proxy, tcp: TcpStream, dst: &str) {
    let upstream = match connect(dst, proxy.limits.connect).await {
        Ok(tcp) => tcp,
        Err(error) => {
            debug!(%error, "cannot connect to a destination outside the mesh");
            return;
        }
    };
    let _active = proxy.metrics.opened(Outbound, Security::Plaintext, "");
    if let Err(error) = relay(
        tcp,
        upstream,
        &proxy.metrics.bytes(Outbound),
        proxy.limits.idle,
    )
    .await
    {
        debug!(%error, "outbound passthrough connection ended with an error");
    }
}

/// Whether `addr` is in one of `networks`.
pub fn in_networks(networks: &[IpNet], addr: SocketAddr) -> bool {
    networks.iter().any(|net| net.contains(&addr.ip()))
}
