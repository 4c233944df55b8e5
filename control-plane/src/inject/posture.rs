//! The enforced posture: what a pod's author may not do in a namespace
//! that enforces the mesh.
//!
//! **The rule.** A namespace enforces the mesh when it carries the label
//! `palisade.io/enforce=true`. Namespaces are cluster-scoped objects that a
//! tenant's namespaced RBAC cannot edit (the same ground Pod Security
//! Admission stands on), whereas a policy's pod selector matches labels the
//! pod's author writes. Policies still shape the posture: the ports their
//! `excludablePorts` name are the only inbound exclusions a pod of an
//! enforcing namespace may ask for, and their mode decides whether an
//! annotation would loosen it.
//!
//! In such a namespace the webhook **refuses** (never silently ignores) a
//! pod that:
//! - opts out (`palisade.io/inject: "false"` as annotation or label), sets
//!   `palisade.io/injected` itself, or has a container named `palisade-*`;
//! - uses the host network (its traffic would not pass the pod's capture);
//! - has an app container (init, regular or ephemeral) that runs as the
//!   proxy's uid 1337 (its own `runAsUser`, else the pod's), is privileged,
//!   or adds `NET_ADMIN`, `NET_RAW`, `SYS_ADMIN`, `BPF` or `ALL` (and
//!   `SYS_PTRACE` where it sees the sidecar's process): each bypasses or
//!   can flush the capture rules;
//! - loosens by annotation: `palisade.io/inbound-mode: permissive` where the
//!   pod's mode is otherwise strict, `palisade.io/exclude-inbound-ports`
//!   naming a port no selecting policy lists in `excludablePorts`, and any
//!   `palisade.io/exclude-outbound-ports` (outbound exclusions are the
//!   platform's: the chart's `injection.sidecar.excludeOutboundPorts`).
//!
//! Tightening annotations (`inbound-mode: strict`) are honoured. An image
//! whose `USER` is 1337 without a `runAsUser` cannot be seen at admission
//! (docs/security.md says what covers it). Every refusal names what to
//! change.

use serde_json::Value;

use crate::policy::Admission;

use super::patch::{INJECT, INJECTED, PodError};

/// The namespace label that makes a namespace enforce the mesh.
pub const ENFORCE_LABEL: &str = "palisade.io/enforce";

/// The proxy's uid, which the capture rules let through uncaptured.
pub const PROXY_UID: i64 = 1337;

/// Capabilities that let a container rewrite or bypass the capture rules:
/// `NET_ADMIN` flushes them, `NET_RAW` crafts packets around them,
/// `SYS_ADMIN` and `BPF` load programs that rewrite traffic. `SYS_PTRACE`
/// is refused too where the container sees the sidecar's process (the pod
/// shares its process namespace, or `kubectl debug` targets a `palisade-*`
/// container): it could make the sidecar, uid 1337 and never captured,
/// send for it. `kubectl debug --profile=general` on an app container
/// keeps working.
const FORBIDDEN_CAPABILITIES: &[&str] = &["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF", "ALL"];

/// What a pod sets for all its containers.
#[derive(Clone, Copy, Debug)]
struct PodWide {
    /// `spec.securityContext.runAsUser`.
    uid: Option<i64>,
    /// `spec.shareProcessNamespace`.
    shared_pids: bool,
}

impl PodWide {
    fn of(pod: &Value) -> Self {
        Self {
            uid: pod
                .pointer("/spec/securityContext/runAsUser")
                .and_then(Value::as_i64),
            shared_pids: pod
                .pointer("/spec/shareProcessNamespace")
                .and_then(Value::as_bool)
                == Some(true),
        }
    }
}

/// The posture a pod is admitted under.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Posture {
    /// Its namespace, for messages.
    pub namespace: String,
    /// The namespace enforces the mesh.
    pub enforced: bool,
    /// What the policies selecting it allow.
    pub admission: Admission,
}

/// The kinds of container a pod has, with the field they sit in.
const CONTAINER_FIELDS: &[(&str, &str)] = &[
    ("initContainers", "init container"),
    ("containers", "container"),
    ("ephemeralContainers", "ephemeral container"),
];

// === impl Posture ===

impl Posture {
    /// A namespace that does not enforce the mesh.
    pub fn open(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            ..Self::default()
        }
    }

    fn refuse(&self, what: impl Into<String>, fix: impl Into<String>) -> PodError {
        PodError::Enforced {
            namespace: self.namespace.clone(),
            what: what.into(),
            fix: fix.into(),
        }
    }

    /// Refuses a pod that would slip out of the mesh (nothing when the
    /// namespace does not enforce it). Runs before injection, on the pod as
    /// its author wrote it.
    pub fn check_pod(&self, pod: &Value) -> Result<(), PodError> {
        if !self.enforced {
            return Ok(());
        }
        for (field, key) in [("annotations", INJECT), ("labels", INJECT)] {
            if let Some(value) = pod
                .pointer(&format!("/metadata/{field}"))
                .and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .filter(|v| matches!(v.trim(), "false" | "disabled"))
            {
                return Err(self.refuse(
                    format!("the pod opts out of injection ({key}: {value:?} in its {field})"),
                    format!("remove {key} from its {field}"),
                ));
            }
        }
        if pod
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(INJECTED))
            .is_some()
        {
            return Err(self.refuse(
                format!("the pod sets {INJECTED} itself"),
                format!("remove the annotation {INJECTED}; only the webhook writes it"),
            ));
        }
        if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
            return Err(self.refuse(
                "the pod uses the host network, where the sidecar cannot capture its traffic",
                "set spec.hostNetwork to false, or run it in a namespace that does not enforce the mesh",
            ));
        }
        let pod_wide = PodWide::of(pod);
        for (field, kind) in CONTAINER_FIELDS {
            let containers = pod
                .pointer(&format!("/spec/{field}"))
                .and_then(Value::as_array);
            for container in containers.into_iter().flatten() {
                self.check_container(container, kind, pod_wide)?;
            }
        }
        Ok(())
    }

    /// Refuses the ephemeral containers of `pod` that `old` lacks (a
    /// `pods/ephemeralcontainers` update: `kubectl debug`).
    pub fn check_ephemeral(&self, pod: &Value, old: Option<&Value>) -> Result<(), PodError> {
        if !self.enforced {
            return Ok(());
        }
        let names = |p: Option<&Value>| -> Vec<String> {
            p.and_then(|p| p.pointer("/spec/ephemeralContainers"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        };
        let existing = names(old);
        let pod_wide = PodWide::of(pod);
        let added = pod
            .pointer("/spec/ephemeralContainers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|c| {
                c.get("name")
                    .and_then(Value::as_str)
                    .is_none_or(|n| !existing.iter().any(|e| e == n))
            });
        for container in added {
            self.check_container(container, "ephemeral container", pod_wide)?;
        }
        Ok(())
    }

    fn check_container(&self, container: &Value, kind: &str, pod: PodWide) -> Result<(), PodError> {
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>");
        let shown: String = name.chars().take(64).collect();
        if name.starts_with("palisade-") {
            return Err(self.refuse(
                format!("{kind} {shown:?} has a name the mesh reserves (palisade-*)"),
                "rename the container",
            ));
        }
        let context = container.get("securityContext");
        let field = |key: &str| context.and_then(|c| c.get(key));
        let uid = field("runAsUser").and_then(Value::as_i64).or(pod.uid);
        // ptrace reaches the sidecar only from its process namespace.
        let sees_sidecar = pod.shared_pids
            || container
                .get("targetContainerName")
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with("palisade-"));
        if uid == Some(PROXY_UID) {
            return Err(self.refuse(
                format!(
                    "{kind} {shown:?} runs as uid {PROXY_UID}, the proxy's, whose traffic is never captured"
                ),
                format!("set runAsUser (of the container or the pod) to another uid than {PROXY_UID}"),
            ));
        }
        if field("privileged").and_then(Value::as_bool) == Some(true) {
            return Err(self.refuse(
                format!("{kind} {shown:?} is privileged and could rewrite the capture rules"),
                "remove securityContext.privileged",
            ));
        }
        let added = field("capabilities")
            .and_then(|c| c.get("add"))
            .and_then(Value::as_array);
        for capability in added.into_iter().flatten().filter_map(Value::as_str) {
            let bare = capability.trim().to_ascii_uppercase();
            let bare = bare.strip_prefix("CAP_").unwrap_or(&bare);
            if FORBIDDEN_CAPABILITIES.contains(&bare) || (bare == "SYS_PTRACE" && sees_sidecar) {
                let shown_cap: String = capability.chars().take(32).collect();
                return Err(self.refuse(
                    format!(
                        "{kind} {shown:?} adds the capability {shown_cap}, which can bypass or flush the capture rules"
                    ),
                    format!("remove {shown_cap} from securityContext.capabilities.add"),
                ));
            }
        }
        Ok(())
    }

    /// Refuses `strict = false` asked by annotation when the pod's mode is
    /// otherwise strict.
    pub fn check_mode(&self, annotation: &str, permissive: bool) -> Result<(), PodError> {
        if self.enforced && permissive && self.admission.strict {
            return Err(self.refuse(
                format!("{annotation}: permissive would loosen the pod's strict inbound mode"),
                format!(
                    "remove the annotation {annotation}, or set mode: permissive in an InboundPolicy selecting the pod"
                ),
            ));
        }
        Ok(())
    }

    /// Refuses inbound exclusions asked by annotation that no selecting
    /// policy allows.
    pub fn check_inbound_exclusions(
        &self,
        annotation: &str,
        ports: &[u16],
    ) -> Result<(), PodError> {
        if !self.enforced {
            return Ok(());
        }
        let refused: Vec<String> = ports
            .iter()
            .filter(|p| !self.admission.excludable.contains(p))
            .map(u16::to_string)
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(self.refuse(
            format!(
                "{annotation} takes port {} out of mTLS and policy, and no InboundPolicy selecting the pod lists it in excludablePorts",
                refused.join(", ")
            ),
            format!(
                "remove {} from the annotation, or add it to excludablePorts of an InboundPolicy selecting the pod",
                refused.join(", ")
            ),
        ))
    }

    /// Refuses outbound exclusions asked by annotation.
    pub fn check_outbound_exclusions(
        &self,
        annotation: &str,
        ports: &[u16],
    ) -> Result<(), PodError> {
        if !self.enforced || ports.is_empty() {
            return Ok(());
        }
        Err(self.refuse(
            format!("{annotation} would let the pod send plain TCP past the sidecar"),
            "remove the annotation; outbound exclusions are the platform's (chart value injection.sidecar.excludeOutboundPorts)",
        ))
    }
}
