//! The discovery state the sources write and the streams read.
//!
//! One [`Directory`] of pods and the [`Services`] behind one lock, and a
//! broadcast of what changed. A
//! stream subscribes and takes its snapshot under the same lock, so it sees
//! every change after its snapshot and none twice. A stream that falls
//! behind is told so by the broadcast (`Lagged`) and starts again from a
//! fresh snapshot.
//!
//! Only real changes are broadcast: the state keeps what it last published
//! per address and drops a change that resolves the same (a pod's status
//! moves on every readiness flip; its address and identity rarely do). A pod
//! whose answer changes also changes every Service with an endpoint at its
//! address, in the same batch, so a sidecar never sees a Service endpoint
//! answered differently from the address itself.
//!
//! The snapshot streams start from is built once per state and shared: a
//! thousand sidecars reconnecting at once cost one copy, not a thousand.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use k8s_openapi::api::core::v1::Pod;
use palisade_proto::{SpiffeId, TrustDomain, discovery::Service};
use tokio::sync::{broadcast, watch};

use super::{
    file::Parsed,
    model::{Claim, Directory, Resolution, Workload},
    services::{ServiceDef, Services, SliceDef},
};

/// How many changes a slow stream may fall behind before it resyncs.
const CHANGES_BUFFERED: usize = 1024;

/// One batch of changes, shared by every stream.
pub type Changes = Arc<Change>;

/// What one update changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Each address with its new resolution, or `None` when no live pod
    /// claims it any more.
    pub addresses: Vec<(IpAddr, Option<Resolution>)>,
    /// Each cluster address with its Service now, or `None` when no Service
    /// has it any more.
    pub services: Vec<(IpAddr, Option<Arc<Service>>)>,
}

/// The whole state at one moment, in address order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub addresses: Vec<(IpAddr, Resolution)>,
    pub services: Vec<(IpAddr, Arc<Service>)>,
}

/// What an update touched: the addresses and cluster addresses whose answer
/// may have changed.
#[derive(Debug, Default)]
struct Touched {
    addresses: BTreeSet<IpAddr>,
    services: BTreeSet<IpAddr>,
}

/// What discovery knows, shared by its sources and its streams.
#[derive(Debug)]
pub struct Discovery {
    trust_domain: TrustDomain,
    directory: Mutex<Published>,
    changes: broadcast::Sender<Changes>,
    synced: watch::Sender<bool>,
}

/// The model and what was last broadcast of it, under one lock.
#[derive(Debug, Default)]
struct Published {
    directory: Directory,
    services: Services,
    resolutions: HashMap<IpAddr, Resolution>,
    published_services: HashMap<IpAddr, Arc<Service>>,
    /// The snapshot of what was last broadcast, built when a stream first
    /// asks for it.
    snapshot: Option<Arc<Snapshot>>,
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

    /// Replaces every pod with `pods` (a list, or a relist).
    pub fn replace_pods(&self, pods: &[Pod]) {
        self.update(|d, _, td| Touched {
            addresses: d.replace_all(pods, td),
            ..Touched::default()
        });
    }

    /// A pod added or changed.
    pub fn apply_pod(&self, pod: &Pod) {
        self.update(|d, _, td| Touched {
            addresses: d.apply(pod, td),
            ..Touched::default()
        });
    }

    /// A pod deleted.
    pub fn delete_pod(&self, pod: &Pod) {
        self.update(|d, _, _| Touched {
            addresses: d.delete(pod),
            ..Touched::default()
        });
    }

    /// Replaces every pod with `workloads` (a list, or a relist, made
    /// [`Workload`]s as it arrives).
    pub fn replace_workloads(&self, workloads: Vec<(String, Workload)>) {
        self.update(|d, _, _| Touched {
            addresses: d.replace_workloads(workloads),
            ..Touched::default()
        });
    }

    /// The pod `key` added or changed (`Some`), or gone (`None`).
    pub fn put_workload(&self, key: String, workload: Option<Workload>) {
        self.update(|d, _, _| Touched {
            addresses: d.put(key, workload),
            ..Touched::default()
        });
    }

    /// Replaces every Service with `services` (a list, or a relist); `None`
    /// for one without a cluster address.
    pub fn replace_services(&self, services: Vec<(String, Option<ServiceDef>)>) {
        self.update(|_, s, _| Touched {
            services: s.replace_services(services),
            ..Touched::default()
        });
    }

    /// The Service `key` added or changed (`Some`), or gone (`None`).
    pub fn put_service(&self, key: String, service: Option<ServiceDef>) {
        self.update(|_, s, _| Touched {
            services: s.put_service(key, service),
            ..Touched::default()
        });
    }

    /// Replaces every EndpointSlice with `slices` (a list, or a relist);
    /// `None` for one that belongs to no Service.
    pub fn replace_slices(&self, slices: Vec<(String, Option<SliceDef>)>) {
        self.update(|_, s, _| Touched {
            services: s.replace_slices(slices),
            ..Touched::default()
        });
    }

    /// The EndpointSlice `key` added or changed (`Some`), or gone (`None`).
    pub fn put_slice(&self, key: String, slice: Option<SliceDef>) {
        self.update(|_, s, _| Touched {
            services: s.put_slice(key, slice),
            ..Touched::default()
        });
    }

    /// Replaces everything with the `file` source's workloads, Services and
    /// their endpoints, in one change.
    pub fn replace_file(&self, file: Parsed) {
        self.update(|d, s, _| {
            let addresses = d.replace_workloads(file.workloads);
            let mut defs = Vec::new();
            let mut slices = Vec::new();
            for (key, def, service_slices) in file.services {
                slices.extend(
                    service_slices
                        .into_iter()
                        .enumerate()
                        .map(|(i, slice)| (format!("{key}/{i}"), Some(slice))),
                );
                defs.push((key, Some(def)));
            }
            let mut services = s.replace_services(defs);
            services.extend(s.replace_slices(slices));
            Touched {
                addresses,
                services,
            }
        });
    }

    /// Changes the model with `change` and broadcasts the resolutions of
    /// what it touched that changed, under one lock.
    fn update(&self, change: impl FnOnce(&mut Directory, &mut Services, &TrustDomain) -> Touched) {
        let mut guard = self.lock();
        let Published {
            directory,
            services,
            resolutions,
            published_services,
            snapshot,
        } = &mut *guard;
        let mut touched = change(directory, services, &self.trust_domain);
        let mut changes = Change::default();
        for address in touched.addresses {
            let now = directory.resolve(address);
            if now.as_ref() == resolutions.get(&address) {
                continue;
            }
            match &now {
                Some(resolution) => resolutions.insert(address, resolution.clone()),
                None => resolutions.remove(&address),
            };
            changes.addresses.push((address, now));
        }
        let moved: BTreeSet<IpAddr> = changes.addresses.iter().map(|(a, _)| *a).collect();
        touched.services.extend(services.behind(&moved));
        for cluster_ip in touched.services {
            let now = services.resolve(cluster_ip, directory);
            if now.as_ref() == published_services.get(&cluster_ip).map(|s| &**s) {
                continue;
            }
            let now = now.map(Arc::new);
            match &now {
                Some(service) => published_services.insert(cluster_ip, service.clone()),
                None => published_services.remove(&cluster_ip),
            };
            changes.services.push((cluster_ip, now));
        }
        if changes.addresses.is_empty() && changes.services.is_empty() {
            return;
        }
        *snapshot = None;
        // No receiver is no error: no stream is open.
        let _ = self.changes.send(Arc::new(changes));
    }

    /// The state now and the changes after it.
    pub fn subscribe(&self) -> (Arc<Snapshot>, broadcast::Receiver<Changes>) {
        let mut published = self.lock();
        let snapshot = match &published.snapshot {
            Some(snapshot) => snapshot.clone(),
            None => {
                let mut addresses: Vec<_> = published
                    .resolutions
                    .iter()
                    .map(|(a, r)| (*a, r.clone()))
                    .collect();
                addresses.sort_unstable_by_key(|(a, _)| *a);
                let mut services: Vec<_> = published
                    .published_services
                    .iter()
                    .map(|(a, s)| (*a, s.clone()))
                    .collect();
                services.sort_unstable_by_key(|(a, _)| *a);
                let snapshot = Arc::new(Snapshot {
                    addresses,
                    services,
                });
                published.snapshot = Some(snapshot.clone());
                snapshot
            }
        };
        (snapshot, self.changes.subscribe())
    }

    /// The Service at the cluster address `ip` now.
    pub fn service(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.lock().published_services.get(&ip).cloned()
    }

    /// How many cluster addresses are known.
    pub fn services(&self) -> usize {
        self.lock().published_services.len()
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
