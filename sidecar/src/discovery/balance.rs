//! Choosing a Service endpoint for one connection.
//!
//! Power of two choices on connections in flight: of two endpoints drawn at
//! random, the one with fewer open connections. It needs no shared queue
//! and no lock (each endpoint's count is an atomic), spreads new connections
//! nearly as well as least-connections over all endpoints, and, unlike
//! least-connections, does not send a burst of simultaneous connections all
//! to the one endpoint that was least loaded a moment ago.
//!
//! An endpoint that refuses or does not answer a connect is marked down for
//! [`DOWN_FOR`] and not chosen while another is up; when every endpoint left
//! is down they are tried anyway, since a mark is only a guess that ages.
//! The counts and marks live with the endpoint's address and are carried
//! over when discovery sends the Service again, so an update neither resets
//! the balance nor touches a connection that is open.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use palisade_proto::SpiffeId;
use rand::Rng;
use tokio::time::Instant;

/// How long an endpoint that failed a connect is passed over.
pub const DOWN_FOR: Duration = Duration::from_secs(5);

/// One endpoint of a Service port, as the sidecar dials it.
#[derive(Clone, Debug)]
pub struct Backend {
    /// The pod address and target port.
    pub address: SocketAddr,
    /// Who must answer (mesh TLS); `None`: plain TCP.
    pub identity: Option<SpiffeId>,
    /// Connections in flight and the down mark, shared across updates.
    pub load: Arc<Load>,
}

/// What one endpoint is carrying, and whether it was found down.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicUsize,
    /// When the mark was made is kept relative to this instant.
    since: Instant,
    /// Milliseconds after `since` until which the endpoint is down; 0: up.
    down_until: AtomicU64,
}

/// One connection counted against an endpoint, for as long as it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Load>);

// === impl Backend ===

impl PartialEq for Backend {
    /// The same endpoint answered the same way; its load is not compared.
    fn eq(&self, other: &Self) -> bool {
        self.address == other.address && self.identity == other.identity
    }
}

impl Eq for Backend {}

// === impl Load ===

impl Default for Load {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            since: Instant::now(),
            down_until: AtomicU64::new(0),
        }
    }
}

impl Load {
    /// Counts one more connection until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Connections open to the endpoint now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks the endpoint down for [`DOWN_FOR`] from `now`.
    pub fn mark_down(&self, now: Instant) {
        let until = now.saturating_duration_since(self.since) + DOWN_FOR;
        // 0 means "up"; a mark is at least 1 ms after `since`.
        let until = u64::try_from(until.as_millis()).unwrap_or(u64::MAX).max(1);
        self.down_until.store(until, Ordering::Relaxed);
    }

    /// Whether the endpoint is marked down at `now`.
    pub fn is_down(&self, now: Instant) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        until != 0 && u128::from(until) > now.saturating_duration_since(self.since).as_millis()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoint of `backends` to try next, `None` when every one is in
/// `tried`: of two drawn among those not tried and not down (all not tried
/// when every one is down), the one with fewer connections in flight.
pub fn pick(
    backends: &[Backend],
    tried: &[bool],
    now: Instant,
    rng: &mut impl Rng,
) -> Option<usize> {
    let untried = || (0..backends.len()).filter(|i| !tried.get(*i).copied().unwrap_or(false));
    let mut candidates: Vec<usize> = untried()
        .filter(|i| !backends[*i].load.is_down(now))
        .collect();
    if candidates.is_empty() {
        candidates = untried().collect();
    }
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let first = rng.random_range(0..n);
            let mut second = rng.random_range(0..n - 1);
            if second >= first {
                second += 1;
            }
            let (a, b) = (candidates[first], candidates[second]);
            Some(
                if backends[b].load.in_flight() < backends[a].load.in_flight() {
                    b
                } else {
                    a
                },
            )
        }
    }
}
