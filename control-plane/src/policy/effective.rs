//! From the policy resources to what one pod's sidecar is sent: the policies
//! that select the pod, resolved for it, and the mesh-wide deny list.
//!
//! The control plane selects and resolves; the sidecar combines (one rule,
//! in one place: `palisade_sidecar::policy`). Selecting takes the pod's
//! namespace and labels as the API server reports them; resolving makes a
//! named port the number of the pod's container port of that name (a name
//! the pod does not declare covers no port of it, as in Linkerd).
//!
//! The API server validates the resources against their schema; what
//! reaches the control plane is checked again, and whatever is still wrong
//! is read the strictest way and counted: a caller that is not exactly one
//! valid identity, namespace or service account is dropped (fewer callers
//! allowed), a port outside 1..=65535 is dropped from its rule, and a
//! selector expression that is not well formed matches every pod of the
//! namespace. A deny-list entry that is not an identity of the trust domain
//! is dropped: it could never match a peer that completes a handshake.

use std::collections::{BTreeMap, BTreeSet};

use palisade_proto::{
    SpiffeId, TrustDomain,
    discovery::v1::{self as wire},
};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::inject::patch::{INBOUND_MODE, SIDECAR_CONTAINER};

use super::resources::{
    Action, Caller, Enforcement, IdentityDenyList, InboundPolicy, LabelExpression, LabelOperator,
    Mode, PodSelector, PortRef,
};

/// The mesh-wide default, for pods no policy selects and what no policy
/// says (chart values `sidecar.inboundMode` and `policy.defaultAction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MeshDefault {
    pub mode: Mode,
    pub action: Action,
}

/// What the policy of one meshed pod depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Its containers' TCP ports by name (unnamed ones only declare).
    pub named_ports: BTreeMap<String, u16>,
    /// Every TCP container port it declares, sorted.
    pub declared_ports: Vec<u16>,
    /// The pod's annotation asks for strict mode.
    pub strict: bool,
}

/// An [`InboundPolicy`] as the control plane keeps it: checked once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDef {
    pub namespace: String,
    /// `namespace/name`.
    pub name: String,
    selector: Selector,
    /// The ports its pods may take out of inbound capture.
    excludable: Ports,
    mode: Option<Mode>,
    default_action: Option<Action>,
    audit: bool,
    rules: Vec<RuleDef>,
    /// What was dropped or read strictly, for the log; empty when valid.
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Selector {
    /// Every pod of the namespace (an empty selector, or a malformed one).
    All,
    Labels(PodSelector),
}

/// Ports as a resource names them: numbers, and container port names
/// resolved per pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ports {
    numbers: Vec<u16>,
    names: Vec<String>,
}

/// What an admitted pod's author may and may not loosen, from the policies
/// that select it (see `inject::posture`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// The pod's inbound mode without its own annotation is strict.
    pub strict: bool,
    /// Ports a selecting policy lets it exclude from inbound capture.
    pub excludable: BTreeSet<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RuleDef {
    ports: Ports,
    identities: BTreeSet<String>,
    namespaces: BTreeSet<String>,
}

/// The deny lists merged: every identity and namespace any of them names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DenyDef {
    pub identities: BTreeSet<String>,
    pub namespaces: BTreeSet<String>,
    /// Entries dropped, for the log.
    pub problems: Vec<String>,
}

// === impl PolicyDef ===

impl PolicyDef {
    /// Checks `policy`; what is wrong is read the strictest way and listed
    /// in `problems`.
    pub fn of(policy: &InboundPolicy, trust_domain: &TrustDomain) -> Self {
        let namespace = policy.metadata.namespace.clone().unwrap_or_default();
        let name = format!(
            "{namespace}/{}",
            policy.metadata.name.as_deref().unwrap_or("")
        );
        let spec = &policy.spec;
        let mut problems = Vec::new();
        let selector = selector(&spec.pod_selector, &mut problems);
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let ports = Ports::of(&rule.ports, &format!("rule {}", i + 1), &mut problems);
                let mut def = RuleDef {
                    ports,
                    identities: BTreeSet::new(),
                    namespaces: BTreeSet::new(),
                };
                for (j, caller) in rule.allow.iter().enumerate() {
                    if let Err(why) = def.allow(caller, trust_domain) {
                        problems.push(format!("rule {}, caller {}: {why}; dropped", i + 1, j + 1));
                    }
                }
                def
            })
            .collect();
        let excludable = Ports::of(&spec.excludable_ports, "excludablePorts", &mut problems);
        Self {
            namespace,
            name,
            selector,
            excludable,
            mode: spec.mode,
            default_action: spec.default_action,
            audit: spec.enforcement == Enforcement::Audit,
            rules,
            problems,
        }
    }

    /// Whether the policy applies to `pod`.
    pub fn selects(&self, pod: &PodFacts) -> bool {
        if pod.namespace != self.namespace {
            return false;
        }
        match &self.selector {
            Selector::All => true,
            Selector::Labels(selector) => {
                selector
                    .match_labels
                    .iter()
                    .all(|(k, v)| pod.labels.get(k) == Some(v))
                    && selector
                        .match_expressions
                        .iter()
                        .all(|e| expression_holds(e, &pod.labels))
            }
        }
    }

    /// The policy for `pod`: named ports made numbers.
    fn resolve(&self, pod: &PodFacts) -> wire::Policy {
        let rules = self
            .rules
            .iter()
            .filter_map(|rule| {
                let mut ports: Vec<u32> = rule.ports.resolve(pod).map(u32::from).collect();
                ports.sort_unstable();
                ports.dedup();
                // A rule whose ports the pod does not have covers nothing.
                (!ports.is_empty()).then(|| wire::Rule {
                    ports,
                    identities: rule.identities.iter().cloned().collect(),
                    namespaces: rule.namespaces.iter().cloned().collect(),
                })
            })
            .collect();
        wire::Policy {
            name: self.name.clone(),
            mode: self.mode.map_or(wire::InboundMode::Unspecified, wire_mode) as i32,
            default_action: self
                .default_action
                .map_or(wire::Action::Unspecified, wire_action) as i32,
            audit: self.audit,
            rules,
        }
    }
}

// === impl Ports ===

impl Ports {
    /// Reads `ports` of the field `what`; a number out of range is dropped
    /// (and said in `problems`).
    fn of(ports: &[PortRef], what: &str, problems: &mut Vec<String>) -> Self {
        let mut out = Self::default();
        for port in ports {
            match port {
                PortRef::Number(n) => match u16::try_from(*n) {
                    Ok(p) if p != 0 => out.numbers.push(p),
                    _ => problems.push(format!("{what}: port {n} is not in 1..=65535; dropped")),
                },
                PortRef::Name(name) => match name.parse::<u16>() {
                    // `"8080"` in YAML quotes is still a number.
                    Ok(p) if p != 0 => out.numbers.push(p),
                    _ => out.names.push(name.clone()),
                },
            }
        }
        out
    }

    /// The numbers, with names resolved against `pod` (a name it lacks is
    /// no port).
    fn resolve<'a>(&'a self, pod: &'a PodFacts) -> impl Iterator<Item = u16> + 'a {
        self.numbers.iter().copied().chain(
            self.names
                .iter()
                .filter_map(|n| pod.named_ports.get(n).copied()),
        )
    }
}

/// What the policies selecting `pod` let its author loosen, under the
/// combination rule of [`pod_policy`]: the strict mode of any selecting
/// policy wins; a policy's `permissive` loosens the mesh default; with no
/// mode set, the mesh default holds (audit-mode policies set no mode).
/// Excludable ports are united.
pub fn admission<'a>(
    pod: &PodFacts,
    policies: impl IntoIterator<Item = &'a PolicyDef>,
    default: MeshDefault,
) -> Admission {
    let mut admission = Admission::default();
    let (mut strict, mut permissive) = (false, false);
    for policy in policies.into_iter().filter(|p| p.selects(pod)) {
        admission.excludable.extend(policy.excludable.resolve(pod));
        // An audit-mode policy enforces no mode (as in the sidecar).
        if !policy.audit {
            strict |= policy.mode == Some(Mode::Strict);
            permissive |= policy.mode == Some(Mode::Permissive);
        }
    }
    admission.strict = strict || (!permissive && default.mode == Mode::Strict);
    admission
}

/// The selector as kept: a malformed expression selects every pod.
fn selector(selector: &PodSelector, problems: &mut Vec<String>) -> Selector {
    if selector.match_labels.is_empty() && selector.match_expressions.is_empty() {
        return Selector::All;
    }
    for (i, e) in selector.match_expressions.iter().enumerate() {
        let wants_values = matches!(e.operator, LabelOperator::In | LabelOperator::NotIn);
        if wants_values == e.values.is_empty() {
            problems.push(format!(
                "podSelector expression {}: {:?} {} values; the policy selects every pod of its namespace",
                i + 1,
                e.operator,
                if wants_values { "needs" } else { "takes no" },
            ));
            return Selector::All;
        }
    }
    Selector::Labels(selector.clone())
}

fn expression_holds(e: &LabelExpression, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&e.key);
    match e.operator {
        LabelOperator::In => value.is_some_and(|v| e.values.contains(v)),
        LabelOperator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
        LabelOperator::Exists => value.is_some(),
        LabelOperator::DoesNotExist => value.is_none(),
    }
}

// === impl RuleDef ===

impl RuleDef {
    /// Adds one allowed caller, or says why it is not one.
    fn allow(&mut self, caller: &Caller, trust_domain: &TrustDomain) -> Result<(), String> {
        match caller {
            Caller {
                identity: Some(id),
                namespace: None,
                service_account: None,
            } => {
                let id = SpiffeId::parse(id).map_err(|e| format!("not a SPIFFE ID: {e}"))?;
                if !id.is_member_of(trust_domain) {
                    return Err(format!("outside the trust domain {trust_domain}"));
                }
                self.identities.insert(id.as_str().to_owned());
            }
            Caller {
                identity: None,
                namespace: Some(ns),
                service_account: None,
            } => {
                // The namespace must be one an identity can name.
                SpiffeId::from_kubernetes(trust_domain, ns, "x")
                    .map_err(|e| format!("`{ns}` is not a namespace: {e}"))?;
                self.namespaces.insert(ns.clone());
            }
            Caller {
                identity: None,
                namespace: None,
                service_account: Some(sa),
            } => {
                let id = SpiffeId::from_kubernetes(trust_domain, &sa.namespace, &sa.name)
                    .map_err(|e| format!("not a service account: {e}"))?;
                self.identities.insert(id.as_str().to_owned());
            }
            _ => return Err("give exactly one of identity, namespace and serviceAccount".into()),
        }
        Ok(())
    }
}

// === impl DenyDef ===

impl DenyDef {
    /// Every deny list merged.
    pub fn of<'a>(
        lists: impl IntoIterator<Item = &'a IdentityDenyList>,
        trust_domain: &TrustDomain,
    ) -> Self {
        let mut def = Self::default();
        for list in lists {
            let name = list.metadata.name.as_deref().unwrap_or("");
            for value in &list.spec.identities {
                match SpiffeId::parse(value) {
                    Ok(id) if id.is_member_of(trust_domain) => {
                        def.identities.insert(id.as_str().to_owned());
                    }
                    Ok(_) => def.problems.push(format!(
                        "{name}: an identity outside the trust domain {trust_domain}; dropped"
                    )),
                    Err(e) => def.problems.push(format!(
                        "{name}: an entry is not a SPIFFE ID ({e}); dropped"
                    )),
                }
            }
            for ns in &list.spec.namespaces {
                match SpiffeId::from_kubernetes(trust_domain, ns, "x") {
                    Ok(_) => {
                        def.namespaces.insert(ns.clone());
                    }
                    Err(e) => def
                        .problems
                        .push(format!("{name}: `{ns}` is not a namespace ({e}); dropped")),
                }
            }
        }
        def
    }

    /// The deny list as sent.
    pub fn wire(&self) -> wire::DenyList {
        let mut list = wire::DenyList {
            version: String::new(),
            identities: self.identities.iter().cloned().collect(),
            namespaces: self.namespaces.iter().cloned().collect(),
        };
        list.version = version(&list.encode_to_vec());
        list
    }
}

/// The policy of `pod`: the mesh default and, in name order, the policies
/// of `policies` that select it.
pub fn pod_policy<'a>(
    pod: &PodFacts,
    policies: impl IntoIterator<Item = &'a PolicyDef>,
    default: MeshDefault,
) -> wire::PodPolicy {
    let mut selected: Vec<&PolicyDef> = policies.into_iter().filter(|p| p.selects(pod)).collect();
    selected.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    let mut policy = wire::PodPolicy {
        version: String::new(),
        default_mode: wire_mode(default.mode) as i32,
        default_action: wire_action(default.action) as i32,
        pod_strict: pod.strict,
        policies: selected.iter().map(|p| p.resolve(pod)).collect(),
        declared_ports: pod.declared_ports.iter().map(|p| u32::from(*p)).collect(),
    };
    policy.version = version(&policy.encode_to_vec());
    policy
}

/// The first 12 hex digits of the SHA-256 of `encoded`: stable across
/// replicas, since prost encodes one message one way.
fn version(encoded: &[u8]) -> String {
    hex::encode(&Sha256::digest(encoded)[..6])
}

fn wire_mode(mode: Mode) -> wire::InboundMode {
    match mode {
        Mode::Strict => wire::InboundMode::Strict,
        Mode::Permissive => wire::InboundMode::Permissive,
    }
}

fn wire_action(action: Action) -> wire::Action {
    match action {
        Action::Allow => wire::Action::Allow,
        Action::Deny => wire::Action::Deny,
    }
}

// === impl PodFacts ===

impl PodFacts {
    /// What the policy of `pod` depends on, as the API server reports it.
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod) -> Self {
        let mut facts = Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            strict: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(INBOUND_MODE))
                .is_some_and(|mode| mode == "strict"),
            ..Self::default()
        };
        // The app's ports: the sidecar's own are not the app's.
        let containers = pod
            .spec
            .iter()
            .flat_map(|spec| {
                spec.containers
                    .iter()
                    .chain(spec.init_containers.iter().flatten())
            })
            .filter(|c| c.name != SIDECAR_CONTAINER);
        for port in containers.flat_map(|c| c.ports.iter().flatten()) {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(number) = u16::try_from(port.container_port) else {
                continue;
            };
            if number == 0 {
                continue;
            }
            facts.declared_ports.push(number);
            if let Some(name) = &port.name {
                facts.named_ports.entry(name.clone()).or_insert(number);
            }
        }
        facts.declared_ports.sort_unstable();
        facts.declared_ports.dedup();
        facts
    }
}
