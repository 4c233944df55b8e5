//! Inbound authorization: which peers may reach which of the app's ports.
//!
//! The policy is a YAML file, watched and hot-reloaded; a bad edit is refused
//! and the policy in use stays:
//!
//! ```yaml
//! # applies to ports that no rule covers: allow | deny
//! default: deny
//! rules:
//!   - port: 8080                  # or `ports: [8080, 8443]`
//!     allow:
//!       - spiffe://cluster.local/ns/web/sa/frontend   # exactly this identity
//!       - spiffe://cluster.local/ns/monitoring/*       # every identity of a namespace
//!   - port: 9090
//!     allow: []                   # nobody
//! ```
//!
//! A connection is judged by its destination port and the peer's verified
//! SPIFFE ID, if any (a plaintext peer accepted in permissive mode has none):
//!
//! - If a rule covers the port, the peer is allowed iff its identity matches
//!   one of the rule's entries. A peer without an identity never matches.
//! - Otherwise `default` decides, for peers with and without an identity.
//!
//! An entry is either an exact SPIFFE ID, or `spiffe://<td>/ns/<namespace>/*`,
//! which matches every ID whose path starts with `/ns/<namespace>/` (so
//! `ns/web/*` matches neither `ns/web2/...` nor `ns/we/...`). No other wildcard
//! is accepted. Every entry must belong to the sidecar's trust domain, since
//! peers of other trust domains never complete a handshake. A port is in at
//! most one rule; ports are `1..=65535`; `default` and every rule's `allow` are
//! required; unknown fields are errors. Errors name the rule and entry by
//! position, counting from 1.
//!
//! Matching runs for every inbound connection, so the file is compiled into,
//! per port, a hash set of exact IDs and a hash set of namespaces: a check is
//! two hash lookups and allocates nothing.
//!
//! On Kubernetes the policy comes over the discovery stream instead
//! ([`delivered`]: the policy resources selecting the pod, combined by one
//! rule), with the mesh-wide deny list ([`deny`]). Every decision names what
//! made it (`policy` label): `<namespace>/<name>` of a resource,
//! `mesh-default`, `file`, or `deny-list`.

pub mod delivered;
pub mod deny;

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use arc_swap::{ArcSwap, Guard};
use palisade_proto::{SpiffeId, SpiffeIdError, TrustDomain};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub use self::deny::DenyList;
use crate::proxy::inbound::Mode;

/// The `policy` label of a decision the file made.
pub const FILE: &str = "file";
/// The `policy` label of a decision the mesh-wide default made.
pub const MESH_DEFAULT: &str = "mesh-default";
/// The `policy` label of a refusal by the deny list.
pub const DENY_LIST: &str = "deny-list";

/// What happens to connections to a port that no rule covers.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Every peer is allowed, with or without an identity.
    Allow,
    /// Every peer is refused.
    Deny,
}

/// The verdict on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Allowed, but a policy in audit mode would have refused it.
    AuditDeny,
}

/// A verdict and what made it (the `policy` label).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub policy: Arc<str>,
}

/// Where the policy in force comes from (`palisade_policy_info{source}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum PolicySource {
    /// The `--policy` file.
    File,
    /// The mesh-wide default, before the control plane sent a policy.
    MeshDefault,
    /// The policy resources, over the discovery stream.
    Kubernetes,
}

/// A compiled policy: what is enforced, and what audit-mode policies would
/// refuse on top of it.
#[derive(Debug)]
pub struct Policy {
    source: PolicySource,
    /// `palisade_policy_info{version}`.
    version: String,
    /// The inbound mode; `None`: the sidecar's `--inbound-mode` (the file,
    /// and the mesh default before the first delivered policy).
    mode: Option<Mode>,
    /// Set when the enforced mode is permissive but audit-mode policies ask
    /// for strict: the policy that asks.
    audit_strict: Option<Arc<str>>,
    enforced: Layer,
    /// Enforced and audit-mode policies together; `None` without audit.
    audited: Option<Layer>,
    /// The trust domain namespace entries belong to; `None` only without rules.
    trust_domain: Option<TrustDomain>,
    /// Ports the `port` label names (declared or in a rule); others are `other`.
    labelled_ports: HashSet<u16>,
    rule_count: usize,
}

/// One combination of rules and a default.
#[derive(Debug)]
struct Layer {
    default: DefaultAction,
    /// Who set the default.
    default_by: Arc<str>,
    /// Each covered port to its rule; the ports of one rule may share it.
    by_port: HashMap<u16, Arc<Rule>>,
}

/// The policy in use (a watched file, or what discovery delivers) and the
/// deny list; the hot path reads both without locking (arc-swap, watch).
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<Policy>,
    /// Where the policy comes from; `None` for a fixed policy.
    source: Option<Source>,
    deny_list: watch::Sender<Arc<DenyList>>,
}

/// Why a policy was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read the policy file {path}: {error}")]
    Read { path: PathBuf, error: io::Error },
    /// The file was read but is not a valid policy.
    #[error("the policy file {path} is not valid: {error}")]
    File {
        path: PathBuf,
        error: Box<PolicyError>,
    },
    /// Not YAML, or not this file's shape; serde's message names the field and line.
    #[error("{0}")]
    Syntax(String),
    /// A rule has both `port` and `ports`.
    #[error("rule {rule}: give either `port` or `ports`, not both")]
    PortAndPorts { rule: usize },
    /// A rule has neither `port` nor a non-empty `ports`.
    #[error("rule {rule}: no port; give `port: N` or `ports: [N, ...]`")]
    NoPort { rule: usize },
    /// A port is 0, negative or above 65535.
    #[error("rule {rule}: port {port} is not in 1..=65535")]
    PortOutOfRange { rule: usize, port: i64 },
    /// A port is listed twice in one rule.
    #[error("rule {rule}: port {port} is listed twice")]
    PortListedTwice { rule: usize, port: u16 },
    /// A port is covered by an earlier rule too.
    #[error("rule {rule}: port {port} is already covered by rule {first_rule}")]
    DuplicatePort {
        rule: usize,
        port: u16,
        first_rule: usize,
    },
    /// An entry is not a SPIFFE ID (or its wildcard's prefix is not).
    #[error("rule {rule}, entry {entry}: `{value}` is not a SPIFFE ID: {error}")]
    BadIdentity {
        rule: usize,
        entry: usize,
        value: String,
        error: SpiffeIdError,
    },
    /// An entry has a `*` anywhere but in `spiffe://<td>/ns/<namespace>/*`.
    #[error(
        "rule {rule}, entry {entry}: `{value}` is a wildcard of the wrong form; \
         the only one accepted is `spiffe://<trust-domain>/ns/<namespace>/*`"
    )]
    BadWildcard {
        rule: usize,
        entry: usize,
        value: String,
    },
    /// An entry belongs to another trust domain.
    #[error("rule {rule}, entry {entry}: `{value}` is outside the trust domain {trust_domain}")]
    ForeignTrustDomain {
        rule: usize,
        entry: usize,
        value: String,
        trust_domain: TrustDomain,
    },
}

/// The peers one port allows, each with the policy that allows it.
#[derive(Debug)]
struct Rule {
    exact: HashMap<SpiffeId, Arc<str>>,
    namespaces: HashMap<String, Arc<str>>,
    /// Who refuses the peers not allowed: the first policy with a rule on
    /// the port.
    by: Arc<str>,
}

/// One entry of a rule's `allow` list, parsed.
enum Entry {
    Exact(SpiffeId),
    Namespace(String),
}

#[derive(Debug)]
struct Source {
    path: PathBuf,
    trust_domain: TrustDomain,
    /// SHA-256 of the file the current policy was read from. Holding the lock
    /// for a whole reload also keeps two reloads from racing.
    digest: Mutex<[u8; 32]>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default: DefaultAction,
    #[serde(default)]
    rules: Vec<FileRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    // Wider than `u16` so that 0 or 65536 get an error naming the rule.
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    ports: Option<Vec<i64>>,
    allow: Vec<String>,
}

/// Longest piece of an entry quoted back in an error.
const MAX_QUOTED: usize = 100;

// === impl Policy ===

impl Policy {
    /// Parses a policy file's contents; every entry must belong to `trust_domain`.
    pub fn parse(yaml: &str, trust_domain: &TrustDomain) -> Result<Policy, PolicyError> {
        if yaml
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            // Likely a truncated write; serde would say "unexpected end of input".
            return Err(PolicyError::Syntax(
                "the file is empty; it needs at least `default: allow` or `default: deny`".into(),
            ));
        }
        // Without the snippet: the rendered one spans lines; the message
        // already ends with "at line L, column C".
        let file: File = serde_saphyr::from_str(yaml)
            .map_err(|e| PolicyError::Syntax(e.without_snippet().to_string()))?;

        let mut by_port = HashMap::new();
        let by: Arc<str> = Arc::from(FILE);
        // Which rule covers each port, to name both in a duplicate error.
        let mut covered_by: HashMap<u16, usize> = HashMap::new();
        for (i, file_rule) in file.rules.iter().enumerate() {
            let rule_no = i + 1;
            let ports = file_rule.ports(rule_no)?;
            let mut rule = Rule::new(by.clone());
            for (j, value) in file_rule.allow.iter().enumerate() {
                match Entry::parse(value, trust_domain, rule_no, j + 1)? {
                    Entry::Exact(id) => rule.exact.insert(id, by.clone()),
                    Entry::Namespace(ns) => rule.namespaces.insert(ns, by.clone()),
                };
            }
            let rule = Arc::new(rule);
            for port in ports {
                match covered_by.get(&port) {
                    Some(&first_rule) if first_rule == rule_no => {
                        return Err(PolicyError::PortListedTwice {
                            rule: rule_no,
                            port,
                        });
                    }
                    Some(&first_rule) => {
                        return Err(PolicyError::DuplicatePort {
                            rule: rule_no,
                            port,
                            first_rule,
                        });
                    }
                    None => {}
                }
                covered_by.insert(port, rule_no);
                by_port.insert(port, rule.clone());
            }
        }
        let labelled_ports = by_port.keys().copied().collect();
        Ok(Policy {
            source: PolicySource::File,
            version: hex::encode(&Sha256::digest(yaml.as_bytes())[..6]),
            mode: None,
            audit_strict: None,
            enforced: Layer {
                default: file.default,
                default_by: by,
                by_port,
            },
            audited: None,
            trust_domain: Some(trust_domain.clone()),
            labelled_ports,
            rule_count: file.rules.len(),
        })
    }

    /// Allows everything: `default: allow` and no rules, for when no file is configured.
    pub fn allow_all() -> Policy {
        Self::mesh_default(DefaultAction::Allow)
    }

    /// The mesh-wide default before the control plane sent a policy: no
    /// rules, `default` on every port, the sidecar's own inbound mode.
    pub fn mesh_default(default: DefaultAction) -> Policy {
        Policy {
            source: PolicySource::MeshDefault,
            version: String::from(match default {
                DefaultAction::Allow => "allow",
                DefaultAction::Deny => "deny",
            }),
            mode: None,
            audit_strict: None,
            enforced: Layer {
                default,
                default_by: Arc::from(MESH_DEFAULT),
                by_port: HashMap::new(),
            },
            audited: None,
            trust_domain: None,
            labelled_ports: HashSet::new(),
            rule_count: 0,
        }
    }

    /// The verdict on `peer` (`None`: no verified identity) connecting to
    /// `port`, and what made it.
    pub fn decide(&self, port: u16, peer: Option<&SpiffeId>) -> Decision {
        // Hot path: hash lookups on borrowed keys and one reference count.
        let td = self.trust_domain.as_ref();
        let (allowed, by) = self.enforced.decide(port, peer, td);
        if !allowed {
            return Decision {
                verdict: Verdict::Deny,
                policy: by.clone(),
            };
        }
        let audit = match (&self.audit_strict, peer) {
            (Some(strict), None) => Some(strict),
            _ => self.audited.as_ref().and_then(|layer| {
                let (allowed, by) = layer.decide(port, peer, td);
                (!allowed).then_some(by)
            }),
        };
        match audit {
            Some(by) => Decision {
                verdict: Verdict::AuditDeny,
                policy: by.clone(),
            },
            None => Decision {
                verdict: Verdict::Allow,
                policy: by.clone(),
            },
        }
    }

    /// Whether `peer` may connect to `port` (an audit-mode refusal allows).
    pub fn allows(&self, port: u16, peer: Option<&SpiffeId>) -> bool {
        self.decide(port, peer).verdict != Verdict::Deny
    }

    /// What happens on ports no rule covers.
    pub fn default_action(&self) -> DefaultAction {
        self.enforced.default
    }

    /// The inbound mode it sets; `None`: the sidecar's own.
    pub fn mode(&self) -> Option<Mode> {
        self.mode
    }

    /// Where it comes from.
    pub fn source(&self) -> PolicySource {
        self.source
    }

    /// Its version (a digest).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// `port` if the `port` label may name it, else `None` (`other`).
    pub fn labelled_port(&self, port: u16) -> Option<u16> {
        self.labelled_ports.contains(&port).then_some(port)
    }

    /// How many rules the policy has.
    pub fn rule_count(&self) -> usize {
        self.rule_count
    }
}

// === impl Layer ===

impl Layer {
    /// Whether `peer` may connect to `port` here, and who says so.
    fn decide(
        &self,
        port: u16,
        peer: Option<&SpiffeId>,
        trust_domain: Option<&TrustDomain>,
    ) -> (bool, &Arc<str>) {
        let Some(rule) = self.by_port.get(&port) else {
            return (self.default == DefaultAction::Allow, &self.default_by);
        };
        let Some(peer) = peer else {
            return (false, &rule.by);
        };
        if let Some(by) = rule.exact.get(peer) {
            return (true, by);
        }
        let in_trust_domain = trust_domain.is_some_and(|td| peer.is_member_of(td));
        let by_namespace = namespace_of(peer)
            .filter(|_| in_trust_domain)
            .and_then(|ns| rule.namespaces.get(ns));
        match by_namespace {
            Some(by) => (true, by),
            None => (false, &rule.by),
        }
    }
}

// === impl Rule ===

impl Rule {
    fn new(by: Arc<str>) -> Self {
        Self {
            exact: HashMap::new(),
            namespaces: HashMap::new(),
            by,
        }
    }
}

/// The `<namespace>` of an ID whose path is `/ns/<namespace>/<anything>`.
fn namespace_of(id: &SpiffeId) -> Option<&str> {
    // `SpiffeId` has no empty segments, so a `/` after the namespace means at
    // least one more segment, as `ns/<namespace>/*` requires.
    let (ns, _rest) = id.path().strip_prefix("/ns/")?.split_once('/')?;
    Some(ns)
}

// === impl FileRule ===

impl FileRule {
    /// The rule's ports, checked for range; `rule` is its position for errors.
    fn ports(&self, rule: usize) -> Result<Vec<u16>, PolicyError> {
        let raw = match (self.port, &self.ports) {
            (Some(_), Some(_)) => return Err(PolicyError::PortAndPorts { rule }),
            (Some(port), None) => vec![port],
            (None, Some(ports)) if !ports.is_empty() => ports.clone(),
            (None, _) => return Err(PolicyError::NoPort { rule }),
        };
        raw.into_iter()
            .map(|port| match u16::try_from(port) {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(PolicyError::PortOutOfRange { rule, port }),
            })
            .collect()
    }
}

// === impl Entry ===

impl Entry {
    /// Parses one `allow` entry; `rule` and `entry` are positions for errors.
    fn parse(
        value: &str,
        trust_domain: &TrustDomain,
        rule: usize,
        entry: usize,
    ) -> Result<Self, PolicyError> {
        let quoted = quote(value);
        // Any `*` makes the entry a wildcard, which has exactly one form.
        let (id_text, namespace) = if value.contains('*') {
            let (id, namespace) =
                namespace_wildcard(value).ok_or_else(|| PolicyError::BadWildcard {
                    rule,
                    entry,
                    value: quoted.clone(),
                })?;
            (id, Some(namespace))
        } else {
            (value, None)
        };
        let id = SpiffeId::parse(id_text).map_err(|error| PolicyError::BadIdentity {
            rule,
            entry,
            value: quoted.clone(),
            error,
        })?;
        if !id.is_member_of(trust_domain) {
            return Err(PolicyError::ForeignTrustDomain {
                rule,
                entry,
                value: quoted,
                trust_domain: trust_domain.clone(),
            });
        }
        Ok(match namespace {
            Some(ns) => Entry::Namespace(ns.to_owned()),
            None => Entry::Exact(id),
        })
    }
}

/// Splits `spiffe://<td>/ns/<namespace>/*` into the ID before `/*` and the
/// namespace, or `None` for any other shape. Only the shape is checked here:
/// `SpiffeId::parse` of the ID then checks the trust domain and the segment.
fn namespace_wildcard(value: &str) -> Option<(&str, &str)> {
    let id = value.strip_suffix("/*")?;
    let (_trust_domain, path) = id.strip_prefix("spiffe://")?.split_once('/')?;
    let namespace = path.strip_prefix("ns/")?;
    let well_formed = !id.contains('*') && !namespace.is_empty() && !namespace.contains('/');
    well_formed.then_some((id, namespace))
}

/// `value`, cut short if long, for an error message.
fn quote(value: &str) -> String {
    if value.chars().count() <= MAX_QUOTED {
        value.to_owned()
    } else {
        let mut short: String = value.chars().take(MAX_QUOTED).collect();
        short.push('…');
        short
    }
}

// === impl PolicyStore ===

impl PolicyStore {
    /// Loads the policy file; every entry must belong to `trust_domain`.
    pub fn load(path: &Path, trust_domain: TrustDomain) -> Result<Self, PolicyError> {
        let (policy, digest) = read(path, &trust_domain)?;
        Ok(Self {
            current: ArcSwap::from_pointee(policy),
            source: Some(Source {
                path: path.to_owned(),
                trust_domain,
                digest: Mutex::new(digest),
            }),
            deny_list: watch::Sender::new(Arc::new(DenyList::empty())),
        })
    }

    /// A policy no file changes: fixed, or replaced by discovery ([`Self::set`]).
    pub fn fixed(policy: Policy) -> Self {
        Self {
            current: ArcSwap::from_pointee(policy),
            source: None,
            deny_list: watch::Sender::new(Arc::new(DenyList::empty())),
        }
    }

    /// Puts `policy` in use for new connections.
    pub fn set(&self, policy: Policy) {
        self.current.store(Arc::new(policy));
    }

    /// Puts `deny_list` in use; connections of identities it denies are
    /// told ([`Self::deny_list`]).
    pub fn set_deny_list(&self, deny_list: DenyList) {
        self.deny_list.send_replace(Arc::new(deny_list));
    }

    /// The deny list in use, to check or to follow.
    pub fn deny_list(&self) -> watch::Receiver<Arc<DenyList>> {
        self.deny_list.subscribe()
    }

    /// Whether the deny list in use refuses `peer`.
    pub fn denied(&self, peer: &SpiffeId) -> bool {
        self.deny_list.borrow().denies(peer)
    }

    /// The policy in use. Lock-free and cheap; drop the guard soon (use it for
    /// one decision, do not hold it across an `.await`).
    pub fn current(&self) -> Guard<Arc<Policy>> {
        self.current.load()
    }

    /// The watched file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.source.as_ref().map(|s| s.path.as_path())
    }

    /// Re-reads the file: Ok(true) if it changed and is now in use, Ok(false) if unchanged; Err keeps the old policy.
    ///
    /// A fixed policy is never reloaded (`Ok(false)`).
    pub fn reload(&self) -> Result<bool, PolicyError> {
        let Some(source) = &self.source else {
            return Ok(false);
        };
        // A panic elsewhere cannot leave the digest half-written: take it as is.
        let mut digest = source.digest.lock().unwrap_or_else(PoisonError::into_inner);
        let text = read_text(&source.path)?;
        let new_digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if new_digest == *digest {
            return Ok(false);
        }
        let policy =
            Policy::parse(&text, &source.trust_domain).map_err(|e| in_file(&source.path, e))?;
        self.current.store(Arc::new(policy));
        *digest = new_digest;
        Ok(true)
    }
}

/// Reads and parses the policy file, with the SHA-256 of its contents.
fn read(path: &Path, trust_domain: &TrustDomain) -> Result<(Policy, [u8; 32]), PolicyError> {
    let text = read_text(path)?;
    let policy = Policy::parse(&text, trust_domain).map_err(|e| in_file(path, e))?;
    Ok((policy, Sha256::digest(text.as_bytes()).into()))
}

fn read_text(path: &Path) -> Result<String, PolicyError> {
    fs::read_to_string(path).map_err(|error| PolicyError::Read {
        path: path.to_owned(),
        error,
    })
}

fn in_file(path: &Path, error: PolicyError) -> PolicyError {
    PolicyError::File {
        path: path.to_owned(),
        error: Box::new(error),
    }
}

#[cfg(test)]
mod tests;
