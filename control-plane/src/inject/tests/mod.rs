use base64::Engine;
use prometheus::Registry;
use serde_json::{Value, json};

use super::*;
use crate::inject::patch::{INIT_CONTAINER, SIDECAR_CONTAINER};

mod posture;
mod probes;

pub(super) const CONFIG: &str = r#"
sidecar:
  image: ghcr.io/palisade-mesh/palisade-sidecar:0.1.0
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 128Mi, cpu: 1}
  excludeOutboundPorts: [53]
  serverFirstPorts: [3306]
  lifetime: 30m
init:
  image: ghcr.io/palisade-mesh/palisade-init:0.1.0
controlPlane:
  address: https://palisade-control-plane.palisade.svc:15012
  serverName: palisade-control-plane.palisade.svc
"#;

pub(super) fn injector() -> (Injector, Registry) {
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).expect("fresh registry");
    let config = InjectionConfig::parse(CONFIG).expect("valid config");
    let td = "cluster.local".parse().expect("valid trust domain");
    (Injector::new(config, td, metrics, None), registry)
}

pub(super) fn pod(annotations: Value, spec: Value) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "demo", "labels": {"app": "web"}},
        "spec": spec,
    });
    if !annotations.is_null() {
        pod["metadata"]["annotations"] = annotations;
    }
    pod
}

pub(super) fn web_spec() -> Value {
    json!({
        "serviceAccountName": "web",
        "containers": [{"name": "web", "image": "web:1"}],
        "volumes": [{"name": "data", "emptyDir": {}}],
    })
}

pub(super) fn review_of(pod: &Value, operation: &str) -> Vec<u8> {
    serde_json::to_vec(&review_json(pod, operation)).expect("serializable")
}

/// An AdmissionReview of `pod` in `demo`, as JSON to adjust.
pub(super) fn review_json(pod: &Value, operation: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "b1d4c2a0-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": operation,
            "userInfo": {"username": "tester"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
        }
    })
}

/// The response as the API server reads it, and the pod after its patch.
pub(super) fn run(injector: &Injector, pod: &Value) -> (StatusCode, Value, Value) {
    let reply = injector.review(&review_of(pod, "CREATE"));
    let body = reply.body();
    let mut patched = pod.clone();
    if let Some(patch) = body["response"]["patch"].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("the patch is base64");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSONPatch");
        json_patch::patch(&mut patched, &patch).expect("the patch applies to the pod");
    }
    (reply.status, body, patched)
}

pub(super) fn env_of(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .expect("env list")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_owned(),
                match e["value"].as_str() {
                    Some(value) => value.to_owned(),
                    // The downward API: `fieldRef:status.podIP`.
                    None => format!(
                        "fieldRef:{}",
                        e["valueFrom"]["fieldRef"]["fieldPath"]
                            .as_str()
                            .expect("a value or a fieldRef")
                    ),
                },
            )
        })
        .collect()
}

pub(super) fn env<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

pub(super) fn count(registry: &Registry, result: &str, reason: &str) -> u64 {
    let allowed = ReviewReason::ALL
        .iter()
        .filter(|r| r.as_str() == reason)
        .any(|r| r.results().iter().any(|x| x.as_str() == result));
    assert!(
        allowed,
        "({result}, {reason}) is not a pair ReviewReason::results() lists, so its counter does not start at zero"
    );
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "palisade_webhook_reviews_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            let labels: Vec<_> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            labels.contains(&("result", result)) && labels.contains(&("reason", reason))
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[test]
fn an_ordinary_pod_gets_init_and_native_sidecar_first() {
    let (injector, registry) = injector();
    let (status, body, patched) = run(&injector, &pod(Value::Null, web_spec()));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["allowed"], true);
    assert_eq!(
        body["response"]["uid"],
        "b1d4c2a0-0000-4000-8000-000000000001"
    );
    assert_eq!(body["response"]["patchType"], "JSONPatch");
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");

    let inits = patched["spec"]["initContainers"]
        .as_array()
        .expect("init containers");
    assert_eq!(inits.len(), 2);
    assert_eq!(inits[0]["name"], INIT_CONTAINER);
    assert_eq!(inits[1]["name"], SIDECAR_CONTAINER);
    assert_eq!(inits[1]["restartPolicy"], "Always");
    assert_eq!(inits[1]["securityContext"]["runAsUser"], 1337);
    assert_eq!(
        inits[0]["securityContext"]["capabilities"],
        json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
    );
    assert_eq!(inits[1]["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(
        inits[1]["resources"]["limits"]["cpu"], "1",
        "numbers become quantities"
    );

    let sidecar = env_of(&inits[1]);
    assert_eq!(
        env(&sidecar, "PALISADE_IDENTITY"),
        Some("spiffe://cluster.local/ns/demo/sa/web")
    );
    assert_eq!(env(&sidecar, "PALISADE_EXCLUDE_OUTBOUND_PORTS"), Some("53"));
    assert_eq!(env(&sidecar, "PALISADE_LIFETIME"), Some("30m"));
    assert_eq!(env(&sidecar, "PALISADE_INBOUND_MODE"), Some("permissive"));
    assert_eq!(
        env(&sidecar, "PALISADE_DISCOVERY"),
        Some("true"),
        "discovery is on unless the config turns it off"
    );
    assert_eq!(env(&sidecar, "PALISADE_OUTBOUND_MODE"), Some("permissive"));

    let volumes = patched["spec"]["volumes"].as_array().expect("volumes");
    assert_eq!(
        volumes[0]["name"], "data",
        "the pod's own volume stays first"
    );
    let token = volumes
        .iter()
        .find(|v| v["name"] == "palisade-token")
        .expect("token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "palisade"
    );
    assert_eq!(
        patched["metadata"]["annotations"]["palisade.io/injected"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        patched["metadata"]["annotations"]["prometheus.io/port"],
        "15020"
    );
    assert_eq!(
        patched["metadata"]["labels"]["palisade.io/sidecar"],
        "injected"
    );
    assert_eq!(
        patched["metadata"]["labels"]["app"], "web",
        "labels are kept"
    );
    assert_eq!(count(&registry, "injected", "injected"), 1);

    // Injecting the result again changes nothing.
    let (_, again, _) = run(&injector, &patched);
    assert_eq!(again["response"]["allowed"], true);
    assert!(again["response"]["patch"].is_null(), "{again}");
    assert_eq!(count(&registry, "skipped", "already_injected"), 1);
}

#[test]
fn existing_init_containers_run_after_the_sidecar() {
    let (injector, _) = injector();
    let spec = json!({
        "initContainers": [{"name": "migrate", "image": "m:1"}],
        "containers": [{"name": "db", "image": "db:1"}],
    });
    let (_, _, patched) = run(
        &injector,
        &pod(json!({"prometheus.io/scrape": "false"}), spec),
    );
    let names: Vec<_> = patched["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, [INIT_CONTAINER, SIDECAR_CONTAINER, "migrate"]);
    assert_eq!(
        patched["metadata"]["annotations"]["prometheus.io/scrape"], "false",
        "the pod's own scrape setting wins"
    );
    assert!(patched["metadata"]["annotations"]["prometheus.io/port"].is_null());
    let sidecar = env_of(&patched["spec"]["initContainers"][1]);
    assert_eq!(
        env(&sidecar, "PALISADE_IDENTITY"),
        Some("spiffe://cluster.local/ns/demo/sa/default"),
        "no service account means `default`"
    );
}

#[test]
fn annotations_merge_with_the_defaults() {
    let (injector, _) = injector();
    let annotations = json!({
        "palisade.io/exclude-outbound-ports": "5432, 6379,53",
        "palisade.io/exclude-inbound-ports": "9090",
        "palisade.io/server-first-ports": "5432",
        "palisade.io/inbound-mode": "strict",
        "palisade.io/access-log": "json",
    });
    let (_, _, plain) = run(&injector, &pod(Value::Null, web_spec()));
    let sidecar = env_of(&plain["spec"]["initContainers"][1]);
    assert_eq!(
        env(&sidecar, "PALISADE_ACCESS_LOG"),
        None,
        "the access log is opt-in"
    );
    let (_, _, patched) = run(&injector, &pod(annotations, web_spec()));
    let init = env_of(&patched["spec"]["initContainers"][0]);
    let sidecar = env_of(&patched["spec"]["initContainers"][1]);
    assert_eq!(
        env(&init, "PALISADE_EXCLUDE_OUTBOUND_PORTS"),
        Some("53,5432,6379")
    );
    assert_eq!(env(&init, "PALISADE_EXCLUDE_INBOUND_PORTS"), Some("9090"));
    assert_eq!(
        env(&sidecar, "PALISADE_EXCLUDE_OUTBOUND_PORTS"),
        Some("53,5432,6379")
    );
    assert_eq!(
        env(&sidecar, "PALISADE_SERVER_FIRST_PORTS"),
        Some("3306,5432")
    );
    assert_eq!(env(&sidecar, "PALISADE_INBOUND_MODE"), Some("strict"));
    assert_eq!(env(&sidecar, "PALISADE_ACCESS_LOG"), Some("json"));
}

#[test]
fn discovery_and_outbound_mode_follow_the_config() {
    let config = CONFIG.replace(
        "  lifetime: 30m\n",
        "  lifetime: 30m\n  discovery: false\n  outboundMode: permissive\n",
    );
    let config = InjectionConfig::parse(&config).expect("valid config");
    assert!(!config.sidecar.discovery);
    assert_eq!(
        config.sidecar.outbound_mode,
        config::OutboundMode::Permissive
    );
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).expect("fresh registry");
    let td = "cluster.local".parse().expect("valid trust domain");
    let injector = Injector::new(config, td, metrics, None);
    let (_, _, patched) = run(&injector, &pod(Value::Null, web_spec()));
    let sidecar = env_of(&patched["spec"]["initContainers"][1]);
    assert_eq!(env(&sidecar, "PALISADE_DISCOVERY"), Some("false"));
    assert_eq!(env(&sidecar, "PALISADE_OUTBOUND_MODE"), Some("permissive"));
    for name in ["PALISADE_DISCOVERY", "PALISADE_OUTBOUND_MODE"] {
        let written = sidecar.iter().filter(|(n, _)| n == name).count();
        assert_eq!(written, 1, "{name} is written once");
    }
}

#[test]
fn skipped_pods_are_allowed_unchanged() {
    let (injector, registry) = injector();
    let mut host = web_spec();
    host["hostNetwork"] = json!(true);
    let cases = [
        (
            pod(json!({"palisade.io/inject": "false"}), web_spec()),
            "opted_out",
        ),
        (
            pod(json!({"palisade.io/inject": "disabled"}), web_spec()),
            "opted_out",
        ),
        (pod(Value::Null, host), "host_network"),
        (
            pod(json!({"palisade.io/injected": "0.0.9"}), web_spec()),
            "already_injected",
        ),
    ];
    for (pod, reason) in cases {
        let (status, body, _) = run(&injector, &pod);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["response"]["allowed"], true, "{reason}");
        assert!(body["response"]["patch"].is_null(), "{reason}: {body}");
    }
    assert_eq!(count(&registry, "skipped", "opted_out"), 2);
    assert_eq!(count(&registry, "skipped", "host_network"), 1);
    assert_eq!(count(&registry, "skipped", "already_injected"), 1);
}

#[test]
fn bad_annotations_are_refused_with_the_annotation_named() {
    let (injector, registry) = injector();
    for (annotations, needle) in [
        (
            json!({"palisade.io/exclude-outbound-ports": "postgres"}),
            "palisade.io/exclude-outbound-ports",
        ),
        (
            json!({"palisade.io/exclude-inbound-ports": "0"}),
            "palisade.io/exclude-inbound-ports",
        ),
        (
            json!({"palisade.io/server-first-ports": "70000"}),
            "palisade.io/server-first-ports",
        ),
        (
            json!({"palisade.io/inbound-mode": "paranoid"}),
            "palisade.io/inbound-mode",
        ),
        (
            json!({"palisade.io/access-log": "yes"}),
            "palisade.io/access-log",
        ),
        (json!({"palisade.io/inject": "maybe"}), "palisade.io/inject"),
    ] {
        let (status, body, _) = run(&injector, &pod(annotations, web_spec()));
        assert_eq!(status, StatusCode::OK, "a refusal is still a valid review");
        assert_eq!(body["response"]["allowed"], false);
        assert_eq!(body["response"]["status"]["code"], 400);
        let message = body["response"]["status"]["message"]
            .as_str()
            .expect("message");
        assert!(message.contains(needle), "{message}");
    }
    assert_eq!(count(&registry, "denied", "bad_annotation"), 6);

    let mut clash = web_spec();
    clash["volumes"] = json!([{"name": "palisade-token", "emptyDir": {}}]);
    let (_, body, _) = run(&injector, &pod(Value::Null, clash));
    assert_eq!(body["response"]["allowed"], false);
    assert_eq!(count(&registry, "denied", "name_conflict"), 1);
}

#[test]
fn malformed_and_foreign_reviews_get_400() {
    let (injector, registry) = injector();
    let secret = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x","object":{"spec":{"containers":[{"env":[{"name":"PASSWORD","value":"hunter2-very-secret"#;
    let reply = injector.review(secret);
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let body = serde_json::to_string(&reply.review).expect("serializable");
    assert!(body.contains("malformed AdmissionReview"), "{body}");
    assert!(
        !body.contains("hunter2"),
        "the body's values stay out of the answer: {body}"
    );

    let mut old =
        serde_json::from_slice::<Value>(&review_of(&pod(Value::Null, web_spec()), "CREATE"))
            .expect("json");
    old["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let reply = injector.review(&serde_json::to_vec(&old).expect("json"));
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let body = serde_json::to_string(&reply.review).expect("serializable");
    assert!(body.contains("admission.k8s.io/v1beta1"), "{body}");
    assert!(body.contains(r#""allowed":false"#), "{body}");

    let reply =
        injector.review(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#);
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(count(&registry, "invalid", "malformed"), 2);
    assert_eq!(count(&registry, "invalid", "unsupported_version"), 1);
}

#[test]
fn updates_and_other_kinds_pass_through() {
    let (injector, registry) = injector();
    let reply = injector.review(&review_of(&pod(Value::Null, web_spec()), "UPDATE"));
    let body = reply.body();
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"]["patch"].is_null());
    assert_eq!(count(&registry, "skipped", "not_pod_create"), 1);
}

#[test]
fn the_injection_config_refuses_unknown_keys_and_bad_values() {
    assert!(InjectionConfig::parse(&format!("{CONFIG}\nsurprise: 1\n")).is_err());
    let http = CONFIG.replace("https://palisade", "http://palisade");
    let err = InjectionConfig::parse(&http).expect_err("plain http refused");
    assert!(err.to_string().contains("controlPlane.address"), "{err}");
    let short = format!("{CONFIG}\ntoken:\n  expirationSeconds: 60\n");
    let err = InjectionConfig::parse(&short).expect_err("too short");
    assert!(err.to_string().contains("expirationSeconds"), "{err}");
    let lax = CONFIG.replace(
        "  lifetime: 30m\n",
        "  lifetime: 30m\n  outboundMode: lax\n",
    );
    let err = InjectionConfig::parse(&lax).expect_err("no such outbound mode");
    assert!(err.to_string().contains("lax"), "{err}");
    let word = CONFIG.replace(
        "  lifetime: 30m\n",
        "  lifetime: 30m\n  discovery: sometimes\n",
    );
    assert!(
        InjectionConfig::parse(&word).is_err(),
        "discovery is a bool"
    );
    let blind = CONFIG.replace(
        "  lifetime: 30m\n",
        "  lifetime: 30m\n  discovery: false\n  outboundMode: strict\n",
    );
    let err = InjectionConfig::parse(&blind).expect_err("strict needs discovery");
    assert!(err.to_string().contains("sidecar.outboundMode"), "{err}");
}

#[test]
fn review_labels_are_the_documented_spellings_and_start_at_zero() {
    assert_eq!(
        ReviewResult::names(),
        ["injected", "skipped", "denied", "invalid"]
    );
    assert_eq!(
        ReviewReason::names(),
        [
            "injected",
            "not_pod_create",
            "already_injected",
            "opted_out",
            "host_network",
            "bad_annotation",
            "bad_identity",
            "name_conflict",
            "malformed",
            "unsupported_version",
            "bad_request",
            "internal",
            "enforced",
            "bad_probe",
            "not_synced",
        ]
    );
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).expect("metrics");
    metrics.webhook_ready();
    for reason in ReviewReason::ALL {
        for result in reason.results() {
            assert_eq!(count(&registry, result.as_str(), reason.as_str()), 0);
        }
    }
    let series: usize = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "palisade_webhook_reviews_total")
        .map(|f| f.get_metric().len())
        .sum();
    assert_eq!(
        series, 16,
        "one series per (result, reason) pair that can occur"
    );
}

#[test]
fn a_service_account_that_is_not_one_segment_forges_no_identity() {
    // `sa/x` after `.../sa/` would name another workload's path; the
    // injector derives identities like the authenticator and refuses it.
    let (injector, registry) = injector();
    for account in ["web/ns/kube-system/sa/admin", "..", "a b"] {
        let mut spec = web_spec();
        spec["serviceAccountName"] = json!(account);
        let (_, body, _) = run(&injector, &pod(Value::Null, spec));
        assert_eq!(body["response"]["allowed"], false, "{account}: {body}");
        assert!(body["response"]["patch"].is_null(), "{account}");
    }
    assert_eq!(count(&registry, "denied", "bad_identity"), 3);
}
