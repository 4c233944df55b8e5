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
//!
//! A Service's cluster address is never dialled: the sidecar picks one of
//! the port's ready endpoints ([`balance`]) and connects to the pod address
//! itself, with mesh TLS requiring that endpoint's identity, or plain TCP to
//! an unmeshed one. An endpoint that refuses or does not answer is marked
//! down and the next is tried, within the one connect budget; nothing of
//! the app's data has been read by then, so the app sees one connection.

use std::{collections::HashSet, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use tokio::time::Instant;

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
    discovery::{
        Backend, Decision, InFlight, Kind, OutboundMode, Refusal as Refused, ServiceRoute, balance,
        decide,
    },
    metrics::{Direction::Outbound, HandshakeFailure, OutboundKind, Security},
    tls::{TlsConfigs, spiffe_id},
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

/// Where one outbound connection goes, once decided.
enum Upstream {
    /// Mesh TLS to `dst`; the server must be `expected` (any identity of
    /// the trust domain when `None`).
    Mesh {
        dst: String,
        expected: Option<SpiffeId>,
    },
    /// Plain TCP to `dst`.
    Plain(String),
    /// One endpoint of a Service port.
    Service(ServiceRoute),
}

/// Handles one accepted outbound connection.
pub async fn handle(proxy: Arc<Proxy>, target: Arc<OutboundTarget>, tcp: TcpStream) {
    let Some(upstream) = upstream(&proxy, &target, &tcp).await else {
        return;
    };
    match upstream {
        Upstream::Plain(dst) => {
            let upstream = match connect(&dst, proxy.limits.connect).await {
                Ok(tcp) => tcp,
                Err(error) => {
                    debug!(%error, "cannot connect to a destination outside the mesh");
                    return;
                }
            };
            passthrough(&proxy, tcp, upstream).await;
        }
        Upstream::Mesh { dst, expected } => {
            let ready = async {
                let configs = proxy.configs()?;
                let upstream = connect(&dst, proxy.limits.connect).await.map_err(|error| {
                    debug!(%error, "cannot connect to the peer");
                    HandshakeFailure::Connect
                })?;
                start_tls(&configs, upstream, expected.as_ref())
            }
            .await;
            mesh(&proxy, tcp, ready).await;
        }
        Upstream::Service(route) => {
            let Some((upstream, backend, _in_flight)) = connect_endpoint(&proxy, &route).await
            else {
                proxy.metrics.endpoints_unreachable();
                warn!(
                    service = %route.service.name,
                    "outbound: no endpoint of the Service answered within the connect budget"
                );
                return;
            };
            tracing::Span::current().record("endpoint", tracing::field::display(backend.address));
            match &backend.identity {
                Some(expected) => {
                    let ready = proxy
                        .configs()
                        .map_err(Refusal::from)
                        .and_then(|configs| start_tls(&configs, upstream, Some(expected)));
                    mesh(&proxy, tcp, ready).await;
                }
                None => passthrough(&proxy, tcp, upstream).await,
            }
        }
    }
}

/// Where `tcp` goes: the explicit listener's upstream, or what the
/// original destination and discovery decide; `None` when it is closed
/// (not redirected, or refused, counted in [`route`]).
async fn upstream(proxy: &Proxy, target: &OutboundTarget, tcp: &TcpStream) -> Option<Upstream> {
    Some(match target {
        OutboundTarget::Explicit { upstream, identity } => {
            tracing::Span::current().record("dst", tracing::field::display(upstream));
            Upstream::Mesh {
                dst: upstream.clone(),
                expected: Some(identity.clone()),
            }
        }
        OutboundTarget::Transparent {
            mesh_networks,
            exclude_ports,
            discovery,
        } => {
            let dst = match original_dst(tcp) {
                Ok(dst) if Some(dst) != tcp.local_addr().ok() => dst,
                Ok(_) => {
                    debug!("a direct connection to the outbound port (not redirected): closing");
                    return None;
                }
                Err(error) => {
                    debug!(%error, "no original destination: closing");
                    return None;
                }
            };
            tracing::Span::current().record("dst", tracing::field::display(&dst));
            if exclude_ports.contains(&dst.port()) {
                Upstream::Plain(dst.to_string())
            } else {
                match discovery {
                    None if in_networks(mesh_networks, dst) => Upstream::Mesh {
                        dst: dst.to_string(),
                        expected: None,
                    },
                    None => Upstream::Plain(dst.to_string()),
                    Some(routing) => match route(proxy, routing, mesh_networks, dst).await {
                        Decision::Mesh(id) => Upstream::Mesh {
                            dst: dst.to_string(),
                            expected: Some(id),
                        },
                        Decision::Service(route) => Upstream::Service(route),
                        Decision::Plain(_) => Upstream::Plain(dst.to_string()),
                        Decision::Refuse(_) => return None,
                    },
                }
            }
        }
    })
}

/// Drives the mesh TLS handshake `ready` and relays the app's connection
/// over it.
async fn mesh(proxy: &Proxy, tcp: TcpStream, ready: Result<Ready<Infallible, Connect>, Refusal>) {
    let Some(Secured::Mesh(tls)) = handshake::run(proxy, Outbound, ready).await else {
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
    let lookup = match proxy.destinations.lookup(dst) {
        Ok(lookup) => Ok(lookup),
        Err(_) if proxy.destinations.wait_synced(routing.wait).await => {
            proxy.destinations.lookup(dst)
        }
        Err(not_synced) => Err(not_synced),
    };
    let decision = match lookup {
        Ok(lookup) => decide(lookup, dst, routing.mode, cluster_networks),
        Err(_) => Decision::Refuse(Refused::NotSynced),
    };
    match &decision {
        Decision::Mesh(id) => {
            proxy.metrics.outbound_decision(OutboundKind::Meshed);
            debug!(expected = %id, "outbound: a meshed workload");
        }
        Decision::Service(route) => {
            proxy.metrics.outbound_decision(OutboundKind::Service);
            debug!(service = %route.service.name, "outbound: a Service");
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

/// Connects to one endpoint of `route` within the connect budget: chosen
/// by [`balance::pick`]; one that refuses or does not answer is marked down
/// (counted) and the next is tried. Each attempt may take half the budget
/// left, the last one all of it, so one silent endpoint cannot use up the
/// budget alone. Returns the connection, the endpoint, and its count.
async fn connect_endpoint<'r>(
    proxy: &Proxy,
    route: &'r ServiceRoute,
) -> Option<(TcpStream, &'r Backend, InFlight)> {
    let (backends, mut tried) = route.backends();
    let deadline = Instant::now() + proxy.limits.connect;
    loop {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return None;
        }
        let index = balance::pick(backends, &tried, now, &mut rand::rng())?;
        tried[index] = true;
        let backend = &backends[index];
        let last = tried.iter().all(|t| *t);
        let budget = if last { left } else { left / 2 };
        // Counted from the attempt on: a connection waiting for its connect
        // is load the next pick should see.
        let in_flight = backend.load.start();
        match connect(&backend.address.to_string(), budget).await {
            Ok(tcp) => return Some((tcp, backend, in_flight)),
            Err(error) => {
                backend.load.mark_down(Instant::now());
                proxy.metrics.endpoint_failed();
                debug!(endpoint = %backend.address, %error, "outbound: an endpoint did not answer; trying the next");
            }
        }
    }
}

/// Prepares the mesh TLS handshake over `upstream` that must find
/// `expected` there (any identity of the trust domain when `None`).
fn start_tls(
    configs: &TlsConfigs,
    upstream: TcpStream,
    expected: Option<&SpiffeId>,
) -> Result<Ready<Infallible, Connect>, Refusal> {
    let peer_ip = upstream.peer_addr().map_err(|_| Refusal::uncounted())?.ip();
    let connector = TlsConnector::from(configs.client(expected));
    Ok(Ready::Tls(connector.connect(
        ServerName::IpAddress(peer_ip.into()),
        ReadAhead::new(upstream),
    )))
}

/// Relays a connection to a destination outside the mesh (or an unmeshed
/// endpoint) as it is.
async fn passthrough(proxy: &Proxy, tcp: TcpStream, upstream: TcpStream) {
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
