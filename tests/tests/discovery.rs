//! Discovery end to end on loopback: the control plane binary follows Pods
//! on the stand-in API server (list + watch, bookmarks, `410` relists), and
//! the sidecar's own stream client follows the control plane.
//!
//! Loopback addresses stand in for pod addresses: the stream comes from
//! 127.0.0.1, so the pod at 127.0.0.1 decides whom a stream is bound to.

use std::{net::IpAddr, process::Command, sync::Arc, time::Duration};

use palisade_proto::{
    SpiffeId,
    discovery::{
        Resolution,
        v1::{WatchRequest, discovery_client::DiscoveryClient as GrpcClient},
    },
};
use palisade_sidecar::{
    discovery::{Destinations, DiscoveryClient, Lookup, StreamConfig},
    identity::{IdentityClient, IdentityClientConfig, refresh::Schedule},
    metrics::Metrics,
    tls::{CertStore, Material},
};
use palisade_tests::{
    ControlPlane, bin, eventually_async, grpc_channel, kube::ApiServer, metric, write_tokens,
};
use rustls::pki_types::PrivateKeyDer;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TD: &str = "cluster.local";
const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B: &str = "spiffe://cluster.local/ns/shop/sa/b";
const C: &str = "spiffe://cluster.local/ns/other/sa/c";
const WAIT: Duration = Duration::from_secs(20);

/// The control plane's own credential at the stand-in.
const CONTROL_PLANE_TOKEN: &str = "control-plane-token";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("valid")
}

/// A running pod as the API server reports it; `meshed` adds the injected
/// sidecar (a native sidecar: an init container).
fn pod(namespace: &str, name: &str, account: &str, address: &str, meshed: bool) -> Value {
    let init: Vec<Value> = if meshed {
        vec![json!({"name": "palisade-sidecar", "image": "palisade", "restartPolicy": "Always"})]
    } else {
        Vec::new()
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": format!("uid-{namespace}-{name}"),
            "labels": {"app": name},
        },
        "spec": {
            "serviceAccountName": account,
            "initContainers": init,
            "containers": [{"name": "app", "image": "app"}],
        },
        "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]},
    })
}

/// What the sidecar's table says of `address`, `None` before the first
/// snapshot and for an unknown address.
fn seen(destinations: &Destinations, address: &str) -> Option<Resolution> {
    destinations.resolve(ip(address)).ok().flatten()
}

/// The sidecar's stream to `cp`, retrying quickly.
fn stream_config(cp: &ControlPlane, ca: &std::path::Path) -> StreamConfig {
    StreamConfig {
        control_plane: format!("https://{}", cp.grpc_addr),
        server_name: "localhost".into(),
        bundle_file: ca.join("ca.crt"),
        connect_timeout: Duration::from_secs(5),
        retry: Schedule {
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_millis(200),
            ..Schedule::default()
        },
    }
}

/// A certificate naming `identity`, from a CA of its own, with that CA as
/// the only root: what a forger can make without the mesh's CA.
fn foreign_credentials(identity: &str) -> Material {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, SanType,
    };
    let ca_key = KeyPair::generate().expect("keygen");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = ca.self_signed(&ca_key).expect("self-sign");
    let key = KeyPair::generate().expect("keygen");
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.subject_alt_names = vec![SanType::URI(identity.try_into().expect("ia5"))];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .expect("sign");
    Material {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        roots: vec![root.der().clone()],
    }
}

/// The text of `registry`'s metrics.
fn encode(registry: &prometheus::Registry) -> String {
    let mut text = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut text,
    )
    .expect("encode");
    String::from_utf8(text).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_authenticated_bound_to_their_pod_and_follow_every_pod_and_service_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();

    let api = ApiServer::builder()
        .client_token(CONTROL_PLANE_TOKEN)
        .bookmark_interval(Duration::from_millis(200))
        .palisade_crds()
        // At the caller's address: a pod of another service account.
        .object(pod("evil", "m", "m", "127.0.0.1", true))
        .object(pod("shop", "a-old", "a", "127.0.0.2", true))
        .object(pod("data", "db", "default", "127.0.0.9", false))
        .start()
        .await
        .expect("the stand-in API server starts");
    let kubeconfig = d.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, None).expect("kubeconfig");

    let ca = d.join("ca");
    let status = Command::new(bin("palisade-control-plane"))
        .args(["ca", "init", "--out"])
        .arg(&ca)
        .status()
        .expect("ca init");
    assert!(status.success());
    let tokens = d.join("tokens.yaml");
    write_tokens(&tokens, &[("token-of-workload-a", A)]).expect("tokens");
    let token_flag = tokens.display().to_string();
    let cp = ControlPlane::spawn(
        &ca,
        &["--authenticator", "static", "--static-tokens", &token_flag],
        &[("KUBECONFIG", kubeconfig.as_path())],
        // A stream outlives the request timeout: it bounds answering, not
        // following.
        &[
            "--discovery-source",
            "kubernetes",
            "--request-timeout",
            "1s",
        ],
    )
    .expect("the control plane starts with discovery");
    let refused = |reason: &str| {
        metric(
            &cp.metrics().expect("metrics"),
            "palisade_discovery_streams_refused_total",
            &[("reason", reason)],
        )
    };

    // Certify keeps working without a client certificate...
    let token_file = d.join("token");
    std::fs::write(&token_file, "token-of-workload-a").expect("token");
    let identity = IdentityClient::new(IdentityClientConfig {
        control_plane: format!("https://{}", cp.grpc_addr),
        server_name: "localhost".into(),
        bundle_file: ca.join("ca.crt"),
        identity: id(A),
        token_file,
        lifetime: None,
        timeout: Duration::from_secs(5),
    });
    let issued = identity
        .certify()
        .await
        .expect("certified without a client certificate");

    // ...but discovery does not.
    let bundle = cp.bundle_pem().expect("bundle");
    let anonymous = grpc_channel(cp.grpc_addr, &bundle).await.expect("channel");
    eventually_async(WAIT, "the control plane to sync", || async {
        (refused("not_synced") == 0.0
            && metric(&cp.metrics().ok()?, "palisade_discovery_source_synced", &[]) == 1.0)
            .then_some(())
    })
    .await;
    let status = GrpcClient::new(anonymous)
        .watch(WatchRequest {})
        .await
        .expect_err("no client certificate");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(refused("no_client_cert"), 1.0);

    // A certificate for a's identity from a CA the mesh does not trust is
    // refused in the handshake: nothing reaches the service.
    let foreign = foreign_credentials(A);
    let store = Arc::new(CertStore::new(TD.parse().expect("td"), Vec::new()));
    store
        .publish(foreign, std::time::SystemTime::now())
        .expect("a self-consistent certificate installs");
    let registry = prometheus::Registry::new();
    let forger = DiscoveryClient::new(
        stream_config(&cp, &ca),
        store,
        Arc::new(Destinations::default()),
        Metrics::register(&registry).expect("metrics"),
    );
    let stop_forger = CancellationToken::new();
    let forging = tokio::spawn(forger.run(stop_forger.clone()));
    eventually_async(WAIT, "the forged certificate to be refused", || async {
        let text = encode(&registry);
        (metric(
            &text,
            "palisade_discovery_stream_opens_total",
            &[("result", "failure")],
        ) >= 2.0)
            .then_some(())
    })
    .await;
    stop_forger.cancel();
    forging.await.expect("the forger stops");
    assert_eq!(
        metric(
            &encode(&registry),
            "palisade_discovery_stream_opens_total",
            &[("result", "success")]
        ),
        0.0
    );
    let text = cp.metrics().expect("metrics");
    assert_eq!(
        metric(&text, "palisade_discovery_streams_refused_total", &[]),
        refused("no_client_cert"),
        "the forged certificate never reached the service"
    );

    // The sidecar's client, presenting a's certificate from 127.0.0.1,
    // where the pod is evil/m: refused, and nothing is known.
    let store = Arc::new(CertStore::new(TD.parse().expect("td"), Vec::new()));
    let mut chain = vec![issued.certificate.clone()];
    chain.extend(issued.intermediates.iter().cloned());
    store
        .publish(
            Material {
                chain,
                key: PrivateKeyDer::Pkcs8(issued.key.serialize_der().into()),
                roots: issued.trust_bundle.clone(),
            },
            std::time::SystemTime::now(),
        )
        .expect("the certificate installs");
    let destinations = Arc::new(Destinations::default());
    let registry = prometheus::Registry::new();
    let stop = CancellationToken::new();
    let client = DiscoveryClient::new(
        stream_config(&cp, &ca),
        store,
        destinations.clone(),
        Metrics::register(&registry).expect("metrics"),
    );
    let follower = tokio::spawn(client.run(stop.clone()));
    eventually_async(
        WAIT,
        "the stream from m's address to be refused",
        || async { (refused("other_identity") >= 1.0).then_some(()) },
    )
    .await;
    assert!(
        destinations.resolve(ip("127.0.0.2")).is_err(),
        "nothing known before a snapshot"
    );

    // m is gone and a pod of a now has the address: the retry binds, and
    // the snapshot says what every address must answer with.
    api.remove("pods", Some("evil"), "m").expect("remove m");
    api.upsert(pod("shop", "a", "a", "127.0.0.1", true))
        .expect("a");
    eventually_async(WAIT, "the snapshot", || async {
        (seen(&destinations, "127.0.0.1") == Some(Resolution::Meshed(id(A)))).then_some(())
    })
    .await;
    assert_eq!(
        seen(&destinations, "127.0.0.2"),
        Some(Resolution::Meshed(id(A)))
    );
    assert_eq!(seen(&destinations, "127.0.0.9"), Some(Resolution::Unmeshed));

    // Each event reaches the stream.
    api.upsert(pod("shop", "b", "b", "127.0.0.5", true))
        .expect("b");
    eventually_async(WAIT, "b's address", || async {
        (seen(&destinations, "127.0.0.5") == Some(Resolution::Meshed(id(B)))).then_some(())
    })
    .await;
    let sent = || {
        metric(
            &cp.metrics().expect("metrics"),
            "palisade_discovery_updates_sent_total",
            &[],
        )
    };
    // A status change that resolves the same is not sent; the next real
    // change is, and is the only one counted.
    let before = sent();
    let mut ready = pod("shop", "b", "b", "127.0.0.5", true);
    ready["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    api.upsert(ready).expect("b ready");
    api.remove("pods", Some("data"), "db").expect("remove db");
    eventually_async(WAIT, "db's address to go", || async {
        seen(&destinations, "127.0.0.9").is_none().then_some(())
    })
    .await;
    assert_eq!(sent(), before + 1.0, "only the real change was sent");

    // Address reuse: while b still holds 127.0.0.5, c claims it too: the
    // address fails closed; once b is gone, it answers as c.
    api.upsert(pod("other", "c", "c", "127.0.0.5", true))
        .expect("c");
    eventually_async(WAIT, "a conflict", || async {
        (seen(&destinations, "127.0.0.5") == Some(Resolution::Conflict)).then_some(())
    })
    .await;
    api.remove("pods", Some("shop"), "b").expect("remove b");
    eventually_async(WAIT, "c's identity at the address", || async {
        (seen(&destinations, "127.0.0.5") == Some(Resolution::Meshed(id(C)))).then_some(())
    })
    .await;

    // A Service with a and c behind it: the sidecar learns the endpoints,
    // each with the identity of the pod at its address. The slice names
    // another identity by hand; it is ignored.
    api.upsert(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": "web"},
        "spec": {"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .expect("service");
    api.upsert(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": "web-1",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["127.0.0.1"], "targetRef": {"kind": "Pod", "name": "a"}},
            {"addresses": ["127.0.0.5"], "targetRef": {"kind": "Pod", "name": "b"},
             "hostname": "spiffe://cluster.local/ns/shop/sa/b"},
        ],
    }))
    .expect("slice");
    let web: std::net::SocketAddr = "198.19.0.10:80".parse().expect("address");
    let endpoints = eventually_async(WAIT, "the Service's endpoints", || async {
        match destinations.lookup(web).ok()? {
            Lookup::Service(service) if service.ports[0].backends.len() == 2 => Some(
                service.ports[0]
                    .backends
                    .iter()
                    .map(|b| (b.address.to_string(), b.identity.clone()))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        }
    })
    .await;
    assert_eq!(
        endpoints,
        [
            ("127.0.0.1:8080".to_owned(), Some(id(A))),
            ("127.0.0.5:8080".to_owned(), Some(id(C)))
        ]
    );
    // Services and slices are listed and watched, never read one by one.
    for kind in ["/services", "/endpointslices"] {
        let requests: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.path.contains(kind))
            .collect();
        assert!(!requests.is_empty(), "{kind} is watched");
        assert!(
            requests
                .iter()
                .all(|r| r.method == "GET" && r.path.ends_with(kind)),
            "only list and watch on {kind}"
        );
    }

    // The API server expires every watch (410): the control plane relists,
    // and what changed meanwhile still arrives.
    api.expire_watches();
    api.upsert(pod("data", "db2", "default", "127.0.0.10", false))
        .expect("db2");
    eventually_async(WAIT, "a change after the relist", || async {
        (seen(&destinations, "127.0.0.10") == Some(Resolution::Unmeshed)).then_some(())
    })
    .await;
    assert!(
        api.requests()
            .iter()
            .filter(|r| r.path.ends_with("/pods") && r.param("watch").is_none())
            .count()
            >= 2,
        "the control plane listed again after 410"
    );

    // One stream carried all of it, past the request timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = encode(&registry);
    assert_eq!(
        metric(&text, "palisade_discovery_stream_connected", &[]),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "palisade_discovery_stream_opens_total",
            &[("result", "success")]
        ),
        1.0,
        "the stream was never replaced"
    );

    // The caller's own pod is deleted: its stream ends, reconnects are
    // refused, and the sidecar keeps the last state.
    api.remove("pods", Some("shop"), "a").expect("remove a");
    eventually_async(WAIT, "the stream to end unbound", || async {
        let text = cp.metrics().ok()?;
        (metric(
            &text,
            "palisade_discovery_streams_ended_total",
            &[("reason", "unbound")],
        ) == 1.0
            && metric(
                &text,
                "palisade_discovery_streams_refused_total",
                &[("reason", "no_pod")],
            ) >= 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        seen(&destinations, "127.0.0.5"),
        Some(Resolution::Meshed(id(C)))
    );
    let text = encode(&registry);
    assert_eq!(
        metric(&text, "palisade_discovery_stream_connected", &[]),
        0.0
    );
    assert!(
        metric(
            &text,
            "palisade_discovery_updates_total",
            &[("result", "success")]
        ) >= 6.0
    );

    stop.cancel();
    follower.await.expect("the follower stops");
    api.shutdown().await;
}
