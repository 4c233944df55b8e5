//! Inbound only to the pod itself, in network namespaces: a neighbour that
//! routes a connection for another host through a meshed pod must not get
//! the sidecar (uid 1337, never captured) to connect there for it. That
//! would be an SSRF and a NetworkPolicy bypass (`169.254.169.254`, another
//! namespace's database), with `ip_forward` off.
//!
//! ```text
//!  netns node: bridge br0 198.18.0.254
//!                 ├── a  198.18.0.1  plain host, the attacker: route 198.18.0.3 via b
//!                 ├── b  198.18.0.2  pod: init rules, sidecar (uid 1337, permissive), app :7001
//!                 └── t  198.18.0.3  the target: an app on :5432 that logs who connects
//! ```
//!
//! b is permissive, the mode in which a relay would carry plaintext. Needs
//! root (CI runs as root): without it every test fails, never skips.

use std::{fs, net::Ipv4Addr, path::PathBuf};

use palisade_tests::{
    ControlPlane, metric,
    netns::{
        App, Lan, Proc, User, certify, curl, secret, send, sidecar_for_proxy_uid, start_sidecar,
        tool,
    },
};

const B_ID: &str = "spiffe://cluster.local/ns/b/sa/app-b";
const B_TOKEN: &str = "token-of-app-b-0123456789";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const T_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const APP_PORT: u16 = 7001;
const TARGET_PORT: u16 = 5432;

/// a, b (meshed) and t on one LAN, a routing t's address through b.
struct Scene {
    _sidecar: Proc,
    _apps: [App; 2],
    _control_plane: ControlPlane,
    lan: Lan,
}

impl Scene {
    fn start() -> Self {
        for name in [
            "ip",
            "iptables",
            "iptables-save",
            "setpriv",
            "python3",
            "curl",
        ] {
            tool(name);
        }
        let mut lan = Lan::new(NODE_IP, 24);
        lan.add_host("a", A_IP);
        lan.add_host("b", B_IP);
        lan.add_host("t", T_IP);
        let cp_dir = lan.dir().join("control-plane");
        fs::create_dir(&cp_dir).expect("mkdir");
        let control_plane = ControlPlane::start(&cp_dir, &[(B_TOKEN, B_ID)], &[])
            .expect("the control plane starts");
        let sidecar_bin = sidecar_for_proxy_uid(&lan);
        let certs: PathBuf = certify(&lan, &control_plane, "b", B_ID, B_TOKEN);
        let b = lan.host("b");
        b.exec(&sidecar_bin, &["init", "--ipv6=false"]);
        let apps = [
            App::start(&lan, b, &User::uid(1000), "b", &[APP_PORT]),
            App::start(&lan, lan.host("t"), &User::root(), "t", &[TARGET_PORT]),
        ];
        let sidecar = start_sidecar(
            &lan,
            b,
            &sidecar_bin,
            &certs,
            "198.18.0.0/24",
            &["--inbound-mode=permissive"],
        );
        // The attacker sends what is meant for t to b.
        lan.host("a").ip(&[
            "route",
            "add",
            &format!("{T_IP}/32"),
            "via",
            &B_IP.to_string(),
        ]);
        assert_eq!(
            lan.host("b")
                .exec(tool("cat"), &["/proc/sys/net/ipv4/ip_forward"])
                .trim(),
            "0",
            "a pod does not forward"
        );
        Self {
            _sidecar: sidecar,
            _apps: apps,
            _control_plane: control_plane,
            lan,
        }
    }

    fn refused_foreign(&self) -> f64 {
        metric(
            &curl(self.lan.host("b"), "http://127.0.0.1:15020/metrics"),
            "palisade_inbound_refusals_total",
            &[("reason", "foreign_destination")],
        )
    }

    /// Whether t's app got `line`: a sends everything for t to b, so only a
    /// relay by b could have brought it.
    fn target_got_from_b(&self, line: &str) -> bool {
        fs::read_to_string(self.lan.dir().join("app-t.log"))
            .unwrap_or_default()
            .contains(line)
    }
}

#[test]
fn a_connection_routed_through_the_pod_for_another_host_is_not_relayed() {
    let scene = Scene::start();
    let a = scene.lan.host("a");

    // The pod's own app is reached as usual (permissive: plaintext passes).
    let own = secret("own");
    assert_eq!(
        send(a, B_IP, APP_PORT, &own).as_deref(),
        Ok(App::reply("b", &own, B_IP, APP_PORT).as_str()),
        "a reaches b's own app through b's sidecar (which connects from the pod's address)"
    );

    // For t's address: not captured (not addressed to the pod), not
    // forwarded, so nothing reaches t.
    let routed = secret("routed");
    let reply = send(a, T_IP, TARGET_PORT, &routed);
    assert!(
        !reply.as_ref().is_ok_and(|r| r.contains(&routed)),
        "a's connection for {T_IP} routed through b must not be relayed; got {reply:?}"
    );
    assert!(
        !scene.target_got_from_b(&routed),
        "t must never see a's line by way of b"
    );
    let nat = scene.lan.host("b").nat().join("\n");
    assert!(
        nat.contains("-m addrtype --dst-type LOCAL -j REDIRECT --to-ports 15006"),
        "inbound capture is for the pod's own addresses only:\n{nat}"
    );
    assert_eq!(scene.refused_foreign(), 0.0, "the sidecar never saw it");
}

#[test]
fn the_sidecar_refuses_a_foreign_destination_that_rules_redirect_to_it() {
    let scene = Scene::start();
    let a = scene.lan.host("a");
    // Rules installed by hand (or by an older init) that capture whatever
    // arrives: the sidecar itself must refuse the relay.
    scene.lan.host("b").exec(
        tool("iptables"),
        &[
            "-t",
            "nat",
            "-I",
            "PALISADE_INBOUND",
            "1",
            "-p",
            "tcp",
            "-d",
            &T_IP.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ],
    );
    let routed = secret("redirected");
    let reply = send(a, T_IP, TARGET_PORT, &routed);
    assert!(
        !reply.as_ref().is_ok_and(|r| r.contains(&routed)),
        "the sidecar must not connect to {T_IP} for a; got {reply:?}"
    );
    assert!(
        !scene.target_got_from_b(&routed),
        "t must never see a's line by way of b"
    );
    assert_eq!(
        scene.refused_foreign(),
        1.0,
        "the refusal is counted as foreign_destination"
    );
    let log = fs::read_to_string(scene.lan.dir().join("sidecar-b.log")).unwrap_or_default();
    assert!(
        log.contains("not the pod's") && log.contains(&T_IP.to_string()),
        "the sidecar logs the refused destination:\n{log}"
    );
}
