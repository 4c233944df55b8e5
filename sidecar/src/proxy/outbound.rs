//! Outbound: the app connects out. Destinations in the mesh networks get mesh
//! TLS to the same address and port, verified against the bundle and the
//! trust domain (and, for explicit listeners, the expected identity); other
//! destinations and excluded ports are relayed as they are.

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Instant};

use ipnet::IpNet;
use palisade_proto::SpiffeId;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::{net::TcpStream, sync::OwnedSemaphorePermit};
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::{Proxy, buffers::ReadAhead, connect, original_dst, relay::relay};
use crate::{
    metrics::Direction::Outbound,
    tls::{failure_reason, spiffe_id},
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

/// Handles one accepted outbound connection.
pub async fn handle(
    proxy: Arc<Proxy>,
    target: Arc<OutboundTarget>,
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
) {
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
        let upstream = match connect(&dst, proxy.limits.connect).await {
            Ok(tcp) => tcp,
            Err(error) => {
                debug!(%error, "cannot connect to a destination outside the mesh");
                return;
            }
        };
        let _active = proxy.metrics.opened(Outbound, false, "");
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
        return;
    }

    let Some(configs) = proxy.tls(Outbound) else {
        return;
    };
    let upstream = match connect(&dst, proxy.limits.connect).await {
        Ok(tcp) => tcp,
        Err(error) => {
            proxy.metrics.handshake_failed(Outbound, "connect");
            debug!(%error, "cannot connect to the peer");
            return;
        }
    };
    let peer_ip = match upstream.peer_addr() {
        Ok(addr) => addr.ip(),
        Err(_) => return,
    };
    let start = Instant::now();
    let connector = TlsConnector::from(configs.client(expected));
    let connected = tokio::time::timeout(
        proxy.limits.handshake,
        connector.connect(
            ServerName::IpAddress(peer_ip.into()),
            ReadAhead::new(upstream),
        ),
    )
    .await;
    let tls = match connected {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let reason = failure_reason(&error);
            proxy.metrics.handshake_failed(Outbound, reason);
            debug!(reason, %error, "outbound handshake failed");
            return;
        }
        Err(_) => {
            proxy.metrics.handshake_failed(Outbound, "timeout");
            debug!("outbound handshake timed out");
            return;
        }
    };
    proxy.metrics.handshake_ok(Outbound, start.elapsed());
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| spiffe_id(leaf).ok());
    let peer_label = peer.as_ref().map(SpiffeId::as_str).unwrap_or_default();
    tracing::Span::current().record("identity", tracing::field::display(peer_label));
    let _active = proxy.metrics.opened(Outbound, true, peer_label);
    debug!(peer = peer_label, "outbound mTLS connection open");
    match relay(tcp, tls, &proxy.metrics.bytes(Outbound), proxy.limits.idle).await {
        Ok((sent, received)) => debug!(sent, received, "outbound connection closed"),
        Err(error) => debug!(%error, "outbound connection ended with an error"),
    }
}

/// Whether `addr` is in one of `networks`.
pub fn in_networks(networks: &[IpNet], addr: SocketAddr) -> bool {
    networks.iter().any(|net| net.contains(&addr.ip()))
}
