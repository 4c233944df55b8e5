//! Publishes the trust bundle into the cluster, so nothing about the CA needs
//! a manual step:
//!
//! - the `caBundle` of every webhook in the injection
//!   MutatingWebhookConfiguration, so the API server trusts the webhook's
//!   serving certificate (which the CA issues to the control plane);
//! - a ConfigMap (`ca.crt`) in every namespace labelled
//!   `palisade.io/inject=enabled`, which injected sidecars mount to trust the
//!   control plane before their first certificate.
//!
//! Every replica runs this; the writes are idempotent (a JSON patch guarded by
//! a `test`, and server-side apply), so they agree without leader election.
//! It runs at start, whenever the CA directory changes, on a resync interval,
//! and for a namespace as soon as the webhook injects a pod there.

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine;
use json_patch::{AddOperation, PatchOperation, TestOperation};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{ConfigMap, Namespace},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    ca::CaStore,
    inject::config::is_dns_label,
    metrics::{Metrics, Outcome},
};

/// Where the bundle is written: the `target` label of
/// `palisade_bundle_publications_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Target {
    /// The `caBundle` of the injection webhooks.
    WebhookCaBundle,
    /// The bundle ConfigMap of a labelled namespace.
    Configmap,
}

#[cfg(test)]
mod tests;

/// The namespace label that turns injection on.
pub const INJECT_LABEL: &str = "palisade.io/inject=enabled";
/// A failed pass is retried after this long.
const RETRY: Duration = Duration::from_secs(10);
/// Field manager of the server-side applies.
pub const FIELD_MANAGER: &str = "palisade-control-plane";

/// What to publish, and how often to check it is still there.
#[derive(Clone, Debug, Serialize)]
pub struct PublishConfig {
    /// MutatingWebhookConfiguration whose webhooks get the bundle as `caBundle`.
    pub webhook_configuration: Option<String>,
    /// ConfigMap written into every injection-enabled namespace.
    pub bundle_configmap: Option<String>,
    /// Everything is re-checked this often, even without a change.
    #[serde(with = "humantime_text")]
    pub resync: Duration,
    /// Each API call is abandoned after this long.
    #[serde(with = "humantime_text")]
    pub request_timeout: Duration,
}

/// Keeps the cluster's copies of the trust bundle current.
pub struct BundlePublisher {
    config: PublishConfig,
    client: Client,
    ca: Arc<CaStore>,
    metrics: Metrics,
    /// namespace → (bundle digest written, when).
    written: HashMap<String, (String, Instant)>,
}

/// The trust bundle as written into ConfigMaps, with its digest.
#[derive(Debug)]
struct Bundle {
    pem: String,
    digest: String,
}

impl Bundle {
    fn of(pem: String) -> Self {
        Self {
            digest: hex::encode(Sha256::digest(pem.as_bytes())),
            pem,
        }
    }
}

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the Kubernetes API call timed out after {0:?}")]
    Timeout(Duration),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

// === impl BundlePublisher ===

impl std::fmt::Debug for BundlePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundlePublisher")
            .field("config", &self.config)
            .field("namespaces_written", &self.written.len())
            .finish_non_exhaustive()
    }
}

impl BundlePublisher {
    /// A publisher talking to the API server through `client`.
    pub fn new(config: PublishConfig, client: Client, ca: Arc<CaStore>, metrics: Metrics) -> Self {
        if config.webhook_configuration.is_some() {
            metrics.publishing(Target::WebhookCaBundle);
        }
        if config.bundle_configmap.is_some() {
            metrics.publishing(Target::Configmap);
        }
        Self {
            config,
            client,
            ca,
            metrics,
            written: HashMap::new(),
        }
    }

    /// Publishes now, then on every CA change, every resync interval and for
    /// every namespace sent on `namespaces`, until `stop`.
    pub async fn run(
        mut self,
        mut namespaces: mpsc::Receiver<String>,
        stop: impl Future<Output = ()>,
    ) {
        let mut changed = self.ca.subscribe();
        tokio::pin!(stop);
        let mut next_full = Instant::now();
        loop {
            if Instant::now() >= next_full {
                // A failed pass (API server restarting, RBAC not yet bound on
                // a fresh install) is retried soon, not at the next resync.
                let wait = if self.publish_all().await {
                    self.config.resync
                } else {
                    self.config.resync.min(RETRY)
                };
                next_full = Instant::now() + wait;
            }
            let wait = next_full.saturating_duration_since(Instant::now());
            tokio::select! {
                () = &mut stop => return,
                r = changed.changed() => {
                    if r.is_err() { return }
                    next_full = Instant::now();
                }
                Some(ns) = namespaces.recv() => {
                    if let Err(error) = self.ensure_labelled(&ns).await {
                        warn!(namespace = %ns, %error, "cannot write the trust bundle ConfigMap");
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One full pass: the webhook's `caBundle` and every namespace's
    /// ConfigMap. Returns whether every write succeeded.
    pub async fn publish_all(&mut self) -> bool {
        let mut ok = true;
        if let Err(error) = self.publish_webhook_ca_bundle().await {
            ok = false;
            warn!(%error, retry_in = ?RETRY, "cannot update the webhook's caBundle");
        }
        if self.config.bundle_configmap.is_some() {
            match self.injected_namespaces().await {
                Ok(namespaces) => {
                    // One encoding of the bundle for the whole pass.
                    let bundle = Bundle::of(self.bundle_pem());
                    for ns in namespaces {
                        if let Err(error) = self.ensure_configmap_with(&ns, &bundle).await {
                            ok = false;
                            warn!(namespace = %ns, %error, "cannot write the trust bundle ConfigMap");
                        }
                    }
                }
                Err(error) => {
                    ok = false;
                    self.metrics.published(Target::Configmap, Outcome::Failure);
                    warn!(%error, retry_in = ?RETRY, "cannot list the injection-enabled namespaces");
                }
            }
        }
        ok
    }

    /// Sets `caBundle` on every webhook of the configuration that lacks the
    /// current bundle. Returns how many were changed.
    pub async fn publish_webhook_ca_bundle(&self) -> Result<usize, PublishError> {
        let Some(name) = &self.config.webhook_configuration else {
            return Ok(0);
        };
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let what = || format!("MutatingWebhookConfiguration {name}");
        let current = self.call(what(), api.get(name)).await.inspect_err(|_| {
            self.metrics
                .published(Target::WebhookCaBundle, Outcome::Failure);
        })?;
        let pem = self.bundle_pem();
        let mut ops = Vec::new();
        for (i, webhook) in current.webhooks.iter().flatten().enumerate() {
            let has = webhook
                .client_config
                .ca_bundle
                .as_ref()
                .map(|b| b.0.as_slice());
            if has == Some(pem.as_bytes()) {
                continue;
            }
            // The test keeps a concurrent reorder from patching the wrong entry.
            ops.push(PatchOperation::Test(TestOperation {
                path: pointer(&format!("/webhooks/{i}/name")),
                value: json!(webhook.name),
            }));
            ops.push(PatchOperation::Add(AddOperation {
                path: pointer(&format!("/webhooks/{i}/clientConfig/caBundle")),
                value: json!(base64::engine::general_purpose::STANDARD.encode(&pem)),
            }));
        }
        if ops.is_empty() {
            debug!(configuration = %name, "the webhook caBundle is current");
            return Ok(0);
        }
        let changed = ops.len() / 2;
        let patch = Patch::Json::<()>(json_patch::Patch(ops));
        let result = self
            .call(what(), api.patch(name, &PatchParams::default(), &patch))
            .await;
        self.metrics
            .published(Target::WebhookCaBundle, Outcome::of(result.is_ok()));
        result?;
        info!(configuration = %name, webhooks = changed, "set the webhook caBundle to the trust bundle");
        Ok(changed)
    }

    /// Writes the bundle ConfigMap into `namespace` unless this replica wrote
    /// the same bundle there within the resync interval.
    pub async fn ensure_configmap(&mut self, namespace: &str) -> Result<bool, PublishError> {
        let bundle = Bundle::of(self.bundle_pem());
        self.ensure_configmap_with(namespace, &bundle).await
    }

    async fn ensure_configmap_with(
        &mut self,
        namespace: &str,
        bundle: &Bundle,
    ) -> Result<bool, PublishError> {
        let Some(name) = self.config.bundle_configmap.clone() else {
            return Ok(false);
        };
        let Bundle { pem, digest } = bundle;
        if let Some((written, at)) = self.written.get(namespace)
            && written == digest
            && at.elapsed() < self.config.resync
        {
            return Ok(false);
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "labels": {
                    "app.kubernetes.io/managed-by": FIELD_MANAGER,
                    "app.kubernetes.io/part-of": "palisade",
                },
                "annotations": {"palisade.io/bundle-sha256": digest},
            },
            "data": {"ca.crt": pem},
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let result = self
            .call(
                format!("ConfigMap {namespace}/{name}"),
                api.patch(&name, &params, &Patch::Apply(body)),
            )
            .await;
        self.metrics
            .published(Target::Configmap, Outcome::of(result.is_ok()));
        result?;
        info!(%namespace, configmap = %name, bundle = %&digest[..16], "wrote the trust bundle ConfigMap");
        self.written
            .insert(namespace.to_owned(), (digest.clone(), Instant::now()));
        Ok(true)
    }

    /// Writes the bundle ConfigMap into `namespace` if it is labelled for
    /// injection. The webhook names the namespace of each injected pod, and
    /// anyone who can reach the webhook can name any namespace: only labelled
    /// ones get a write.
    pub async fn ensure_labelled(&mut self, namespace: &str) -> Result<bool, PublishError> {
        if self.config.bundle_configmap.is_none() || !is_dns_label(namespace) {
            return Ok(false);
        }
        let field = format!("metadata.name={namespace}");
        if !self
            .injected_namespaces_where(Some(&field))
            .await?
            .iter()
            .any(|n| n == namespace)
        {
            debug!(%namespace, "not labelled for injection; no ConfigMap written");
            return Ok(false);
        }
        self.ensure_configmap(namespace).await
    }

    async fn injected_namespaces(&self) -> Result<Vec<String>, PublishError> {
        self.injected_namespaces_where(None).await
    }

    async fn injected_namespaces_where(
        &self,
        field: Option<&str>,
    ) -> Result<Vec<String>, PublishError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let mut params = ListParams::default().labels(INJECT_LABEL);
        if let Some(field) = field {
            params = params.fields(field);
        }
        let list = self
            .call("listing namespaces".to_owned(), api.list(&params))
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|ns| ns.metadata.deletion_timestamp.is_none())
            .filter_map(|ns| ns.metadata.name)
            .collect())
    }

    /// The trust bundle as PEM, as sidecars and the API server read it.
    fn bundle_pem(&self) -> String {
        let issuer = self.ca.issuer();
        let blocks: Vec<pem::Pem> = issuer
            .bundle()
            .iter()
            .map(|c| pem::Pem::new("CERTIFICATE", c.to_vec()))
            .collect();
        pem::encode_many_config(
            &blocks,
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    async fn call<T>(
        &self,
        what: String,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, PublishError> {
        match tokio::time::timeout(self.config.request_timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(PublishError::Api { what, source }),
            Err(_) => Err(PublishError::Timeout(self.config.request_timeout)),
        }
    }
}

fn pointer(text: &str) -> json_patch::jsonptr::PointerBuf {
    json_patch::jsonptr::PointerBuf::parse(text).expect("the pointers built here are valid")
}

mod humantime_text {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}
