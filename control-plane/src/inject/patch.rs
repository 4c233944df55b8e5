//! Reads a pod and builds the JSONPatch that meshes it.
//!
//! Pointers are built from what the pod actually has: a missing
//! `metadata.annotations`, `spec.initContainers` or `spec.volumes` is added
//! whole, an existing one is extended, so the patch applies to any pod the
//! API server accepts.

use std::collections::BTreeSet;

use json_patch::{AddOperation, Patch, PatchOperation};
use palisade_proto::{SpiffeId, TrustDomain};
use serde_json::{Value, json};

use crate::policy::resources::Action;

use super::{
    ReviewReason,
    config::{AccessLog, InboundMode, InjectionConfig},
    posture::{PROXY_UID, Posture},
    probes::{self, ORIGINAL_PROBES},
};

/// Annotation that opts a pod out (`"false"` or `"disabled"`).
pub const INJECT: &str = "palisade.io/inject";
/// Annotation the injector sets: the version that injected the pod.
pub const INJECTED: &str = "palisade.io/injected";
/// Label the injector sets, for PodMonitors and `kubectl get -l`.
pub const SIDECAR_LABEL: &str = "palisade.io/sidecar";
/// Destination ports the sidecar leaves untouched (comma-separated).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "palisade.io/exclude-outbound-ports";
/// Inbound ports not captured (comma-separated).
pub const EXCLUDE_INBOUND_PORTS: &str = "palisade.io/exclude-inbound-ports";
/// Inbound ports whose protocol speaks first (comma-separated).
pub const SERVER_FIRST_PORTS: &str = "palisade.io/server-first-ports";
/// `permissive` or `strict`.
pub const INBOUND_MODE: &str = "palisade.io/inbound-mode";
/// `json` or `off`: the sidecar's access log, over the chart's default.
pub const ACCESS_LOG: &str = "palisade.io/access-log";

/// Name of the sidecar container.
pub const SIDECAR_CONTAINER: &str = "palisade-sidecar";
/// Name of the iptables init container.
pub const INIT_CONTAINER: &str = "palisade-init";
const TOKEN_VOLUME: &str = "palisade-token";
const BUNDLE_VOLUME: &str = "palisade-trust-bundle";
const INIT_RUN_VOLUME: &str = "palisade-init-run";
const TOKEN_DIR: &str = "/var/run/secrets/palisade";
const BUNDLE_DIR: &str = "/var/run/palisade/bundle";
const ADMIN_PORT: u16 = 15020;

/// What to do with a pod.
#[derive(Debug)]
pub enum Decision {
    /// Mesh it with this patch; the sidecar will claim `identity`.
    Inject { identity: SpiffeId, patch: Patch },
    /// Allow it unchanged.
    Skip(Skip),
}

/// Why a pod is allowed unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    AlreadyInjected,
    OptedOut,
    HostNetwork,
}

/// Why a pod is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error("annotation {annotation}={value:?} is not {expected}")]
    BadAnnotation {
        annotation: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "cannot form the SPIFFE ID of namespace {namespace:?}, service account {service_account:?}"
    )]
    BadIdentity {
        namespace: String,
        service_account: String,
    },
    #[error("the pod already has a volume named {0:?}, which the sidecar needs; rename it")]
    NameConflict(String),
    #[error("{0} is not what a pod has there")]
    Malformed(&'static str),
    #[error(
        "namespace {namespace} enforces the mesh (label palisade.io/enforce=true): {what}; {fix}"
    )]
    Enforced {
        namespace: String,
        what: String,
        fix: String,
    },
    #[error("{0}")]
    Probe(String),
}

// === impl Skip ===

impl Skip {
    /// The metric's `reason`.
    pub fn reason(self) -> ReviewReason {
        match self {
            Self::AlreadyInjected => ReviewReason::AlreadyInjected,
            Self::OptedOut => ReviewReason::OptedOut,
            Self::HostNetwork => ReviewReason::HostNetwork,
        }
    }
}

// === impl PodError ===

impl PodError {
    /// The metric's `reason`.
    pub fn reason(&self) -> ReviewReason {
        match self {
            Self::BadAnnotation { .. } => ReviewReason::BadAnnotation,
            Self::BadIdentity { .. } => ReviewReason::BadIdentity,
            Self::NameConflict(_) => ReviewReason::NameConflict,
            Self::Malformed(_) => ReviewReason::Malformed,
            Self::Enforced { .. } => ReviewReason::Enforced,
            Self::Probe(_) => ReviewReason::BadProbe,
        }
    }
}

/// Decides what to do with `pod`, created in `namespace`, under `posture`.
pub fn decide(
    pod: &Value,
    namespace: &str,
    trust_domain: &TrustDomain,
    config: &InjectionConfig,
    posture: &Posture,
) -> Result<Decision, PodError> {
    posture.check_pod(pod)?;
    let annotations = object_at(pod, "/metadata/annotations", "metadata.annotations")?;
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);
    let spec = object_at(pod, "/spec", "spec")?.ok_or(PodError::Malformed("spec"))?;

    if annotation(INJECTED).is_some() || has_our_container(pod)? {
        return Ok(Decision::Skip(Skip::AlreadyInjected));
    }
    match annotation(INJECT).map(str::trim) {
        None | Some("true" | "enabled") => {}
        Some("false" | "disabled") => return Ok(Decision::Skip(Skip::OptedOut)),
        Some(other) => {
            return Err(PodError::BadAnnotation {
                annotation: INJECT,
                value: shorten(other),
                expected: "\"false\" or \"disabled\" (to opt out) or \"true\"",
            });
        }
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        // Its iptables rules would capture the node's traffic.
        return Ok(Decision::Skip(Skip::HostNetwork));
    }

    let asked = |key: &'static str| -> Result<Vec<u16>, PodError> {
        annotation(key).map_or(Ok(Vec::new()), |text| parse_ports(key, text))
    };
    let joined = |base: &[u16], asked: Vec<u16>| -> String {
        let all: BTreeSet<u16> = base.iter().copied().chain(asked).collect();
        all.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
    };
    let asked_outbound = asked(EXCLUDE_OUTBOUND_PORTS)?;
    posture.check_outbound_exclusions(EXCLUDE_OUTBOUND_PORTS, &asked_outbound)?;
    let exclude_outbound = joined(&config.sidecar.exclude_outbound_ports, asked_outbound);
    let asked_inbound = asked(EXCLUDE_INBOUND_PORTS)?;
    posture.check_inbound_exclusions(EXCLUDE_INBOUND_PORTS, &asked_inbound)?;
    let exclude_inbound = joined(&config.sidecar.exclude_inbound_ports, asked_inbound);
    let server_first = joined(
        &config.sidecar.server_first_ports,
        asked(SERVER_FIRST_PORTS)?,
    );
    let mode = match annotation(INBOUND_MODE).map(str::trim) {
        None if posture.enforced && posture.admission.strict => InboundMode::Strict,
        None => config.sidecar.inbound_mode,
        Some("permissive") => {
            posture.check_mode(INBOUND_MODE, true)?;
            InboundMode::Permissive
        }
        Some("strict") => InboundMode::Strict,
        Some(other) => {
            return Err(PodError::BadAnnotation {
                annotation: INBOUND_MODE,
                value: shorten(other),
                expected: "\"permissive\" or \"strict\"",
            });
        }
    };
    let access_log = match annotation(ACCESS_LOG).map(str::trim) {
        None => config.sidecar.access_log,
        Some("off") => AccessLog::Off,
        Some("json") => AccessLog::Json,
        Some(other) => {
            return Err(PodError::BadAnnotation {
                annotation: ACCESS_LOG,
                value: shorten(other),
                expected: "\"json\" or \"off\"",
            });
        }
    };

    let service_account = spec
        .get("serviceAccountName")
        .or_else(|| spec.get("serviceAccount"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    // The same derivation the authenticator applies to the pod's token: the
    // identity injected is the identity the control plane will sign.
    let identity =
        SpiffeId::from_kubernetes(trust_domain, namespace, service_account).map_err(|_| {
            PodError::BadIdentity {
                namespace: shorten(namespace),
                service_account: shorten(service_account),
            }
        })?;

    let volumes = array_at(pod, "/spec/volumes", "spec.volumes")?;
    for ours in [TOKEN_VOLUME, BUNDLE_VOLUME, INIT_RUN_VOLUME] {
        if volumes
            .into_iter()
            .flatten()
            .any(|v| v.get("name").and_then(Value::as_str) == Some(ours))
        {
            return Err(PodError::NameConflict(ours.to_owned()));
        }
    }

    let probes = probes::rewrite(pod, ADMIN_PORT)?;
    let app_probes = probes.env();

    let settings = Settings {
        identity: &identity,
        trust_domain,
        mode,
        access_log,
        app_probes: app_probes.as_deref(),
        exclude_outbound: &exclude_outbound,
        exclude_inbound: &exclude_inbound,
        server_first: &server_first,
    };
    // The probes first: the containers are still where the pod has them.
    let mut ops = probes.ops.clone();

    // metadata: the injected marker, the label, the scrape annotations.
    let mut new_annotations = vec![(INJECTED, json!(env!("CARGO_PKG_VERSION")))];
    if let Some(originals) = probes.annotation() {
        new_annotations.push((ORIGINAL_PROBES, json!(originals)));
    }
    if config.prometheus_scrape && annotation("prometheus.io/scrape").is_none() {
        new_annotations.push(("prometheus.io/scrape", json!("true")));
        new_annotations.push(("prometheus.io/port", json!(ADMIN_PORT.to_string())));
        new_annotations.push(("prometheus.io/path", json!("/metrics")));
    }
    add_entries(
        &mut ops,
        "/metadata/annotations",
        annotations.is_some(),
        new_annotations,
    );
    let labels = object_at(pod, "/metadata/labels", "metadata.labels")?;
    add_entries(
        &mut ops,
        "/metadata/labels",
        labels.is_some(),
        vec![(SIDECAR_LABEL, json!("injected"))],
    );

    // spec.volumes: the token, the bundle, a scratch /run for iptables' lock.
    let new_volumes = vec![
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": config.token.audience,
                "expirationSeconds": config.token.expiration_seconds,
                "path": "token",
            }}]},
        }),
        json!({
            "name": BUNDLE_VOLUME,
            "configMap": {"name": config.bundle_config_map, "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        }),
        json!({"name": INIT_RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}),
    ];
    if volumes.is_some() {
        for v in new_volumes {
            ops.push(add("/spec/volumes/-", v));
        }
    } else {
        ops.push(add("/spec/volumes", Value::Array(new_volumes)));
    }

    // spec.initContainers: iptables first, then the sidecar, then the pod's
    // own init containers, so their traffic is meshed too.
    let init = init_container(config, &settings);
    let sidecar = sidecar_container(config, &settings);
    if array_at(pod, "/spec/initContainers", "spec.initContainers")?.is_some() {
        ops.push(add("/spec/initContainers/0", sidecar));
        ops.push(add("/spec/initContainers/0", init));
    } else {
        ops.push(add("/spec/initContainers", json!([init, sidecar])));
    }

    Ok(Decision::Inject {
        identity,
        patch: Patch(ops),
    })
}

/// What differs from pod to pod in the two containers.
struct Settings<'a> {
    identity: &'a SpiffeId,
    trust_domain: &'a TrustDomain,
    mode: InboundMode,
    access_log: AccessLog,
    /// `PALISADE_APP_PROBES`: the probes the sidecar performs for kubelet.
    app_probes: Option<&'a str>,
    exclude_outbound: &'a str,
    exclude_inbound: &'a str,
    server_first: &'a str,
}

fn init_container(config: &InjectionConfig, s: &Settings<'_>) -> Value {
    let mut env = vec![
        env_var("PALISADE_PROXY_UID", &PROXY_UID.to_string()),
        env_var("PALISADE_ADMIN_PORT", &ADMIN_PORT.to_string()),
    ];
    if !s.exclude_outbound.is_empty() {
        env.push(env_var(
            "PALISADE_EXCLUDE_OUTBOUND_PORTS",
            s.exclude_outbound,
        ));
    }
    if !s.exclude_inbound.is_empty() {
        env.push(env_var("PALISADE_EXCLUDE_INBOUND_PORTS", s.exclude_inbound));
    }
    json!({
        "name": INIT_CONTAINER,
        "image": config.init.image,
        "imagePullPolicy": config.init.image_pull_policy.as_str(),
        "args": ["init"],
        "env": env,
        "resources": config.init.resources.to_json(),
        "securityContext": {
            // Root with exactly the two capabilities iptables needs.
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": INIT_RUN_VOLUME, "mountPath": "/run"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

fn sidecar_container(config: &InjectionConfig, s: &Settings<'_>) -> Value {
    let sidecar = &config.sidecar;
    let mut env = vec![
        env_var("PALISADE_TRUST_DOMAIN", s.trust_domain.as_str()),
        env_var("PALISADE_IDENTITY", s.identity.as_str()),
        env_var("PALISADE_CONTROL_PLANE", &config.control_plane.address),
        env_var(
            "PALISADE_CONTROL_PLANE_NAME",
            &config.control_plane.server_name,
        ),
        env_var("PALISADE_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
        env_var("PALISADE_BUNDLE", &format!("{BUNDLE_DIR}/ca.crt")),
        env_var("PALISADE_INBOUND_MODE", s.mode.as_str()),
        // Written either way: the sidecar's own default is discovery off,
        // and the pod spec should show the posture it runs under.
        env_var(
            "PALISADE_DISCOVERY",
            if sidecar.discovery { "true" } else { "false" },
        ),
        env_var("PALISADE_OUTBOUND_MODE", sidecar.outbound_mode.as_str()),
        // The mesh default until discovery delivers the pod's policy.
        env_var(
            "PALISADE_DEFAULT_ACTION",
            match sidecar.default_action {
                Action::Allow => "allow",
                Action::Deny => "deny",
            },
        ),
        // Both families: init captures IPv6 too, and a pod without IPv6 just
        // skips those listeners.
        env_var("PALISADE_OUTBOUND_ADDR", "127.0.0.1:15001,[::1]:15001"),
        env_var("PALISADE_INBOUND_ADDR", "0.0.0.0:15006,[::]:15006"),
        env_var("PALISADE_LOG_LEVEL", &sidecar.log_level),
        env_var("PALISADE_LOG_FORMAT", "json"),
    ];
    if !s.exclude_outbound.is_empty() {
        env.push(env_var(
            "PALISADE_EXCLUDE_OUTBOUND_PORTS",
            s.exclude_outbound,
        ));
    }
    if !s.server_first.is_empty() {
        env.push(env_var("PALISADE_SERVER_FIRST_PORTS", s.server_first));
    }
    if s.access_log == AccessLog::Json {
        env.push(env_var("PALISADE_ACCESS_LOG", "json"));
    }
    if let Some(probes) = s.app_probes {
        env.push(env_var("PALISADE_APP_PROBES", probes));
        // The probes go where kubelet's would: the pod's address.
        env.push(json!({"name": "PALISADE_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}));
    }
    if !sidecar.mesh_networks.is_empty() {
        let nets: Vec<String> = sidecar
            .mesh_networks
            .iter()
            .map(ToString::to_string)
            .collect();
        env.push(env_var("PALISADE_MESH_NETWORKS", &nets.join(",")));
    }
    if let Some(lifetime) = sidecar.lifetime {
        env.push(env_var(
            "PALISADE_LIFETIME",
            &humantime::format_duration(lifetime).to_string(),
        ));
    }
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": ADMIN_PORT},
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        })
    };
    json!({
        "name": SIDECAR_CONTAINER,
        "image": sidecar.image,
        "imagePullPolicy": sidecar.image_pull_policy.as_str(),
        // A native sidecar: started before the app, stopped after it.
        "restartPolicy": "Always",
        "args": ["run"],
        "env": env,
        "ports": [{"name": "palisade-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        // The app's containers start once the first certificate is in place.
        "startupProbe": probe("/ready", 1, 300),
        "readinessProbe": probe("/ready", 5, 3),
        "livenessProbe": probe("/live", 10, 6),
        "resources": sidecar.resources.to_json(),
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR, "readOnly": true},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

fn env_var(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

fn add(path: &str, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: json_patch::jsonptr::PointerBuf::parse(path)
            .expect("the pointers built here are valid JSON pointers"),
        value,
    })
}

/// Adds map entries under `base`, creating the map if the pod has none.
fn add_entries(
    ops: &mut Vec<PatchOperation>,
    base: &str,
    exists: bool,
    entries: Vec<(&str, Value)>,
) {
    if exists {
        for (key, value) in entries {
            ops.push(add(&format!("{base}/{}", escape(key)), value));
        }
    } else {
        let map: serde_json::Map<String, Value> = entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        ops.push(add(base, Value::Object(map)));
    }
}

/// RFC 6901 escaping of one reference token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// The object at `pointer`: absent or null is `None`, another type an error.
fn object_at<'a>(
    pod: &'a Value,
    pointer: &str,
    what: &'static str,
) -> Result<Option<&'a serde_json::Map<String, Value>>, PodError> {
    match pod.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(PodError::Malformed(what)),
    }
}

/// The array at `pointer`: absent or null is `None`, another type an error.
fn array_at<'a>(
    pod: &'a Value,
    pointer: &str,
    what: &'static str,
) -> Result<Option<&'a Vec<Value>>, PodError> {
    match pod.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => Err(PodError::Malformed(what)),
    }
}

/// Whether any container list already holds one of ours.
fn has_our_container(pod: &Value) -> Result<bool, PodError> {
    for (pointer, what) in [
        ("/spec/initContainers", "spec.initContainers"),
        ("/spec/containers", "spec.containers"),
    ] {
        let found = array_at(pod, pointer, what)?
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("name").and_then(Value::as_str))
            .any(|n| n == SIDECAR_CONTAINER || n == INIT_CONTAINER);
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `"8080, 9090"` → ports; empty entries are ignored.
fn parse_ports(annotation: &'static str, text: &str) -> Result<Vec<u16>, PodError> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|&port| port != 0)
                .ok_or_else(|| PodError::BadAnnotation {
                    annotation,
                    value: shorten(text),
                    expected: "a comma-separated list of ports 1-65535",
                })
        })
        .collect()
}

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}
