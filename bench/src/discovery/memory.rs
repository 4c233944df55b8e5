//! Memory of one sidecar's discovery state, counted by the allocator.
//!
//! The binary installs `stats_alloc`'s counting wrapper around the system
//! allocator as its global allocator, and this module reads its counters
//! around building a `palisade_sidecar::discovery::Destinations` from a
//! snapshot the control plane sent. The figure is the heap the state holds
//! afterwards: bytes requested and not freed (what glibc adds per
//! allocation, about 8–16 bytes, is not in it; the live allocations are
//! counted so it can be estimated). The counters are process-wide, so the
//! measurement runs while nothing else in this process works: before any
//! stream but the probe's is opened.

use std::{alloc::System, net::IpAddr};

use anyhow::{Context, Result};
use palisade_proto::discovery::{self, v1::WatchResponse};
use palisade_sidecar::discovery::Destinations;
use stats_alloc::{Region, StatsAlloc};

/// Heap held by a structure: bytes and live allocations.
#[derive(Clone, Copy, Debug, Default)]
pub struct Held {
    pub bytes: u64,
    pub allocations: u64,
}

/// What one sidecar's discovery state costs at this size.
#[derive(Clone, Copy, Debug, Default)]
pub struct SidecarMemory {
    /// Snapshot parts, and their encoded bytes.
    pub parts: usize,
    pub encoded_bytes: usize,
    /// Addresses and Services in the snapshot.
    pub addresses: usize,
    pub services: usize,
    pub endpoints: usize,
    /// `Destinations` with the whole snapshot applied as one message.
    pub destinations: Held,
    /// Addresses `Destinations` knows after the parts were applied one at a
    /// time, as `DiscoveryClient::follow` applies messages.
    pub known_after_parts: usize,
    /// The snapshot's Services decoded (`palisade_proto::discovery::Service`
    /// by cluster IP, in a `Vec`): what a sidecar holds at least if it keeps
    /// them in that form. `Destinations` does not keep Services.
    pub services_decoded: Held,
}

// === impl Held ===

impl Held {
    fn of(region: &Region<'_, System>) -> Self {
        let change = region.change();
        Self {
            bytes: (change.bytes_allocated as u64).saturating_sub(change.bytes_deallocated as u64),
            allocations: (change.allocations as u64).saturating_sub(change.deallocations as u64),
        }
    }
}

/// Measures the sidecar's discovery state built from `parts`, a whole
/// snapshot as the control plane sent it.
pub fn measure(
    parts: &[WatchResponse],
    alloc: &'static StatsAlloc<System>,
) -> Result<SidecarMemory> {
    let merged = WatchResponse {
        snapshot: true,
        partial: false,
        addresses: parts.iter().flat_map(|p| p.addresses.clone()).collect(),
        removed: Vec::new(),
        services: parts.iter().flat_map(|p| p.services.clone()).collect(),
        removed_services: Vec::new(),
    };
    let endpoints = merged
        .services
        .iter()
        .flat_map(|s| &s.ports)
        .map(|p| p.endpoints.len())
        .sum();

    let region = Region::new(alloc);
    let destinations = Destinations::default();
    destinations
        .apply(&merged)
        .context("the sidecar's Destinations refused the snapshot")?;
    let mut held = Held::of(&region);
    held.bytes += std::mem::size_of::<Destinations>() as u64;
    let known = destinations.len();
    drop(destinations);

    let region = Region::new(alloc);
    let services: Vec<(IpAddr, discovery::Service)> = merged
        .services
        .iter()
        .map(discovery::decode_service)
        .collect::<Result<_, _>>()
        .context("a Service of the snapshot does not decode")?;
    let services_decoded = Held::of(&region);
    drop(services);

    let by_parts = Destinations::default();
    for part in parts {
        by_parts
            .apply(part)
            .context("the sidecar's Destinations refused a snapshot part")?;
    }
    anyhow::ensure!(
        known == merged.addresses.len(),
        "Destinations knows {known} addresses of the {} sent",
        merged.addresses.len()
    );
    Ok(SidecarMemory {
        parts: parts.len(),
        encoded_bytes: parts.iter().map(prost::Message::encoded_len).sum(),
        addresses: merged.addresses.len(),
        services: merged.services.len(),
        endpoints,
        destinations: held,
        known_after_parts: by_parts.len(),
        services_decoded,
    })
}
