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
//!
//! Policies are per pod, so a change does not carry them: it says whose
//! policy may have changed (a pod's labels or ports, a namespace's
//! policies, or everyone's after a relist), and each stream concerned asks
//! for its own pod's policy again and sends it if its version moved. The
//! deny list is one for the mesh and travels in the change itself.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use k8s_openapi::api::core::v1::Pod;
use palisade_proto::{
    SpiffeId, TrustDomain,
    discovery::{
        Service,
        v1::{DenyList, PodPolicy},
    },
};
use tokio::sync::{broadcast, watch};

use super::{
    file::Parsed,
    model::{Claim, Directory, Resolution, Workload},
    services::{ServiceDef, Services, SliceDef},
};
use crate::policy::{
    Admission, DenyDef, IdentityDenyList, MeshDefault, PodFacts, PolicyDef, admission, pod_policy,
    resources::{Action, Mode},
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
    /// Whose policy may have changed.
    pub policies: PolicyScope,
    /// The deny list, when it changed.
    pub deny_list: Option<Arc<DenyList>>,
}

/// Whose policy an update may have changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyScope {
    /// Every pod's (a relist).
    pub all: bool,
    /// These pods' (by key): their labels, ports or annotation changed.
    pub pods: BTreeSet<String>,
    /// Every pod's of these namespaces: a policy there changed.
    pub namespaces: BTreeSet<String>,
}

/// The whole state at one moment, in address order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub addresses: Vec<(IpAddr, Resolution)>,
    pub services: Vec<(IpAddr, Arc<Service>)>,
}

/// What an update touched: the addresses and cluster addresses whose answer
/// may have changed, whose policy, and whether the deny lists did.
#[derive(Debug, Default)]
struct Touched {
    addresses: BTreeSet<IpAddr>,
    services: BTreeSet<IpAddr>,
    policies: PolicyScope,
    deny_lists: bool,
}

/// What the sources write.
#[derive(Debug, Default)]
struct Model {
    directory: Directory,
    services: Services,
    /// By `namespace/name`.
    policies: BTreeMap<String, Arc<PolicyDef>>,
    /// By name.
    deny_lists: BTreeMap<String, IdentityDenyList>,
    /// The namespaces that enforce the mesh (label `palisade.io/enforce=true`).
    enforced: BTreeSet<String>,
}

impl Model {
    /// The policies of `namespace`, in name order.
    fn policies_of(&self, namespace: &str) -> impl Iterator<Item = &PolicyDef> {
        let prefix = format!("{namespace}/");
        self.policies
            .range(prefix.clone()..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(_, p)| &**p)
    }
}

/// What discovery knows, shared by its sources and its streams.
#[derive(Debug)]
pub struct Discovery {
    trust_domain: TrustDomain,
    mesh_default: MeshDefault,
    directory: Mutex<Published>,
    changes: broadcast::Sender<Changes>,
    synced: watch::Sender<bool>,
}

/// The model and what was last broadcast of it, under one lock.
#[derive(Debug, Default)]
struct Published {
    model: Model,
    resolutions: HashMap<IpAddr, Resolution>,
    published_services: HashMap<IpAddr, Arc<Service>>,
    deny_list: Arc<DenyList>,
    /// The snapshot of what was last broadcast, built when a stream first
    /// asks for it.
    snapshot: Option<Arc<Snapshot>>,
}

/// The pod a stream is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    /// The key it is tracked by.
    pub key: String,
    /// `namespace/name`.
    pub name: String,
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
    /// Discovery with the mesh default `permissive` and `allow`.
    pub fn new(trust_domain: TrustDomain) -> Arc<Self> {
        Self::with_default(
            trust_domain,
            MeshDefault {
                mode: Mode::Permissive,
                action: Action::Allow,
            },
        )
    }

    /// Discovery whose pods no policy selects get `mesh_default`.
    pub fn with_default(trust_domain: TrustDomain, mesh_default: MeshDefault) -> Arc<Self> {
        let empty = DenyDef::default().wire();
        Arc::new(Self {
            trust_domain,
            mesh_default,
            directory: Mutex::new(Published {
                deny_list: Arc::new(empty),
                ..Published::default()
            }),
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
        self.update(|m, td| Touched {
            addresses: m.directory.replace_all(pods, td),
            policies: PolicyScope::everyone(),
            ..Touched::default()
        });
    }

    /// A pod added or changed.
    pub fn apply_pod(&self, pod: &Pod) {
        let workload = Workload::of(pod, &self.trust_domain);
        self.put_workload(super::model::pod_key(pod), workload);
    }

    /// A pod deleted.
    pub fn delete_pod(&self, pod: &Pod) {
        self.put_workload(super::model::pod_key(pod), None);
    }

    /// Replaces every pod with `workloads` (a list, or a relist, made
    /// [`Workload`]s as it arrives).
    pub fn replace_workloads(&self, workloads: Vec<(String, Workload)>) {
        self.update(|m, _| Touched {
            addresses: m.directory.replace_workloads(workloads),
            policies: PolicyScope::everyone(),
            ..Touched::default()
        });
    }

    /// The pod `key` added or changed (`Some`), or gone (`None`).
    pub fn put_workload(&self, key: String, workload: Option<Workload>) {
        self.update(|m, _| {
            let before = m.directory.get(&key).and_then(|w| w.facts.clone());
            let after = workload.as_ref().and_then(|w| w.facts.clone());
            let mut policies = PolicyScope::default();
            if before != after {
                policies.pods.insert(key.clone());
            }
            Touched {
                addresses: m.directory.put(key, workload),
                policies,
                ..Touched::default()
            }
        });
    }

    /// Replaces every policy with `policies` (a list, or a relist).
    pub fn replace_policies(&self, policies: Vec<(String, Option<PolicyDef>)>) {
        self.update(|m, _| {
            m.policies = policies
                .into_iter()
                .filter_map(|(k, p)| Some((k, Arc::new(p?))))
                .collect();
            Touched {
                policies: PolicyScope::everyone(),
                ..Touched::default()
            }
        });
    }

    /// The policy `key` (`namespace/name`) added or changed, or gone.
    pub fn put_policy(&self, key: String, policy: Option<PolicyDef>) {
        self.update(|m, _| {
            let mut scope = PolicyScope::default();
            let old = match policy {
                Some(p) => {
                    scope.namespaces.insert(p.namespace.clone());
                    m.policies.insert(key, Arc::new(p))
                }
                None => m.policies.remove(&key),
            };
            if let Some(old) = old {
                scope.namespaces.insert(old.namespace.clone());
            }
            Touched {
                policies: scope,
                ..Touched::default()
            }
        });
    }

    /// Replaces every deny list with `lists` (a list, or a relist).
    pub fn replace_deny_lists(&self, lists: Vec<(String, Option<IdentityDenyList>)>) {
        self.update(|m, _| {
            m.deny_lists = lists
                .into_iter()
                .filter_map(|(k, l)| Some((k, l?)))
                .collect();
            Touched {
                deny_lists: true,
                ..Touched::default()
            }
        });
    }

    /// The deny list `key` added or changed, or gone.
    pub fn put_deny_list(&self, key: String, list: Option<IdentityDenyList>) {
        self.update(|m, _| {
            match list {
                Some(l) => m.deny_lists.insert(key, l),
                None => m.deny_lists.remove(&key),
            };
            Touched {
                deny_lists: true,
                ..Touched::default()
            }
        });
    }

    /// Replaces every namespace with `namespaces` (a list, or a relist):
    /// each name and whether it enforces the mesh. Streams are not told:
    /// only the webhook reads it.
    pub fn replace_namespaces(&self, namespaces: Vec<(String, bool)>) {
        let mut published = self.lock();
        published.model.enforced = namespaces
            .into_iter()
            .filter_map(|(name, enforced)| enforced.then_some(name))
            .collect();
    }

    /// The namespace `name` added or changed (whether it enforces the
    /// mesh), or gone.
    pub fn put_namespace(&self, name: String, enforced: Option<bool>) {
        let mut published = self.lock();
        if enforced == Some(true) {
            published.model.enforced.insert(name);
        } else {
            published.model.enforced.remove(&name);
        }
    }

    /// For the webhook: whether `pod`'s namespace enforces the mesh and
    /// what the policies selecting it let its author loosen; `None` until
    /// discovery has synced (namespaces and policies listed).
    pub fn admission(&self, pod: &PodFacts) -> Option<(bool, Admission)> {
        if !self.is_synced() {
            return None;
        }
        let published = self.lock();
        let model = &published.model;
        Some((
            model.enforced.contains(&pod.namespace),
            admission(pod, model.policies_of(&pod.namespace), self.mesh_default),
        ))
    }

    /// Replaces every Service with `services` (a list, or a relist); `None`
    /// for one without a cluster address.
    pub fn replace_services(&self, services: Vec<(String, Option<ServiceDef>)>) {
        self.update(|m, _| Touched {
            services: m.services.replace_services(services),
            ..Touched::default()
        });
    }

    /// The Service `key` added or changed (`Some`), or gone (`None`).
    pub fn put_service(&self, key: String, service: Option<ServiceDef>) {
        self.update(|m, _| Touched {
            services: m.services.put_service(key, service),
            ..Touched::default()
        });
    }

    /// Replaces every EndpointSlice with `slices` (a list, or a relist);
    /// `None` for one that belongs to no Service.
    pub fn replace_slices(&self, slices: Vec<(String, Option<SliceDef>)>) {
        self.update(|m, _| Touched {
            services: m.services.replace_slices(slices),
            ..Touched::default()
        });
    }

    /// The EndpointSlice `key` added or changed (`Some`), or gone (`None`).
    pub fn put_slice(&self, key: String, slice: Option<SliceDef>) {
        self.update(|m, _| Touched {
            services: m.services.put_slice(key, slice),
            ..Touched::default()
        });
    }

    /// Replaces everything with the `file` source's workloads, Services and
    /// their endpoints, in one change.
    pub fn replace_file(&self, file: Parsed) {
        self.update(|m, td| {
            let Model {
                directory: d,
                services: s,
                policies,
                deny_lists,
                ..
            } = m;
            let addresses = d.replace_workloads(file.workloads);
            *policies = file
                .policies
                .iter()
                .map(|p| {
                    let def = PolicyDef::of(p, td);
                    (def.name.clone(), Arc::new(def))
                })
                .collect();
            *deny_lists = file
                .deny_lists
                .into_iter()
                .map(|l| (l.metadata.name.clone().unwrap_or_default(), l))
                .collect();
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
                policies: PolicyScope::everyone(),
                deny_lists: true,
            }
        });
    }

    /// Changes the model with `change` and broadcasts the resolutions of
    /// what it touched that changed, under one lock.
    fn update(&self, change: impl FnOnce(&mut Model, &TrustDomain) -> Touched) {
        let mut guard = self.lock();
        let Published {
            model,
            resolutions,
            published_services,
            deny_list,
            snapshot,
        } = &mut *guard;
        let mut touched = change(model, &self.trust_domain);
        let Model {
            directory,
            services,
            deny_lists,
            ..
        } = model;
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
        if touched.deny_lists {
            let merged = DenyDef::of(deny_lists.values(), &self.trust_domain);
            for problem in &merged.problems {
                tracing::warn!(%problem, "policy: a deny list entry is not an identity of the mesh");
            }
            let now = merged.wire();
            if now.version != deny_list.version {
                *deny_list = Arc::new(now);
                changes.deny_list = Some(deny_list.clone());
            }
        }
        changes.policies = touched.policies;
        let policies_moved = changes.policies.all
            || !changes.policies.pods.is_empty()
            || !changes.policies.namespaces.is_empty();
        if changes.addresses.is_empty()
            && changes.services.is_empty()
            && changes.deny_list.is_none()
            && !policies_moved
        {
            return;
        }
        if !changes.addresses.is_empty() || !changes.services.is_empty() {
            *snapshot = None;
        }
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
        self.lock().model.directory.workloads()
    }

    /// How many addresses are known.
    pub fn addresses(&self) -> usize {
        self.lock().resolutions.len()
    }

    /// The one live, meshed pod at `address` whose identity is `identity`:
    /// the pod a caller's stream is bound to.
    pub fn bind(&self, address: IpAddr, identity: &SpiffeId) -> Result<Bound, BindError> {
        let published = self.lock();
        let claimants = published.model.directory.claimants(address);
        let [(key, pod)] = claimants.as_slice() else {
            return Err(if claimants.is_empty() {
                BindError::NoPod(address)
            } else {
                BindError::Contested(address)
            });
        };
        match &pod.claim {
            Claim::Meshed(id) if id == identity => Ok(Bound {
                key: (*key).to_owned(),
                name: pod.name.clone(),
            }),
            _ => Err(BindError::OtherIdentity {
                address,
                pod: pod.name.clone(),
                identity: identity.clone(),
            }),
        }
    }

    /// The policy of the pod tracked as `key` now; `None` when it is not a
    /// live meshed pod.
    pub fn pod_policy(&self, key: &str) -> Option<PodPolicy> {
        let published = self.lock();
        let model = &published.model;
        let facts = model.directory.get(key)?.facts.as_ref()?;
        Some(pod_policy(
            facts,
            model.policies_of(&facts.namespace),
            self.mesh_default,
        ))
    }

    /// The deny list now.
    pub fn deny_list(&self) -> Arc<DenyList> {
        self.lock().deny_list.clone()
    }

    /// How many policies and deny lists are known.
    pub fn policy_resources(&self) -> (usize, usize) {
        let published = self.lock();
        (
            published.model.policies.len(),
            published.model.deny_lists.len(),
        )
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

// === impl PolicyScope ===

impl PolicyScope {
    /// Every pod's policy.
    pub fn everyone() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// Whether the policy of the pod `key` in `namespace` may have changed.
    pub fn covers(&self, key: &str, namespace: &str) -> bool {
        self.all || self.pods.contains(key) || self.namespaces.contains(namespace)
    }
}
