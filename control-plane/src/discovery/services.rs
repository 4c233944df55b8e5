//! Services in the discovery model: which cluster address leads to which
//! ready endpoints, and who must answer at each.
//!
//! A Service's cluster IPs and ports come from the Service; its endpoints
//! from the EndpointSlices labelled `kubernetes.io/service-name` in its
//! namespace. Both are objects a namespace's editors may write, so neither
//! decides an identity: the identity a sidecar expects at an endpoint is the
//! one the pod directory holds for that address (the live pod there, from
//! its spec), exactly as for a pod address dialled directly. Whoever can
//! point their own Service's slice at another pod only sends their own
//! clients there, verified as that pod.
//!
//! Per endpoint, from the pod directory:
//! - a meshed workload: mesh TLS with exactly its identity;
//! - a pod without a sidecar, or a node: plain TCP;
//! - an address that fails closed (two pods, no identity): left out;
//! - an address no live pod claims: left out when the slice says a Pod is
//!   behind it (the pod is not live in our view yet, or any more), plain TCP
//!   otherwise (a hand-written slice pointing outside the cluster).
//!
//! Ready endpoints are used; when a port has none, its serving and
//! terminating ones are, as kube-proxy does. Headless and `ExternalName`
//! Services have no cluster address: their clients dial pod addresses,
//! which need nothing new. Only TCP ports are kept.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Service as KubeService, discovery::v1::EndpointSlice};
use palisade_proto::discovery::{Endpoint, Resolution, Service, ServicePort};

use super::model::Directory;

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service as discovery sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDef {
    /// `namespace/name`: how slices find it, and for logs.
    pub name: String,
    /// Its cluster IPs (one per family), parsed.
    pub cluster_ips: Vec<IpAddr>,
    /// Its TCP ports.
    pub ports: Vec<PortDef>,
}

/// One TCP port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortDef {
    /// The port's name, which the slices' ports carry ("" for a lone
    /// unnamed port).
    pub name: String,
    /// What clients dial.
    pub port: u16,
}

/// An EndpointSlice as discovery sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceDef {
    /// The Service's `namespace/name`.
    pub service: String,
    /// Its addresses are IPv6 (else IPv4).
    pub ipv6: bool,
    /// The TCP ports: name and target port.
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<EndpointDef>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointDef {
    pub address: IpAddr,
    pub ready: bool,
    /// Serving while terminating: used when a port has no ready endpoint.
    pub serving_terminating: bool,
    /// The slice says a Pod is behind it.
    pub pod: bool,
}

/// Every Service and slice, and the indexes that say which cluster address
/// a change touches.
#[derive(Debug, Default)]
pub struct Services {
    /// By `namespace/name`.
    services: HashMap<String, ServiceDef>,
    /// By the slice's key.
    slices: HashMap<String, SliceDef>,
    /// A Service's `namespace/name` to its slices' keys.
    slices_of: HashMap<String, BTreeSet<String>>,
    /// An endpoint address to the keys of the slices naming it.
    by_endpoint: HashMap<IpAddr, BTreeSet<String>>,
    /// A cluster IP to the Services claiming it (one, but for a moment
    /// while an address is reused).
    by_cluster_ip: HashMap<IpAddr, BTreeSet<String>>,
}

// === impl ServiceDef ===

impl ServiceDef {
    /// The Service as discovery sees it, or `None` when it has no cluster
    /// address (headless, `ExternalName`, not yet allocated).
    pub fn of(service: &KubeService) -> Option<Self> {
        let spec = service.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let listed = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.clone(),
            _ => spec.cluster_ip.iter().cloned().collect(),
        };
        let mut cluster_ips: Vec<IpAddr> = listed
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        cluster_ips.sort_unstable();
        cluster_ips.dedup();
        if cluster_ips.is_empty() {
            return None;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                Some(PortDef {
                    name: p.name.clone().unwrap_or_default(),
                    port: u16::try_from(p.port).ok().filter(|p| *p != 0)?,
                })
            })
            .collect();
        Some(Self {
            name: object_name(
                service.metadata.namespace.as_deref(),
                service.metadata.name.as_deref(),
            ),
            cluster_ips,
            ports,
        })
    }
}

fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

fn object_name(namespace: Option<&str>, name: Option<&str>) -> String {
    format!("{}/{}", namespace.unwrap_or(""), name.unwrap_or(""))
}

// === impl SliceDef ===

impl SliceDef {
    /// The slice as discovery sees it, or `None` when it belongs to no
    /// Service or holds no IP addresses (`FQDN` slices).
    pub fn of(slice: &EndpointSlice) -> Option<Self> {
        let ipv6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            _ => return None,
        };
        let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok().filter(|p| *p != 0)?;
                Some((p.name.clone().unwrap_or_default(), port))
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .filter_map(|e| {
                // The addresses of one endpoint are fungible; the first is
                // the one every consumer uses.
                let address = e.addresses.first()?.parse::<IpAddr>().ok()?.to_canonical();
                let conditions = e.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                Some(EndpointDef {
                    address,
                    ready,
                    serving_terminating: serving && terminating,
                    pod: e.target_ref.as_ref().and_then(|r| r.kind.as_deref()) == Some("Pod"),
                })
            })
            .collect();
        Some(Self {
            service: object_name(slice.metadata.namespace.as_deref(), Some(service)),
            ipv6,
            ports,
            endpoints,
        })
    }
}

/// The key a slice is tracked by: its UID, else `namespace/name`.
pub fn slice_key(slice: &EndpointSlice) -> String {
    match &slice.metadata.uid {
        Some(uid) if !uid.is_empty() => uid.clone(),
        _ => object_name(
            slice.metadata.namespace.as_deref(),
            slice.metadata.name.as_deref(),
        ),
    }
}

/// The key a Service is tracked by: `namespace/name` (slices name it so).
pub fn service_key(service: &KubeService) -> String {
    object_name(
        service.metadata.namespace.as_deref(),
        service.metadata.name.as_deref(),
    )
}

// === impl Services ===

impl Services {
    /// Exactly `services` (a list, or a relist). Returns every cluster IP
    /// that may have changed.
    pub fn replace_services(
        &mut self,
        services: impl IntoIterator<Item = (String, Option<ServiceDef>)>,
    ) -> BTreeSet<IpAddr> {
        let mut changed: BTreeSet<IpAddr> = self.by_cluster_ip.keys().copied().collect();
        self.services.clear();
        self.by_cluster_ip.clear();
        for (key, def) in services {
            changed.extend(self.put_service(key, def));
        }
        changed
    }

    /// Exactly `slices` (a list, or a relist). Returns every cluster IP
    /// that may have changed.
    pub fn replace_slices(
        &mut self,
        slices: impl IntoIterator<Item = (String, Option<SliceDef>)>,
    ) -> BTreeSet<IpAddr> {
        let mut touched: BTreeSet<String> = self.slices_of.keys().cloned().collect();
        self.slices.clear();
        self.slices_of.clear();
        self.by_endpoint.clear();
        for (key, def) in slices {
            touched.extend(self.put_slice_only(key, def));
        }
        self.cluster_ips_of(touched)
    }

    /// Adds, updates (`Some`) or removes (`None`) the Service `key`.
    /// Returns the cluster IPs that may have changed.
    pub fn put_service(&mut self, key: String, def: Option<ServiceDef>) -> BTreeSet<IpAddr> {
        let mut changed = BTreeSet::new();
        if let Some(old) = self.services.remove(&key) {
            for ip in old.cluster_ips {
                if let Some(keys) = self.by_cluster_ip.get_mut(&ip) {
                    keys.remove(&key);
                    if keys.is_empty() {
                        self.by_cluster_ip.remove(&ip);
                    }
                }
                changed.insert(ip);
            }
        }
        if let Some(def) = def {
            for ip in &def.cluster_ips {
                self.by_cluster_ip
                    .entry(*ip)
                    .or_default()
                    .insert(key.clone());
                changed.insert(*ip);
            }
            self.services.insert(key, def);
        }
        changed
    }

    /// Adds, updates (`Some`) or removes (`None`) the slice `key`.
    /// Returns the cluster IPs that may have changed.
    pub fn put_slice(&mut self, key: String, def: Option<SliceDef>) -> BTreeSet<IpAddr> {
        let touched = self.put_slice_only(key, def);
        self.cluster_ips_of(touched)
    }

    /// The Services whose endpoints `key`'s old and new content name.
    fn put_slice_only(&mut self, key: String, def: Option<SliceDef>) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        if let Some(old) = self.slices.remove(&key) {
            for endpoint in &old.endpoints {
                if let Some(keys) = self.by_endpoint.get_mut(&endpoint.address) {
                    keys.remove(&key);
                    if keys.is_empty() {
                        self.by_endpoint.remove(&endpoint.address);
                    }
                }
            }
            if let Some(keys) = self.slices_of.get_mut(&old.service) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.slices_of.remove(&old.service);
                }
            }
            touched.insert(old.service);
        }
        if let Some(def) = def {
            for endpoint in &def.endpoints {
                self.by_endpoint
                    .entry(endpoint.address)
                    .or_default()
                    .insert(key.clone());
            }
            self.slices_of
                .entry(def.service.clone())
                .or_default()
                .insert(key.clone());
            touched.insert(def.service.clone());
            self.slices.insert(key, def);
        }
        touched
    }

    /// The cluster IPs of the Services whose endpoints include one of
    /// `addresses` (pods that changed there).
    pub fn behind(&self, addresses: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
        let services: BTreeSet<String> = addresses
            .iter()
            .filter_map(|a| self.by_endpoint.get(a))
            .flatten()
            .filter_map(|slice| self.slices.get(slice))
            .map(|slice| slice.service.clone())
            .collect();
        self.cluster_ips_of(services)
    }

    fn cluster_ips_of(&self, services: BTreeSet<String>) -> BTreeSet<IpAddr> {
        services
            .iter()
            .filter_map(|s| self.services.get(s))
            .flat_map(|s| s.cluster_ips.iter().copied())
            .collect()
    }

    /// What the cluster address `ip` leads to, each endpoint answered from
    /// `pods`; `None` when no Service has it. Two Services on one address
    /// (an address reused before the old Service's deletion is seen): the
    /// first by name, until the other is gone.
    pub fn resolve(&self, ip: IpAddr, pods: &Directory) -> Option<Service> {
        let key = self.by_cluster_ip.get(&ip)?.first()?;
        let def = self.services.get(key)?;
        let slices: Vec<&SliceDef> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .filter(|s| s.ipv6 == ip.is_ipv6())
            .collect();
        let mut ports: Vec<ServicePort> = def
            .ports
            .iter()
            .map(|port| ServicePort {
                port: port.port,
                endpoints: endpoints(port, &slices, pods),
            })
            .collect();
        ports.sort_by_key(|p| p.port);
        ports.dedup_by_key(|p| p.port);
        Some(Service {
            name: def.name.clone(),
            ports,
        })
    }

    /// Every cluster IP, in address order.
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.by_cluster_ip.keys().copied().collect();
        ips.sort_unstable();
        ips
    }

    /// How many Services have a cluster address.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// The endpoints of `port` in `slices`, each answered from `pods`: the
/// ready ones, else the serving terminating ones.
fn endpoints(port: &PortDef, slices: &[&SliceDef], pods: &Directory) -> Vec<Endpoint> {
    let candidates = |wanted: fn(&EndpointDef) -> bool| -> Vec<Endpoint> {
        let mut found: Vec<Endpoint> = slices
            .iter()
            .filter_map(|s| {
                let target = s.ports.iter().find(|(name, _)| *name == port.name)?.1;
                Some((s, target))
            })
            .flat_map(|(s, target)| {
                s.endpoints
                    .iter()
                    .filter(move |e| wanted(e))
                    .filter_map(move |e| answer(e, target, pods))
            })
            .collect();
        found.sort_unstable();
        found.dedup_by(|a, b| a.address == b.address);
        found
    };
    let ready = candidates(|e| e.ready);
    if ready.is_empty() {
        candidates(|e| e.serving_terminating)
    } else {
        ready
    }
}

/// Who must answer at `endpoint`, from the live pod there; `None` when it
/// is left out.
fn answer(endpoint: &EndpointDef, port: u16, pods: &Directory) -> Option<Endpoint> {
    let identity = match pods.resolve(endpoint.address) {
        Some(Resolution::Meshed(id)) => Some(id),
        Some(Resolution::Unmeshed) => None,
        Some(Resolution::Conflict | Resolution::Unidentifiable) => return None,
        None if endpoint.pod => return None,
        None => None,
    };
    Some(Endpoint {
        address: SocketAddr::new(endpoint.address, port),
        identity,
    })
}
