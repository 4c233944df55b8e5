//! The enforced posture: every refusal, by field and by container kind;
//! tightening and loosening annotations; the caches' sync gate.

use std::sync::Arc;

use http::StatusCode;

use serde_json::{Value, json};

use super::{CONFIG, count, env, env_of, pod, review_json, review_of, run, web_spec};
use crate::{
    discovery::Discovery,
    inject::{Entry, InboundMode, InjectionConfig, Injector},
    metrics::Metrics,
    policy::{InboundPolicy, PolicyDef},
};

/// An injector whose caches know `demo` as enforcing the mesh, with the
/// policies `policies` (YAML InboundPolicy specs by name) in it.
fn enforcing(policies: &[(&str, Value)]) -> (Injector, prometheus::Registry, Arc<Discovery>) {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).expect("fresh registry");
    let config = InjectionConfig::parse(CONFIG).expect("valid config");
    let td: palisade_proto::TrustDomain = "cluster.local".parse().expect("trust domain");
    let discovery = Discovery::new(td.clone());
    discovery.replace_namespaces(vec![("demo".to_owned(), true), ("open".to_owned(), false)]);
    discovery.replace_policies(
        policies
            .iter()
            .map(|(name, spec)| {
                let policy: InboundPolicy = serde_json::from_value(json!({
                    "apiVersion": "policy.palisade.io/v1alpha1",
                    "kind": "InboundPolicy",
                    "metadata": {"name": name, "namespace": "demo"},
                    "spec": spec,
                }))
                .expect("an InboundPolicy");
                (format!("demo/{name}"), Some(PolicyDef::of(&policy, &td)))
            })
            .collect(),
    );
    discovery.mark_synced();
    let injector = Injector::new(config, td, metrics, None).with_posture(discovery.clone());
    (injector, registry, discovery)
}

/// The refusal message, asserting the pod was refused.
fn refused(injector: &Injector, pod: &Value) -> String {
    let (status, body, _) = run(injector, pod);
    assert_eq!(
        status,
        StatusCode::OK,
        "a refusal is a valid review: {body}"
    );
    assert_eq!(body["response"]["allowed"], false, "{pod} was admitted");
    let message = body["response"]["status"]["message"]
        .as_str()
        .expect("a message")
        .to_owned();
    assert!(
        message.contains("enforces the mesh") || message.contains("probe"),
        "{message}"
    );
    message
}

fn injected(injector: &Injector, pod: &Value) -> Value {
    let (_, body, patched) = run(injector, pod);
    assert_eq!(body["response"]["allowed"], true, "{body}");
    assert!(
        body["response"]["patch"].is_string(),
        "not injected: {body}"
    );
    patched
}

fn with_container(kind: &str, container: Value) -> Value {
    let mut spec = web_spec();
    if kind == "containers" {
        spec["containers"]
            .as_array_mut()
            .expect("containers")
            .push(container);
    } else {
        spec[kind] = json!([container]);
    }
    spec
}

#[test]
fn every_way_out_of_the_mesh_is_refused_with_what_to_change() {
    let (injector, registry, _) = enforcing(&[]);
    let cases: Vec<(Value, &str)> = vec![
        (
            pod(json!({"palisade.io/inject": "false"}), web_spec()),
            "remove palisade.io/inject from its annotations",
        ),
        (
            {
                let mut p = pod(Value::Null, web_spec());
                p["metadata"]["labels"]["palisade.io/inject"] = json!("disabled");
                p
            },
            "remove palisade.io/inject from its labels",
        ),
        (
            pod(json!({"palisade.io/injected": "0.1.0"}), web_spec()),
            "only the webhook writes it",
        ),
        (
            {
                let mut spec = web_spec();
                spec["hostNetwork"] = json!(true);
                pod(Value::Null, spec)
            },
            "set spec.hostNetwork to false",
        ),
        (
            {
                let mut spec = web_spec();
                spec["securityContext"] = json!({"runAsUser": 1337});
                pod(Value::Null, spec)
            },
            "set runAsUser (of the container or the pod) to another uid than 1337",
        ),
        (
            pod(
                json!({"palisade.io/exclude-outbound-ports": "5432"}),
                web_spec(),
            ),
            "outbound exclusions are the platform's",
        ),
        (
            pod(
                json!({"palisade.io/exclude-inbound-ports": "9090"}),
                web_spec(),
            ),
            "add it to excludablePorts of an InboundPolicy selecting the pod",
        ),
    ];
    let mut n = 0;
    for (pod, fix) in &cases {
        let message = refused(&injector, pod);
        assert!(
            message.contains("namespace demo enforces the mesh"),
            "{message}"
        );
        assert!(message.contains(fix), "{message} does not say {fix:?}");
        n += 1;
    }

    // Each container kind, each field.
    let bad: Vec<(Value, &str)> = vec![
        (json!({"runAsUser": 1337}), "runs as uid 1337"),
        (
            json!({"privileged": true}),
            "remove securityContext.privileged",
        ),
        (
            json!({"capabilities": {"add": ["NET_ADMIN"]}}),
            "remove NET_ADMIN",
        ),
        (
            json!({"capabilities": {"add": ["net_raw"]}}),
            "remove net_raw",
        ),
        (
            json!({"capabilities": {"add": ["CAP_NET_ADMIN"]}}),
            "remove CAP_NET_ADMIN",
        ),
        (json!({"capabilities": {"add": ["ALL"]}}), "remove ALL"),
        (
            json!({"capabilities": {"add": ["SYS_ADMIN"]}}),
            "remove SYS_ADMIN",
        ),
        (json!({"capabilities": {"add": ["bpf"]}}), "remove bpf"),
    ];
    for kind in ["initContainers", "containers", "ephemeralContainers"] {
        for (context, fix) in &bad {
            let container = json!({"name": "tool", "image": "tool:1", "securityContext": context});
            let message = refused(
                &injector,
                &pod(Value::Null, with_container(kind, container)),
            );
            assert!(message.contains(fix), "{kind}: {message}");
            assert!(
                message.contains("\"tool\""),
                "names the container: {message}"
            );
            n += 1;
        }
        let ours = json!({"name": "palisade-sidecar", "image": "fake:1"});
        let message = refused(&injector, &pod(Value::Null, with_container(kind, ours)));
        assert!(
            message.contains("rename the container"),
            "{kind}: {message}"
        );
        n += 1;
    }
    assert_eq!(count(&registry, "denied", "enforced"), n);

    // The container's own uid wins over the pod's, both ways.
    let mut spec = with_container(
        "containers",
        json!({"name": "tool", "image": "tool:1", "securityContext": {"runAsUser": 1000}}),
    );
    spec["securityContext"] = json!({"runAsUser": 1337});
    spec["containers"][0]["securityContext"] = json!({"runAsUser": 1000});
    injected(&injector, &pod(Value::Null, spec));
    // Harmless capabilities pass.
    let harmless = json!({"name": "tool", "image": "tool:1",
        "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}}});
    injected(
        &injector,
        &pod(Value::Null, with_container("containers", harmless)),
    );
}

#[test]
fn a_namespace_that_does_not_enforce_keeps_the_pod_s_choices() {
    let (injector, _, _) = enforcing(&[]);
    let mut opted_out = pod(json!({"palisade.io/inject": "false"}), web_spec());
    opted_out["metadata"]["namespace"] = json!("open");
    let mut review = review_json(&opted_out, "CREATE");
    review["request"]["namespace"] = json!("open");
    let reply = injector.review(&serde_json::to_vec(&review).expect("json"));
    let body = reply.body();
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"]["patch"].is_null(), "opted out: {body}");
}

#[test]
fn loosening_annotations_need_a_policy_and_tightening_ones_are_honoured() {
    let (injector, _, _) = enforcing(&[
        (
            "web-strict",
            json!({"podSelector": {"matchLabels": {"app": "web"}}, "mode": "strict",
                   "excludablePorts": [9090, "metrics"]}),
        ),
        // An audit policy sets no mode, but its exclusions are granted.
        (
            "web-trial",
            json!({"mode": "permissive", "enforcement": "audit", "excludablePorts": [7070]}),
        ),
    ]);
    let mut spec = web_spec();
    spec["containers"][0]["ports"] = json!([{"name": "metrics", "containerPort": 9100}]);

    // Strict by the policy: permissive would loosen it.
    let message = refused(
        &injector,
        &pod(
            json!({"palisade.io/inbound-mode": "permissive"}),
            spec.clone(),
        ),
    );
    assert!(
        message.contains("set mode: permissive in an InboundPolicy"),
        "{message}"
    );
    // Without the annotation the sidecar starts strict, as the policy says.
    let patched = injected(&injector, &pod(Value::Null, spec.clone()));
    let sidecar = env_of(&patched["spec"]["initContainers"][1]);
    assert_eq!(env(&sidecar, "PALISADE_INBOUND_MODE"), Some("strict"));
    // Strict asked for: honoured.
    injected(
        &injector,
        &pod(json!({"palisade.io/inbound-mode": "strict"}), spec.clone()),
    );

    // Exclusions the policies list (by number, by container port name, by
    // the audit policy) pass; another is refused and named.
    let patched = injected(
        &injector,
        &pod(
            json!({"palisade.io/exclude-inbound-ports": "9090,9100,7070"}),
            spec.clone(),
        ),
    );
    let init = env_of(&patched["spec"]["initContainers"][0]);
    assert_eq!(
        env(&init, "PALISADE_EXCLUDE_INBOUND_PORTS"),
        Some("7070,9090,9100")
    );
    let message = refused(
        &injector,
        &pod(
            json!({"palisade.io/exclude-inbound-ports": "9090,8080"}),
            spec.clone(),
        ),
    );
    assert!(
        message.contains("remove 8080 from the annotation"),
        "{message}"
    );

    // A pod the strict policy does not select: the mesh default
    // (permissive) holds, and the audit policy sets no mode.
    let mut other = pod(
        json!({"palisade.io/inbound-mode": "permissive"}),
        web_spec(),
    );
    other["metadata"]["labels"] = json!({"app": "batch"});
    injected(&injector, &other);
}

#[test]
fn until_the_caches_sync_every_pod_review_is_answered_503() {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).expect("fresh registry");
    let config = InjectionConfig::parse(CONFIG).expect("valid config");
    let td: palisade_proto::TrustDomain = "cluster.local".parse().expect("trust domain");
    let discovery = Discovery::new(td.clone());
    let injector = Injector::new(config, td, metrics, None).with_posture(discovery.clone());
    let (status, body, _) = run(&injector, &pod(Value::Null, web_spec()));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["response"]["allowed"], false);
    assert!(
        body["response"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not synced")),
        "{body}"
    );
    assert_eq!(count(&registry, "denied", "not_synced"), 1);
    discovery.mark_synced();
    let (status, body, _) = run(&injector, &pod(Value::Null, web_spec()));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["allowed"], true);
}

#[test]
fn the_enforce_entry_enforces_without_caches_and_before_they_see_the_label() {
    let opted_out = pod(json!({"palisade.io/inject": "false"}), web_spec());
    let permissive = pod(
        json!({"palisade.io/inbound-mode": "permissive"}),
        web_spec(),
    );
    let excluded = pod(
        json!({"palisade.io/exclude-inbound-ports": "8080"}),
        web_spec(),
    );
    let allowed = |injector: &Injector, entry: Entry, pod: &Value| {
        let body = injector.review_at(entry, &review_of(pod, "CREATE")).body();
        body["response"]["allowed"].as_bool().expect("an answer")
    };

    // No kubernetes discovery source: /inject keeps the pod's choices,
    // /enforce refuses them; the mesh default (strict here) is the mode.
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).expect("fresh registry");
    let mut config = InjectionConfig::parse(CONFIG).expect("valid config");
    config.sidecar.inbound_mode = InboundMode::Strict;
    let td: palisade_proto::TrustDomain = "cluster.local".parse().expect("trust domain");
    let injector = Injector::new(config, td, metrics, None);
    for pod in [&opted_out, &permissive, &excluded] {
        assert!(allowed(&injector, Entry::Inject, pod), "{pod}");
        assert!(!allowed(&injector, Entry::Enforce, pod), "{pod}");
    }
    assert!(allowed(
        &injector,
        Entry::Enforce,
        &pod(Value::Null, web_spec())
    ));
    assert_eq!(count(&registry, "denied", "enforced"), 3);

    // With caches that do not (yet) know the namespace as enforcing, the
    // entry the cluster admin configured still decides.
    let (injector, _, discovery) = enforcing(&[]);
    discovery.replace_namespaces(vec![("demo".to_owned(), false)]);
    assert!(allowed(&injector, Entry::Inject, &opted_out));
    assert!(!allowed(&injector, Entry::Enforce, &opted_out));
}

fn ephemeral_review(old: &Value, new: &Value) -> Vec<u8> {
    let mut review = review_json(new, "UPDATE");
    review["request"]["uid"] = json!("b1d4c2a0-0000-4000-8000-000000000002");
    review["request"]["subResource"] = json!("ephemeralcontainers");
    review["request"]["name"] = json!("web-1");
    review["request"]["oldObject"] = old.clone();
    serde_json::to_vec(&review).expect("serializable")
}

#[test]
fn kubectl_debug_gets_no_container_that_bypasses_the_capture() {
    let (injector, registry, _) = enforcing(&[]);
    let mut old = pod(Value::Null, web_spec());
    old["metadata"]["name"] = json!("web-1");
    // An earlier debug container (admitted before) is not judged again.
    old["spec"]["ephemeralContainers"] = json!([{"name": "debugger-old", "image": "busybox", "securityContext": {"privileged": true}}]);
    let with = |container: Value| {
        let mut new = old.clone();
        new["spec"]["ephemeralContainers"]
            .as_array_mut()
            .expect("list")
            .push(container);
        new
    };
    let answer = |new: &Value| injector.review(&ephemeral_review(&old, new)).body();

    let fine = answer(&with(json!({"name": "debugger", "image": "busybox"})));
    assert_eq!(fine["response"]["allowed"], true, "{fine}");
    assert!(fine["response"]["patch"].is_null());
    for context in [
        json!({"runAsUser": 1337}),
        json!({"capabilities": {"add": ["NET_ADMIN"]}}),
        json!({"privileged": true}),
    ] {
        let body = answer(&with(
            json!({"name": "debugger", "image": "busybox", "securityContext": context}),
        ));
        assert_eq!(body["response"]["allowed"], false, "{context}: {body}");
        let message = body["response"]["status"]["message"]
            .as_str()
            .expect("message");
        assert!(
            message.contains("ephemeral container \"debugger\""),
            "{message}"
        );
    }
    assert_eq!(count(&registry, "denied", "enforced"), 3);

    // ptrace (kubectl debug --profile=general) of the app is fine; of the
    // sidecar, or in a pod whose containers share one process namespace,
    // it would drive the uncaptured proxy.
    let ptrace = json!({"capabilities": {"add": ["SYS_PTRACE"]}});
    let app = answer(&with(json!({"name": "debugger", "image": "busybox",
        "targetContainerName": "web", "securityContext": ptrace})));
    assert_eq!(app["response"]["allowed"], true, "{app}");
    let sidecar = answer(&with(json!({"name": "debugger", "image": "busybox",
        "targetContainerName": "palisade-sidecar", "securityContext": ptrace})));
    assert_eq!(sidecar["response"]["allowed"], false, "{sidecar}");
    old["spec"]["shareProcessNamespace"] = json!(true);
    let answer = |new: &Value| injector.review(&ephemeral_review(&old, new)).body();
    let mut shared = old.clone();
    shared["spec"]["ephemeralContainers"]
        .as_array_mut()
        .expect("list")
        .push(json!({"name": "debugger", "image": "busybox", "securityContext": ptrace}));
    let shared = answer(&shared);
    assert_eq!(shared["response"]["allowed"], false, "{shared}");
    assert!(
        shared["response"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("remove SYS_PTRACE")),
        "{shared}"
    );
    assert_eq!(count(&registry, "denied", "enforced"), 5);
}
