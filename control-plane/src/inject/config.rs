//! The injection configuration file: what the webhook puts into pods.
//!
//! The chart renders it into a ConfigMap; the control plane reads it at start
//! and again whenever it changes. A file that does not parse, or names a key
//! this version does not know, is refused as a whole and the previous
//! configuration stays in use.

use std::{collections::BTreeMap, path::Path, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::policy::resources::Action;

/// Everything the webhook needs to build the two containers of a pod.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InjectionConfig {
    /// The sidecar container (a native sidecar: an init container with
    /// `restartPolicy: Always`).
    pub sidecar: SidecarTemplate,
    /// The init container that installs the iptables rules.
    pub init: InitTemplate,
    /// Where the sidecar asks for certificates.
    pub control_plane: ControlPlaneRef,
    /// The projected service-account token the sidecar authenticates with.
    #[serde(default)]
    pub token: TokenTemplate,
    /// The ConfigMap, in the pod's namespace, holding the trust bundle (`ca.crt`).
    #[serde(default = "default_bundle_configmap")]
    pub bundle_config_map: String,
    /// Add `prometheus.io/{scrape,port,path}` annotations unless the pod has its own.
    #[serde(default = "yes")]
    pub prometheus_scrape: bool,
}

/// The sidecar container.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarTemplate {
    pub image: String,
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    /// `ResourceRequirements`, copied into the pod.
    #[serde(default)]
    pub resources: Resources,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// The default inbound mode; the pod annotation `palisade.io/inbound-mode` overrides it.
    #[serde(default)]
    pub inbound_mode: InboundMode,
    /// The mesh-wide action on ports no rule covers, until discovery
    /// delivers the pod's policy (the chart's `policy.defaultAction`).
    #[serde(default = "allow")]
    pub default_action: Action,
    /// Whether the sidecar opens the discovery stream and decides outbound
    /// per destination from it (the chart's `discovery.enabled`).
    #[serde(default = "yes")]
    pub discovery: bool,
    /// Plain TCP to destinations without a sidecar: counted, or refused.
    #[serde(default)]
    pub outbound_mode: OutboundMode,
    /// Requested certificate lifetime (`1h`, `30m`); the control plane's default when absent.
    #[serde(default, with = "humantime_serde")]
    pub lifetime: Option<Duration>,
    /// Merged with the annotation `palisade.io/exclude-outbound-ports`.
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Merged with the annotation `palisade.io/exclude-inbound-ports`.
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Merged with the annotation `palisade.io/server-first-ports`.
    #[serde(default)]
    pub server_first_ports: Vec<u16>,
    /// Destinations treated as mesh peers; empty means the sidecar's default.
    #[serde(default)]
    pub mesh_networks: Vec<IpNet>,
    /// The sidecar's access log (`off` or `json`); the pod annotation
    /// `palisade.io/access-log` overrides it.
    #[serde(default)]
    pub access_log: AccessLog,
}

/// The init container.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitTemplate {
    pub image: String,
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    #[serde(default)]
    pub resources: Resources,
}

/// How sidecars reach the control plane.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlaneRef {
    /// `https://palisade-control-plane.<ns>.svc:15012`
    pub address: String,
    /// The DNS name the sidecar expects in the control plane's certificate.
    pub server_name: String,
}

/// The projected service-account token.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenTemplate {
    #[serde(default = "default_audience")]
    pub audience: String,
    /// The kubelet refreshes the token at 80 % of this; its minimum is 600.
    #[serde(default = "default_expiration")]
    pub expiration_seconds: i64,
}

/// `imagePullPolicy`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

fn allow() -> Action {
    Action::Allow
}

/// The sidecar's inbound mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    #[default]
    Permissive,
    Strict,
}

/// The sidecar's access log.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    #[default]
    Off,
    Json,
}

/// The sidecar's outbound mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutboundMode {
    #[default]
    Permissive,
    Strict,
}

/// `ResourceRequirements` as the chart writes it: quantities may be YAML
/// numbers (`cpu: 1`) or strings (`memory: 64Mi`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
}

/// A resource quantity.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Quantity {
    Text(String),
    Number(serde_json::Number),
}

/// Why the injection configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid injection configuration: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}: {field}: {why}")]
    Invalid {
        path: String,
        field: &'static str,
        why: String,
    },
}

// === impl InjectionConfig ===

impl InjectionConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { reason, .. } => ConfigError::Parse {
                path: shown,
                reason,
            },
            ConfigError::Invalid { field, why, .. } => ConfigError::Invalid {
                path: shown,
                field,
                why,
            },
            other => other,
        })
    }

    /// Parses and checks YAML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            reason: e.to_string(),
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |field, why: &str| ConfigError::Invalid {
            path: String::new(),
            field,
            why: why.to_owned(),
        };
        if self.sidecar.image.trim().is_empty() {
            return Err(invalid("sidecar.image", "must name an image"));
        }
        if self.init.image.trim().is_empty() {
            return Err(invalid("init.image", "must name an image"));
        }
        if !self.control_plane.address.starts_with("https://") {
            return Err(invalid(
                "controlPlane.address",
                "must be an https:// URL (the identity API is served over TLS)",
            ));
        }
        if self.control_plane.server_name.is_empty() {
            return Err(invalid("controlPlane.serverName", "must not be empty"));
        }
        if self.token.audience.is_empty() {
            return Err(invalid("token.audience", "must not be empty"));
        }
        if !(600..=86_400).contains(&self.token.expiration_seconds) {
            return Err(invalid(
                "token.expirationSeconds",
                "must be between 600 (the kubelet's minimum) and 86400",
            ));
        }
        if self.sidecar.outbound_mode == OutboundMode::Strict && !self.sidecar.discovery {
            return Err(invalid(
                "sidecar.outboundMode",
                "strict needs sidecar.discovery: without discovery nothing says which destinations are unmeshed",
            ));
        }
        if !is_dns_label(&self.bundle_config_map) {
            return Err(invalid(
                "bundleConfigMap",
                "must be a DNS-1123 name (lowercase letters, digits, '-')",
            ));
        }
        let ports = [
            (
                "sidecar.excludeOutboundPorts",
                &self.sidecar.exclude_outbound_ports,
            ),
            (
                "sidecar.excludeInboundPorts",
                &self.sidecar.exclude_inbound_ports,
            ),
            ("sidecar.serverFirstPorts", &self.sidecar.server_first_ports),
        ];
        for (field, list) in ports {
            if list.contains(&0) {
                return Err(invalid(field, "port 0 is not a port"));
            }
        }
        Ok(())
    }
}

// === impl Resources ===

impl Resources {
    /// The Kubernetes JSON form, quantities as strings.
    pub fn to_json(&self) -> Value {
        let map = |m: &BTreeMap<String, Quantity>| -> Value {
            m.iter()
                .map(|(k, q)| {
                    let text = match q {
                        Quantity::Text(t) => t.clone(),
                        Quantity::Number(n) => n.to_string(),
                    };
                    (k.clone(), Value::String(text))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let mut out = serde_json::Map::new();
        if !self.requests.is_empty() {
            out.insert("requests".into(), map(&self.requests));
        }
        if !self.limits.is_empty() {
            out.insert("limits".into(), map(&self.limits));
        }
        out.into()
    }
}

// === impl PullPolicy ===

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

// === impl InboundMode ===

impl InboundMode {
    /// The sidecar flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }
}

// === impl OutboundMode ===

impl OutboundMode {
    /// The sidecar flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }
}

impl Default for TokenTemplate {
    fn default() -> Self {
        Self {
            audience: default_audience(),
            expiration_seconds: default_expiration(),
        }
    }
}

/// A DNS-1123 label: what Kubernetes accepts as a ConfigMap or namespace name.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn default_bundle_configmap() -> String {
    "palisade-trust-bundle".to_owned()
}

fn default_log_level() -> String {
    "info".to_owned()
}

fn default_audience() -> String {
    "palisade".to_owned()
}

fn default_expiration() -> i64 {
    600
}

fn yes() -> bool {
    true
}
