//! Flags of the proxy: which listeners run, in which mode, within which
//! bounds.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use clap::{ArgAction, Args};
use ipnet::IpNet;
use palisade_proto::{SpiffeId, TrustDomain};
use serde::Serialize;

use super::ConfigError;
use crate::{
    discovery::OutboundMode,
    proxy::{
        Limits,
        inbound::{InboundTarget, Mode},
        outbound::{OutboundTarget, Routing},
    },
};

/// Flags of `run` for the listeners, transparent and explicit.
#[derive(Debug, Args)]
pub struct ListenerArgs {
    /// Run the iptables-captured listeners (outbound 15001, inbound 15006).
    #[arg(long, env = "PALISADE_TRANSPARENT", default_value_t = true, action = ArgAction::Set)]
    pub transparent: bool,
    /// Addresses of the captured outbound listener (comma-separated).
    #[arg(
        long,
        env = "PALISADE_OUTBOUND_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:15001"
    )]
    pub outbound_addr: Vec<SocketAddr>,
    /// Addresses of the captured inbound listener (comma-separated).
    #[arg(
        long,
        env = "PALISADE_INBOUND_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15006"
    )]
    pub inbound_addr: Vec<SocketAddr>,
    /// Inbound traffic that is not mesh TLS: passed to the app (permissive) or refused (strict).
    #[arg(
        long,
        env = "PALISADE_INBOUND_MODE",
        value_enum,
        default_value = "permissive"
    )]
    pub inbound_mode: Mode,
    /// Decide outbound per destination from the control plane's discovery stream (needs --control-plane).
    #[arg(long, env = "PALISADE_DISCOVERY", default_value_t = false, action = ArgAction::Set)]
    pub discovery: bool,
    /// With discovery: plain TCP to unmeshed and unknown destinations (permissive), or no plain TCP to any address discovery knows or inside --mesh-networks (strict).
    #[arg(
        long,
        env = "PALISADE_OUTBOUND_MODE",
        value_enum,
        default_value = "permissive"
    )]
    pub outbound_mode: OutboundMode,
    /// With discovery: outbound connections wait this long for the first snapshot, then are refused.
    #[arg(long, env = "PALISADE_DISCOVERY_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub discovery_wait: Duration,
    /// Without discovery: destinations in these networks are mesh peers (any identity of the trust domain), others pass through untouched. With discovery: the cluster's networks, which strict mode keeps plain TCP out of.
    #[arg(
        long,
        env = "PALISADE_MESH_NETWORKS",
        value_delimiter = ',',
        default_value = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fd00::/8"
    )]
    pub mesh_networks: Vec<IpNet>,
    /// Outbound destination ports never wrapped in mesh TLS (comma-separated).
    #[arg(long, env = "PALISADE_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound ports whose protocol speaks first from the server (no detection).
    #[arg(long, env = "PALISADE_SERVER_FIRST_PORTS", value_delimiter = ',')]
    pub server_first_ports: Vec<u16>,
    /// An explicit outbound listener: LISTEN=UPSTREAM,SPIFFE_ID (repeatable).
    #[arg(long = "explicit-outbound", env = "PALISADE_EXPLICIT_OUTBOUND", value_delimiter = ';', value_parser = parse_explicit_outbound)]
    pub explicit_outbound: Vec<ExplicitOutbound>,
    /// An explicit inbound listener: LISTEN=LOCAL_APP (repeatable); mesh TLS only.
    #[arg(long = "explicit-inbound", env = "PALISADE_EXPLICIT_INBOUND", value_delimiter = ';', value_parser = parse_explicit_inbound)]
    pub explicit_inbound: Vec<ExplicitInbound>,
}

/// Flags of `run` for the data plane's timeouts and bounds.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// A TLS handshake is abandoned after this long.
    #[arg(long, env = "PALISADE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// An inbound client that sends nothing is dropped after this long.
    #[arg(long, env = "PALISADE_DETECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,
    /// On a server-first port in permissive mode, a client silent this long is the app's own (plaintext); one that speaks first is detected (mesh TLS is terminated).
    #[arg(long, env = "PALISADE_SERVER_FIRST_WAIT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub server_first_wait: Duration,
    /// Connecting to the app or a peer gives up after this long.
    #[arg(long, env = "PALISADE_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Close connections idle this long (0 = never).
    #[arg(long, env = "PALISADE_IDLE_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// At most this many connections are proxied at once; more wait in the backlog.
    #[arg(long, env = "PALISADE_MAX_CONNECTIONS", default_value_t = 16384)]
    pub max_connections: usize,
    /// On SIGTERM, open connections get this long to finish.
    #[arg(long, env = "PALISADE_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Threads that run the proxy (0: one per CPU).
    #[arg(long, env = "PALISADE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

/// `LISTEN=UPSTREAM,SPIFFE_ID`.
#[derive(Clone, Debug, Serialize)]
pub struct ExplicitOutbound {
    pub listen: SocketAddr,
    pub upstream: String,
    pub identity: SpiffeId,
}

/// `LISTEN=LOCAL_APP`.
#[derive(Clone, Debug, Serialize)]
pub struct ExplicitInbound {
    pub listen: SocketAddr,
    pub app: SocketAddr,
}

/// Every listener of a direction: (address, what it serves).
pub type Listeners<T> = Vec<(SocketAddr, T)>;

// === impl ListenerArgs ===

impl ListenerArgs {
    /// The inbound and outbound listeners; explicit outbound identities must
    /// belong to `trust_domain`, and at least one listener must run.
    /// `control_plane` says whether certificates come from a control plane,
    /// which discovery needs.
    pub fn into_listeners(
        self,
        trust_domain: &TrustDomain,
        control_plane: bool,
    ) -> Result<(Listeners<InboundTarget>, Listeners<OutboundTarget>), ConfigError> {
        if self.discovery && !control_plane {
            return Err(ConfigError {
                flag: "--discovery",
                value: "true".into(),
                why: "the stream goes to the control plane and presents its certificate: it needs --control-plane",
            });
        }
        if self.outbound_mode == OutboundMode::Strict && !self.discovery {
            return Err(ConfigError {
                flag: "--outbound-mode",
                value: "strict".into(),
                why: "strict mode refuses what discovery knows as unmeshed: it needs --discovery true",
            });
        }
        let routing = self.discovery.then_some(Routing {
            mode: self.outbound_mode,
            wait: self.discovery_wait,
        });
        let mut inbound = Vec::new();
        let mut outbound = Vec::new();
        if self.transparent {
            let server_first_ports: HashSet<u16> =
                self.server_first_ports.iter().copied().collect();
            for addr in &self.inbound_addr {
                inbound.push((
                    *addr,
                    InboundTarget::Transparent {
                        mode: self.inbound_mode,
                        server_first_ports: server_first_ports.clone(),
                    },
                ));
            }
            for addr in &self.outbound_addr {
                outbound.push((
                    *addr,
                    OutboundTarget::Transparent {
                        mesh_networks: self.mesh_networks.clone(),
                        exclude_ports: self.exclude_outbound_ports.iter().copied().collect(),
                        discovery: routing,
                    },
                ));
            }
        }
        for e in self.explicit_inbound {
            inbound.push((e.listen, InboundTarget::Explicit { app: e.app }));
        }
        for e in self.explicit_outbound {
            if !e.identity.is_member_of(trust_domain) {
                return Err(ConfigError {
                    flag: "--explicit-outbound",
                    value: e.identity.to_string(),
                    why: "the expected identity is outside --trust-domain",
                });
            }
            outbound.push((
                e.listen,
                OutboundTarget::Explicit {
                    upstream: e.upstream,
                    identity: e.identity,
                },
            ));
        }
        if inbound.is_empty() && outbound.is_empty() {
            return Err(ConfigError {
                flag: "--transparent",
                value: "false".into(),
                why: "with no --explicit-inbound or --explicit-outbound there is nothing to run",
            });
        }
        Ok((inbound, outbound))
    }
}

// === impl LimitArgs ===

impl LimitArgs {
    /// The data plane's timeouts.
    pub fn limits(&self) -> Limits {
        Limits {
            handshake: self.handshake_timeout,
            detect: self.detect_timeout,
            server_first_wait: self.server_first_wait,
            connect: self.connect_timeout,
            idle: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
        }
    }

    /// The connection limit, which must admit at least one connection.
    pub fn max_connections(&self) -> Result<usize, ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError {
                flag: "--max-connections",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        Ok(self.max_connections)
    }
}

fn parse_explicit_outbound(s: &str) -> Result<ExplicitOutbound, String> {
    let (listen, rest) = s
        .split_once('=')
        .ok_or("expected LISTEN=UPSTREAM,SPIFFE_ID, e.g. 127.0.0.1:7001=10.0.0.7:15006,spiffe://cluster.local/ns/prod/sa/api")?;
    let (upstream, identity) = rest
        .split_once(',')
        .ok_or("expected LISTEN=UPSTREAM,SPIFFE_ID: the SPIFFE ID after the comma is missing")?;
    if !upstream.contains(':') {
        return Err(format!("upstream {upstream:?} needs a port (HOST:PORT)"));
    }
    Ok(ExplicitOutbound {
        listen: listen
            .parse()
            .map_err(|e| format!("listen address {listen:?}: {e}"))?,
        upstream: upstream.to_owned(),
        identity: identity
            .parse()
            .map_err(|e| format!("identity {identity:?}: {e}"))?,
    })
}

fn parse_explicit_inbound(s: &str) -> Result<ExplicitInbound, String> {
    let (listen, app) = s
        .split_once('=')
        .ok_or("expected LISTEN=LOCAL_APP, e.g. 0.0.0.0:7002=127.0.0.1:8080")?;
    Ok(ExplicitInbound {
        listen: listen
            .parse()
            .map_err(|e| format!("listen address {listen:?}: {e}"))?,
        app: app
            .parse()
            .map_err(|e| format!("app address {app:?}: {e}"))?,
    })
}
