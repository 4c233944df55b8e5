//! The discovery state the sources write and the streams read.
//!
//! One [`Directory`] behind a lock, and a broadcast of what changed. A
//! stream subscribes and takes its snapshot under the same lock, so it sees
//! every change after its snapshot and none twice. A stream that falls
//! behind is told so by the broadcast (`Lagged`) and starts again from a
//! fresh snapshot.
//!
//! Only real changes are broadcast: the state keeps what it last published
//! per address and drops a change that resolves the same (a pod's status
//! moves on every readiness flip; its address and identity rarely do).

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use k8s_openapi::api::core::v1::Pod;
use palisade_proto::{SpiffeId, TrustDomain};
use tokio::sync::{broadcast, watch};

use super::model::{Claim, Directory, Resolution, Workload};

/// How many changes a slow stream may fall behind before it resyncs.
const CHANGES_BUFFERED: usize = 1024;

/// One batch of changes: each address with its new resolution, or `None`
/// when no live pod claims it any more.
pub type Changes = Arc<Vec<(IpAddr, Option<Resolution>)>>;

/// What discovery knows, shared by its sources and its streams.
#[derive(Debug)]
pub struct Discovery {
    trust_domain: TrustDomain,
    directory: Mutex<Published>,
    changes: broadcast::Sender<Changes>,
    synced: watch::Sender<bool>,
}

/// The directory and what was last broadcast of it, under one lock.
#[derive(Debug, Default)]
struct Published {
    directory: Directory,
    resolutions: HashMap<IpAddr, Resolution>,
}

/// Why a caller's stream cannot be bound to a pod.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("no live pod has the address {0}")]
    NoPod(IpAddr),
    #[error("more than one live pod has the address {0}")]
    Contested(IpAddr),
    #[error("the pod at {address} ({pod}) is not a meshed workload of {identity}")]
    OtherIdentity {
        address: IpAddr,
        pod: String,
        identity: SpiffeId,
    },
}

impl Discovery {
    pub fn new(trust_domain: TrustDomain) -> Arc<Self> {
        Arc::new(Self {
            trust_domain,
            directory: Mutex::new(Published::default()),
            changes: broadcast::channel(CHANGES_BUFFERED).0,
            synced: watch::channel(false).0,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    fn lock(&self) -> MutexGuard<'_, Published> {
        // Every update leaves the directory whole; a panic elsewhere does not
        // make it unusable.
        self.directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces everything with `pods` (a list, or a relist).
    pub fn replace_pods(&self, pods: &[Pod]) {
        self.update(|d, td| d.replace_all(pods, td));
    }

    /// Replaces everything with `workloads` (the `file` source).
    pub fn replace_workloads(&self, workloads: Vec<(String, Workload)>) {
        self.update(|d, _| d.replace_workloads(workloads));
    }

    /// A pod added or changed.
    pub fn apply_pod(&self, pod: &Pod) {
        self.update(|d, td| d.apply(pod, td));
    }

    /// A pod deleted.
    pub fn delete_pod(&self, pod: &Pod) {
        self.update(|d, _| d.delete(pod));
    }

    /// Changes the directory with `change` and broadcasts the resolutions of
    /// the addresses it names, under one lock.
    fn update(&self, change: impl FnOnce(&mut Directory, &TrustDomain) -> BTreeSet<IpAddr>) {
        let mut guard = self.lock();
        let Published {
            directory,
            resolutions,
        } = &mut *guard;
        let changed = change(directory, &self.trust_domain);
        let mut changes = Vec::new();
        for address in changed {
            let now = directory.resolve(address);
            if now.as_ref() == resolutions.get(&address) {
                continue;
            }
            match &now {
                Some(resolution) => resolutions.insert(address, resolution.clone()),
                None => resolutions.remove(&address),
            };
            changes.push((address, now));
        }
        if changes.is_empty() {
            return;
        }
        // No receiver is no error: no stream is open.
        let _ = self.changes.send(Arc::new(changes));
    }

    /// The state now, in address order, and the changes after it.
    pub fn subscribe(&self) -> (Vec<(IpAddr, Resolution)>, broadcast::Receiver<Changes>) {
        let published = self.lock();
        let mut snapshot: Vec<_> = published
            .resolutions
            .iter()
            .map(|(a, r)| (*a, r.clone()))
            .collect();
        snapshot.sort_unstable_by_key(|(a, _)| *a);
        (snapshot, self.changes.subscribe())
    }

    /// What `address` must answer with now.
    pub fn resolve(&self, address: IpAddr) -> Option<Resolution> {
        self.lock().resolutions.get(&address).cloned()
    }

    /// How many live pods claim an address.
    pub fn workloads(&self) -> usize {
        self.lock().directory.workloads()
    }

    /// How many addresses are known.
    pub fn addresses(&self) -> usize {
        self.lock().resolutions.len()
    }

    /// The one live, meshed pod at `address` whose identity is `identity`:
    /// the pod a caller's stream is bound to. Returns its `namespace/name`.
    pub fn bind(&self, address: IpAddr, identity: &SpiffeId) -> Result<String, BindError> {
        let published = self.lock();
        let claimants = published.directory.claimants(address);
        let [pod] = claimants.as_slice() else {
            return Err(if claimants.is_empty() {
                BindError::NoPod(address)
            } else {
                BindError::Contested(address)
            });
        };
        match &pod.claim {
            Claim::Meshed(id) if id == identity => Ok(pod.name.clone()),
            _ => Err(BindError::OtherIdentity {
                address,
                pod: pod.name.clone(),
                identity: identity.clone(),
            }),
        }
    }

    /// The sources have delivered a complete state at least once.
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until [`Self::mark_synced`].
    pub async fn synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives in `self`: it cannot be dropped while we wait.
        let _ = rx.wait_for(|synced| *synced).await;
    }
}
