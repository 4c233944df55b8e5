//! The discovery model on Pods as the API server reports them.

use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::core::v1::Pod;
use palisade_proto::{SpiffeId, SpiffeIdError, TrustDomain};
use serde_json::json;

use super::{Claim, Directory, Resolution, Workload};

fn td() -> TrustDomain {
    TrustDomain::parse("cluster.local").expect("valid")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("valid")
}

/// A pod of `ns`/`name` (UID `uid`) on `address`, with the injected
/// sidecar as a native sidecar when `meshed`.
fn pod(uid: &str, ns: &str, name: &str, account: &str, address: &str, meshed: bool) -> Pod {
    let mut init = vec![json!({"name": "palisade-init", "image": "palisade"})];
    if meshed {
        init.push(
            json!({"name": "palisade-sidecar", "image": "palisade", "restartPolicy": "Always"}),
        );
    }
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "uid": uid},
        "spec": {
            "serviceAccountName": account,
            "initContainers": init,
            "containers": [{"name": "app", "image": "app"}],
        },
        "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]},
    }))
    .expect("a pod")
}

fn with(mut pod: Pod, change: impl FnOnce(&mut serde_json::Value)) -> Pod {
    let mut value = serde_json::to_value(&pod).expect("serializes");
    change(&mut value);
    pod = serde_json::from_value(value).expect("still a pod");
    pod
}

fn claim(pod: &Pod) -> Option<Claim> {
    Workload::of(pod, &td()).map(|w| w.claim)
}

const B: &str = "spiffe://cluster.local/ns/shop/sa/b";

#[test]
fn a_pod_with_the_injected_sidecar_is_meshed_under_its_service_account() {
    let b = pod("u1", "shop", "b-1", "b", "198.18.0.2", true);
    assert_eq!(claim(&b), Some(Claim::Meshed(id(B))));
    let workload = Workload::of(&b, &td()).expect("live");
    assert_eq!(workload.name, "shop/b-1");
    assert_eq!(workload.addresses, [ip("198.18.0.2")]);

    // No service account named: the namespace's `default`, as Kubernetes does.
    let unnamed = with(b.clone(), |v| {
        v["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("serviceAccountName");
    });
    assert_eq!(
        claim(&unnamed),
        Some(Claim::Meshed(id(
            "spiffe://cluster.local/ns/shop/sa/default"
        )))
    );

    // The sidecar as an ordinary container (clusters without native sidecars).
    let classic = with(pod("u2", "shop", "b-2", "b", "198.18.0.3", false), |v| {
        v["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .push(json!({"name": "palisade-sidecar", "image": "palisade"}));
    });
    assert_eq!(claim(&classic), Some(Claim::Meshed(id(B))));
}

#[test]
fn labels_and_annotations_never_decide_membership() {
    let says_injected = with(pod("u1", "shop", "m", "m", "198.18.0.4", false), |v| {
        v["metadata"]["labels"] = json!({"palisade.io/injected": "true"});
        v["metadata"]["annotations"] = json!({
            "palisade.io/injected": "true",
            "palisade.io/identity": B,
        });
    });
    assert_eq!(claim(&says_injected), Some(Claim::Unmeshed));

    let says_not = with(pod("u2", "shop", "b", "b", "198.18.0.5", true), |v| {
        v["metadata"]["annotations"] = json!({"palisade.io/inject": "false"});
        v["metadata"]["labels"] = json!({});
    });
    assert_eq!(claim(&says_not), Some(Claim::Meshed(id(B))));

    // A container merely named like ours but elsewhere in the pod does not count.
    let ephemeral = with(pod("u3", "shop", "e", "e", "198.18.0.6", false), |v| {
        v["spec"]["ephemeralContainers"] =
            json!([{"name": "palisade-sidecar", "image": "palisade"}]);
    });
    assert_eq!(claim(&ephemeral), Some(Claim::Unmeshed));
}

#[test]
fn only_pending_or_running_pods_with_an_address_claim_it() {
    let base = pod("u1", "shop", "b", "b", "198.18.0.2", true);
    for phase in ["Succeeded", "Failed", "Unknown"] {
        let ended = with(base.clone(), |v| v["status"]["phase"] = json!(phase));
        assert_eq!(claim(&ended), None, "{phase}");
    }
    let no_phase = with(base.clone(), |v| {
        v["status"].as_object_mut().expect("status").remove("phase");
    });
    assert_eq!(claim(&no_phase), None);
    let pending = with(base.clone(), |v| v["status"]["phase"] = json!("Pending"));
    assert_eq!(claim(&pending), Some(Claim::Meshed(id(B))));
    let no_ip = with(pending, |v| v["status"] = json!({"phase": "Pending"}));
    assert_eq!(claim(&no_ip), None);
    let garbage_ip = with(base.clone(), |v| {
        v["status"]["podIP"] = json!("not-an-ip");
        v["status"]["podIPs"] = json!([{"ip": "999.1.1.1"}]);
    });
    assert_eq!(claim(&garbage_ip), None, "an address must parse");
    // An empty `podIPs` falls back to `podIP`.
    let only_pod_ip = with(base.clone(), |v| v["status"]["podIPs"] = json!([]));
    assert_eq!(
        Workload::of(&only_pod_ip, &td()).map(|w| w.addresses),
        Some(vec![ip("198.18.0.2")])
    );
    // A terminating pod still answers at its address.
    let terminating = with(base, |v| {
        v["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    });
    assert_eq!(claim(&terminating), Some(Claim::Meshed(id(B))));
}

#[test]
fn dual_stack_pods_claim_every_address() {
    let b = with(pod("u1", "shop", "b", "b", "198.18.0.2", true), |v| {
        v["status"]["podIPs"] = json!([{"ip": "198.18.0.2"}, {"ip": "2001:db8::2"}, {"ip": "bad"}]);
    });
    let mut directory = Directory::default();
    let changed = directory.apply(&b, &td());
    assert_eq!(
        changed,
        BTreeSet::from([ip("198.18.0.2"), ip("2001:db8::2")])
    );
    for address in ["198.18.0.2", "2001:db8::2"] {
        assert_eq!(
            directory.resolve(ip(address)),
            Some(Resolution::Meshed(id(B)))
        );
    }
}

#[test]
fn host_network_pods_are_their_nodes_address_and_never_meshed() {
    let host = |uid: &str, meshed: bool| {
        with(
            pod(uid, "kube-system", uid, "agent", "198.18.1.1", meshed),
            |v| {
                v["spec"]["hostNetwork"] = json!(true);
            },
        )
    };
    assert_eq!(claim(&host("h1", true)), Some(Claim::Host));
    let mut directory = Directory::default();
    directory.apply(&host("h1", true), &td());
    directory.apply(&host("h2", false), &td());
    assert_eq!(
        directory.resolve(ip("198.18.1.1")),
        Some(Resolution::Unmeshed),
        "node addresses are shared by host-network pods"
    );
    // A pod-network pod on a node's address is no normal state: fail closed.
    directory.apply(&pod("p1", "shop", "b", "b", "198.18.1.1", true), &td());
    assert_eq!(
        directory.resolve(ip("198.18.1.1")),
        Some(Resolution::Conflict)
    );
}

#[test]
fn an_address_reused_while_the_old_pod_terminates_fails_closed_until_it_is_gone() {
    let mut directory = Directory::default();
    let b = pod("u-b", "shop", "b", "b", "198.18.0.2", true);
    directory.apply(&b, &td());
    assert_eq!(
        directory.resolve(ip("198.18.0.2")),
        Some(Resolution::Meshed(id(B)))
    );

    // Another workload gets the address while `b` is still terminating.
    let m = pod("u-m", "evil", "m", "m", "198.18.0.2", true);
    assert_eq!(
        directory.apply(&m, &td()),
        BTreeSet::from([ip("198.18.0.2")])
    );
    assert_eq!(
        directory.resolve(ip("198.18.0.2")),
        Some(Resolution::Conflict)
    );
    assert_eq!(directory.claimants(ip("198.18.0.2")).len(), 2);

    // Gone: the address follows the new pod, with the new pod's identity.
    assert_eq!(directory.delete(&b), BTreeSet::from([ip("198.18.0.2")]));
    assert_eq!(
        directory.resolve(ip("198.18.0.2")),
        Some(Resolution::Meshed(id(
            "spiffe://cluster.local/ns/evil/sa/m"
        )))
    );

    // Two live pods fail closed even when they would expect the same identity,
    // and a pod recreated under the same name is another pod (another UID).
    let again = pod("u-b2", "evil", "m", "m", "198.18.0.2", true);
    directory.apply(&again, &td());
    assert_eq!(
        directory.resolve(ip("198.18.0.2")),
        Some(Resolution::Conflict)
    );
    // An unmeshed claimant conflicts as well: no plain TCP to a contested address.
    directory.delete(&again);
    directory.apply(&pod("u-x", "shop", "x", "x", "198.18.0.2", false), &td());
    assert_eq!(
        directory.resolve(ip("198.18.0.2")),
        Some(Resolution::Conflict)
    );
}

#[test]
fn an_update_moves_the_claim_and_a_finished_pod_frees_its_address() {
    let mut directory = Directory::default();
    let b = pod("u-b", "shop", "b", "b", "198.18.0.2", true);
    directory.apply(&b, &td());
    let moved = with(b.clone(), |v| {
        v["status"]["podIP"] = json!("198.18.0.7");
        v["status"]["podIPs"] = json!([{"ip": "198.18.0.7"}]);
    });
    assert_eq!(
        directory.apply(&moved, &td()),
        BTreeSet::from([ip("198.18.0.2"), ip("198.18.0.7")])
    );
    assert_eq!(directory.resolve(ip("198.18.0.2")), None);
    assert_eq!(
        directory.resolve(ip("198.18.0.7")),
        Some(Resolution::Meshed(id(B)))
    );

    let done = with(moved, |v| v["status"]["phase"] = json!("Succeeded"));
    assert_eq!(
        directory.apply(&done, &td()),
        BTreeSet::from([ip("198.18.0.7")])
    );
    assert_eq!(directory.resolve(ip("198.18.0.7")), None);
    assert_eq!(directory.workloads(), 0);
    assert!(directory.delete(&done).is_empty(), "already gone");
}

#[test]
fn an_unmeshed_pod_is_plain_tcp_and_an_unidentifiable_one_fails_closed() {
    let mut directory = Directory::default();
    directory.apply(&pod("u-db", "data", "db", "db", "198.18.0.8", false), &td());
    assert_eq!(
        directory.resolve(ip("198.18.0.8")),
        Some(Resolution::Unmeshed)
    );

    // Bytes from the API server are parsed like any other input.
    let odd = pod("u-odd", "shop", "odd", "a/b", "198.18.0.9", true);
    assert_eq!(
        claim(&odd),
        Some(Claim::Unidentifiable(SpiffeIdError::BadPathChar))
    );
    directory.apply(&odd, &td());
    assert_eq!(
        directory.resolve(ip("198.18.0.9")),
        Some(Resolution::Unidentifiable)
    );
    assert_eq!(directory.resolve(ip("198.18.0.10")), None, "unknown");
}

#[test]
fn a_relist_replaces_everything_and_names_what_vanished() {
    let mut directory = Directory::default();
    directory.apply(&pod("u-a", "shop", "a", "a", "198.18.0.1", true), &td());
    directory.apply(&pod("u-b", "shop", "b", "b", "198.18.0.2", true), &td());
    let relisted = [
        pod("u-b", "shop", "b", "b", "198.18.0.2", true),
        pod("u-c", "shop", "c", "c", "198.18.0.3", false),
    ];
    let changed = directory.replace_all(&relisted, &td());
    assert_eq!(
        changed,
        BTreeSet::from([ip("198.18.0.1"), ip("198.18.0.2"), ip("198.18.0.3")])
    );
    assert_eq!(
        directory.snapshot(),
        [
            (ip("198.18.0.2"), Resolution::Meshed(id(B))),
            (ip("198.18.0.3"), Resolution::Unmeshed),
        ]
    );
    assert_eq!(directory.workloads(), 2);

    // Pods without a UID are told apart by namespace and name.
    let no_uid = |name: &str, address: &str| {
        with(pod("x", "shop", name, name, address, false), |v| {
            v["metadata"]["uid"] = json!("");
        })
    };
    let mut directory = Directory::default();
    directory.apply(&no_uid("p", "198.18.0.4"), &td());
    directory.apply(&no_uid("q", "198.18.0.5"), &td());
    assert_eq!(directory.workloads(), 2);
    assert_eq!(super::model::pod_key(&no_uid("p", "198.18.0.4")), "shop/p");
}

// --- the file source ---

fn from_file(yaml: &str) -> Result<Directory, super::file::FileError> {
    let mut directory = Directory::default();
    directory.replace_workloads(super::file::parse(yaml, &td())?.workloads);
    Ok(directory)
}

#[test]
fn a_discovery_file_gives_the_same_model() {
    let directory = from_file(
        "workloads:\n  - name: shop/b\n    addresses: [198.18.0.2]\n    identity: spiffe://cluster.local/ns/shop/sa/b\n  - name: data/db\n    addresses: [198.18.0.8, \"2001:db8::8\"]\n    unmeshed: true\n  - addresses: [198.18.0.9]\n    identity: spiffe://cluster.local/ns/a/sa/a\n  - addresses: [198.18.0.9]\n    unmeshed: true\n",
    )
    .expect("valid");
    assert_eq!(
        directory.snapshot(),
        [
            (ip("198.18.0.2"), Resolution::Meshed(id(B))),
            (ip("198.18.0.8"), Resolution::Unmeshed),
            (ip("198.18.0.9"), Resolution::Conflict),
            (ip("2001:db8::8"), Resolution::Unmeshed),
        ]
    );
    assert_eq!(from_file("").expect("empty").workloads(), 0);
    assert_eq!(from_file("workloads: []\n").expect("none").workloads(), 0);
}

#[test]
fn a_bad_discovery_file_is_refused_naming_the_workload() {
    use super::file::FileError as E;
    let one = |entry: &str| {
        format!("workloads:\n  - addresses: [198.18.0.1]\n    unmeshed: true\n  - {entry}\n")
    };
    type Expected = fn(&E) -> bool;
    let cases: [(String, Expected); 7] = [
        (one("addresses: [198.18.0.300]\n    unmeshed: true"), |e| {
            matches!(e, E::BadAddress { workload: 2, .. })
        }),
        (one("addresses: []\n    unmeshed: true"), |e| {
            matches!(e, E::NoAddress { workload: 2 })
        }),
        (one("addresses: [198.18.0.2]"), |e| {
            matches!(e, E::IdentityOrUnmeshed { workload: 2 })
        }),
        (
            one(
                "addresses: [198.18.0.2]\n    unmeshed: true\n    identity: spiffe://cluster.local/ns/a/sa/a",
            ),
            |e| matches!(e, E::IdentityOrUnmeshed { workload: 2 }),
        ),
        (
            one("addresses: [198.18.0.2]\n    identity: spiffe://cluster.local/ns//sa/a"),
            |e| matches!(e, E::BadIdentity { workload: 2, .. }),
        ),
        (
            one("addresses: [198.18.0.2]\n    identity: spiffe://evil.example/ns/a/sa/a"),
            |e| matches!(e, E::ForeignTrustDomain { workload: 2, .. }),
        ),
        (
            one("addresses: [198.18.0.2]\n    unmeshed: true\n    port: 80"),
            |e| matches!(e, E::Syntax(m) if m.contains("unknown field `port`")),
        ),
    ];
    for (yaml, expected) in cases {
        let err = super::file::parse(&yaml, &td()).expect_err(&yaml);
        assert!(expected(&err), "{yaml}: {err:?}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}

// --- the kubernetes source and the shared state, against the stand-in API server ---

mod against_the_api_server {
    use std::{sync::Arc, time::Duration};

    use palisade_tests::{eventually_async, kube::ApiServer};
    use tokio::sync::broadcast;

    use super::*;
    use crate::discovery::{BindError, Discovery, kubernetes, state::Changes};

    const WAIT: Duration = Duration::from_secs(10);

    fn object(pod: &Pod) -> serde_json::Value {
        serde_json::to_value(pod).expect("serializes")
    }

    /// The `kubernetes` source following `api`, once it has synced (every
    /// kind listed), and its task.
    pub(super) async fn follow(api: &ApiServer) -> (Arc<Discovery>, tokio::task::JoinHandle<()>) {
        install_policy_crds(api);
        let discovery = Discovery::new(td());
        assert!(!discovery.is_synced());
        let source = tokio::spawn(kubernetes::run(
            api.client().expect("client"),
            discovery.clone(),
            crate::metrics::Metrics::register(&prometheus::Registry::new()).expect("metrics"),
        ));
        tokio::time::timeout(WAIT, discovery.synced())
            .await
            .expect("synced after every kind is listed");
        (discovery, source)
    }

    /// The policy CRDs, as the chart installs them: without them the
    /// source never syncs.
    pub(super) fn install_policy_crds(api: &ApiServer) {
        use kube::CustomResourceExt;
        for crd in [
            crate::policy::InboundPolicy::crd(),
            crate::policy::IdentityDenyList::crd(),
        ] {
            api.upsert(serde_json::to_value(crd).expect("a CRD is JSON"))
                .expect("the stand-in takes CRDs");
        }
    }

    /// The next batch of changes that mentions `address`.
    async fn next_change(
        rx: &mut broadcast::Receiver<Changes>,
        address: &str,
    ) -> Option<Resolution> {
        let address = ip(address);
        tokio::time::timeout(WAIT, async {
            loop {
                let changes = rx.recv().await.expect("the broadcast stays open");
                if let Some((_, r)) = changes.addresses.iter().find(|(a, _)| *a == address) {
                    return r.clone();
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no change for {address} within {WAIT:?}"))
    }

    #[tokio::test]
    async fn the_state_follows_every_pod_event_and_a_relist() {
        let b = pod("u-b", "shop", "b", "b", "198.18.0.2", true);
        let db = pod("u-db", "data", "db", "db", "198.18.0.8", false);
        let api = ApiServer::builder()
            .object(object(&b))
            .object(object(&db))
            .start()
            .await
            .expect("the stand-in starts");
        let (discovery, source) = follow(&api).await;
        let (snapshot, mut rx) = discovery.subscribe();
        assert_eq!(
            snapshot.addresses,
            [
                (ip("198.18.0.2"), Resolution::Meshed(id(B))),
                (ip("198.18.0.8"), Resolution::Unmeshed),
            ]
        );
        assert_eq!(
            discovery.bind(ip("198.18.0.2"), &id(B)).map(|b| b.name),
            Ok("shop/b".into())
        );

        // Another workload takes b's address while b terminates.
        let m = pod("u-m", "evil", "m", "m", "198.18.0.2", true);
        api.upsert(object(&m)).expect("created");
        assert_eq!(
            next_change(&mut rx, "198.18.0.2").await,
            Some(Resolution::Conflict)
        );
        assert_eq!(
            discovery.bind(ip("198.18.0.2"), &id(B)),
            Err(BindError::Contested(ip("198.18.0.2")))
        );
        api.remove("pods", Some("shop"), "b").expect("deleted");
        let m_id = id("spiffe://cluster.local/ns/evil/sa/m");
        assert_eq!(
            next_change(&mut rx, "198.18.0.2").await,
            Some(Resolution::Meshed(m_id.clone()))
        );
        assert!(matches!(
            discovery.bind(ip("198.18.0.2"), &id(B)),
            Err(BindError::OtherIdentity { .. })
        ));
        assert_eq!(
            discovery.bind(ip("198.18.0.2"), &m_id).map(|b| b.name),
            Ok("evil/m".into())
        );
        assert_eq!(
            discovery.bind(ip("198.18.0.3"), &m_id),
            Err(BindError::NoPod(ip("198.18.0.3")))
        );

        // A finished pod frees its address.
        let done = with(db, |v| v["status"]["phase"] = json!("Succeeded"));
        api.upsert(object(&done)).expect("updated");
        assert_eq!(next_change(&mut rx, "198.18.0.8").await, None);

        // History compacted: 410, a relist, and the state is the list's.
        api.expire_watches();
        api.upsert(object(&pod("u-c", "shop", "c", "c", "198.18.0.3", true)))
            .expect("created");
        eventually_async(WAIT, "the pod created across the relist", || async {
            discovery.resolve(ip("198.18.0.3"))
        })
        .await;
        assert_eq!(
            discovery.resolve(ip("198.18.0.2")),
            Some(Resolution::Meshed(m_id))
        );
        assert_eq!(discovery.workloads(), 2);
        let lists = api
            .requests()
            .iter()
            .filter(|r| {
                r.method == "GET" && r.path == "/api/v1/pods" && !r.query.contains("watch=true")
            })
            .count();
        assert_eq!(lists, 2, "one list at start, one after the 410");

        source.abort();
        api.shutdown().await;
    }

    #[tokio::test]
    async fn a_stream_that_falls_behind_can_tell() {
        let discovery: Arc<Discovery> = Discovery::new(td());
        let (_, mut rx) = discovery.subscribe();
        for i in 0..1100u32 {
            let address = format!("198.18.{}.{}", i / 250, i % 250 + 1);
            discovery.apply_pod(&pod(&format!("u{i}"), "shop", "p", "p", &address, true));
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        assert_eq!(
            discovery.subscribe().0.addresses.len(),
            1100,
            "a fresh snapshot has it all"
        );
    }
}

/// The `Watch` stream on its own: who may open one, what it sends, and when
/// it ends. (Over real TLS, with the binary: `tests/tests/discovery.rs`.)
pub(super) mod stream {
    use std::{
        net::SocketAddr,
        sync::Arc,
        time::{Duration, SystemTime},
    };

    use futures::StreamExt;
    use palisade_proto::discovery::{
        decode,
        v1::{WatchRequest, WatchResponse},
    };
    use prometheus::Registry;
    use tonic::{Code, Request, Status};

    use super::*;
    use crate::{
        discovery::{Caller, Discovery, DiscoveryService},
        metrics::Metrics,
    };

    pub(super) type Stream = <DiscoveryService as palisade_proto::discovery::v1::discovery_server::Discovery>::WatchStream;

    pub(super) fn service(discovery: &Arc<Discovery>) -> (DiscoveryService, Registry) {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).expect("metrics");
        (DiscoveryService::new(discovery.clone(), metrics), registry)
    }

    /// A caller at `from` with a verified certificate of `identity` valid
    /// for `valid` more.
    pub(super) fn request(from: &str, identity: Option<&str>, valid: Duration) -> Option<Caller> {
        Some(Caller {
            addr: SocketAddr::new(ip(from), 40000),
            certificate: identity.map(|i| (id(i), SystemTime::now() + valid)),
        })
    }

    pub(super) async fn open(
        service: &DiscoveryService,
        caller: Option<Caller>,
    ) -> Result<Stream, Status> {
        Ok(service.open(caller)?.into_inner())
    }

    pub(super) async fn next(stream: &mut Stream) -> Result<WatchResponse, Status> {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a message in time")
            .expect("the stream goes on")
    }

    /// The parts of one snapshot: `partial` on all but the last.
    async fn snapshot_parts(stream: &mut Stream) -> Vec<WatchResponse> {
        let mut parts = Vec::new();
        loop {
            let part = next(stream).await.expect("a part");
            assert!(part.snapshot, "a change in the middle of a snapshot");
            let last = !part.partial;
            parts.push(part);
            if last {
                return parts;
            }
        }
    }

    fn refused(registry: &Registry, reason: &str) -> f64 {
        crate::service::tests::counter(
            registry,
            "palisade_discovery_streams_refused_total",
            &[("reason", reason)],
        )
    }

    const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
    const HOUR: Duration = Duration::from_secs(3600);

    fn cluster() -> Arc<Discovery> {
        let discovery = Discovery::new(td());
        discovery.replace_pods(&[
            pod("ua", "shop", "a-1", "a", "198.18.0.1", true),
            pod("ub", "shop", "b-1", "b", "198.18.0.2", true),
        ]);
        discovery.mark_synced();
        discovery
    }

    #[tokio::test]
    async fn a_stream_needs_a_certificate_a_synced_state_and_the_callers_own_pod() {
        let discovery = Discovery::new(td());
        discovery.replace_pods(&[pod("ua", "shop", "a-1", "a", "198.18.0.1", true)]);
        let (service, registry) = service(&discovery);
        let cases: [(Option<Caller>, Code, &str); 2] = [
            (
                request("198.18.0.1", None, HOUR),
                Code::Unauthenticated,
                "no_client_cert",
            ),
            (
                request("198.18.0.1", Some(A), HOUR),
                Code::Unavailable,
                "not_synced",
            ),
        ];
        for (request, code, reason) in cases {
            let status = open(&service, request).await.err().expect("refused");
            assert_eq!(status.code(), code, "{reason}: {status:?}");
            assert_eq!(refused(&registry, reason), 1.0);
        }
        // No connect info at all (not our listener): no certificate.
        let status = open(&service, Caller::of(&Request::new(WatchRequest {})))
            .await
            .err()
            .expect("refused");
        assert_eq!(status.code(), Code::Unauthenticated);

        discovery.mark_synced();
        discovery.apply_pod(&pod("ub", "shop", "b-1", "b", "198.18.0.2", true));
        discovery.apply_pod(&pod("u9", "shop", "x-1", "x", "198.18.0.9", true));
        discovery.apply_pod(&pod("u8", "shop", "y-1", "y", "198.18.0.9", true));
        for (from, reason) in [
            // a's certificate from b's address: b's pod is not a.
            ("198.18.0.2", "other_identity"),
            ("198.18.0.7", "no_pod"),
            ("198.18.0.9", "contested"),
        ] {
            let status = open(&service, request(from, Some(A), HOUR))
                .await
                .err()
                .expect("refused");
            assert_eq!(status.code(), Code::PermissionDenied, "{from}: {status:?}");
            assert_eq!(refused(&registry, reason), 1.0, "{from}");
        }
        // A request on a connection whose certificate has expired since.
        let status = open(&service, request("198.18.0.1", Some(A), Duration::ZERO))
            .await
            .err()
            .expect("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(refused(&registry, "certificate_expired"), 1.0);
        // IPv4-mapped IPv6 (a dual-stack listener) is the IPv4 address.
        let mut stream = open(&service, request("::ffff:198.18.0.1", Some(A), HOUR))
            .await
            .expect("a's own address");
        assert!(next(&mut stream).await.expect("snapshot").snapshot);
    }

    #[tokio::test]
    async fn a_snapshot_then_each_change_and_a_fresh_snapshot_after_falling_behind() {
        let discovery = cluster();
        let (service, registry) = service(&discovery);
        let mut stream = open(&service, request("198.18.0.1", Some(A), HOUR))
            .await
            .expect("bound");
        let first = next(&mut stream).await.expect("snapshot");
        assert!(first.snapshot);
        let known: Vec<_> = first
            .addresses
            .iter()
            .map(|a| decode(a).expect("valid"))
            .collect();
        assert_eq!(
            known,
            [
                (ip("198.18.0.1"), Resolution::Meshed(id(A))),
                (ip("198.18.0.2"), Resolution::Meshed(id(B))),
            ]
        );

        discovery.delete_pod(&pod("ub", "shop", "b-1", "b", "198.18.0.2", true));
        let change = next(&mut stream).await.expect("a change");
        assert!(!change.snapshot);
        assert_eq!(change.removed, [vec![198, 18, 0, 2]]);
        assert!(change.addresses.is_empty());

        // More changes than the broadcast holds while the stream is not
        // read: the stream starts again from a fresh snapshot.
        for n in 0..1100u32 {
            let address = format!("198.18.{}.{}", 1 + n / 250, 1 + n % 250);
            discovery.apply_pod(&pod(
                &format!("u{n}"),
                "shop",
                &format!("p-{n}"),
                "p",
                &address,
                false,
            ));
        }
        // It comes in parts of 256 addresses, applied together after the
        // last.
        let parts = snapshot_parts(&mut stream).await;
        let sizes: Vec<usize> = parts.iter().map(|p| p.addresses.len()).collect();
        assert_eq!(sizes, [256, 256, 256, 256, 77]);
        assert_eq!(
            crate::service::tests::counter(&registry, "palisade_discovery_resyncs_total", &[]),
            1.0
        );
    }

    #[tokio::test]
    async fn the_stream_ends_when_its_pod_goes_or_its_certificate_expires() {
        let discovery = cluster();
        let (service, registry) = service(&discovery);
        let ended = |reason: &str| {
            crate::service::tests::counter(
                &registry,
                "palisade_discovery_streams_ended_total",
                &[("reason", reason)],
            )
        };

        let mut stream = open(&service, request("198.18.0.1", Some(A), HOUR))
            .await
            .expect("bound");
        next(&mut stream).await.expect("snapshot");
        // The caller's pod is replaced by one of another service account.
        discovery.delete_pod(&pod("ua", "shop", "a-1", "a", "198.18.0.1", true));
        let status = next(&mut stream).await.expect_err("unbound");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(stream.next().await.is_none(), "nothing after the end");
        assert_eq!(ended("unbound"), 1.0);

        discovery.apply_pod(&pod("ua", "shop", "a-1", "a", "198.18.0.1", true));
        let mut stream = open(
            &service,
            request("198.18.0.1", Some(A), Duration::from_millis(300)),
        )
        .await
        .expect("bound");
        next(&mut stream).await.expect("snapshot");
        let status = next(&mut stream).await.expect_err("expired");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(ended("certificate_expired"), 1.0);

        // A caller that goes away is counted too.
        let mut stream = open(&service, request("198.18.0.1", Some(A), HOUR))
            .await
            .expect("bound");
        next(&mut stream).await.expect("snapshot");
        drop(stream);
        assert_eq!(ended("closed"), 1.0);
        assert_eq!(
            crate::service::tests::counter(&registry, "palisade_discovery_streams_active", &[]),
            0.0
        );
    }

    #[tokio::test]
    async fn services_follow_the_addresses_in_the_snapshot_and_travel_whole_in_changes() {
        use palisade_proto::discovery::decode_service;

        use crate::discovery::{EndpointDef, PortDef, ServiceDef, SliceDef};

        let discovery = cluster();
        // 1,500 Services with one endpoint each (b): more than one part.
        let service_ip = |n: u32| ip(&format!("198.19.{}.{}", n / 250, 1 + n % 250));
        let define = |n: u32, endpoints: Vec<EndpointDef>| {
            let key = format!("shop/s{n}");
            discovery.put_service(
                key.clone(),
                Some(ServiceDef {
                    name: key.clone(),
                    cluster_ips: vec![service_ip(n)],
                    ports: vec![PortDef {
                        name: "http".into(),
                        port: 80,
                    }],
                }),
            );
            discovery.put_slice(
                format!("slice-{n}"),
                Some(SliceDef {
                    service: key,
                    ipv6: false,
                    ports: vec![("http".into(), 8080)],
                    endpoints,
                }),
            );
        };
        let b = || EndpointDef {
            address: ip("198.18.0.2"),
            ready: true,
            serving_terminating: false,
            pod: true,
        };
        for n in 0..1500 {
            define(n, vec![b()]);
        }
        let (service, _registry) = service(&discovery);
        let mut stream = open(&service, request("198.18.0.1", Some(A), HOUR))
            .await
            .expect("bound");
        let parts = snapshot_parts(&mut stream).await;
        // The addresses come first, then the Services, about 256 endpoints
        // a part.
        assert_eq!(parts[0].addresses.len(), 2);
        assert!(parts[0].services.is_empty());
        let counts: Vec<usize> = parts[1..].iter().map(|p| p.services.len()).collect();
        assert_eq!(counts, [256, 256, 256, 256, 256, 220]);
        let first = decode_service(&parts[1].services[0]).expect("valid");
        assert_eq!(first.0, service_ip(0));
        assert_eq!(
            first.1.ports[0].endpoints[0].identity.as_ref(),
            Some(&id(B))
        );

        // b goes: every Service behind it changes in the same message as
        // b's address.
        discovery.delete_pod(&pod("ub", "shop", "b-1", "b", "198.18.0.2", true));
        let change = next(&mut stream).await.expect("a change");
        assert_eq!(change.removed, [vec![198, 18, 0, 2]]);
        assert_eq!(change.services.len(), 1500);
        assert!(change.services.iter().all(|s| {
            decode_service(s).expect("valid").1.ports[0]
                .endpoints
                .is_empty()
        }));
        // A Service removed is named in removed_services.
        discovery.put_service("shop/s7".into(), None);
        let change = next(&mut stream).await.expect("a change");
        assert_eq!(
            change.removed_services,
            [palisade_proto::discovery::encode_ip(service_ip(7))]
        );
    }
}

mod policy;
mod services;
