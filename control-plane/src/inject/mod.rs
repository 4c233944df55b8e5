//! Sidecar injection: the mutating admission webhook served on 15017.
//!
//! The API server sends an `AdmissionReview` for every pod created in a
//! namespace labelled `palisade.io/inject=enabled`. The answer is a JSONPatch
//! that adds the iptables init container and the sidecar (a native sidecar:
//! an init container with `restartPolicy: Always`), the projected token and
//! the trust-bundle volume. Pods that opted out, use the host network or are
//! already injected are allowed unchanged; a pod whose `palisade.io/*`
//! annotations do not parse is refused with a message naming the annotation.
//!
//! - [`config`]: the injection configuration file (images, resources, defaults).
//! - [`patch`]: reads a pod and builds the patch.
//! - [`server`]: the HTTPS server.

use std::{sync::Arc, time::Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use http::StatusCode;
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use palisade_proto::TrustDomain;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    discovery::Discovery,
    metrics::{LabelValue, Metrics},
    policy::PodFacts,
};

pub mod config;
pub mod patch;
pub mod posture;
pub mod probes;
pub mod server;
#[cfg(test)]
mod tests;

pub use config::{InboundMode, InjectionConfig};
pub use patch::{Decision, PodError, Skip};
pub use posture::Posture;

/// The only AdmissionReview version this webhook speaks.
pub const ADMISSION_V1: &str = "admission.k8s.io/v1";

/// How a review was answered: the `result` label of
/// `palisade_webhook_reviews_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum ReviewResult {
    /// Allowed with the sidecar patch.
    Injected,
    /// Allowed unchanged.
    Skipped,
    /// Refused: the pod is not created.
    Denied,
    /// Not a readable AdmissionReview (HTTP 400).
    Invalid,
}

/// Why a review was answered so: the `reason` label of
/// `palisade_webhook_reviews_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum ReviewReason {
    /// The sidecar was injected.
    Injected,
    /// Not the creation of a pod (an update, another kind, a subresource).
    NotPodCreate,
    /// The pod already has the sidecar.
    AlreadyInjected,
    /// The pod opted out (`palisade.io/inject: "false"`).
    OptedOut,
    /// The pod uses the host network.
    HostNetwork,
    /// A `palisade.io/*` annotation does not parse.
    BadAnnotation,
    /// Namespace and service account form no SPIFFE ID.
    BadIdentity,
    /// The pod already has a volume of a name the sidecar needs.
    NameConflict,
    /// The body or the pod is not what it must be.
    Malformed,
    /// An AdmissionReview version other than `admission.k8s.io/v1`.
    UnsupportedVersion,
    /// The request names no namespace.
    BadRequest,
    /// The patch could not be serialized.
    Internal,
    /// The namespace enforces the mesh and the pod would slip out of it.
    Enforced,
    /// A probe cannot be rewritten (a named port the container lacks, a
    /// host other than the pod).
    BadProbe,
    /// The namespace and policy caches have not synced yet (HTTP 503: the
    /// API server's `failurePolicy: Fail` turns it into a retry).
    NotSynced,
}

/// Answers AdmissionReviews with the current injection configuration.
#[derive(Debug)]
pub struct Injector {
    config: ArcSwap<InjectionConfig>,
    trust_domain: TrustDomain,
    metrics: Metrics,
    /// Namespaces that just got an injected pod: the bundle publisher makes
    /// sure their trust-bundle ConfigMap exists.
    namespaces: Option<mpsc::Sender<String>>,
    /// Which namespaces enforce the mesh and what policies allow: discovery's
    /// caches. Without them no namespace is enforced (a control plane
    /// without the `kubernetes` discovery source).
    posture: Option<Arc<Discovery>>,
}

/// Which entry of the webhook configuration called: the chart sends
/// namespaces labelled `palisade.io/enforce=true` to `/enforce`, the others
/// that opted in to `/inject`. The path is the cluster admin's (it is in the
/// MutatingWebhookConfiguration), so a call at `/enforce` is enforced even
/// before the namespace cache has seen the label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `POST /inject`.
    Inject,
    /// `POST /enforce`.
    Enforce,
}

/// An HTTP answer to one webhook call.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub review: AdmissionReview<DynamicObject>,
}

// === impl Reply ===

impl Reply {
    /// The JSON body: the AdmissionReview with `response.patch` as base64
    /// text, the form the API documents (kube serializes the bytes as a list
    /// of numbers, which Go happens to accept, but other readers do not).
    pub fn body(&self) -> Value {
        let mut body = serde_json::to_value(&self.review).unwrap_or(Value::Null);
        if let Some(patch) = self.review.response.as_ref().and_then(|r| r.patch.as_ref()) {
            body["response"]["patch"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(patch));
        }
        body
    }
}

// === impl ReviewReason ===

impl ReviewReason {
    /// The results this reason is counted under (its counters start at zero
    /// for each of them).
    pub fn results(self) -> &'static [ReviewResult] {
        match self {
            Self::Injected => &[ReviewResult::Injected],
            Self::NotPodCreate | Self::AlreadyInjected | Self::OptedOut | Self::HostNetwork => {
                &[ReviewResult::Skipped]
            }
            Self::BadAnnotation
            | Self::BadIdentity
            | Self::NameConflict
            | Self::BadRequest
            | Self::Internal
            | Self::Enforced
            | Self::BadProbe
            | Self::NotSynced => &[ReviewResult::Denied],
            // An unreadable review, or a pod whose fields are not a pod's.
            Self::Malformed => &[ReviewResult::Invalid, ReviewResult::Denied],
            Self::UnsupportedVersion => &[ReviewResult::Invalid],
        }
    }
}

// === impl Injector ===

impl Injector {
    /// An injector for the mesh `trust_domain`.
    pub fn new(
        config: InjectionConfig,
        trust_domain: TrustDomain,
        metrics: Metrics,
        namespaces: Option<mpsc::Sender<String>>,
    ) -> Self {
        Self {
            config: ArcSwap::from_pointee(config),
            trust_domain,
            metrics,
            namespaces,
            posture: None,
        }
    }

    /// Judges pods by the posture `discovery` knows (namespaces, policies);
    /// until it has synced, pod reviews are answered 503.
    #[must_use]
    pub fn with_posture(mut self, discovery: Arc<Discovery>) -> Self {
        self.posture = Some(discovery);
        self
    }

    /// The posture of `pod` in `namespace` called at `entry`; `None` while
    /// the caches have not synced. Without them (no kubernetes discovery
    /// source) only `/enforce` enforces, and no port may be excluded.
    fn posture_of(
        &self,
        pod: &Value,
        namespace: &str,
        entry: Entry,
        config: &InjectionConfig,
    ) -> Option<Posture> {
        let Some(discovery) = &self.posture else {
            let mut posture = Posture::open(namespace);
            posture.enforced = entry == Entry::Enforce;
            posture.admission.strict = config.sidecar.inbound_mode == InboundMode::Strict;
            return Some(posture);
        };
        // What policies select depends on the pod's labels and ports; a pod
        // that is not a Pod gets none (patch::decide refuses it anyway).
        let mut facts = serde_json::from_value::<Pod>(pod.clone())
            .map(|p| PodFacts::of(&p))
            .unwrap_or_default();
        facts.namespace = namespace.to_owned();
        let (enforced, admission) = discovery.admission(&facts)?;
        Some(Posture {
            namespace: namespace.to_owned(),
            enforced: enforced || entry == Entry::Enforce,
            admission,
        })
    }

    /// Replaces the injection configuration; pods admitted from now on get the new one.
    pub fn set_config(&self, config: InjectionConfig) {
        self.config.store(Arc::new(config));
    }

    /// The configuration in use.
    pub fn config(&self) -> Arc<InjectionConfig> {
        self.config.load_full()
    }

    /// Answers one call of `/inject` whose body is `body`.
    pub fn review(&self, body: &[u8]) -> Reply {
        self.review_at(Entry::Inject, body)
    }

    /// Answers one webhook call at `entry` whose body is `body`.
    pub fn review_at(&self, entry: Entry, body: &[u8]) -> Reply {
        let started = Instant::now();
        let (reply, result, reason) = self.answer(entry, body);
        self.metrics
            .review_finished(result, reason, started.elapsed());
        reply
    }

    fn answer(&self, entry: Entry, body: &[u8]) -> (Reply, ReviewResult, ReviewReason) {
        let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
            Ok(review) => review,
            Err(e) => {
                // serde's message can quote the offending value, and a pod's
                // env may hold secrets: say where, not what.
                let why = format!(
                    "malformed AdmissionReview: invalid JSON ({:?} error at line {}, column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                );
                warn!(error = %why, "refused a webhook call");
                return (
                    bad_request(&why),
                    ReviewResult::Invalid,
                    ReviewReason::Malformed,
                );
            }
        };
        if review.types.api_version != ADMISSION_V1 || review.types.kind != "AdmissionReview" {
            let why = format!(
                "unsupported {} {:?}: this webhook speaks AdmissionReview {ADMISSION_V1} \
                 (set admissionReviewVersions: [v1])",
                if review.types.kind == "AdmissionReview" {
                    "AdmissionReview apiVersion"
                } else {
                    "kind"
                },
                shorten(if review.types.kind == "AdmissionReview" {
                    &review.types.api_version
                } else {
                    &review.types.kind
                }),
            );
            warn!(error = %why, "refused a webhook call");
            return (
                bad_request(&why),
                ReviewResult::Invalid,
                ReviewReason::UnsupportedVersion,
            );
        }
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(request) => request,
            Err(_) => {
                let why = "malformed AdmissionReview: no request in it";
                warn!(error = why, "refused a webhook call");
                return (
                    bad_request(why),
                    ReviewResult::Invalid,
                    ReviewReason::Malformed,
                );
            }
        };

        let response = AdmissionResponse::from(&request);
        let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
        let sub_resource = request.sub_resource.as_deref().unwrap_or_default();
        let ephemeral = sub_resource == "ephemeralcontainers";
        let object = match (&request.operation, is_pod, sub_resource, &request.object) {
            (Operation::Create, true, "", Some(object)) => object,
            (Operation::Update, true, "ephemeralcontainers", Some(object)) => object,
            _ => {
                debug!(uid = %request.uid, kind = %request.kind.kind, op = ?request.operation, "not a pod creation; allowed unchanged");
                return (
                    ok(response),
                    ReviewResult::Skipped,
                    ReviewReason::NotPodCreate,
                );
            }
        };
        let pod = match serde_json::to_value(object) {
            Ok(pod) => pod,
            Err(_) => {
                return (
                    bad_request("the object is not JSON"),
                    ReviewResult::Invalid,
                    ReviewReason::Malformed,
                );
            }
        };
        let namespace = request
            .namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .or_else(|| {
                pod.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        let Some(namespace) = namespace else {
            let why = "the request names no namespace";
            return (
                ok(response.deny(why)),
                ReviewResult::Denied,
                ReviewReason::BadRequest,
            );
        };
        let name = pod_name(&pod, &request.name);

        let config = self.config.load();
        let Some(posture) = self.posture_of(&pod, &namespace, entry, &config) else {
            let why = "the webhook's caches of namespaces and policies have not synced yet; retry";
            info!(uid = %request.uid, pod = %name, %namespace, "refused a pod review: {why}");
            return (
                unavailable(why),
                ReviewResult::Denied,
                ReviewReason::NotSynced,
            );
        };
        if ephemeral {
            let old = request
                .old_object
                .as_ref()
                .and_then(|o| serde_json::to_value(o).ok());
            return match posture.check_ephemeral(&pod, old.as_ref()) {
                Ok(()) => (
                    ok(response),
                    ReviewResult::Skipped,
                    ReviewReason::NotPodCreate,
                ),
                Err(error) => {
                    info!(uid = %request.uid, pod = %name, %namespace, %error, "refused an ephemeral container");
                    (
                        refusal(response, &error),
                        ReviewResult::Denied,
                        error.reason(),
                    )
                }
            };
        }

        match patch::decide(&pod, &namespace, &self.trust_domain, &config, &posture) {
            Ok(Decision::Inject { identity, patch }) => {
                let ops = patch.0.len();
                match response.clone().with_patch(patch) {
                    Ok(response) => {
                        info!(uid = %request.uid, pod = %name, %namespace, %identity, ops, dry_run = request.dry_run, "injected the sidecar");
                        if !request.dry_run
                            && let Some(tx) = &self.namespaces
                        {
                            // The publisher is behind; its periodic pass covers it.
                            let _ = tx.try_send(namespace);
                        }
                        (ok(response), ReviewResult::Injected, ReviewReason::Injected)
                    }
                    Err(_) => {
                        let why = "internal error: cannot serialize the patch";
                        (
                            ok(response.deny(why)),
                            ReviewResult::Denied,
                            ReviewReason::Internal,
                        )
                    }
                }
            }
            Ok(Decision::Skip(reason)) => {
                debug!(uid = %request.uid, pod = %name, %namespace, reason = reason.reason().as_str(), "allowed without injection");
                (ok(response), ReviewResult::Skipped, reason.reason())
            }
            Err(error) => {
                info!(uid = %request.uid, pod = %name, %namespace, %error, "refused the pod");
                (
                    refusal(response, &error),
                    ReviewResult::Denied,
                    error.reason(),
                )
            }
        }
    }
}

/// The pod's name for logs: its name, else its generateName.
fn pod_name(pod: &Value, request_name: &str) -> String {
    if !request_name.is_empty() {
        return request_name.to_owned();
    }
    pod.pointer("/metadata/name")
        .and_then(Value::as_str)
        .or_else(|| {
            pod.pointer("/metadata/generateName")
                .and_then(Value::as_str)
        })
        .unwrap_or("<unnamed>")
        .to_owned()
}

fn ok(response: AdmissionResponse) -> Reply {
    Reply {
        status: StatusCode::OK,
        review: response.into_review(),
    }
}

/// A pod refused, with what to change.
fn refusal(response: AdmissionResponse, error: &PodError) -> Reply {
    let mut response = response.deny(format!("palisade sidecar injection: {error}"));
    response.result.code = 400;
    response.result.reason = "BadRequest".to_owned();
    ok(response)
}

/// The webhook cannot judge yet: an HTTP error the API server treats as a
/// failed call (with `failurePolicy: Fail`, the creation fails and its
/// controller retries).
fn unavailable(why: &str) -> Reply {
    let mut response = AdmissionResponse::invalid(why);
    response.result.code = 503;
    Reply {
        status: StatusCode::SERVICE_UNAVAILABLE,
        review: response.into_review(),
    }
}

fn bad_request(why: &str) -> Reply {
    let mut response = AdmissionResponse::invalid(why);
    response.result.code = 400;
    Reply {
        status: StatusCode::BAD_REQUEST,
        review: response.into_review(),
    }
}

/// At most 64 characters of a caller-chosen string, for messages.
fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}
