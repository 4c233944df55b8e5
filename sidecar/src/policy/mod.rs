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

/// What happens to connections to a port that no rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Every peer is allowed, with or without an identity.
    Allow,
    /// Every peer is refused.
    Deny,
}

/// A parsed policy.
#[derive(Debug)]
pub struct Policy {
    default: DefaultAction,
    /// The trust domain namespace entries belong to; `None` only without rules.
    trust_domain: Option<TrustDomain>,
    /// Each covered port to its rule; the ports of one rule share it.
    by_port: HashMap<u16, Arc<Rule>>,
    rule_count: usize,
}

/// A policy file, watched and hot-reloaded; the hot path reads it without locking (arc-swap).
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<Policy>,
    /// Where the policy comes from; `None` for a fixed policy.
    source: Option<Source>,
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

/// The peers one rule allows.
#[derive(Debug, Default)]
struct Rule {
    exact: HashSet<SpiffeId>,
    namespaces: HashSet<String>,
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
        // Which rule covers each port, to name both in a duplicate error.
        let mut covered_by: HashMap<u16, usize> = HashMap::new();
        for (i, file_rule) in file.rules.iter().enumerate() {
            let rule_no = i + 1;
            let ports = file_rule.ports(rule_no)?;
            let mut rule = Rule::default();
            for (j, value) in file_rule.allow.iter().enumerate() {
                match Entry::parse(value, trust_domain, rule_no, j + 1)? {
                    Entry::Exact(id) => rule.exact.insert(id),
                    Entry::Namespace(ns) => rule.namespaces.insert(ns),
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
        Ok(Policy {
            default: file.default,
            trust_domain: Some(trust_domain.clone()),
            by_port,
            rule_count: file.rules.len(),
        })
    }

    /// Allows everything: `default: allow` and no rules, for when no file is configured.
    pub fn allow_all() -> Policy {
        Policy {
            default: DefaultAction::Allow,
            trust_domain: None,
            by_port: HashMap::new(),
            rule_count: 0,
        }
    }

    /// Whether `peer` (`None`: no verified identity) may connect to `port`.
    pub fn allows(&self, port: u16, peer: Option<&SpiffeId>) -> bool {
        // Hot path: hash lookups on borrowed keys (`u16`, `&SpiffeId`, `&str`
        // slices of the peer's ID) and nothing else; it must never allocate.
        let Some(rule) = self.by_port.get(&port) else {
            return self.default == DefaultAction::Allow;
        };
        let Some(peer) = peer else {
            return false;
        };
        if rule.exact.contains(peer) {
            return true;
        }
        let in_trust_domain = self
            .trust_domain
            .as_ref()
            .is_some_and(|td| peer.is_member_of(td));
        in_trust_domain && namespace_of(peer).is_some_and(|ns| rule.namespaces.contains(ns))
    }

    /// What happens on ports no rule covers.
    pub fn default_action(&self) -> DefaultAction {
        self.default
    }

    /// How many rules the policy has.
    pub fn rule_count(&self) -> usize {
        self.rule_count
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
        })
    }

    /// A policy that never changes (no file is configured).
    pub fn fixed(policy: Policy) -> Self {
        Self {
            current: ArcSwap::from_pointee(policy),
            source: None,
        }
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
