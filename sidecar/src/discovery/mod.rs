//! What the sidecar knows from discovery, and the outbound decision it
//! drives.
//!
//! [`Destinations`] holds, per address, what the control plane says must
//! answer there, and per Service cluster address its ports' ready
//! endpoints. It is written by the discovery stream (a snapshot, possibly in
//! parts, then changes) and read once per outbound connection. A message
//! that does not decode is refused as a whole and the state stays as it was;
//! the stream then reconnects for a fresh snapshot.
//!
//! [`decide`] is the outbound decision, one row per case:
//!
//! | what discovery says | permissive | strict |
//! | --- | --- | --- |
//! | a meshed workload | mesh TLS, exactly its identity | the same |
//! | a pod without a sidecar, a node | plain TCP | refused |
//! | two live pods, or no derivable identity | refused | refused |
//! | a Service port with endpoints | one endpoint ([`balance`]): mesh TLS with its identity, or plain TCP to an unmeshed one | meshed endpoints only |
//! | a Service port without endpoints, or not a port of the Service | refused | refused |
//! | nothing, inside the cluster networks | plain TCP | refused |
//! | nothing, outside them | plain TCP | plain TCP |
//!
//! The sidecar never dials a cluster address: it connects to the endpoint
//! it chose, so the identity it checks is that of the pod that answers, not
//! of whichever pod kube-proxy would have picked after the check.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use arc_swap::ArcSwapOption;

use ipnet::IpNet;
use palisade_proto::{
    SpiffeId,
    discovery::{self, Resolution, WireError, v1::WatchResponse},
};
use serde::Serialize;
use tokio::sync::watch;

pub mod balance;
pub mod client;

pub use balance::{Backend, InFlight, Load};
pub use client::{DiscoveryClient, StreamConfig};

#[cfg(test)]
mod tests;

/// What to do with one outbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Mesh TLS; the server must present exactly this identity.
    Mesh(SpiffeId),
    /// A Service port: connect to one of its endpoints.
    Service(ServiceRoute),
    /// Plain TCP, as the app sent it.
    Plain(Kind),
    /// Refused before a byte is sent.
    Refuse(Refusal),
}

/// Why plain TCP: what discovery knows of the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A pod without a sidecar, or a node address.
    Unmeshed,
    /// An address discovery does not know.
    Unknown,
}

/// Why an outbound connection is refused: the `reason` of
/// `palisade_outbound_refusals_total`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray, strum::Display,
)]
#[strum(serialize_all = "snake_case")]
pub enum Refusal {
    /// More than one live pod claims the address.
    Conflict,
    /// The pod there has a sidecar but no identity can be derived for it.
    Unidentifiable,
    /// Strict mode: plain TCP to an address discovery knows.
    StrictUnmeshed,
    /// Strict mode: plain TCP into the cluster networks.
    StrictUnknown,
    /// Discovery delivered no snapshot within `--discovery-wait`.
    NotSynced,
    /// A Service port with no ready endpoint.
    NoEndpoints,
    /// A Service's cluster address, on a port the Service does not have.
    NoServicePort,
    /// Every endpoint of a Service port refused or did not answer within
    /// the connect budget.
    EndpointsUnreachable,
}

/// What discovery knows of one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A pod or node address.
    Address(Resolution),
    /// A Service's cluster address.
    Service(Arc<ServiceTarget>),
    /// Nothing.
    Unknown,
}

/// A Service's cluster address, as the sidecar dials it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTarget {
    /// `namespace/name`, for logs.
    pub name: String,
    pub ports: Vec<PortTarget>,
}

/// One port of a Service and its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortTarget {
    pub port: u16,
    pub backends: Vec<Backend>,
}

/// The endpoints one outbound connection may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRoute {
    pub service: Arc<ServiceTarget>,
    /// The index of the port in `service.ports`.
    pub port: usize,
    /// Strict mode: unmeshed endpoints are not candidates.
    pub meshed_only: bool,
}

/// Whether plain TCP is allowed where mesh TLS is not possible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundMode {
    /// Plain TCP to unmeshed and unknown addresses, counted.
    #[default]
    Permissive,
    /// No plain TCP to an address discovery knows or inside the cluster
    /// networks.
    Strict,
}

/// The outbound decision for `dst`, of which discovery knows `lookup`.
pub fn decide(
    lookup: Lookup,
    dst: SocketAddr,
    mode: OutboundMode,
    cluster_networks: &[IpNet],
) -> Decision {
    let strict = mode == OutboundMode::Strict;
    match lookup {
        Lookup::Address(Resolution::Meshed(id)) => Decision::Mesh(id),
        Lookup::Address(Resolution::Conflict) => Decision::Refuse(Refusal::Conflict),
        Lookup::Address(Resolution::Unidentifiable) => Decision::Refuse(Refusal::Unidentifiable),
        Lookup::Address(Resolution::Unmeshed) if strict => {
            Decision::Refuse(Refusal::StrictUnmeshed)
        }
        Lookup::Address(Resolution::Unmeshed) => Decision::Plain(Kind::Unmeshed),
        Lookup::Service(service) => {
            let Some(port) = service.ports.iter().position(|p| p.port == dst.port()) else {
                return Decision::Refuse(Refusal::NoServicePort);
            };
            let backends = &service.ports[port].backends;
            if backends.is_empty() {
                Decision::Refuse(Refusal::NoEndpoints)
            } else if strict && backends.iter().all(|b| b.identity.is_none()) {
                Decision::Refuse(Refusal::StrictUnmeshed)
            } else {
                Decision::Service(ServiceRoute {
                    service,
                    port,
                    meshed_only: strict,
                })
            }
        }
        Lookup::Unknown if strict && cluster_networks.iter().any(|n| n.contains(&dst.ip())) => {
            Decision::Refuse(Refusal::StrictUnknown)
        }
        Lookup::Unknown => Decision::Plain(Kind::Unknown),
    }
}

// === impl ServiceRoute ===

impl ServiceRoute {
    /// The endpoints this connection may use; in strict mode the others are
    /// marked tried so they are never picked.
    pub fn backends(&self) -> (&[Backend], Vec<bool>) {
        let backends = &self.service.ports[self.port].backends;
        let tried = backends
            .iter()
            .map(|b| self.meshed_only && b.identity.is_none())
            .collect();
        (backends, tried)
    }
}

// === impl ServiceTarget ===

impl ServiceTarget {
    /// `service` as the sidecar dials it, keeping the load of every
    /// endpoint `previous` (what was known at the same address) had.
    fn new(service: discovery::Service, previous: Option<&ServiceTarget>) -> Self {
        let loads: HashMap<SocketAddr, &Arc<Load>> = previous
            .into_iter()
            .flat_map(|p| &p.ports)
            .flat_map(|p| &p.backends)
            .map(|b| (b.address, &b.load))
            .collect();
        Self {
            name: service.name,
            ports: service
                .ports
                .into_iter()
                .map(|p| PortTarget {
                    port: p.port,
                    backends: p
                        .endpoints
                        .into_iter()
                        .map(|e| Backend {
                            load: loads
                                .get(&e.address)
                                .map_or_else(Arc::default, |l| Arc::clone(l)),
                            address: e.address,
                            identity: e.identity,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Per address, what must answer there; per Service cluster address, its
/// endpoints.
///
/// Read once per outbound connection without a lock: the tables are
/// immutable maps swapped whole. The stream (the only writer) builds the
/// next maps from the current ones; changes are rare next to connections.
#[derive(Debug)]
pub struct Destinations {
    /// `None` until the first snapshot.
    known: ArcSwapOption<Known>,
    /// Serializes writers, so no change is lost between load and store, and
    /// holds the parts of a snapshot still arriving.
    writer: Mutex<Option<Known>>,
    /// Set once the first snapshot is in.
    synced: watch::Sender<bool>,
}

/// Everything discovery has said, at one moment.
///
/// Persistent maps: a change copies the few nodes it touches and shares the
/// rest with the table in use, so applying one change to a 10,000-pod table
/// costs microseconds rather than a copy of the table, and the old and the
/// new table together take little more memory than one.
#[derive(Clone, Debug, Default)]
struct Known {
    addresses: imbl::HashMap<IpAddr, Resolution>,
    services: imbl::HashMap<IpAddr, Arc<ServiceTarget>>,
}

/// What one stream message changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The message was a snapshot.
    pub snapshot: bool,
    /// Addresses and Services set or changed.
    pub set: usize,
    /// Addresses and Services dropped.
    pub removed: usize,
    /// A part of a snapshot: nothing is in use until its last part.
    pub partial: bool,
}

impl Default for Destinations {
    fn default() -> Self {
        Self {
            known: ArcSwapOption::empty(),
            writer: Mutex::new(None),
            synced: watch::Sender::new(false),
        }
    }
}

impl Destinations {
    /// Applies one stream message, all or nothing. A change before the first
    /// snapshot is refused: there is nothing to change yet. The parts of a
    /// snapshot are gathered and take effect together with the last one.
    pub fn apply(&self, message: &WatchResponse) -> Result<Applied, ApplyError> {
        let set = message
            .addresses
            .iter()
            .map(discovery::decode)
            .collect::<Result<Vec<_>, _>>()?;
        let removed = message
            .removed
            .iter()
            .map(|ip| discovery::decode_ip(ip))
            .collect::<Result<Vec<_>, _>>()?;
        let services = message
            .services
            .iter()
            .map(discovery::decode_service)
            .collect::<Result<Vec<_>, _>>()?;
        let removed_services = message
            .removed_services
            .iter()
            .map(|ip| discovery::decode_ip(ip))
            .collect::<Result<Vec<_>, _>>()?;
        if message.partial && !message.snapshot {
            return Err(ApplyError::PartialChange);
        }
        let applied = Applied {
            snapshot: message.snapshot,
            set: set.len() + services.len(),
            removed: removed.len() + removed_services.len(),
            partial: message.partial,
        };

        let mut pending = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.known.load_full();
        let mut next = if message.snapshot {
            pending.take().unwrap_or_default()
        } else {
            if pending.is_some() {
                *pending = None;
                return Err(ApplyError::UnfinishedSnapshot);
            }
            Known::clone(current.as_ref().ok_or(ApplyError::BeforeSnapshot)?)
        };
        for address in &removed {
            next.addresses.remove(address);
        }
        for address in &removed_services {
            next.services.remove(address);
        }
        next.addresses.extend(set);
        for (address, service) in services {
            // Loads carry over from what is in use, not from the parts.
            let previous = current.as_ref().and_then(|c| c.services.get(&address));
            let target = ServiceTarget::new(service, previous.map(|p| &**p));
            next.services.insert(address, Arc::new(target));
        }
        if message.partial {
            *pending = Some(next);
            return Ok(applied);
        }
        self.known.store(Some(Arc::new(next)));
        if message.snapshot {
            self.synced.send_replace(true);
        }
        Ok(applied)
    }

    /// Forgets the parts of a snapshot still arriving (the stream that sent
    /// them is gone).
    pub fn abandon_partial(&self) {
        *self.writer.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Waits at most `limit` for the first snapshot; whether it is in.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        // The sender lives in `self`: it cannot be dropped while we wait.
        tokio::time::timeout(limit, synced.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// What discovery knows of `dst`: `Err` before the first snapshot. A
    /// pod or node address is looked up before a Service's (they never
    /// overlap in a cluster; if they did, the pod that answers there is the
    /// one to verify).
    pub fn lookup(&self, dst: SocketAddr) -> Result<Lookup, NotSynced> {
        let known = self.known.load();
        let known = known.as_ref().ok_or(NotSynced)?;
        let address = dst.ip().to_canonical();
        Ok(if let Some(resolution) = known.addresses.get(&address) {
            Lookup::Address(resolution.clone())
        } else if let Some(service) = known.services.get(&address) {
            Lookup::Service(service.clone())
        } else {
            Lookup::Unknown
        })
    }

    /// What must answer at the pod or node `address`: `Err` before the
    /// first snapshot, `Ok(None)` when discovery does not know it.
    pub fn resolve(&self, address: IpAddr) -> Result<Option<Resolution>, NotSynced> {
        let known = self.known.load();
        let known = known.as_ref().ok_or(NotSynced)?;
        Ok(known.addresses.get(&address.to_canonical()).cloned())
    }

    /// How many addresses are known (0 before the first snapshot).
    pub fn len(&self) -> usize {
        self.known.load().as_ref().map_or(0, |k| k.addresses.len())
    }

    /// How many Service cluster addresses are known.
    pub fn services(&self) -> usize {
        self.known.load().as_ref().map_or(0, |k| k.services.len())
    }

    /// Whether no address is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// No snapshot has arrived yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("discovery has not delivered its first snapshot yet")]
pub struct NotSynced;

/// Why a stream message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("a change arrived before the first snapshot")]
    BeforeSnapshot,
    #[error("a change arrived marked as a part of a snapshot")]
    PartialChange,
    #[error("a change arrived before the last part of a snapshot")]
    UnfinishedSnapshot,
}
