//! The `kubernetes` source: kube-rs watchers on Pods, Services,
//! EndpointSlices, Namespaces (whether each enforces the mesh, for the
//! webhook) and the policy resources (`InboundPolicy`,
//! `IdentityDenyList`), cluster-wide and read-only (RBAC: `list` and `watch`
//! on each, nothing more). The policy CRDs must be installed: without them
//! discovery never syncs, since a sidecar must not start from a state that
//! lacks the deny list.
//!
//! Each watcher lists, then watches from the list's resourceVersion; on
//! `410 Gone` it lists again. A list arrives as `Init`, one `InitApply` per
//! object and `InitDone`, and only then replaces that kind's state, so a
//! relist never shows sidecars a half-empty directory. Objects are reduced
//! to what discovery keeps as they arrive (a 10,000-pod list is never held
//! whole), and the list is paged by kube. Discovery is synced once every
//! kind has been listed. A watch error is retried with kube's default
//! backoff while the last state stays in use.

use std::{
    fmt::Debug,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use palisade_proto::TrustDomain;
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use super::{
    model::{Workload, pod_key},
    services::{ServiceDef, SliceDef, service_key, slice_key},
    state::Discovery,
};
use crate::{
    inject::posture::ENFORCE_LABEL,
    metrics::Metrics,
    policy::{IdentityDenyList, InboundPolicy, PolicyDef},
};

/// How many kinds are followed; discovery is synced when all are listed.
const KINDS: usize = 6;

/// A kind of object discovery follows, and what it keeps of one.
trait Followed: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + 'static {
    /// The kind's plural, for logs.
    const WHAT: &'static str;
    /// What discovery keeps of one object.
    type Def: Send;

    fn key(&self) -> String;
    fn def(&self, trust_domain: &TrustDomain) -> Option<Self::Def>;
    fn replace(discovery: &Discovery, all: Vec<(String, Option<Self::Def>)>);
    fn put(discovery: &Discovery, key: String, def: Option<Self::Def>);
}

/// Follows every Pod, Service and EndpointSlice of the cluster into
/// `discovery` until the streams end (they do not: errors are retried);
/// `metrics` follow what it knows.
pub async fn run(client: Client, discovery: Arc<Discovery>, metrics: Metrics) {
    let listed = Arc::new(AtomicUsize::new(0));
    futures::join!(
        follow::<Pod>(client.clone(), &discovery, &metrics, &listed),
        follow::<Service>(client.clone(), &discovery, &metrics, &listed),
        follow::<EndpointSlice>(client.clone(), &discovery, &metrics, &listed),
        follow::<InboundPolicy>(client.clone(), &discovery, &metrics, &listed),
        follow::<IdentityDenyList>(client.clone(), &discovery, &metrics, &listed),
        follow::<Namespace>(client, &discovery, &metrics, &listed),
    );
}

/// Follows one kind. `listed` counts the kinds listed at least once.
async fn follow<K: Followed>(
    client: Client,
    discovery: &Discovery,
    metrics: &Metrics,
    listed: &AtomicUsize,
) {
    let api: Api<K> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Vec<(String, Option<K::Def>)> = Vec::new();
    let mut first = true;
    loop {
        let event = events.try_next().await;
        let changed = matches!(
            event,
            Ok(Some(
                watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)
            ))
        );
        let trust_domain = discovery.trust_domain();
        match event {
            Ok(Some(watcher::Event::Init)) => listing.clear(),
            Ok(Some(watcher::Event::InitApply(object))) => {
                listing.push((object.key(), object.def(trust_domain)));
            }
            Ok(Some(watcher::Event::InitDone)) => {
                let objects = listing.len();
                K::replace(discovery, std::mem::take(&mut listing));
                if first {
                    first = false;
                    if listed.fetch_add(1, Ordering::AcqRel) + 1 == KINDS {
                        discovery.mark_synced();
                    }
                }
                info!(
                    kind = K::WHAT,
                    objects,
                    workloads = discovery.workloads(),
                    services = discovery.services(),
                    synced = discovery.is_synced(),
                    "discovery: listed"
                );
            }
            Ok(Some(watcher::Event::Apply(object))) => {
                debug!(kind = K::WHAT, name = ?object.meta().name, "discovery: changed");
                K::put(discovery, object.key(), object.def(trust_domain));
            }
            Ok(Some(watcher::Event::Delete(object))) => {
                debug!(kind = K::WHAT, name = ?object.meta().name, "discovery: deleted");
                K::put(discovery, object.key(), None);
            }
            Ok(None) => return,
            Err(error) => warn!(kind = K::WHAT, %error, "discovery: watching failed; retrying"),
        }
        if changed {
            metrics.discovery_known(discovery);
        }
    }
}

// === impl Followed ===

impl Followed for Pod {
    const WHAT: &'static str = "pods";
    type Def = Workload;

    fn key(&self) -> String {
        pod_key(self)
    }

    fn def(&self, trust_domain: &TrustDomain) -> Option<Workload> {
        Workload::of(self, trust_domain)
    }

    fn replace(discovery: &Discovery, all: Vec<(String, Option<Workload>)>) {
        discovery.replace_workloads(all.into_iter().filter_map(|(k, w)| Some((k, w?))).collect());
    }

    fn put(discovery: &Discovery, key: String, def: Option<Workload>) {
        discovery.put_workload(key, def);
    }
}

impl Followed for Service {
    const WHAT: &'static str = "services";
    type Def = ServiceDef;

    fn key(&self) -> String {
        service_key(self)
    }

    fn def(&self, _: &TrustDomain) -> Option<ServiceDef> {
        ServiceDef::of(self)
    }

    fn replace(discovery: &Discovery, all: Vec<(String, Option<ServiceDef>)>) {
        discovery.replace_services(all);
    }

    fn put(discovery: &Discovery, key: String, def: Option<ServiceDef>) {
        discovery.put_service(key, def);
    }
}

impl Followed for EndpointSlice {
    const WHAT: &'static str = "endpointslices";
    type Def = SliceDef;

    fn key(&self) -> String {
        slice_key(self)
    }

    fn def(&self, _: &TrustDomain) -> Option<SliceDef> {
        SliceDef::of(self)
    }

    fn replace(discovery: &Discovery, all: Vec<(String, Option<SliceDef>)>) {
        discovery.replace_slices(all);
    }

    fn put(discovery: &Discovery, key: String, def: Option<SliceDef>) {
        discovery.put_slice(key, def);
    }
}

impl Followed for InboundPolicy {
    const WHAT: &'static str = "inboundpolicies";
    type Def = PolicyDef;

    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or(""),
            self.metadata.name.as_deref().unwrap_or("")
        )
    }

    fn def(&self, trust_domain: &TrustDomain) -> Option<PolicyDef> {
        let def = PolicyDef::of(self, trust_domain);
        for problem in &def.problems {
            warn!(policy = %def.name, %problem, "policy: read the strictest way");
        }
        Some(def)
    }

    fn replace(discovery: &Discovery, all: Vec<(String, Option<PolicyDef>)>) {
        discovery.replace_policies(all);
    }

    fn put(discovery: &Discovery, key: String, def: Option<PolicyDef>) {
        discovery.put_policy(key, def);
    }
}

impl Followed for IdentityDenyList {
    const WHAT: &'static str = "identitydenylists";
    type Def = IdentityDenyList;

    fn key(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }

    fn def(&self, _: &TrustDomain) -> Option<IdentityDenyList> {
        Some(self.clone())
    }

    fn replace(discovery: &Discovery, all: Vec<(String, Option<IdentityDenyList>)>) {
        discovery.replace_deny_lists(all);
    }

    fn put(discovery: &Discovery, key: String, def: Option<IdentityDenyList>) {
        discovery.put_deny_list(key, def);
    }
}

impl Followed for Namespace {
    const WHAT: &'static str = "namespaces";
    /// Whether it enforces the mesh.
    type Def = bool;

    fn key(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }

    fn def(&self, _: &TrustDomain) -> Option<bool> {
        Some(
            self.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ENFORCE_LABEL))
                .is_some_and(|v| v == "true"),
        )
    }

    fn replace(discovery: &Discovery, all: Vec<(String, Option<bool>)>) {
        discovery.replace_namespaces(all.into_iter().map(|(k, e)| (k, e == Some(true))).collect());
    }

    fn put(discovery: &Discovery, key: String, def: Option<bool>) {
        discovery.put_namespace(key, def);
    }
}
