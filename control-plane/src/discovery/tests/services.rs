//! Services in the discovery model: cluster addresses to ready endpoints,
//! each answered from the pod directory.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use k8s_openapi::api::{core::v1::Service as KubeService, discovery::v1::EndpointSlice};
use palisade_proto::discovery::{Endpoint, Service, ServicePort};
use serde_json::{Value, json};

use super::*;
use crate::discovery::{
    Discovery, ServiceDef, SliceDef,
    services::{service_key, slice_key},
};

fn kube_service(name: &str, cluster_ips: &[&str], ports: Value) -> KubeService {
    serde_json::from_value(json!({
        "metadata": {"namespace": "shop", "name": name},
        "spec": {"clusterIP": cluster_ips[0], "clusterIPs": cluster_ips, "ports": ports},
    }))
    .expect("a service")
}

fn kube_slice(
    name: &str,
    service: &str,
    family: &str,
    ports: Value,
    endpoints: Value,
) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"namespace": "shop", "name": name, "uid": format!("uid-{name}"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("a slice")
}

/// A ready endpoint at `address` with a Pod behind it.
fn ready(address: &str) -> Value {
    json!({"addresses": [address], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "p"}})
}

fn endpoint(address: &str, identity: Option<&str>) -> Endpoint {
    Endpoint {
        address: address.parse::<SocketAddr>().expect("address"),
        identity: identity.map(id),
    }
}

fn put_service(discovery: &Discovery, service: &KubeService) {
    discovery.put_service(service_key(service), ServiceDef::of(service));
}

fn put_slice(discovery: &Discovery, slice: &EndpointSlice) {
    discovery.put_slice(slice_key(slice), SliceDef::of(slice));
}

const B2: &str = "spiffe://cluster.local/ns/shop/sa/b2";
const WEB: &str = "198.19.0.10";

/// b-1 (meshed, b) on .2, b-2 (meshed, b2) on .3, db (unmeshed) on .8, two
/// pods on .9; the Service shop/web on 198.19.0.10 port 80 → 8080.
fn shop() -> Arc<Discovery> {
    let discovery = Discovery::new(td());
    discovery.replace_pods(&[
        pod("u1", "shop", "b-1", "b", "198.18.0.2", true),
        pod("u2", "shop", "b-2", "b2", "198.18.0.3", true),
        pod("u3", "shop", "db", "db", "198.18.0.8", false),
        pod("u4", "shop", "x", "x", "198.18.0.9", true),
        pod("u5", "evil", "y", "y", "198.18.0.9", true),
    ]);
    put_service(
        &discovery,
        &kube_service(
            "web",
            &[WEB],
            json!([{"name": "http", "port": 80, "targetPort": 8080},
                   {"name": "dns", "port": 53, "protocol": "UDP"}]),
        ),
    );
    discovery
}

#[test]
fn a_service_leads_to_its_ready_endpoints_each_answered_by_the_pod_there() {
    let discovery = shop();
    put_slice(
        &discovery,
        &kube_slice(
            "web-a",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
            json!([
                ready("198.18.0.2"),
                ready("198.18.0.3"),
                ready("198.18.0.8"),
                // Two pods claim it: it fails closed, so it is left out.
                ready("198.18.0.9"),
                // A Pod behind it that discovery does not know (yet): left out.
                ready("198.18.0.7"),
                // Not ready.
                {"addresses": ["198.18.0.4"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod"}},
                // Hand-written, no pod behind it: plain TCP.
                {"addresses": ["198.18.5.5"]},
            ]),
        ),
    );
    let web = discovery.service(ip(WEB)).expect("known");
    assert_eq!(
        *web,
        Service {
            name: "shop/web".into(),
            // The UDP port is not kept.
            ports: vec![ServicePort {
                port: 80,
                endpoints: vec![
                    endpoint("198.18.0.2:8080", Some(B)),
                    endpoint("198.18.0.3:8080", Some(B2)),
                    endpoint("198.18.0.8:8080", None),
                    endpoint("198.18.5.5:8080", None),
                ],
            }],
        }
    );
    assert_eq!(discovery.services(), 1);
}

#[test]
fn the_identity_is_never_the_slices_own() {
    // A slice naming another namespace's pod (by address, or by a target
    // reference it writes itself) gets that pod's identity, nothing else.
    let discovery = shop();
    put_slice(
        &discovery,
        &kube_slice(
            "web-a",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": ["198.18.0.2"], "targetRef": {"kind": "Pod", "namespace": "evil", "name": "y"},
                    "hostname": "spiffe://cluster.local/ns/evil/sa/y"}]),
        ),
    );
    let web = discovery.service(ip(WEB)).expect("known");
    assert_eq!(
        web.ports[0].endpoints,
        [endpoint("198.18.0.2:8080", Some(B))]
    );
}

#[test]
fn without_ready_endpoints_the_serving_terminating_ones_are_used() {
    let discovery = shop();
    let terminating = |address: &str| {
        json!({"addresses": [address], "targetRef": {"kind": "Pod"},
               "conditions": {"ready": false, "serving": true, "terminating": true}})
    };
    let slice = |endpoints| {
        kube_slice(
            "web-a",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            endpoints,
        )
    };
    put_slice(&discovery, &slice(json!([terminating("198.18.0.2")])));
    assert_eq!(
        discovery.service(ip(WEB)).expect("known").ports[0].endpoints,
        [endpoint("198.18.0.2:8080", Some(B))]
    );
    put_slice(
        &discovery,
        &slice(json!([terminating("198.18.0.2"), ready("198.18.0.3")])),
    );
    assert_eq!(
        discovery.service(ip(WEB)).expect("known").ports[0].endpoints,
        [endpoint("198.18.0.3:8080", Some(B2))]
    );
    // No endpoint at all: the port is still known, with nothing behind it.
    put_slice(&discovery, &slice(json!([])));
    assert!(
        discovery.service(ip(WEB)).expect("known").ports[0]
            .endpoints
            .is_empty()
    );
}

#[test]
fn headless_and_external_name_services_have_no_cluster_address_and_dual_stack_has_two() {
    let headless = kube_service("h", &["None"], json!([{"port": 80}]));
    assert_eq!(ServiceDef::of(&headless), None);
    let external: KubeService = serde_json::from_value(json!({
        "metadata": {"namespace": "shop", "name": "e"},
        "spec": {"type": "ExternalName", "externalName": "example.org"},
    }))
    .expect("a service");
    assert_eq!(ServiceDef::of(&external), None);
    // An FQDN slice holds no addresses.
    let fqdn = kube_slice(
        "f",
        "e",
        "FQDN",
        json!([]),
        json!([{"addresses": ["example.org"]}]),
    );
    assert_eq!(SliceDef::of(&fqdn), None);

    let discovery = Discovery::new(td());
    let v6: Pod = with(pod("u1", "shop", "b-1", "b", "198.18.0.2", true), |v| {
        v["status"]["podIPs"] = json!([{"ip": "198.18.0.2"}, {"ip": "2001:db8::2"}]);
    });
    discovery.replace_pods(&[v6]);
    put_service(
        &discovery,
        &kube_service(
            "web",
            &[WEB, "2001:db8:1::10"],
            json!([{"name": "", "port": 80}]),
        ),
    );
    for (name, family, address) in [("w4", "IPv4", "198.18.0.2"), ("w6", "IPv6", "2001:db8::2")] {
        put_slice(
            &discovery,
            &kube_slice(
                name,
                "web",
                family,
                json!([{"port": 8080}]),
                json!([ready(address)]),
            ),
        );
    }
    assert_eq!(
        discovery.service(ip(WEB)).expect("v4").ports[0].endpoints,
        [endpoint("198.18.0.2:8080", Some(B))]
    );
    assert_eq!(
        discovery.service(ip("2001:db8:1::10")).expect("v6").ports[0].endpoints,
        [endpoint("[2001:db8::2]:8080", Some(B))]
    );
}

#[tokio::test]
async fn a_pod_that_changes_changes_the_services_behind_it_in_the_same_batch() {
    let discovery = shop();
    let slice = kube_slice(
        "web-a",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([ready("198.18.0.2"), ready("198.18.0.3")]),
    );
    put_slice(&discovery, &slice);
    let (snapshot, mut rx) = discovery.subscribe();
    assert_eq!(snapshot.services.len(), 1);

    // b-1 is recreated under another service account on the same address.
    discovery.delete_pod(&pod("u1", "shop", "b-1", "b", "198.18.0.2", true));
    let change = rx.recv().await.expect("a change");
    assert_eq!(change.addresses, [(ip("198.18.0.2"), None)]);
    let (at, web) = &change.services[0];
    assert_eq!(*at, ip(WEB));
    assert_eq!(
        web.as_ref().expect("still there").ports[0].endpoints,
        [endpoint("198.18.0.3:8080", Some(B2))],
        "an endpoint whose pod is gone is left out at once"
    );
    discovery.apply_pod(&pod("u6", "shop", "b-1", "other", "198.18.0.2", true));
    let change = rx.recv().await.expect("a change");
    assert_eq!(change.services.len(), 1);
    assert_eq!(
        change.services[0].1.as_ref().expect("there").ports[0].endpoints[0],
        endpoint(
            "198.18.0.2:8080",
            Some("spiffe://cluster.local/ns/shop/sa/other")
        )
    );

    // A readiness flip that resolves the same sends nothing.
    discovery.apply_pod(&with(
        pod("u6", "shop", "b-1", "other", "198.18.0.2", true),
        |v| {
            v["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
        },
    ));
    // The slice goes: the Service stays, with nothing behind it; then the
    // Service goes.
    discovery.put_slice(slice_key(&slice), None);
    let change = rx.recv().await.expect("a change");
    assert!(
        change.addresses.is_empty(),
        "the readiness flip sent nothing"
    );
    assert!(
        change.services[0].1.as_ref().expect("there").ports[0]
            .endpoints
            .is_empty()
    );
    discovery.put_service("shop/web".into(), None);
    let change = rx.recv().await.expect("a change");
    assert_eq!(change.services, [(ip(WEB), None)]);
    assert_eq!(discovery.services(), 0);
}

#[test]
fn a_relist_replaces_every_service_and_names_what_vanished() {
    let discovery = shop();
    let (_, mut rx) = discovery.subscribe();
    discovery.replace_services(vec![(
        "shop/api".into(),
        ServiceDef::of(&kube_service(
            "api",
            &["198.19.0.11"],
            json!([{"port": 443}]),
        )),
    )]);
    let change = rx.try_recv().expect("a change");
    let mut names: Vec<_> = change
        .services
        .iter()
        .map(|(a, s)| (*a, s.as_ref().map(|s| s.name.clone())))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            (ip(WEB), None),
            (ip("198.19.0.11"), Some("shop/api".into()))
        ]
    );
}

#[test]
fn a_discovery_file_gives_services_the_same_model() {
    let discovery = Discovery::new(td());
    let parsed = super::super::file::parse(
        "workloads:\n  - addresses: [198.18.0.2]\n    identity: spiffe://cluster.local/ns/shop/sa/b\n\
         services:\n  - name: shop/web\n    addresses: [198.19.0.10]\n    ports:\n      - port: 80\n        endpoints: [\"198.18.0.2:8080\", \"198.18.5.5:80\"]\n      - port: 443\n",
        &td(),
    )
    .expect("valid");
    discovery.replace_file(parsed);
    let web = discovery.service(ip(WEB)).expect("known");
    assert_eq!(web.name, "shop/web");
    assert_eq!(
        web.ports,
        [
            ServicePort {
                port: 80,
                endpoints: vec![
                    endpoint("198.18.0.2:8080", Some(B)),
                    endpoint("198.18.5.5:80", None)
                ],
            },
            ServicePort {
                port: 443,
                endpoints: vec![],
            },
        ]
    );

    let refused = |yaml: &str| {
        super::super::file::parse(yaml, &td())
            .expect_err("refused")
            .to_string()
    };
    let workload = "workloads:\n  - name: shop/b\n    addresses: [198.18.0.2]\n    identity: spiffe://cluster.local/ns/shop/sa/b\n";
    assert_eq!(
        refused(&format!(
            "{workload}services:\n  - addresses: [198.18.0.2]\n"
        )),
        "service 1: the address 198.18.0.2 is already shop/b's"
    );
    assert_eq!(
        refused(
            "services:\n  - addresses: [198.19.0.1]\n  - name: two\n    addresses: [198.19.0.1]\n"
        ),
        "service 2: the address 198.19.0.1 is already service 1's"
    );
    assert_eq!(
        refused("services:\n  - addresses: [nope]\n"),
        "service 1: `nope` is not an IP address"
    );
    assert_eq!(
        refused("services:\n  - ports: []\n"),
        "service 1: no addresses"
    );
    for port in ["0", "65536", "80\n      - port: 80"] {
        assert!(
            refused(&format!(
                "services:\n  - addresses: [198.19.0.1]\n    ports:\n      - port: {port}\n"
            ))
            .contains("is not 1 to 65535, or is listed twice"),
            "{port}"
        );
    }
    for bad in ["198.18.0.2", "198.18.0.2:0", "host:80"] {
        assert_eq!(
            refused(&format!(
                "services:\n  - addresses: [198.19.0.1]\n    ports:\n      - port: 80\n        endpoints: [\"{bad}\"]\n"
            )),
            format!("service 1: `{bad}` is not an endpoint (address:port, [v6]:port)")
        );
    }
}

mod against_the_api_server {
    use palisade_tests::kube::ApiServer;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn services_and_slices_are_followed_and_synced_with_the_pods() {
        let api = ApiServer::builder()
            .object(
                serde_json::to_value(pod("u1", "shop", "b-1", "b", "198.18.0.2", true))
                    .expect("json"),
            )
            .object(
                serde_json::to_value(kube_service(
                    "web",
                    &[WEB],
                    json!([{"name": "http", "port": 80}]),
                ))
                .expect("json"),
            )
            .object(
                serde_json::to_value(kube_slice(
                    "web-a",
                    "web",
                    "IPv4",
                    json!([{"name": "http", "port": 8080}]),
                    json!([ready("198.18.0.2")]),
                ))
                .expect("json"),
            )
            .start()
            .await
            .expect("the stand-in starts");
        let (discovery, source) = super::super::against_the_api_server::follow(&api).await;
        let (snapshot, mut rx) = discovery.subscribe();
        assert_eq!(snapshot.addresses.len(), 1);
        assert_eq!(
            snapshot.services[0].1.ports[0].endpoints,
            [endpoint("198.18.0.2:8080", Some(B))]
        );

        // A second endpoint is added by the EndpointSlice controller.
        api.upsert(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "shop", "name": "b-2", "uid": "u2"},
            "spec": {"serviceAccountName": "b2", "containers": [{"name": "app"}],
                     "initContainers": [{"name": "palisade-sidecar", "restartPolicy": "Always"}]},
            "status": {"phase": "Running", "podIP": "198.18.0.3"}}))
            .expect("pod");
        let mut slice = serde_json::to_value(kube_slice(
            "web-a",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([ready("198.18.0.2"), ready("198.18.0.3")]),
        ))
        .expect("json");
        slice["apiVersion"] = json!("discovery.k8s.io/v1");
        slice["kind"] = json!("EndpointSlice");
        api.upsert(slice).expect("slice");
        let seen = tokio::time::timeout(WAIT, async {
            loop {
                let change = rx.recv().await.expect("open");
                if let Some((_, Some(web))) = change.services.first()
                    && web.ports[0].endpoints.len() == 2
                {
                    return web.ports[0].endpoints.clone();
                }
            }
        })
        .await
        .expect("the new endpoint arrives");
        assert_eq!(
            seen,
            [
                endpoint("198.18.0.2:8080", Some(B)),
                endpoint("198.18.0.3:8080", Some(B2))
            ]
        );
        api.remove("services", Some("shop"), "web")
            .expect("deleted");
        tokio::time::timeout(WAIT, async {
            while discovery.service(ip(WEB)).is_some() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the Service goes");
        source.abort();
    }
}
