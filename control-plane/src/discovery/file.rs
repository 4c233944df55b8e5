//! The `file` source: the discovery model in YAML, for the local demo, VMs
//! and tests without an API server.
//!
//! ```yaml
//! workloads:
//!   - name: shop/b                                  # for logs and errors
//!     addresses: [198.18.0.2]
//!     identity: spiffe://cluster.local/ns/shop/sa/b   # meshed: exactly this must answer
//!   - name: data/db
//!     addresses: [198.18.0.8, "2001:db8::8"]
//!     unmeshed: true                                # plain TCP
//! services:
//!   - name: shop/web                                # for logs and errors
//!     addresses: [198.19.0.10]                      # its cluster IPs
//!     ports:
//!       - port: 80
//!         endpoints: ["198.18.0.2:8080", "198.18.0.3:8080"]
//! policies:                                       # InboundPolicy, as in Kubernetes
//!   - name: shop/b-inbound                        # namespace/name
//!     spec:
//!       podSelector: {matchLabels: {app: b}}
//!       defaultAction: deny
//!       rules: [{ports: [8080], allow: [{serviceAccount: {namespace: shop, name: a}}]}]
//! denyLists:                                      # IdentityDenyList, as in Kubernetes
//!   - name: incident-42
//!     spec: {identities: [spiffe://cluster.local/ns/shop/sa/c]}
//! ```
//!
//! A meshed workload's namespace (for policy selection) is its identity's;
//! it may carry `labels:` and declare `ports:` (`[8080, {name: http, port:
//! 8080}]`), as a pod's containers do.
//!
//! Each workload has exactly one of `identity` (in the control plane's trust
//! domain) and `unmeshed: true`. Two workloads on one address make it fail
//! closed, as two live pods do. A Service's endpoints are ready; who must
//! answer at each is the workload at its address (an address no workload
//! claims is plain TCP, as a hand-written EndpointSlice's would be). A
//! Service address is no workload's and no other Service's. Unknown fields
//! are errors; errors name the workload or Service by position, counting
//! from 1. A file that does not parse is refused as a whole, and the caller
//! keeps the state it had.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use palisade_proto::{SpiffeId, SpiffeIdError, TrustDomain};
use serde::Deserialize;

use crate::policy::{
    IdentityDenyList, InboundPolicy, PodFacts,
    resources::{IdentityDenyListSpec, InboundPolicySpec},
};

use super::{
    model::{Claim, Workload},
    services::{EndpointDef, PortDef, ServiceDef, SliceDef},
};

/// Why a discovery file was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// Not YAML, or not this file's shape; the message names the field and line.
    #[error("{0}")]
    Syntax(String),
    #[error("workload {workload}: `{value}` is not an IP address")]
    BadAddress { workload: usize, value: String },
    #[error("workload {workload}: no addresses")]
    NoAddress { workload: usize },
    #[error("workload {workload}: give exactly one of `identity` and `unmeshed: true`")]
    IdentityOrUnmeshed { workload: usize },
    #[error("workload {workload}: the identity is not a SPIFFE ID: {error}")]
    BadIdentity {
        workload: usize,
        error: SpiffeIdError,
    },
    #[error("workload {workload}: {identity} is outside the trust domain {trust_domain}")]
    ForeignTrustDomain {
        workload: usize,
        identity: String,
        trust_domain: String,
    },
    #[error("service {service}: `{value}` is not an IP address")]
    BadServiceAddress { service: usize, value: String },
    #[error("service {service}: no addresses")]
    NoServiceAddress { service: usize },
    #[error("service {service}: the address {address} is already {owner}'s")]
    AddressTaken {
        service: usize,
        address: IpAddr,
        owner: String,
    },
    #[error("service {service}: port {port} is not 1 to 65535, or is listed twice")]
    BadPort { service: usize, port: u32 },
    #[error("service {service}: `{value}` is not an endpoint (address:port, [v6]:port)")]
    BadEndpoint { service: usize, value: String },
    #[error("workload {workload}: the name {name} is taken by workload {first}")]
    DuplicateName {
        workload: usize,
        name: String,
        first: usize,
    },
    #[error("policy {policy}: the name must be `namespace/name`")]
    PolicyName { policy: usize },
}

/// The policy facts of a file workload: its identity's namespace, its
/// labels and its declared ports.
fn facts_of(
    id: &SpiffeId,
    labels: BTreeMap<String, String>,
    ports: &[FileContainerPort],
) -> PodFacts {
    let namespace = id
        .path()
        .strip_prefix("/ns/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let mut facts = PodFacts {
        namespace,
        labels,
        ..PodFacts::default()
    };
    for port in ports {
        let number = match port {
            FileContainerPort::Number(n) => *n,
            FileContainerPort::Named { name, port } => {
                facts.named_ports.entry(name.clone()).or_insert(*port);
                *port
            }
        };
        facts.declared_ports.push(number);
    }
    facts.declared_ports.sort_unstable();
    facts.declared_ports.dedup();
    facts
}

/// What a discovery file holds: its workloads and Services, each with the
/// key it is tracked by.
#[derive(Debug, Default)]
pub struct Parsed {
    pub workloads: Vec<(String, Workload)>,
    /// Each Service with its endpoints, one slice per address family.
    pub services: Vec<(String, ServiceDef, Vec<SliceDef>)>,
    pub policies: Vec<InboundPolicy>,
    pub deny_lists: Vec<IdentityDenyList>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    #[serde(default)]
    workloads: Vec<FileWorkload>,
    #[serde(default)]
    services: Vec<FileService>,
    #[serde(default)]
    policies: Vec<FilePolicy>,
    #[serde(default)]
    deny_lists: Vec<FileDenyList>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    /// `namespace/name`.
    name: String,
    spec: InboundPolicySpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDenyList {
    name: String,
    spec: IdentityDenyListSpec,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileContainerPort {
    Number(u16),
    Named { name: String, port: u16 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<FilePort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePort {
    port: u32,
    #[serde(default)]
    endpoints: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWorkload {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    unmeshed: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<FileContainerPort>,
}

/// The workloads and Services of a discovery file.
pub fn parse(yaml: &str, trust_domain: &TrustDomain) -> Result<Parsed, FileError> {
    let file: File = if yaml.trim().is_empty() {
        File {
            workloads: Vec::new(),
            services: Vec::new(),
            policies: Vec::new(),
            deny_lists: Vec::new(),
        }
    } else {
        serde_saphyr::from_str(yaml)
            .map_err(|e| FileError::Syntax(e.without_snippet().to_string()))?
    };
    let mut named: HashMap<&str, usize> = HashMap::new();
    for (i, w) in file.workloads.iter().enumerate() {
        if let Some(name) = &w.name
            && let Some(first) = named.insert(name, i + 1)
        {
            return Err(FileError::DuplicateName {
                workload: i + 1,
                name: name.chars().take(64).collect(),
                first,
            });
        }
    }
    let workloads = parse_workloads(file.workloads, trust_domain)?;
    let mut owners: HashMap<IpAddr, String> = workloads
        .iter()
        .flat_map(|(_, w)| w.addresses.iter().map(|a| (*a, w.name.clone())))
        .collect();
    let services = file
        .services
        .into_iter()
        .enumerate()
        .map(|(i, s)| parse_service(i + 1, s, &mut owners))
        .collect::<Result<_, _>>()?;
    let mut policies = Vec::new();
    for (i, p) in file.policies.into_iter().enumerate() {
        let Some((namespace, name)) = p.name.split_once('/') else {
            return Err(FileError::PolicyName { policy: i + 1 });
        };
        let mut policy = InboundPolicy::new(name, p.spec);
        policy.metadata.namespace = Some(namespace.to_owned());
        policies.push(policy);
    }
    let deny_lists = file
        .deny_lists
        .into_iter()
        .map(|d| IdentityDenyList::new(&d.name, d.spec))
        .collect();
    Ok(Parsed {
        workloads,
        services,
        policies,
        deny_lists,
    })
}

fn parse_workloads(
    workloads: Vec<FileWorkload>,
    trust_domain: &TrustDomain,
) -> Result<Vec<(String, Workload)>, FileError> {
    workloads
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let workload = i + 1;
            let addresses = w
                .addresses
                .iter()
                .map(|a| {
                    a.parse::<IpAddr>()
                        .map(|ip| ip.to_canonical())
                        .map_err(|_| FileError::BadAddress {
                            workload,
                            value: a.chars().take(64).collect(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if addresses.is_empty() {
                return Err(FileError::NoAddress { workload });
            }
            let claim = match (&w.identity, w.unmeshed) {
                (Some(id), false) => {
                    let id = SpiffeId::parse(id)
                        .map_err(|error| FileError::BadIdentity { workload, error })?;
                    if !id.is_member_of(trust_domain) {
                        return Err(FileError::ForeignTrustDomain {
                            workload,
                            identity: id.to_string(),
                            trust_domain: trust_domain.to_string(),
                        });
                    }
                    Claim::Meshed(id)
                }
                (None, true) => Claim::Unmeshed,
                _ => return Err(FileError::IdentityOrUnmeshed { workload }),
            };
            // Keyed by name, so a reordered file keeps each workload's key.
            let key = match &w.name {
                Some(name) => format!("file/{name}"),
                None => format!("file/#{workload}"),
            };
            let name = w.name.unwrap_or_else(|| format!("workload {workload}"));
            let facts = match &claim {
                Claim::Meshed(id) => Some(Arc::new(facts_of(id, w.labels, &w.ports))),
                _ => None,
            };
            Ok((
                key,
                Workload {
                    name,
                    addresses,
                    claim,
                    facts,
                },
            ))
        })
        .collect()
}

/// Service number `service` of the file; `owners` holds who has each
/// address so far, and gains this Service's.
fn parse_service(
    service: usize,
    file: FileService,
    owners: &mut HashMap<IpAddr, String>,
) -> Result<(String, ServiceDef, Vec<SliceDef>), FileError> {
    let name = file.name.unwrap_or_else(|| format!("service {service}"));
    let mut cluster_ips = Vec::new();
    for value in &file.addresses {
        let address = value
            .parse::<IpAddr>()
            .map_err(|_| FileError::BadServiceAddress {
                service,
                value: value.chars().take(64).collect(),
            })?
            .to_canonical();
        if let Some(owner) = owners.insert(address, name.clone()) {
            return Err(FileError::AddressTaken {
                service,
                address,
                owner,
            });
        }
        cluster_ips.push(address);
    }
    if cluster_ips.is_empty() {
        return Err(FileError::NoServiceAddress { service });
    }
    let key = format!("file/service/{service}");
    let mut ports: Vec<PortDef> = Vec::new();
    // A slice maps a port name to one target port, so each endpoint here
    // is a slice of its own, for the one port (named by its number) it
    // serves.
    let mut slices = Vec::new();
    for file_port in &file.ports {
        let port = u16::try_from(file_port.port)
            .ok()
            .filter(|p| *p != 0 && !ports.iter().any(|d| d.port == *p))
            .ok_or(FileError::BadPort {
                service,
                port: file_port.port,
            })?;
        ports.push(PortDef {
            name: port.to_string(),
            port,
        });
        for value in &file_port.endpoints {
            let bad = || FileError::BadEndpoint {
                service,
                value: value.chars().take(64).collect(),
            };
            let endpoint = value.parse::<SocketAddr>().map_err(|_| bad())?;
            if endpoint.port() == 0 {
                return Err(bad());
            }
            let address = endpoint.ip().to_canonical();
            slices.push(SliceDef {
                service: key.clone(),
                ipv6: address.is_ipv6(),
                ports: vec![(port.to_string(), endpoint.port())],
                endpoints: vec![EndpointDef {
                    address,
                    ready: true,
                    serving_terminating: false,
                    pod: false,
                }],
            });
        }
    }
    Ok((
        key,
        ServiceDef {
            name,
            cluster_ips,
            ports,
        },
        slices,
    ))
}
