//! The publisher against the stand-in API server (`palisade_tests::kube`),
//! which stores what it writes and records every call.

use palisade_tests::kube::{ApiServer, Fault, Recorded};
use prometheus::Registry;
use serde_json::{Value, json};

use super::*;
use crate::testing::TestCa;

const WEBHOOK: &str = "palisade-sidecar-injector";
const WEBHOOKS: &str = "mutatingwebhookconfigurations.admissionregistration.k8s.io";
const WEBHOOK_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/palisade-sidecar-injector";

fn namespace(name: &str, labels: Value, terminating: bool) -> Value {
    let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
    if terminating {
        ns["metadata"]["deletionTimestamp"] = json!("2026-11-26T00:00:00Z");
    }
    ns
}

struct Fixture {
    api: ApiServer,
    publisher: BundlePublisher,
    registry: Registry,
    ca: Arc<CaStore>,
    dir: tempfile::TempDir,
    root: TestCa,
}

async fn fixture() -> Fixture {
    let webhook = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK},
        "webhooks": [
            {"name": "inject.palisade.io", "admissionReviewVersions": ["v1"], "sideEffects": "NoneOnDryRun",
             "clientConfig": {"service": {"name": "palisade-control-plane", "namespace": "palisade", "path": "/inject", "port": 15017}}},
            {"name": "inject-2.palisade.io", "admissionReviewVersions": ["v1"], "sideEffects": "NoneOnDryRun",
             "clientConfig": {"caBundle": "c3RhbGU=", "service": {"name": "palisade-control-plane", "namespace": "palisade", "port": 15017}}},
        ],
    });
    let api = ApiServer::builder()
        .object(webhook)
        .object(namespace(
            "shop",
            json!({"palisade.io/inject": "enabled"}),
            false,
        ))
        .object(namespace(
            "demo",
            json!({"palisade.io/inject": "enabled", "team": "a"}),
            false,
        ))
        .object(namespace("kube-system", json!({}), false))
        .object(namespace(
            "old",
            json!({"palisade.io/inject": "enabled"}),
            true,
        ))
        .start()
        .await
        .expect("the stand-in API server starts");

    let dir = tempfile::tempdir().expect("tempdir");
    let root = TestCa::fresh_root("root A");
    root.write(dir.path(), &[], &[&root]);
    let ca = Arc::new(CaStore::load(dir.path()).expect("valid CA"));
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).expect("fresh registry");
    let client = api.client().expect("client");
    let config = PublishConfig {
        webhook_configuration: Some(WEBHOOK.into()),
        bundle_configmap: Some("palisade-trust-bundle".into()),
        resync: Duration::from_secs(300),
        request_timeout: Duration::from_secs(5),
    };
    let publisher = BundlePublisher::new(config, client, ca.clone(), metrics);
    Fixture {
        api,
        publisher,
        registry,
        ca,
        dir,
        root,
    }
}

fn published(registry: &Registry, target: &str, result: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "palisade_bundle_publications_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            let l: Vec<_> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            l.contains(&("target", target)) && l.contains(&("result", result))
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn decoded_ca_bundles(api: &ApiServer) -> Vec<String> {
    let webhook = api
        .get(WEBHOOKS, None, WEBHOOK)
        .expect("the webhook configuration");
    webhook["webhooks"]
        .as_array()
        .expect("webhooks")
        .iter()
        .map(|w| {
            let b64 = w["clientConfig"]["caBundle"].as_str().unwrap_or_default();
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("base64"),
            )
            .expect("PEM text")
        })
        .collect()
}

/// Successful patches of the webhook configuration.
fn webhook_patches(api: &ApiServer) -> Vec<Recorded> {
    api.requests()
        .into_iter()
        .filter(|r| r.is("PATCH", WEBHOOK_PATH) && r.status == Some(200))
        .collect()
}

/// Successful writes of a ConfigMap, with the namespace each went to.
fn applies(api: &ApiServer) -> Vec<(String, Recorded)> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.status.is_some_and(|s| s < 300))
        .filter_map(|r| {
            let rest = r.path.strip_prefix("/api/v1/namespaces/")?;
            let (ns, rest) = rest.split_once('/')?;
            rest.starts_with("configmaps/")
                .then(|| (ns.to_owned(), r.clone()))
        })
        .collect()
}

#[tokio::test]
async fn publishes_the_bundle_to_the_webhook_and_enabled_namespaces_once() {
    let Fixture {
        api,
        mut publisher,
        registry,
        ca,
        dir,
        root,
    } = fixture().await;

    publisher.publish_all().await;
    let bundles = decoded_ca_bundles(&api);
    assert_eq!(bundles.len(), 2);
    for b in &bundles {
        assert_eq!(
            b.trim(),
            root.pem.trim(),
            "caBundle is the trust bundle PEM"
        );
    }
    let patches = webhook_patches(&api);
    assert_eq!(patches.len(), 1, "one patch sets both webhooks");
    assert_eq!(
        patches[0].content_type.as_deref(),
        Some("application/json-patch+json"),
        "a JSON patch"
    );
    let listed = api
        .requests()
        .into_iter()
        .find(|r| r.is("GET", "/api/v1/namespaces"))
        .expect("the namespaces were listed");
    assert_eq!(
        listed.param("labelSelector").as_deref(),
        Some("palisade.io/inject=enabled"),
        "the list is filtered by label"
    );
    let written = applies(&api);
    let mut namespaces: Vec<_> = written.iter().map(|(ns, _)| ns.as_str()).collect();
    namespaces.sort_unstable();
    assert_eq!(
        namespaces,
        ["demo", "shop"],
        "enabled namespaces only, not terminating ones"
    );
    let (_, apply) = &written[0];
    assert!(
        apply.path.ends_with("/configmaps/palisade-trust-bundle"),
        "{}",
        apply.path
    );
    assert_eq!(
        apply.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        apply.param("fieldManager").as_deref(),
        Some("palisade-control-plane")
    );
    assert_eq!(
        apply.param("force").as_deref(),
        Some("true"),
        "{}",
        apply.query
    );
    let body = apply.json().expect("the apply body");
    assert_eq!(
        body["data"]["ca.crt"].as_str().map(str::trim),
        Some(root.pem.trim())
    );
    let stored = api
        .get("configmaps", Some("shop"), "palisade-trust-bundle")
        .expect("the ConfigMap is stored");
    assert_eq!(
        stored["data"]["ca.crt"].as_str().map(str::trim),
        Some(root.pem.trim())
    );
    assert!(
        api.get("configmaps", Some("kube-system"), "palisade-trust-bundle")
            .is_none()
    );

    // Nothing changed: no writes.
    publisher.publish_all().await;
    assert_eq!(webhook_patches(&api).len(), 1);
    assert_eq!(applies(&api).len(), 2);

    // A second root joins the bundle: everything is rewritten with both.
    let root_b = TestCa::fresh_root("root B");
    root.write(dir.path(), &[], &[&root, &root_b]);
    ca.reload().expect("valid CA");
    publisher.publish_all().await;
    for b in decoded_ca_bundles(&api) {
        assert!(
            b.contains(root_b.pem.trim()) && b.contains(root.pem.trim()),
            "{b}"
        );
    }
    assert_eq!(applies(&api).len(), 4);
    assert_eq!(published(&registry, "webhook_ca_bundle", "success"), 2);
    assert_eq!(published(&registry, "configmap", "success"), 4);
}

#[tokio::test]
async fn an_api_server_that_refuses_is_counted_and_retried() {
    let Fixture {
        api,
        mut publisher,
        registry,
        ..
    } = fixture().await;
    api.inject(Fault::status(403, "refused by the test"));
    assert!(!publisher.publish_all().await, "a failed pass says so");
    let err = publisher
        .ensure_configmap("shop")
        .await
        .expect_err("refused");
    assert!(
        err.to_string()
            .contains("ConfigMap shop/palisade-trust-bundle"),
        "{err}"
    );
    assert_eq!(published(&registry, "webhook_ca_bundle", "failure"), 1);
    assert_eq!(published(&registry, "configmap", "failure"), 2);

    // Once the API server answers again, the same publisher catches up.
    api.clear_faults();
    assert!(publisher.publish_all().await);
    assert_eq!(applies(&api).len(), 2);
    assert_eq!(published(&registry, "webhook_ca_bundle", "success"), 1);
}

#[tokio::test]
async fn a_namespace_named_by_the_webhook_gets_a_configmap_only_when_labelled() {
    let Fixture {
        api, mut publisher, ..
    } = fixture().await;
    assert!(
        !publisher
            .ensure_labelled("kube-system")
            .await
            .expect("answered")
    );
    assert!(
        !publisher
            .ensure_labelled("Not/A-Namespace")
            .await
            .expect("answered")
    );
    assert!(applies(&api).is_empty());
    assert!(publisher.ensure_labelled("shop").await.expect("answered"));
    let written = applies(&api);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].0, "shop");
}
