//! The policy the control plane delivers for this pod, combined into one
//! [`Policy`].
//!
//! The control plane sends the mesh-wide default and every `InboundPolicy`
//! that selects the pod, resolved for it (named ports made numbers). They
//! combine by one rule, over the *enforced* policies for what is refused,
//! and over *all* of them (audit-mode ones too) for what is counted as
//! `audit_deny`:
//!
//! - **Allows are united.** A port that any policy's rule names admits the
//!   callers of every rule, of any policy, that names it; a port no rule
//!   names gets the default.
//! - **A `deny` default wins** over `allow`; a policy that sets no default
//!   leaves it to the others, and to the mesh default when none sets one.
//! - **The stricter mode wins**: `strict` if any policy, or the pod's own
//!   annotation, says so; else `permissive` if a policy says so (a policy
//!   may loosen the mesh default for its pods: it is RBAC-guarded, an
//!   annotation is not); else the mesh default.
//! - **Audit never refuses.** A connection the enforced policies allow but
//!   all of them together would refuse (a rule or default of an audit-mode
//!   policy, or its `strict` mode for a plaintext peer) is let through and
//!   counted `audit_deny`, named after that policy.
//!
//! Each decision is named after the policy that made it: for an allow, the
//! first policy (in name order) whose rule admits the caller, or that set
//! the default; for a refusal on a ruled port, the first policy with a rule
//! on it; `mesh-default` when no policy decided.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use palisade_proto::{SpiffeId, TrustDomain, discovery::v1 as wire};

use super::{DefaultAction, Layer, MESH_DEFAULT, Policy, PolicySource, Rule};
use crate::proxy::inbound::Mode;

/// Why a delivered policy was refused (the one in use stays).
#[derive(Debug, thiserror::Error)]
pub enum DeliveredError {
    #[error("policy {policy}: port {port} is not in 1..=65535")]
    Port { policy: String, port: u32 },
    #[error("policy {policy}: an allowed identity is not a SPIFFE ID of the trust domain")]
    Identity { policy: String },
    #[error("policy {policy}: an allowed namespace is empty or holds a `/`")]
    Namespace { policy: String },
    #[error("the mesh default has no mode or no action")]
    Default,
}

// === impl Policy ===

impl Policy {
    /// Combines what the control plane sent for this pod.
    pub fn from_wire(
        message: &wire::PodPolicy,
        trust_domain: &TrustDomain,
    ) -> Result<Self, DeliveredError> {
        let default_mode = match message.default_mode() {
            wire::InboundMode::Strict => Mode::Strict,
            wire::InboundMode::Permissive => Mode::Permissive,
            wire::InboundMode::Unspecified => return Err(DeliveredError::Default),
        };
        let default_action = action(message.default_action()).ok_or(DeliveredError::Default)?;
        let all: Vec<Checked> = message
            .policies
            .iter()
            .map(|p| Checked::of(p, trust_domain))
            .collect::<Result<_, _>>()?;
        let enforced: Vec<&Checked> = all.iter().filter(|p| !p.audit).collect();
        let everyone: Vec<&Checked> = all.iter().collect();

        let (mode, _) = combined_mode(&enforced, message.pod_strict, default_mode);
        let (audit_mode, audit_by) = combined_mode(&everyone, message.pod_strict, default_mode);
        let audit_strict =
            (mode == Mode::Permissive && audit_mode == Mode::Strict).then_some(audit_by);
        let audited = all
            .iter()
            .any(|p| p.audit)
            .then(|| layer(&everyone, default_action));
        let mut labelled_ports: HashSet<u16> = message
            .declared_ports
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect();
        for policy in &all {
            for rule in &policy.rules {
                labelled_ports.extend(&rule.ports);
            }
        }
        Ok(Policy {
            source: PolicySource::Kubernetes,
            version: message.version.clone(),
            mode: Some(mode),
            audit_strict,
            enforced: layer(&enforced, default_action),
            audited,
            trust_domain: Some(trust_domain.clone()),
            labelled_ports,
            rule_count: all.iter().map(|p| p.rules.len()).sum(),
        })
    }
}

/// One delivered policy, checked.
struct Checked {
    name: Arc<str>,
    mode: Option<Mode>,
    default_action: Option<DefaultAction>,
    audit: bool,
    rules: Vec<CheckedRule>,
}

struct CheckedRule {
    ports: Vec<u16>,
    identities: Vec<SpiffeId>,
    namespaces: Vec<String>,
}

impl Checked {
    fn of(policy: &wire::Policy, trust_domain: &TrustDomain) -> Result<Self, DeliveredError> {
        let named = || policy.name.chars().take(253).collect::<String>();
        let mut rules = Vec::with_capacity(policy.rules.len());
        for rule in &policy.rules {
            let ports = rule
                .ports
                .iter()
                .map(|p| match u16::try_from(*p) {
                    Ok(port) if port != 0 => Ok(port),
                    _ => Err(DeliveredError::Port {
                        policy: named(),
                        port: *p,
                    }),
                })
                .collect::<Result<_, _>>()?;
            let identities = rule
                .identities
                .iter()
                .map(|id| match SpiffeId::parse(id) {
                    Ok(id) if id.is_member_of(trust_domain) => Ok(id),
                    _ => Err(DeliveredError::Identity { policy: named() }),
                })
                .collect::<Result<_, _>>()?;
            if rule
                .namespaces
                .iter()
                .any(|ns| ns.is_empty() || ns.contains('/'))
            {
                return Err(DeliveredError::Namespace { policy: named() });
            }
            rules.push(CheckedRule {
                ports,
                identities,
                namespaces: rule.namespaces.clone(),
            });
        }
        Ok(Self {
            name: Arc::from(policy.name.as_str()),
            mode: match policy.mode() {
                wire::InboundMode::Strict => Some(Mode::Strict),
                wire::InboundMode::Permissive => Some(Mode::Permissive),
                wire::InboundMode::Unspecified => None,
            },
            default_action: action(policy.default_action()),
            audit: policy.audit,
            rules,
        })
    }
}

fn action(action: wire::Action) -> Option<DefaultAction> {
    match action {
        wire::Action::Allow => Some(DefaultAction::Allow),
        wire::Action::Deny => Some(DefaultAction::Deny),
        wire::Action::Unspecified => None,
    }
}

/// The mode of `policies` together, and who set it.
fn combined_mode(policies: &[&Checked], pod_strict: bool, default: Mode) -> (Mode, Arc<str>) {
    if let Some(p) = policies.iter().find(|p| p.mode == Some(Mode::Strict)) {
        return (Mode::Strict, p.name.clone());
    }
    if pod_strict {
        return (Mode::Strict, Arc::from("pod-annotation"));
    }
    if let Some(p) = policies.iter().find(|p| p.mode == Some(Mode::Permissive)) {
        return (Mode::Permissive, p.name.clone());
    }
    (default, Arc::from(MESH_DEFAULT))
}

/// The rules and default of `policies` together (in name order).
fn layer(policies: &[&Checked], mesh_default: DefaultAction) -> Layer {
    let default_of = |action: DefaultAction| {
        policies
            .iter()
            .find(|p| p.default_action == Some(action))
            .map(|p| (action, p.name.clone()))
    };
    let (default, default_by) = default_of(DefaultAction::Deny)
        .or_else(|| default_of(DefaultAction::Allow))
        .unwrap_or_else(|| (mesh_default, Arc::from(MESH_DEFAULT)));
    let mut by_port: HashMap<u16, Rule> = HashMap::new();
    for policy in policies {
        for rule in &policy.rules {
            for port in &rule.ports {
                let entry = by_port
                    .entry(*port)
                    .or_insert_with(|| Rule::new(policy.name.clone()));
                for id in &rule.identities {
                    entry
                        .exact
                        .entry(id.clone())
                        .or_insert_with(|| policy.name.clone());
                }
                for ns in &rule.namespaces {
                    entry
                        .namespaces
                        .entry(ns.clone())
                        .or_insert_with(|| policy.name.clone());
                }
            }
        }
    }
    Layer {
        default,
        default_by,
        by_port: by_port.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
    }
}
