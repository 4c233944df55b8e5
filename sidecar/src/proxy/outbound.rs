//! Outbound: the app connects out.
//!
//! With discovery, the control plane decides per destination address
//! ([`crate::discovery::decide`]): a meshed workload gets mesh TLS to the
//! same address and port, and its server must present exactly the identity
//! discovery names; a pod without a sidecar, or an address discovery does
//! not know, gets plain TCP (counted, and refused in strict mode); an
//! address two live pods claim is refused. Nothing of the app's data is
//! sent before the decision and, for mesh TLS, the verified handshake.
//!
//! Without discovery (explicit setups), destinations in the mesh networks
//! get mesh TLS verified against the bundle and the trust domain only, and
//! other destinations are relayed as they are. Explicit listeners always
//! require their configured identity. Excluded ports are relayed as they
//! are in both cases.

use std::{collections::HashSet, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use ipnet::IpNet;
use palisade_proto::SpiffeId;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::{
    Proxy,
    buffers::ReadAhead,
    connect,
    handshake::{self, Ready, Refusal, Secured},
    original_dst,
    relay::relay,
};
use crate::{
    discovery::{Decision, Kind, OutboundMode, Refusal as Refused, decide},
    metrics::{Direction::Outbound, HandshakeFailure, OutboundKind, Security},
    tls::spiffe_id,
};

/// Where outbound connections go.
#[derive(Clone, Debug, Serialize)]
pub enum OutboundTarget {
    /// Captured by iptables: to the original destination.
    Transparent {
        /// Without discovery, destinations inside these networks are mesh
        /// peers; with it, the cluster networks strict mode protects.
        mesh_networks: Vec<IpNet>,
        /// Destination ports never wrapped in mesh TLS.
        exclude_ports: HashSet<u16>,
        /// Decide per destination from discovery.
        discovery: Option<Routing>,
    },
    /// An explicit listener: always mesh TLS to `upstream`, which must be `identity`.
    Explicit {
        upstream: String,
        identity: SpiffeId,
    },
}

/// How outbound connections follow discovery.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Routing {
    /// Whether plain TCP is allowed where mesh TLS is not possible.
    pub mode: OutboundMode,
    /// Connections wait this long for the first snapshot, then are refused.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
}

/// The mesh TLS handshake with a peer, still to drive.
type Connect = tokio_rustls::Connect<ReadAhead<TcpStream>>;

/// Handles one accepted outbound connection.
pub async fn handle(proxy: Arc<Proxy>, target: Arc<OutboundTarget>, tcp: TcpStream) {
    let (dst, expected, mesh) = match &*target {
        OutboundTarget::Explicit { upstream, identity } => {
            tracing::Span::current().record("dst", tracing::field::display(upstream));
            (upstream.clone(), Some(identity.clone()), true)
        }
        OutboundTarget::Transparent {
            mesh_networks,
            exclude_ports,
            discovery,
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
            tracing::Span::current().record("dst", tracing::field::display(&dst));
            if exclude_ports.contains(&dst.port()) {
                passthrough(&proxy, tcp, &dst.to_string()).await;
                return;
            }
            match discovery {
                None => (dst.to_string(), None, in_networks(mesh_networks, dst)),
                Some(routing) => match route(&proxy, routing, mesh_networks, dst).await {
                    Decision::Mesh(id) => (dst.to_string(), Some(id), true),
                    Decision::Plain(_) => (dst.to_string(), None, false),
                    Decision::Refuse(_) => return,
                },
            }
        }
    };

    if !mesh {
        passthrough(&proxy, tcp, &dst).await;
        return;
    }
    let ready = connect_mesh(&proxy, &dst, expected.as_ref()).await;
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

/// What discovery says of `dst`, waiting for the first snapshot at most
/// `routing.wait`; counted, and a refusal logged, here and only here.
async fn route(
    proxy: &Proxy,
    routing: &Routing,
    cluster_networks: &[IpNet],
    dst: SocketAddr,
) -> Decision {
    let address = dst.ip().to_canonical();
    let resolution = match proxy.destinations.resolve(address) {
        Ok(resolution) => Ok(resolution),
        Err(_) if proxy.destinations.wait_synced(routing.wait).await => {
            proxy.destinations.resolve(address)
        }
        Err(not_synced) => Err(not_synced),
    };
    let decision = match resolution {
        Ok(resolution) => decide(resolution.as_ref(), address, routing.mode, cluster_networks),
        Err(_) => Decision::Refuse(Refused::NotSynced),
    };
    match &decision {
        Decision::Mesh(id) => {
            proxy.metrics.outbound_decision(OutboundKind::Meshed);
            debug!(expected = %id, "outbound: a meshed workload");
        }
        Decision::Plain(Kind::Unmeshed) => proxy.metrics.outbound_decision(OutboundKind::Unmeshed),
        Decision::Plain(Kind::Unknown) => proxy.metrics.outbound_decision(OutboundKind::Unknown),
        Decision::Refuse(reason) => {
            proxy.metrics.outbound_refused(*reason);
            warn!(destination = %dst, %reason, "outbound: refused before a byte was sent");
        }
    }
    decision
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
