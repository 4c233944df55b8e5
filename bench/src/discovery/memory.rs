//! Memory of one sidecar's discovery state, counted by the allocator.
//!
//! The binary installs `stats_alloc`'s counting wrapper around the system
//! allocator as its global allocator, and this module reads its counters
//! around building a `palisade_sidecar::discovery::Destinations` from a
//! snapshot the control plane sent, its parts applied one by one as the
//! sidecar's stream client applies them (addresses and Services). The figure is the heap the state holds
//! afterwards: bytes requested and not freed (what glibc adds per
//! allocation, about 8–16 bytes, is not in it; the live allocations are
//! counted so it can be estimated). The counters are process-wide, so the
//! measurement runs while nothing else in this process works: before any
//! stream but the probe's is opened.

use std::alloc::System;

use anyhow::{Context, Result, ensure};
use palisade_proto::discovery::v1::WatchResponse;
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
    /// Addresses, Services and Service endpoints in the snapshot.
    pub addresses: usize,
    pub services: usize,
    pub endpoints: usize,
    /// `Destinations` after every part was applied in order, as the
    /// sidecar's stream client applies them.
    pub destinations: Held,
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
    let addresses = parts.iter().map(|p| p.addresses.len()).sum();
    let services = parts.iter().map(|p| p.services.len()).sum();
    let endpoints = parts
        .iter()
        .flat_map(|p| &p.services)
        .flat_map(|s| &s.ports)
        .map(|p| p.endpoints.len())
        .sum();

    let region = Region::new(alloc);
    let destinations = Destinations::default();
    for part in parts {
        destinations
            .apply(part)
            .context("the sidecar's Destinations refused a snapshot part")?;
    }
    let mut held = Held::of(&region);
    held.bytes += std::mem::size_of::<Destinations>() as u64;
    ensure!(
        destinations.len() == addresses && destinations.services() == services,
        "Destinations knows {} addresses and {} Services of the {addresses} and {services} sent",
        destinations.len(),
        destinations.services()
    );
    Ok(SidecarMemory {
        parts: parts.len(),
        encoded_bytes: parts.iter().map(prost::Message::encoded_len).sum(),
        addresses,
        services,
        endpoints,
        destinations: held,
    })
}
