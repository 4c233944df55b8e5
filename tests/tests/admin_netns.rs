//! The admin port as the pod network meets it, in network namespaces: a pod
//! `b` with the capture rules of `init` (which leave 15020 alone) and its
//! sidecar; kubelet's place on the node, a neighbour `a`, and `b` itself ask
//! b's pod address; only `b`'s loopback gets `/config`.
//!
//! ```text
//!  netns node: bridge br0 198.18.0.254   "kubelet", "Prometheus"
//!                 ├── a  198.18.0.1      a neighbour
//!                 └── b  198.18.0.2      pod: init rules, sidecar (uid 1337), admin 0.0.0.0:15020
//! ```
//!
//! `tests/admin.rs` shows the same without root, on this host's own address.
//! Needs root (CI runs as root): without it the test fails, never skips.

use std::net::Ipv4Addr;

use palisade_tests::netns::{Lan, Netns, curl, curl_status, mesh_pod, sidecar_for_proxy_uid, tool};

const B_ID: &str = "spiffe://cluster.local/ns/b/sa/app-b";
const B_TOKEN: &str = "token-of-app-b-0123456789";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

#[test]
fn the_pod_network_gets_health_metrics_and_identity_and_only_loopback_gets_config() {
    for name in ["ip", "iptables", "iptables-save", "setpriv", "curl"] {
        tool(name);
    }
    let mut lan = Lan::new(NODE_IP, 24);
    lan.add_host("a", A_IP);
    lan.add_host("b", B_IP);
    let control_plane = lan.control_plane(&[(B_TOKEN, B_ID)]);
    let b = lan.host("b");
    let bin = sidecar_for_proxy_uid(&lan);
    let _sidecar = mesh_pod(
        &lan,
        b,
        &control_plane,
        &bin,
        B_ID,
        B_TOKEN,
        "198.18.0.0/24",
        &[],
    );

    let pod = |path: &str| format!("http://{B_IP}:15020{path}");
    let askers: [(&str, &Netns); 3] = [
        ("the node", lan.node()),
        ("neighbour a", lan.host("a")),
        ("b itself, at its pod address", b),
    ];
    for (who, host) in askers {
        assert_eq!(curl_status(host, &pod("/config")), "404", "{who}: /config");
        assert_eq!(
            curl_status(host, &pod("/config")),
            curl_status(host, &pod("/no-such-path")),
            "{who}: /config looks like any unknown path"
        );
        for path in ["/ready", "/live", "/metrics", "/identity"] {
            assert_eq!(curl_status(host, &pod(path)), "200", "{who}: {path}");
        }
    }

    let identity = curl(lan.node(), &pod("/identity"));
    let report: serde_json::Value = serde_json::from_str(&identity).expect("JSON");
    assert_eq!(report["identity"], B_ID, "{report}");
    assert!(
        !identity.contains("PRIVATE KEY") && !identity.contains("BEGIN"),
        "{identity}"
    );

    // Inside the pod, on loopback: the configuration.
    let config = curl(b, "http://127.0.0.1:15020/config");
    let config: serde_json::Value = serde_json::from_str(&config).expect("JSON");
    assert_eq!(config["trust_domain"], "cluster.local", "{config}");
}
