//! What the sidecar knows from discovery, and the outbound decision it
//! drives.
//!
//! [`Destinations`] holds, per address, what the control plane says must
//! answer there. It is written by the discovery stream (a snapshot, then
//! changes) and read once per outbound connection. A message that does not
//! decode is refused as a whole and the state stays as it was; the stream
//! then reconnects for a fresh snapshot.
//!
//! [`decide`] is the outbound decision, one row per case:
//!
//! | what discovery says | permissive | strict |
//! | --- | --- | --- |
//! | a meshed workload | mesh TLS, exactly its identity | the same |
//! | a pod without a sidecar, a node | plain TCP | refused |
//! | two live pods, or no derivable identity | refused | refused |
//! | nothing, inside the cluster networks | plain TCP | refused |
//! | nothing, outside them | plain TCP | plain TCP |

use std::{
    collections::HashMap,
    net::IpAddr,
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

pub mod client;

pub use client::{DiscoveryClient, StreamConfig};

#[cfg(test)]
mod tests;

/// What to do with one outbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Mesh TLS; the server must present exactly this identity.
    Mesh(SpiffeId),
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

/// The outbound decision for `resolution` (what discovery says of the
/// destination address; `None`: nothing).
pub fn decide(
    resolution: Option<&Resolution>,
    address: IpAddr,
    mode: OutboundMode,
    cluster_networks: &[IpNet],
) -> Decision {
    let strict = mode == OutboundMode::Strict;
    match resolution {
        Some(Resolution::Meshed(id)) => Decision::Mesh(id.clone()),
        Some(Resolution::Conflict) => Decision::Refuse(Refusal::Conflict),
        Some(Resolution::Unidentifiable) => Decision::Refuse(Refusal::Unidentifiable),
        Some(Resolution::Unmeshed) if strict => Decision::Refuse(Refusal::StrictUnmeshed),
        Some(Resolution::Unmeshed) => Decision::Plain(Kind::Unmeshed),
        None if strict && cluster_networks.iter().any(|n| n.contains(&address)) => {
            Decision::Refuse(Refusal::StrictUnknown)
        }
        None => Decision::Plain(Kind::Unknown),
    }
}

/// Per address, what must answer there.
///
/// Read once per outbound connection without a lock: the table is an
/// immutable map swapped whole. The stream (the only writer) builds the next
/// map from the current one; changes are rare next to connections.
#[derive(Debug)]
pub struct Destinations {
    /// `None` until the first snapshot.
    known: ArcSwapOption<HashMap<IpAddr, Resolution>>,
    /// Serializes writers, so no change is lost between load and store.
    writer: Mutex<()>,
    /// Set once the first snapshot is in.
    synced: watch::Sender<bool>,
}

/// What one stream message changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The message was a snapshot.
    pub snapshot: bool,
    /// Addresses set or changed.
    pub set: usize,
    /// Addresses dropped.
    pub removed: usize,
}

impl Default for Destinations {
    fn default() -> Self {
        Self {
            known: ArcSwapOption::empty(),
            writer: Mutex::new(()),
            synced: watch::Sender::new(false),
        }
    }
}

impl Destinations {
    /// Applies one stream message, all or nothing. A change before the first
    /// snapshot is refused: there is nothing to change yet.
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
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut map = if message.snapshot {
            HashMap::with_capacity(set.len())
        } else {
            let current = self.known.load_full().ok_or(ApplyError::BeforeSnapshot)?;
            (*current).clone()
        };
        for address in &removed {
            map.remove(address);
        }
        let applied = Applied {
            snapshot: message.snapshot,
            set: set.len(),
            removed: removed.len(),
        };
        map.extend(set);
        self.known.store(Some(Arc::new(map)));
        if message.snapshot {
            self.synced.send_replace(true);
        }
        Ok(applied)
    }

    /// Waits at most `limit` for the first snapshot; whether it is in.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        // The sender lives in `self`: it cannot be dropped while we wait.
        tokio::time::timeout(limit, synced.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// What must answer at `address`: `Err` before the first snapshot,
    /// `Ok(None)` when discovery does not know it.
    pub fn resolve(&self, address: IpAddr) -> Result<Option<Resolution>, NotSynced> {
        let known = self.known.load();
        let map = known.as_ref().ok_or(NotSynced)?;
        Ok(map.get(&address).cloned())
    }

    /// How many addresses are known (0 before the first snapshot).
    pub fn len(&self) -> usize {
        self.known.load().as_ref().map_or(0, |map| map.len())
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
}
