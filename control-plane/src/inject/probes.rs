//! Probe rewriting: kubelet probes go to the sidecar's admin port, which
//! performs the original probe against the app over the pod's own network.
//!
//! In strict mode the sidecar refuses plaintext on captured ports, and a
//! kubelet probe is plaintext from the node: without rewriting, every
//! `httpGet`, `tcpSocket` and `grpc` probe fails unless its port is excluded
//! from capture, which takes mTLS off the app's main port. So each such
//! probe (liveness, readiness, startup; of every container, native sidecars
//! included) becomes `httpGet /app-health/<container>/<probe>` on the admin
//! port, and the sidecar is told the original in `PALISADE_APP_PROBES`:
//! HTTP with the original path, headers and scheme, a TCP connect to the
//! app's port, or a gRPC health check. The original probes stay in the
//! annotation `palisade.io/original-probes`. Nothing is opened to the
//! network: the admin port answers only with the probe's result, and the
//! app's port stays captured.
//!
//! Named ports resolve as kubelet resolves them, against the container's
//! own `ports`. A probe whose `host` is anything but the pod itself is
//! refused: the sidecar's probe is not captured, so a host elsewhere would
//! make it a plaintext path out of the pod.

use std::collections::BTreeMap;

use json_patch::{PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
use serde_json::{Map, Value, json};

use super::patch::PodError;

/// The annotation keeping every rewritten probe as the pod's author wrote it.
pub const ORIGINAL_PROBES: &str = "palisade.io/original-probes";

/// The probe fields, and the name each has in the sidecar's path.
const PROBES: &[(&str, &str)] = &[
    ("livenessProbe", "liveness"),
    ("readinessProbe", "readiness"),
    ("startupProbe", "startup"),
];

/// Fields of a probe that say when and how often, kept on the rewrite.
const TIMING: &[&str] = &[
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
    "terminationGracePeriodSeconds",
];

/// What rewriting a pod's probes gives.
#[derive(Debug, Default)]
pub struct Rewritten {
    /// Replaces each rewritten probe; apply before anything that moves the
    /// pod's containers.
    pub ops: Vec<PatchOperation>,
    /// `{container: {probeField: original}}`, for the annotation.
    pub originals: BTreeMap<String, Map<String, Value>>,
    /// `{"<container>/<probe>": check}`, for the sidecar: ports resolved.
    pub app: BTreeMap<String, Value>,
}

impl Rewritten {
    /// The annotation's value; `None` when nothing was rewritten.
    pub fn annotation(&self) -> Option<String> {
        (!self.originals.is_empty())
            .then(|| serde_json::to_string(&self.originals).unwrap_or_default())
    }

    /// The sidecar's `PALISADE_APP_PROBES`; `None` when nothing was rewritten.
    pub fn env(&self) -> Option<String> {
        (!self.app.is_empty()).then(|| serde_json::to_string(&self.app).unwrap_or_default())
    }
}

/// Rewrites the `httpGet`, `tcpSocket` and `grpc` probes of `pod`'s
/// containers and init containers to `admin_port`.
pub fn rewrite(pod: &Value, admin_port: u16) -> Result<Rewritten, PodError> {
    let mut out = Rewritten::default();
    for field in ["containers", "initContainers"] {
        let containers = pod
            .pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array);
        for (i, container) in containers.into_iter().flatten().enumerate() {
            let Some(name) = container.get("name").and_then(Value::as_str) else {
                continue;
            };
            if !is_dns_label(name) {
                // The API server refuses such a pod after admission; a name
                // that is not a label must not reach a URL path.
                return Err(PodError::Probe(format!(
                    "container name {:?} is not a DNS label",
                    shorten(name)
                )));
            }
            for (probe_field, probe_name) in PROBES {
                let Some(probe) = container.get(*probe_field).filter(|p| p.is_object()) else {
                    continue;
                };
                let Some(check) = check(container, name, probe_name, probe)? else {
                    // exec: runs in the container, nothing to rewrite.
                    continue;
                };
                let path = format!("/app-health/{name}/{probe_name}");
                let mut rewritten = Map::new();
                for key in TIMING {
                    if let Some(v) = probe.get(*key) {
                        rewritten.insert((*key).to_owned(), v.clone());
                    }
                }
                rewritten.insert(
                    "httpGet".to_owned(),
                    json!({"path": path, "port": admin_port, "scheme": "HTTP"}),
                );
                let pointer = format!("/spec/{field}/{i}/{probe_field}");
                out.ops.push(PatchOperation::Replace(ReplaceOperation {
                    path: PointerBuf::parse(&pointer)
                        .map_err(|_| PodError::Malformed("a container name"))?,
                    value: Value::Object(rewritten),
                }));
                out.originals
                    .entry(name.to_owned())
                    .or_default()
                    .insert((*probe_field).to_owned(), probe.clone());
                out.app.insert(format!("{name}/{probe_name}"), check);
            }
        }
    }
    Ok(out)
}

/// What the sidecar must do for `probe`; `None` for an exec probe.
fn check(
    container: &Value,
    name: &str,
    probe_name: &str,
    probe: &Value,
) -> Result<Option<Value>, PodError> {
    let what = |handler: &str| format!("{probe_name} probe ({handler}) of container {name:?}");
    let timeout = probe.get("timeoutSeconds").cloned().unwrap_or(json!(1));
    if let Some(get) = probe.get("httpGet") {
        let port = resolve_port(container, get.get("port"), &what("httpGet"))?;
        only_the_pod(get, &what("httpGet"))?;
        let scheme = match get.get("scheme").and_then(Value::as_str) {
            None | Some("HTTP") => "HTTP",
            Some("HTTPS") => "HTTPS",
            Some(other) => {
                return Err(PodError::Probe(format!(
                    "{}: scheme {:?} is not HTTP or HTTPS",
                    what("httpGet"),
                    shorten(other)
                )));
            }
        };
        let path = get.get("path").and_then(Value::as_str).unwrap_or("/");
        let mut http = json!({"port": port, "path": path, "scheme": scheme});
        if let Some(headers) = get.get("httpHeaders").filter(|h| h.is_array()) {
            http["httpHeaders"] = headers.clone();
        }
        return Ok(Some(json!({"httpGet": http, "timeoutSeconds": timeout})));
    }
    if let Some(tcp) = probe.get("tcpSocket") {
        let port = resolve_port(container, tcp.get("port"), &what("tcpSocket"))?;
        only_the_pod(tcp, &what("tcpSocket"))?;
        return Ok(Some(
            json!({"tcpSocket": {"port": port}, "timeoutSeconds": timeout}),
        ));
    }
    if let Some(grpc) = probe.get("grpc") {
        // grpc.port is a number only; kubelet does not resolve names here.
        let port = grpc
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                PodError::Probe(format!("{}: port is not in 1..=65535", what("grpc")))
            })?;
        let mut check = json!({"port": port});
        if let Some(service) = grpc.get("service").and_then(Value::as_str) {
            check["service"] = json!(service);
        }
        return Ok(Some(json!({"grpc": check, "timeoutSeconds": timeout})));
    }
    Ok(None)
}

/// A probe port as kubelet resolves it: a number, or the name of one of the
/// container's own ports.
fn resolve_port(container: &Value, port: Option<&Value>, what: &str) -> Result<u16, PodError> {
    let in_range = |n: i64| u16::try_from(n).ok().filter(|p| *p != 0);
    match port {
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(in_range)
            .ok_or_else(|| PodError::Probe(format!("{what}: port {n} is not in 1..=65535"))),
        Some(Value::String(name)) => container
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("containerPort").and_then(Value::as_i64))
            .and_then(in_range)
            .ok_or_else(|| {
                PodError::Probe(format!(
                    "{what}: port {:?} names none of the container's ports; name one of its ports or give the number",
                    shorten(name)
                ))
            }),
        _ => Err(PodError::Probe(format!("{what}: no port"))),
    }
}

/// Refuses a probe `host` other than the pod itself.
fn only_the_pod(handler: &Value, what: &str) -> Result<(), PodError> {
    match handler.get("host").and_then(Value::as_str).map(str::trim) {
        None | Some("" | "localhost" | "127.0.0.1" | "::1") => Ok(()),
        Some(host) => Err(PodError::Probe(format!(
            "{what}: host {:?} is not the pod; the sidecar probes only the pod itself, remove host",
            shorten(host)
        ))),
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}
