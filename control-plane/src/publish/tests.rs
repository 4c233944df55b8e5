//! The publisher against a loopback HTTP server that answers the few API
//! calls it makes the way the API server does, and records them.

use std::sync::{Arc, Mutex};

use axum::{
    Json, Router,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    routing::get,
};
use prometheus::Registry;
use serde_json::{Value, json};

use super::*;
use crate::testing::TestCa;

#[derive(Debug, Default)]
struct FakeApi {
    webhook: Value,
    namespaces: Vec<Value>,
    /// (namespace, name, content-type, query, body) of every ConfigMap apply.
    applies: Vec<(String, String, String, String, Value)>,
    webhook_patches: usize,
    /// Answer every call with this status instead.
    fail_with: Option<u16>,
}

type Shared = Arc<Mutex<FakeApi>>;

async fn get_webhook(
    State(api): State<Shared>,
    Path(name): Path<String>,
) -> (StatusCode, Json<Value>) {
    let api = api.lock().expect("lock");
    if let Some(code) = api.fail_with {
        return status(code);
    }
    if api.webhook["metadata"]["name"] != name.as_str() {
        return status(404);
    }
    (StatusCode::OK, Json(api.webhook.clone()))
}

async fn patch_webhook(
    State(api): State<Shared>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<Value>) {
    let mut api = api.lock().expect("lock");
    assert_eq!(
        headers["content-type"], "application/json-patch+json",
        "a JSON patch"
    );
    let patch: json_patch::Patch = serde_json::from_str(&body).expect("a JSON patch");
    if json_patch::patch(&mut api.webhook, &patch).is_err() {
        return status(422);
    }
    api.webhook_patches += 1;
    (StatusCode::OK, Json(api.webhook.clone()))
}

async fn list_namespaces(
    State(api): State<Shared>,
    RawQuery(query): RawQuery,
) -> (StatusCode, Json<Value>) {
    let api = api.lock().expect("lock");
    if let Some(code) = api.fail_with {
        return status(code);
    }
    let selector = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
        .expect("the list is filtered by label")
        .replace("%2F", "/")
        .replace("%3D", "=");
    let (key, value) = selector.split_once('=').expect("an equality selector");
    let items: Vec<Value> = api
        .namespaces
        .iter()
        .filter(|ns| ns["metadata"]["labels"][key] == value)
        .cloned()
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": items});
    (StatusCode::OK, Json(list))
}

async fn apply_configmap(
    State(api): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: String,
) -> (StatusCode, Json<Value>) {
    let mut api = api.lock().expect("lock");
    if let Some(code) = api.fail_with {
        return status(code);
    }
    let body: Value = serde_json::from_str(&body).expect("apply bodies are JSON");
    let content_type = headers["content-type"].to_str().expect("ascii").to_owned();
    api.applies.push((
        ns,
        name,
        content_type,
        query.unwrap_or_default(),
        body.clone(),
    ));
    (StatusCode::OK, Json(body))
}

fn status(code: u16) -> (StatusCode, Json<Value>) {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": "fake API server says no", "reason": "Forbidden"});
    (StatusCode::from_u16(code).expect("valid code"), Json(body))
}

fn namespace(name: &str, labels: Value, terminating: bool) -> Value {
    let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
    if terminating {
        ns["metadata"]["deletionTimestamp"] = json!("2026-11-26T00:00:00Z");
    }
    ns
}

struct Fixture {
    api: Shared,
    publisher: BundlePublisher,
    registry: Registry,
    ca: Arc<CaStore>,
    dir: tempfile::TempDir,
    root: TestCa,
}

async fn fixture() -> Fixture {
    let api = Arc::new(Mutex::new(FakeApi {
        webhook: json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "palisade-sidecar-injector", "resourceVersion": "7"},
            "webhooks": [
                {"name": "inject.palisade.io", "admissionReviewVersions": ["v1"], "sideEffects": "NoneOnDryRun",
                 "clientConfig": {"service": {"name": "palisade-control-plane", "namespace": "palisade", "path": "/inject", "port": 15017}}},
                {"name": "inject-2.palisade.io", "admissionReviewVersions": ["v1"], "sideEffects": "NoneOnDryRun",
                 "clientConfig": {"caBundle": "c3RhbGU=", "service": {"name": "palisade-control-plane", "namespace": "palisade", "port": 15017}}},
            ],
        }),
        namespaces: vec![
            namespace("shop", json!({"palisade.io/inject": "enabled"}), false),
            namespace(
                "demo",
                json!({"palisade.io/inject": "enabled", "team": "a"}),
                false,
            ),
            namespace("kube-system", json!({}), false),
            namespace("old", json!({"palisade.io/inject": "enabled"}), true),
        ],
        ..FakeApi::default()
    }));
    let app = Router::new()
        .route(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}",
            get(get_webhook).patch(patch_webhook),
        )
        .route("/api/v1/namespaces", get(list_namespaces))
        .route(
            "/api/v1/namespaces/{ns}/configmaps/{name}",
            axum::routing::patch(apply_configmap),
        )
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("tempdir");
    let root = TestCa::fresh_root("root A");
    root.write(dir.path(), &[], &[&root]);
    let ca = Arc::new(CaStore::load(dir.path()).expect("valid CA"));
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).expect("fresh registry");
    let client = Client::try_from(kube::Config::new(url.parse().expect("url"))).expect("client");
    let config = PublishConfig {
        webhook_configuration: Some("palisade-sidecar-injector".into()),
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

fn decoded_ca_bundles(api: &Shared) -> Vec<String> {
    let api = api.lock().expect("lock");
    api.webhook["webhooks"]
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
    {
        let api = api.lock().expect("lock");
        assert_eq!(api.webhook_patches, 1, "one patch sets both webhooks");
        let mut written: Vec<_> = api.applies.iter().map(|a| a.0.as_str()).collect();
        written.sort_unstable();
        assert_eq!(
            written,
            ["demo", "shop"],
            "enabled namespaces only, not terminating ones"
        );
        let (_, name, content_type, query, body) = &api.applies[0];
        assert_eq!(name, "palisade-trust-bundle");
        assert_eq!(content_type, "application/apply-patch+yaml");
        assert!(
            query.contains("fieldManager=palisade-control-plane") && query.contains("force=true"),
            "{query}"
        );
        assert_eq!(
            body["data"]["ca.crt"].as_str().map(str::trim),
            Some(root.pem.trim())
        );
    }

    // Nothing changed: no writes.
    publisher.publish_all().await;
    assert_eq!(api.lock().expect("lock").webhook_patches, 1);
    assert_eq!(api.lock().expect("lock").applies.len(), 2);

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
    assert_eq!(api.lock().expect("lock").applies.len(), 4);
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
    api.lock().expect("lock").fail_with = Some(403);
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
    api.lock().expect("lock").fail_with = None;
    assert!(publisher.publish_all().await);
    assert_eq!(api.lock().expect("lock").applies.len(), 2);
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
    assert!(api.lock().expect("lock").applies.is_empty());
    assert!(publisher.ensure_labelled("shop").await.expect("answered"));
    let api = api.lock().expect("lock");
    assert_eq!(api.applies.len(), 1);
    assert_eq!(api.applies[0].0, "shop");
}
