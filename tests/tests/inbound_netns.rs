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
//! b is permissive, the mode in which a relay would carry plaintext.
//!
//! Then server-first ports (MySQL, PostgreSQL, Redis, ...: the client waits
//! for the server's greeting): pod `m` (198.18.0.4, meshed) and plain host
//! `c` (198.18.0.5) talk to a greeter on b's 3306. A mesh client always
//! speaks first, so mesh TLS works there in both modes; in permissive mode
//! the app's own silent client still gets its greeting.
//!
//! Needs root (CI runs as root): without it every test fails, never skips.

use std::{fs, net::Ipv4Addr, time::Duration};

use palisade_tests::{
    ControlPlane, metric,
    netns::{
        App, Lan, Netns, Proc, User, curl, mesh_pod, secret, send, sidecar_for_proxy_uid, tool,
    },
};

const B_ID: &str = "spiffe://cluster.local/ns/b/sa/app-b";
const B_TOKEN: &str = "token-of-app-b-0123456789";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const T_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const APP_PORT: u16 = 7001;
const MESH_NETWORKS: &str = "198.18.0.0/24";
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
        let control_plane = lan.control_plane(&[(B_TOKEN, B_ID)]);
        let b = lan.host("b");
        let sidecar = mesh_pod(
            &lan,
            b,
            &control_plane,
            &sidecar_for_proxy_uid(&lan),
            B_ID,
            B_TOKEN,
            MESH_NETWORKS,
            &["--inbound-mode=permissive"],
        );
        let apps = [
            App::start(&lan, b, &User::uid(1000), "b", &[APP_PORT]),
            App::start(&lan, lan.host("t"), &User::root(), "t", &[TARGET_PORT]),
        ];
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

// === server-first ports ===

const M_ID: &str = "spiffe://cluster.local/ns/m/sa/app-m";
const M_TOKEN: &str = "token-of-app-m-0123456789";
const M_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 5);
/// A server-first port of the chart's defaults (MySQL).
const GREETER_PORT: u16 = 3306;

/// b's app on a server-first port: greets at once, then answers one line.
/// Logs the first bytes it receives, so a ClientHello handed to it as data
/// shows.
const GREETER: &str = r#"
import socket, sys, threading
port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(64)
def serve(conn, peer):
    with conn:
        conn.settimeout(10)
        conn.sendall(b"GREETING from b\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            line += chunk
        print(f"{peer[0]} sent {line[:16]!r}", file=sys.stderr, flush=True)
        conn.sendall(b"b got " + line)
print("ready", flush=True)
while True:
    conn, peer = s.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"#;

/// A client of a server-first protocol: waits for the greeting, then sends
/// a line; prints the greeting and the answer.
const WAITING_CLIENT: &str = r#"
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
got = b""
while not got.endswith(b"\n"):
    chunk = conn.recv(4096)
    if not chunk:
        break
    got += chunk
conn.sendall(sys.argv[3].encode() + b"\n")
while True:
    chunk = conn.recv(4096)
    if not chunk:
        break
    got += chunk
sys.stdout.write(got.decode(errors="replace"))
"#;

/// b (greeter on a server-first port, sidecar in `mode`), m (meshed
/// client) and c (plain client).
struct ServerFirst {
    _sidecars: [Proc; 2],
    _greeter: Proc,
    _control_plane: ControlPlane,
    lan: Lan,
}

impl ServerFirst {
    fn start(mode: &str) -> Self {
        for name in [
            "ip",
            "iptables-save",
            "setpriv",
            "python3",
            "curl",
            "timeout",
        ] {
            tool(name);
        }
        let mut lan = Lan::new(NODE_IP, 24);
        lan.add_host("b", B_IP);
        lan.add_host("m", M_IP);
        lan.add_host("c", C_IP);
        let control_plane = lan.control_plane(&[(B_TOKEN, B_ID), (M_TOKEN, M_ID)]);
        let bin = sidecar_for_proxy_uid(&lan);
        let server_first = format!("--server-first-ports={GREETER_PORT}");
        let sidecars = [
            ("b", B_ID, B_TOKEN, format!("--inbound-mode={mode}")),
            ("m", M_ID, M_TOKEN, "--inbound-mode=strict".to_owned()),
        ]
        .map(|(role, id, token, mode)| {
            let extra = [mode.as_str(), server_first.as_str()];
            mesh_pod(
                &lan,
                lan.host(role),
                &control_plane,
                &bin,
                id,
                token,
                MESH_NETWORKS,
                &extra,
            )
        });
        let log = lan.log("greeter-b");
        let mut greeter =
            lan.host("b")
                .spawn("greeter b", &User::uid(1000), tool("python3"), |c| {
                    c.args(["-u", "-c", GREETER, &GREETER_PORT.to_string()])
                        .stdout(std::process::Stdio::piped())
                        .stderr(log);
                });
        assert_eq!(
            greeter.read_line(Duration::from_secs(10)).as_deref(),
            Some("ready"),
            "b's greeter did not start"
        );
        Self {
            _sidecars: sidecars,
            _greeter: greeter,
            _control_plane: control_plane,
            lan,
        }
    }

    /// A waiting client in `from` as uid 1000 (an app, so m's is captured):
    /// the greeting and the answer, or why there were none.
    fn exchange(&self, from: &Netns, line: &str) -> Result<String, String> {
        let out = from
            .command_as(&User::uid(1000), tool("timeout"))
            .arg("10")
            .arg(tool("python3"))
            .args([
                "-c",
                WAITING_CLIENT,
                &B_IP.to_string(),
                &GREETER_PORT.to_string(),
                line,
            ])
            .output()
            .expect("run the client");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// m's app, meshed, talks to b's server-first app through mesh TLS,
    /// which b's sidecar terminated (the first inbound handshake of b).
    fn mesh_client_is_greeted(&self, step: &str) {
        let line = secret(step);
        assert_eq!(
            self.exchange(self.lan.host("m"), &line),
            Ok(greeted(&line)),
            "m's app, meshed, talks to b's server-first app through mesh TLS"
        );
        let terminated = metric(
            &curl(self.lan.host("b"), "http://127.0.0.1:15020/metrics"),
            "palisade_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "success")],
        );
        assert_eq!(
            terminated, 1.0,
            "b terminated m's mesh TLS on the server-first port, instead of refusing it or \
             handing the ClientHello to the app"
        );
    }

    fn greeter_log(&self) -> String {
        fs::read_to_string(self.lan.dir().join("greeter-b.log")).unwrap_or_default()
    }
}

fn greeted(line: &str) -> String {
    format!("GREETING from b\nb got {line}\n")
}

#[test]
fn in_strict_mode_a_server_first_port_carries_mesh_tls_and_refuses_plaintext() {
    let scene = ServerFirst::start("strict");
    scene.mesh_client_is_greeted("strict-mesh");
    // A plain client waits for a greeting that never comes: refused.
    let plain = secret("strict-plain");
    let reply = scene.exchange(scene.lan.host("c"), &plain);
    assert!(
        !reply.as_ref().is_ok_and(|r| r.contains("GREETING")),
        "strict mode gives a plain client nothing of b's app; got {reply:?}"
    );
    assert!(
        !scene.greeter_log().contains(&C_IP.to_string()),
        "b's app never sees c:\n{}",
        scene.greeter_log()
    );
}

#[test]
fn in_permissive_mode_a_server_first_port_takes_mesh_tls_and_greets_a_silent_plain_client() {
    let scene = ServerFirst::start("permissive");
    scene.mesh_client_is_greeted("permissive-mesh");
    let log = scene.greeter_log();
    assert!(
        !log.contains("\\x16\\x03"),
        "b's app must never get a ClientHello as data:\n{log}"
    );
    // The app's own client, silent until greeted, is the app's.
    let plain = secret("permissive-plain");
    assert_eq!(
        scene.exchange(scene.lan.host("c"), &plain),
        Ok(greeted(&plain)),
        "a plain client that waits for the greeting gets it in permissive mode"
    );
}
