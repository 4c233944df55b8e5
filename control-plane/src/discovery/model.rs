//! The discovery model: which pod claims which address, and what a sidecar
//! dialling that address must be answered by.
//!
//! Only facts the API server vouches for decide: a pod is a *meshed
//! workload* if and only if its spec holds the injected sidecar container,
//! it is not `hostNetwork`, and it is Pending or Running with an IP. Labels
//! and annotations never decide it: a pod's author can pre-set them, and
//! anyone who may patch a pod can remove them. Its identity comes from the
//! same function the authenticator uses (`SpiffeId::from_kubernetes`), so
//! the identity a sidecar expects at an address is the one the CA would sign
//! for the pod there.
//!
//! An address answers with exactly one claim or fails closed: two live pods
//! on one pod-network address (an IP reused while the old pod terminates)
//! make it [`Resolution::Conflict`] until one of them is gone, whatever they
//! claim. Host-network pods share their node's address; they make it
//! `Unmeshed` (plain TCP to the node), and conflict only with a pod-network
//! claim on the same address.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;
pub use palisade_proto::discovery::Resolution;
use palisade_proto::{SpiffeId, SpiffeIdError, TrustDomain};

use crate::{inject::patch::SIDECAR_CONTAINER, policy::PodFacts};

/// What one live pod claims at its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// A pod-network pod with the injected sidecar.
    Meshed(SpiffeId),
    /// A pod-network pod with the sidecar whose identity cannot be derived.
    Unidentifiable(SpiffeIdError),
    /// A pod-network pod without the sidecar.
    Unmeshed,
    /// A `hostNetwork` pod: its addresses are its node's.
    Host,
}

/// One live pod, as discovery sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `namespace/name`, for logs.
    pub name: String,
    /// The pod's addresses (`status.podIPs`, else `status.podIP`), parsed.
    pub addresses: Vec<IpAddr>,
    pub claim: Claim,
    /// What its authorization policy depends on (meshed pods only).
    pub facts: Option<Arc<PodFacts>>,
}

/// Every live pod's claims, and the addresses they make.
#[derive(Debug, Default)]
pub struct Directory {
    /// By the pod's key ([`pod_key`]).
    pods: HashMap<String, Workload>,
    /// Each claimed address to the keys of the pods claiming it.
    by_address: HashMap<IpAddr, BTreeSet<String>>,
}

// === impl Workload ===

impl Workload {
    /// The pod as discovery sees it, or `None` when it claims no address:
    /// not Pending or Running, or without a parsable IP.
    pub fn of(pod: &Pod, trust_domain: &TrustDomain) -> Option<Self> {
        let status = pod.status.as_ref()?;
        if !matches!(status.phase.as_deref(), Some("Pending" | "Running")) {
            return None;
        }
        let mut addresses: Vec<IpAddr> = match &status.pod_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|p| parse_ip(&p.ip)).collect(),
            _ => status.pod_ip.iter().filter_map(|ip| parse_ip(ip)).collect(),
        };
        addresses.sort_unstable();
        addresses.dedup();
        if addresses.is_empty() {
            return None;
        }
        let spec = pod.spec.as_ref()?;
        let claim = if spec.host_network == Some(true) {
            Claim::Host
        } else if has_sidecar(pod) {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            let account = spec.service_account_name.as_deref().unwrap_or("default");
            match SpiffeId::from_kubernetes(trust_domain, namespace, account) {
                Ok(id) => Claim::Meshed(id),
                Err(e) => Claim::Unidentifiable(e),
            }
        } else {
            Claim::Unmeshed
        };
        let facts = matches!(claim, Claim::Meshed(_)).then(|| Arc::new(PodFacts::of(pod)));
        Some(Self {
            name: pod_name(pod),
            addresses,
            claim,
            facts,
        })
    }
}

/// An address as the API server writes it; IPv4-mapped IPv6 as IPv4.
fn parse_ip(text: &str) -> Option<IpAddr> {
    text.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// Whether the pod's spec holds the injected sidecar: the native sidecar (an
/// init container) or, on clusters without native sidecars, a container.
fn has_sidecar(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.name == SIDECAR_CONTAINER)
}

/// `namespace/name`.
fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The key a pod is tracked by: its UID, which a pod recreated under the
/// same name does not share; `namespace/name` for a pod without one.
pub fn pod_key(pod: &Pod) -> String {
    match &pod.metadata.uid {
        Some(uid) if !uid.is_empty() => uid.clone(),
        _ => pod_name(pod),
    }
}

// === impl Directory ===

impl Directory {
    /// A directory of exactly `pods` (a list, or a relist after `410 Gone`).
    /// Returns every address whose resolution may have changed.
    pub fn replace_all<'a>(
        &mut self,
        pods: impl IntoIterator<Item = &'a Pod>,
        trust_domain: &TrustDomain,
    ) -> BTreeSet<IpAddr> {
        self.replace_workloads(
            pods.into_iter()
                .filter_map(|pod| Some((pod_key(pod), Workload::of(pod, trust_domain)?))),
        )
    }

    /// A directory of exactly `workloads`, each with its key (the `file`
    /// source). Returns every address whose resolution may have changed.
    pub fn replace_workloads(
        &mut self,
        workloads: impl IntoIterator<Item = (String, Workload)>,
    ) -> BTreeSet<IpAddr> {
        let mut changed: BTreeSet<IpAddr> = self.by_address.keys().copied().collect();
        self.pods.clear();
        self.by_address.clear();
        for (key, workload) in workloads {
            changed.extend(self.put(key, Some(workload)));
        }
        changed
    }

    /// Adds or updates `pod` (one that is no longer live is removed).
    /// Returns the addresses whose resolution may have changed.
    pub fn apply(&mut self, pod: &Pod, trust_domain: &TrustDomain) -> BTreeSet<IpAddr> {
        self.put(pod_key(pod), Workload::of(pod, trust_domain))
    }

    /// Replaces what `key` claims with `workload` (`None`: it claims
    /// nothing any more). Returns the addresses whose resolution may have
    /// changed.
    pub fn put(&mut self, key: String, workload: Option<Workload>) -> BTreeSet<IpAddr> {
        let mut changed = self.forget(&key);
        if let Some(workload) = workload {
            for address in &workload.addresses {
                self.by_address
                    .entry(*address)
                    .or_default()
                    .insert(key.clone());
                changed.insert(*address);
            }
            self.pods.insert(key, workload);
        }
        changed
    }

    /// Removes `pod`. Returns the addresses it claimed.
    pub fn delete(&mut self, pod: &Pod) -> BTreeSet<IpAddr> {
        self.forget(&pod_key(pod))
    }

    fn forget(&mut self, key: &str) -> BTreeSet<IpAddr> {
        let Some(old) = self.pods.remove(key) else {
            return BTreeSet::new();
        };
        for address in &old.addresses {
            if let Some(keys) = self.by_address.get_mut(address) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_address.remove(address);
                }
            }
        }
        old.addresses.into_iter().collect()
    }

    /// What `address` must answer with; `None` when no live pod claims it.
    pub fn resolve(&self, address: IpAddr) -> Option<Resolution> {
        let keys = self.by_address.get(&address)?;
        let mut claims = keys
            .iter()
            .filter_map(|k| self.pods.get(k))
            .map(|w| &w.claim);
        let first = claims.next()?;
        let rest: Vec<&Claim> = claims.collect();
        if rest.is_empty() {
            return Some(match first {
                Claim::Meshed(id) => Resolution::Meshed(id.clone()),
                Claim::Unidentifiable(_) => Resolution::Unidentifiable,
                Claim::Unmeshed | Claim::Host => Resolution::Unmeshed,
            });
        }
        // Several claimants: only node addresses may be shared.
        let all_host = *first == Claim::Host && rest.iter().all(|c| **c == Claim::Host);
        Some(if all_host {
            Resolution::Unmeshed
        } else {
            Resolution::Conflict
        })
    }

    /// Every claimed address with its resolution, in address order.
    pub fn snapshot(&self) -> Vec<(IpAddr, Resolution)> {
        let mut addresses: Vec<IpAddr> = self.by_address.keys().copied().collect();
        addresses.sort_unstable();
        addresses
            .into_iter()
            .filter_map(|a| self.resolve(a).map(|r| (a, r)))
            .collect()
    }

    /// How many live pods claim an address.
    pub fn workloads(&self) -> usize {
        self.pods.len()
    }

    /// The live pods claiming `address`, with their keys.
    pub fn claimants(&self, address: IpAddr) -> Vec<(&str, &Workload)> {
        self.by_address
            .get(&address)
            .into_iter()
            .flatten()
            .filter_map(|k| Some((k.as_str(), self.pods.get(k)?)))
            .collect()
    }

    /// The pod tracked as `key`.
    pub fn get(&self, key: &str) -> Option<&Workload> {
        self.pods.get(key)
    }

    /// The policy facts of every pod, for a comparison before and after a
    /// relist.
    pub fn all_facts(&self) -> impl Iterator<Item = (&str, &Arc<PodFacts>)> {
        self.pods
            .iter()
            .filter_map(|(k, w)| Some((k.as_str(), w.facts.as_ref()?)))
    }
}
