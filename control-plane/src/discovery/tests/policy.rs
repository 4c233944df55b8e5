//! Policies over the discovery stream: selection, resolution, and delivery
//! to the one pod a policy selects, with the deny list to every stream.

use std::time::Duration;

use palisade_proto::discovery::v1::{self as wire, WatchResponse};
use serde_json::json;

use super::{pod, td, with};
use crate::{
    discovery::Discovery,
    policy::{
        DenyDef, IdentityDenyList, InboundPolicy, MeshDefault, PodFacts, PolicyDef, pod_policy,
    },
};

const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B: &str = "spiffe://cluster.local/ns/shop/sa/b";

fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> InboundPolicy {
    serde_json::from_value(json!({
        "apiVersion": "policy.palisade.io/v1alpha1",
        "kind": "InboundPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    }))
    .expect("an InboundPolicy")
}

fn deny_list(name: &str, spec: serde_json::Value) -> IdentityDenyList {
    serde_json::from_value(json!({
        "apiVersion": "policy.palisade.io/v1alpha1",
        "kind": "IdentityDenyList",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("an IdentityDenyList")
}

/// A meshed pod of `shop` with `labels` and an app container declaring
/// 8080 as `http` and 9090 unnamed.
fn labelled(
    uid: &str,
    account: &str,
    address: &str,
    labels: serde_json::Value,
) -> k8s_openapi::api::core::v1::Pod {
    with(pod(uid, "shop", uid, account, address, true), |v| {
        v["metadata"]["labels"] = labels;
        v["spec"]["containers"][0]["ports"] = json!([
            {"name": "http", "containerPort": 8080},
            {"containerPort": 9090},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        ]);
    })
}

const MESH: MeshDefault = MeshDefault {
    mode: crate::policy::resources::Mode::Permissive,
    action: crate::policy::resources::Action::Allow,
};

#[test]
fn the_chart_ships_exactly_the_generated_crds() {
    let chart = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/palisade/files/crds.yaml"
    ))
    .expect("the chart's CRD file");
    assert!(
        chart == crate::policy::crds_yaml(),
        "helm/palisade/files/crds.yaml is not what the code generates: run \
         `cargo run -p palisade-control-plane -- crds > helm/palisade/files/crds.yaml`"
    );
}

#[test]
fn a_policy_selects_by_namespace_and_labels_and_resolves_named_ports() {
    let web = PodFacts::of(&labelled(
        "w",
        "web",
        "198.18.0.2",
        json!({"app": "web", "tier": "front"}),
    ));
    assert_eq!(
        web.declared_ports,
        [8080, 9090],
        "TCP only, the sidecar's own left out"
    );
    assert_eq!(web.named_ports.get("http"), Some(&8080));
    let other = PodFacts {
        namespace: "other".into(),
        ..web.clone()
    };
    let cases = [
        (json!({}), true),
        (
            json!({"podSelector": {"matchLabels": {"app": "web"}}}),
            true,
        ),
        (
            json!({"podSelector": {"matchLabels": {"app": "db"}}}),
            false,
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "x"]}]}}),
            true,
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]}}),
            false,
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}}),
            true,
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "canary", "operator": "Exists"}]}}),
            false,
        ),
        // Malformed (In without values): read the strictest way, every pod.
        (
            json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In"}]}}),
            true,
        ),
    ];
    for (spec, selects) in cases {
        let def = PolicyDef::of(&policy("shop", "p", spec.clone()), &td());
        assert_eq!(def.selects(&web), selects, "{spec}");
        assert!(!def.selects(&other), "another namespace's pod: {spec}");
    }

    let def = PolicyDef::of(
        &policy(
            "shop",
            "p",
            json!({"rules": [
                {"ports": ["http", 9090, "grpc"], "allow": [
                    {"serviceAccount": {"namespace": "shop", "name": "a"}},
                    {"namespace": "monitoring"},
                    {"identity": B},
                    {"identity": "spiffe://other.td/ns/x/sa/y"},
                    {"identity": A, "namespace": "shop"},
                ]},
                {"ports": ["grpc"], "allow": [{"namespace": "x"}]},
            ]}),
        ),
        &td(),
    );
    assert_eq!(def.problems.len(), 2, "{:?}", def.problems);
    let sent = pod_policy(&web, [&def], MESH);
    assert_eq!(sent.policies.len(), 1);
    let rules = &sent.policies[0].rules;
    assert_eq!(
        rules.len(),
        1,
        "the rule of only undeclared names covers nothing"
    );
    assert_eq!(rules[0].ports, [8080, 9090]);
    assert_eq!(rules[0].identities, [A, B]);
    assert_eq!(rules[0].namespaces, ["monitoring"]);
    assert_eq!(sent.declared_ports, [8080, 9090]);
}

#[test]
fn the_version_is_the_content_and_a_pod_annotation_only_tightens() {
    let facts = PodFacts::of(&labelled("w", "web", "198.18.0.2", json!({"app": "web"})));
    let def = PolicyDef::of(
        &policy("shop", "p", json!({"defaultAction": "deny"})),
        &td(),
    );
    let one = pod_policy(&facts, [&def], MESH);
    let again = pod_policy(&facts, [&def.clone()], MESH);
    assert_eq!(one.version, again.version);
    assert_eq!(one.version.len(), 12);
    let changed = PolicyDef::of(
        &policy("shop", "p", json!({"defaultAction": "allow"})),
        &td(),
    );
    assert_ne!(pod_policy(&facts, [&changed], MESH).version, one.version);
    assert!(!one.pod_strict);

    for (annotation, strict) in [("strict", true), ("permissive", false)] {
        let annotated = with(labelled("w", "web", "198.18.0.2", json!({})), |v| {
            v["metadata"]["annotations"] = json!({"palisade.io/inbound-mode": annotation});
        });
        assert_eq!(PodFacts::of(&annotated).strict, strict, "{annotation}");
    }
}

#[test]
fn deny_lists_merge_and_drop_what_cannot_be_an_identity() {
    let merged = DenyDef::of(
        &[
            deny_list(
                "one",
                json!({"identities": [A, "spiffe://other.td/ns/a/sa/b", "nope"]}),
            ),
            deny_list(
                "two",
                json!({"identities": [A], "namespaces": ["sandbox", "a/b"]}),
            ),
        ],
        &td(),
    );
    assert_eq!(merged.identities.iter().collect::<Vec<_>>(), [A]);
    assert_eq!(merged.namespaces.iter().collect::<Vec<_>>(), ["sandbox"]);
    assert_eq!(merged.problems.len(), 3, "{:?}", merged.problems);
    let wire = merged.wire();
    assert_eq!(wire.identities, [A]);
    assert_ne!(wire.version, DenyDef::default().wire().version);
}

#[test]
fn a_policy_change_reaches_only_the_streams_it_concerns() {
    let discovery = Discovery::new(td());
    let b = labelled("b", "b", "198.18.0.2", json!({"app": "b"}));
    let a = labelled("a", "a", "198.18.0.1", json!({"app": "a"}));
    discovery.apply_pod(&a);
    discovery.apply_pod(&b);
    let (_, mut rx) = discovery.subscribe();
    discovery.put_policy(
        "shop/b-in".into(),
        Some(PolicyDef::of(
            &policy(
                "shop",
                "b-in",
                json!({"podSelector": {"matchLabels": {"app": "b"}}, "defaultAction": "deny"}),
            ),
            &td(),
        )),
    );
    let change = rx.try_recv().expect("a change");
    assert!(change.policies.covers("b", "shop") && change.policies.covers("a", "shop"));
    assert!(!change.policies.covers("x", "web"));
    let b_policy = discovery.pod_policy("b").expect("b is meshed");
    assert_eq!(b_policy.policies.len(), 1);
    assert_eq!(discovery.pod_policy("a").expect("a too").policies.len(), 0);

    // A label change is b's alone.
    discovery.apply_pod(&with(b.clone(), |v| {
        v["metadata"]["labels"] = json!({"app": "b2"})
    }));
    let change = rx.try_recv().expect("a change");
    assert!(change.policies.covers("b", "shop"));
    assert!(!change.policies.covers("a", "shop"));
    // A status flip that changes nothing of its policy is nobody's.
    discovery.apply_pod(&with(b, |v| {
        v["metadata"]["labels"] = json!({"app": "b2"});
        v["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    }));
    assert!(rx.try_recv().is_err(), "nothing to send");
}

mod against_the_api_server {
    use palisade_tests::kube::ApiServer;

    use super::{super::against_the_api_server::follow, *};
    use crate::discovery::tests::stream::{Stream, next, open, request, service};

    const WAIT: Duration = Duration::from_secs(10);

    /// The next message on `stream` that carries a policy or a deny list.
    async fn next_policy(stream: &mut Stream) -> WatchResponse {
        tokio::time::timeout(WAIT, async {
            loop {
                let message = next(stream).await.expect("the stream goes on");
                if message.policy.is_some() || message.deny_list.is_some() {
                    return message;
                }
            }
        })
        .await
        .expect("a policy message in time")
    }

    /// Nothing on `stream` for a moment, or nothing of policy.
    async fn quiet(stream: &mut Stream) {
        let got = tokio::time::timeout(Duration::from_millis(500), next_policy(stream)).await;
        assert!(got.is_err(), "another pod's stream got {got:?}");
    }

    fn names(policy: &wire::PodPolicy) -> Vec<&str> {
        policy.policies.iter().map(|p| p.name.as_str()).collect()
    }

    fn object(value: serde_json::Value) -> serde_json::Value {
        value
    }

    #[tokio::test]
    async fn policies_reach_the_stream_of_the_selected_pod_and_no_other_and_the_deny_list_every_stream()
     {
        let api = ApiServer::start().await.expect("stand-in");
        for p in [
            labelled("a", "a", "198.18.0.1", json!({"app": "a"})),
            labelled("b", "b", "198.18.0.2", json!({"app": "b"})),
        ] {
            api.upsert(serde_json::to_value(p).expect("json"))
                .expect("pod");
        }
        let (discovery, source) = follow(&api).await;
        let (svc, _registry) = service(&discovery);
        let mut a = open(&svc, request("198.18.0.1", Some(A), WAIT * 6))
            .await
            .expect("a's stream");
        let mut b = open(&svc, request("198.18.0.2", Some(B), WAIT * 6))
            .await
            .expect("b's stream");
        for (stream, who) in [(&mut a, "a"), (&mut b, "b")] {
            let first = next(stream).await.expect("the snapshot");
            assert!(first.snapshot);
            let policy = first
                .policy
                .expect("the snapshot's first part carries the policy");
            assert!(policy.policies.is_empty(), "{who}: no policy yet");
            assert_eq!(policy.default_action(), wire::Action::Allow);
            assert!(
                first
                    .deny_list
                    .expect("and the deny list")
                    .identities
                    .is_empty()
            );
        }

        // Created: b's stream only.
        let spec = json!({"podSelector": {"matchLabels": {"app": "b"}}, "defaultAction": "deny",
            "rules": [{"ports": ["http"], "allow": [{"serviceAccount": {"namespace": "shop", "name": "a"}}]}]});
        api.upsert(object(json!({
            "apiVersion": "policy.palisade.io/v1alpha1", "kind": "InboundPolicy",
            "metadata": {"namespace": "shop", "name": "b-in"}, "spec": spec,
        })))
        .expect("policy");
        let got = next_policy(&mut b).await.policy.expect("b's policy");
        assert_eq!(names(&got), ["shop/b-in"]);
        assert_eq!(got.policies[0].default_action(), wire::Action::Deny);
        assert_eq!(
            got.policies[0].rules[0].ports,
            [8080],
            "the named port resolved for b"
        );
        assert_eq!(got.policies[0].rules[0].identities, [A]);
        quiet(&mut a).await;

        // Changed to audit: b again, a still nothing.
        let mut audit = spec.clone();
        audit["enforcement"] = json!("audit");
        api.upsert(object(json!({
            "apiVersion": "policy.palisade.io/v1alpha1", "kind": "InboundPolicy",
            "metadata": {"namespace": "shop", "name": "b-in"}, "spec": audit,
        })))
        .expect("policy");
        let changed = next_policy(&mut b).await.policy.expect("b's policy");
        assert!(changed.policies[0].audit);
        assert_ne!(changed.version, got.version);
        quiet(&mut a).await;

        // A policy in another namespace concerns neither.
        api.upsert(object(json!({
            "apiVersion": "policy.palisade.io/v1alpha1", "kind": "InboundPolicy",
            "metadata": {"namespace": "web", "name": "all"}, "spec": {"defaultAction": "deny"},
        })))
        .expect("policy");
        quiet(&mut b).await;

        // The deny list: every stream.
        api.upsert(object(json!({
            "apiVersion": "policy.palisade.io/v1alpha1", "kind": "IdentityDenyList",
            "metadata": {"name": "incident"}, "spec": {"identities": [A]},
        })))
        .expect("deny list");
        for stream in [&mut a, &mut b] {
            let list = next_policy(stream).await.deny_list.expect("the deny list");
            assert_eq!(list.identities, [A]);
        }

        // Deleted: b back to the mesh default.
        api.remove("inboundpolicies.policy.palisade.io", Some("shop"), "b-in")
            .expect("deleted");
        let gone = next_policy(&mut b).await.policy.expect("b's policy");
        assert!(gone.policies.is_empty());
        quiet(&mut a).await;
        source.abort();
    }
}

#[test]
fn the_file_source_carries_policies_and_deny_lists() {
    let yaml = "workloads:\n\
        \x20 - name: shop/a\n    addresses: [198.18.0.1]\n    identity: spiffe://cluster.local/ns/shop/sa/a\n    labels: {app: a}\n\
        \x20 - name: shop/b\n    addresses: [198.18.0.2]\n    identity: spiffe://cluster.local/ns/shop/sa/b\n    labels: {app: b}\n    ports: [{name: http, port: 8080}, 9090]\n\
        policies:\n\
        \x20 - name: shop/b-inbound\n    spec:\n      podSelector: {matchLabels: {app: b}}\n      defaultAction: deny\n      rules: [{ports: [http], allow: [{serviceAccount: {namespace: shop, name: a}}]}]\n\
        denyLists:\n\
        \x20 - name: incident\n    spec: {identities: [spiffe://cluster.local/ns/shop/sa/c]}\n";
    let parsed = crate::discovery::file::parse(yaml, &td()).expect("a valid file");
    let discovery = Discovery::new(td());
    let (_, mut rx) = discovery.subscribe();
    discovery.replace_file(parsed);
    let change = rx.try_recv().expect("a change");
    assert!(change.policies.all);
    assert_eq!(
        change.deny_list.as_ref().expect("the deny list").identities,
        ["spiffe://cluster.local/ns/shop/sa/c"]
    );
    let b = discovery.pod_policy("file/shop/b").expect("b");
    assert_eq!(b.policies.len(), 1, "{b:?}");
    assert_eq!(b.policies[0].rules[0].ports, [8080]);
    assert_eq!(b.declared_ports, [8080, 9090]);
    assert!(
        discovery
            .pod_policy("file/shop/a")
            .expect("a")
            .policies
            .is_empty()
    );
    assert!(
        crate::discovery::file::parse("policies: [{name: nonamespace, spec: {}}]", &td()).is_err()
    );
    let twice = "workloads:\n\
        \x20 - {name: shop/a, addresses: [198.18.0.1], unmeshed: true}\n\
        \x20 - {name: shop/a, addresses: [198.18.0.2], unmeshed: true}\n";
    let error = crate::discovery::file::parse(twice, &td()).expect_err("a name twice");
    assert_eq!(
        error.to_string(),
        "workload 2: the name shop/a is taken by workload 1"
    );
}
