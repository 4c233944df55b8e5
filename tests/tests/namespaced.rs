//! Pods as network namespaces, with the real iptables rules, sidecars and
//! control plane: what a user of the mesh would see on a node.
//!
//! ```text
//!  host netns: control plane on 127.0.0.1 (certificates for app-a and app-b)
//!
//!  netns node: bridge br0 198.18.0.254 ── pod a 198.18.0.1    app client, sidecar (uid 1337), init rules
//!                                      ├── pod b 198.18.0.2    app :8080 :9090, sidecar (uid 1337), init rules
//!                                      └── c     198.18.0.129  app :8080, no sidecar: a plain host
//! ```
//!
//! All three share 198.18.0.0/24; the sidecars take `--mesh-networks
//! 198.18.0.0/25`: a and b are mesh peers, c is outside the mesh networks.
//!
//! Each test is one step of the scenario on a mesh of its own ([`Mesh::start`]),
//! so a broken step fails alone and under its own name; nextest runs them in
//! parallel, each LAN in namespaces of its own. Needs root (CI runs as root):
//! without it every test fails, never skips. A failing test prints the tail
//! of every log and the pods' nat tables; namespaces and processes are
//! removed when it ends, whatever happens (see `palisade_tests::netns`).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use palisade_tests::{
    ControlPlane, eventually, metric,
    netns::{
        App, Lan, Netns, PROXY_UID, Proc, Signal, User, certify, contains, curl_status, secret,
        send, sidecar_for_proxy_uid, tool,
    },
};

const A_ID: &str = "spiffe://cluster.local/ns/a/sa/app-a";
const B_ID: &str = "spiffe://cluster.local/ns/b/sa/app-b";
const A_TOKEN: &str = "token-of-app-a-0123456789";
const B_TOKEN: &str = "token-of-app-b-0123456789";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 129);
/// Holds a and b, not c.
const MESH_NETWORKS: &str = "198.18.0.0/25";
/// The app port of b and c that the mesh carries.
const APP_PORT: u16 = 8080;
/// b's port that both pods exclude from capture.
const EXCLUDED_PORT: u16 = 9090;

const ALLOW_ALL: &str = "default: allow\nrules: []\n";
const DENY_A_ON_APP_PORT: &str = "\
default: allow
rules:
  - port: 8080
    allow:
      - spiffe://cluster.local/ns/other/*
";

// === the scenario, one step per test ===

#[test]
fn app_a_reaches_app_b_through_both_sidecars() {
    let mesh = Mesh::start();
    let line = secret("mesh");
    // App b sees the connection come from its own sidecar, not from a.
    assert_eq!(
        send(mesh.a(), B_IP, APP_PORT, &line),
        Ok(App::reply("b", &line, B_IP, APP_PORT)),
        "a plain connect() from app a to {B_IP}:{APP_PORT} must reach app b through both sidecars"
    );
}

#[test]
fn the_wire_between_the_pods_carries_tls_and_none_of_the_plaintext() {
    let mesh = Mesh::start();
    let capture = mesh.lan.capture("mesh", "tcp");
    let line = secret("on-the-wire");
    mesh.a_reaches_b(&line);
    let pcap = capture.stop();

    let b = SocketAddrV4::new(B_IP, APP_PORT);
    let to_b = pcap.stream(A_IP, b);
    let from_b = pcap.stream_back(b, A_IP);
    assert!(
        !pcap.contains(line.as_bytes()),
        "the plaintext {line:?} crossed the link between the pods in clear ({} bytes captured)",
        pcap.bytes().len()
    );
    assert!(
        to_b.starts_with(&[0x16, 0x03]) && contains(&to_b, b"palisade/1"),
        "a -> b:{APP_PORT} must open with a TLS ClientHello offering ALPN palisade/1; \
         the first captured bytes are {:02x?}",
        &to_b[..to_b.len().min(16)]
    );
    assert!(
        contains(&from_b, &[0x17, 0x03, 0x03]),
        "b:{APP_PORT} -> a must answer with TLS application data records; \
         {} bytes captured, starting {:02x?}",
        from_b.len(),
        &from_b[..from_b.len().min(16)]
    );
}

#[test]
fn b_counts_the_inbound_connection_under_a_s_identity() {
    let mesh = Mesh::start();
    mesh.a_reaches_b(&secret("counted"));

    let inbound_from_a = metric(
        &mesh.metrics("b"),
        "palisade_connections_opened_total",
        &[
            ("direction", "inbound"),
            ("security", "mtls"),
            ("peer_identity", A_ID),
        ],
    );
    assert_eq!(
        inbound_from_a, 1.0,
        "b must count the one inbound mTLS connection from {A_ID}"
    );
    let outbound_to_b = metric(
        &mesh.metrics("a"),
        "palisade_connections_opened_total",
        &[
            ("direction", "outbound"),
            ("security", "mtls"),
            ("peer_identity", B_ID),
        ],
    );
    assert_eq!(
        outbound_to_b, 1.0,
        "a must count the one outbound mTLS connection to {B_ID}"
    );
}

#[test]
fn a_deny_policy_refuses_a_and_allowing_again_lets_it_back() {
    let mesh = Mesh::start();
    let line = secret("denied");
    mesh.a_reaches_b(&line);
    let denied = |metrics: &str| {
        metric(
            metrics,
            "palisade_authz_decisions_total",
            &[("decision", "deny"), ("port", "8080"), ("policy", "file")],
        )
    };
    // The series appears with the first denial; until then b has denied
    // nothing.
    let before = mesh.metrics("b");
    let denied_before = if before.contains("decision=\"deny\"") {
        denied(&before)
    } else {
        0.0
    };
    assert_eq!(
        denied_before, 0.0,
        "nothing is denied before the deny policy"
    );

    mesh.write_policy(DENY_A_ON_APP_PORT);
    let through = Ok(App::reply("b", &line, B_IP, APP_PORT));
    eventually(
        Duration::from_secs(10),
        "b to refuse a on port 8080 once the deny policy is written",
        || (send(mesh.a(), B_IP, APP_PORT, &line) != through).then_some(()),
    );
    assert_eq!(
        denied(&mesh.metrics("b")),
        1.0,
        "the refusal must be counted once in \
         palisade_authz_decisions_total{{decision=\"deny\",port=\"8080\",policy=\"file\"}}"
    );

    mesh.write_policy(ALLOW_ALL);
    eventually(
        Duration::from_secs(10),
        "a to get through again once every peer is allowed",
        || (send(mesh.a(), B_IP, APP_PORT, &line) == through).then_some(()),
    );
}

#[test]
fn in_permissive_mode_a_plain_host_reaches_b() {
    let mesh = Mesh::start();
    let line = secret("permissive");
    assert_eq!(
        send(mesh.c(), B_IP, APP_PORT, &line),
        Ok(App::reply("b", &line, B_IP, APP_PORT)),
        "in permissive mode c's plaintext must reach app b through b's sidecar"
    );
    let inbound_plain = metric(
        &mesh.metrics("b"),
        "palisade_connections_opened_total",
        &[("direction", "inbound"), ("security", "plaintext")],
    );
    assert_eq!(
        inbound_plain, 1.0,
        "b must count c's connection as inbound plaintext"
    );
}

#[test]
fn in_strict_mode_b_refuses_a_plain_host_but_not_a_mesh_peer() {
    let mut mesh = Mesh::start();
    mesh.restart_b(&["--inbound-mode=strict"]);

    let line = secret("strict");
    let reply = send(mesh.c(), B_IP, APP_PORT, &line);
    assert!(
        !reply.as_ref().is_ok_and(|r| r.contains(&line)),
        "in strict mode c's plaintext must not reach app b; got {reply:?}"
    );
    let plaintext_refused = metric(
        &mesh.metrics("b"),
        "palisade_tls_handshakes_total",
        &[
            ("direction", "inbound"),
            ("result", "failure"),
            ("reason", "plaintext"),
        ],
    );
    assert_eq!(
        plaintext_refused, 1.0,
        "strict mode must count c's attempt as an inbound handshake failure with reason plaintext"
    );
    assert_eq!(
        send(mesh.a(), B_IP, APP_PORT, &line),
        Ok(App::reply("b", &line, B_IP, APP_PORT)),
        "in strict mode a (in the mesh) must still reach app b"
    );
}

#[test]
fn an_excluded_port_and_a_host_outside_the_mesh_networks_pass_untouched() {
    let mesh = Mesh::start();
    let capture = mesh.lan.capture("passthrough", "tcp");
    let excluded = secret("excluded-port");
    let outside = secret("outside-mesh");
    assert_eq!(
        send(mesh.a(), B_IP, EXCLUDED_PORT, &excluded),
        Ok(App::reply("b", &excluded, A_IP, EXCLUDED_PORT)),
        "app a -> {B_IP}:{EXCLUDED_PORT} (excluded) must reach app b straight from a"
    );
    assert_eq!(
        send(mesh.a(), C_IP, APP_PORT, &outside),
        Ok(App::reply("c", &outside, A_IP, APP_PORT)),
        "app a -> {C_IP}:{APP_PORT} (outside the mesh networks) must reach app c"
    );
    let pcap = capture.stop();

    // On the wire, both carry the apps' bytes exactly as they wrote them.
    for (server, line, name) in [
        (SocketAddrV4::new(B_IP, EXCLUDED_PORT), &excluded, "b"),
        (SocketAddrV4::new(C_IP, APP_PORT), &outside, "c"),
    ] {
        let request = pcap.stream(A_IP, server);
        let response = pcap.stream_back(server, A_IP);
        assert!(
            request == format!("{line}\n").as_bytes()
                && response == App::reply(name, line, A_IP, server.port()).as_bytes(),
            "a <-> {server} must pass untouched; captured request {:?}, response {:?}",
            String::from_utf8_lossy(&request),
            String::from_utf8_lossy(&response)
        );
    }
    let outbound_plain = metric(
        &mesh.metrics("a"),
        "palisade_connections_opened_total",
        &[("direction", "outbound"), ("security", "plaintext")],
    );
    assert_eq!(
        outbound_plain, 1.0,
        "a must count its connection to {C_IP} (outside the mesh) as outbound plaintext; \
         the excluded port never reaches its sidecar"
    );
}

#[test]
fn init_remove_restores_the_nat_tables() {
    let mesh = Mesh::start();
    for (pod, before) in [("a", &mesh.nat_before_a), ("b", &mesh.nat_before_b)] {
        assert_ne!(
            &mesh.lan.host(pod).nat(),
            before,
            "`init` must have changed the nat table of {pod}"
        );
        mesh.lan
            .host(pod)
            .exec(&mesh.sidecar_bin, &["init", "--remove", "--ipv6=false"]);
        let after = mesh.lan.host(pod).nat();
        assert_eq!(
            &after, before,
            "after `init --remove` the nat table of {pod} must be as before `init`"
        );
    }
    // Without the rules, app b sees a itself again.
    let line = secret("removed");
    assert_eq!(
        send(mesh.a(), B_IP, APP_PORT, &line),
        Ok(App::reply("b", &line, A_IP, APP_PORT)),
        "without the capture rules app a must reach app b directly"
    );
}

// === the mesh every step starts from ===

/// Pods a and b with sidecars and capture rules, plain host c, on one LAN,
/// with certificates from a real control plane.
struct Mesh {
    // Dropped in this order: the processes, the control plane, then the LAN
    // (which prints its logs if the test failed, then deletes the namespaces).
    _sidecar_a: Sidecar,
    sidecar_b: Sidecar,
    _apps: [App; 2],
    sidecar_bin: PathBuf,
    certs_b: PathBuf,
    policy: PathBuf,
    nat_before_a: Vec<String>,
    nat_before_b: Vec<String>,
    _control_plane: ControlPlane,
    lan: Lan,
}

/// A `palisade-sidecar run` as uid 1337 inside a pod.
struct Sidecar(Proc);

// === impl Mesh ===

impl Mesh {
    /// Builds the LAN, certifies both pods, installs the capture rules with
    /// `palisade-sidecar init`, starts the apps and the sidecars, and returns
    /// once both sidecars are ready.
    fn start() -> Self {
        for name in [
            "ip",
            "iptables-save",
            "setpriv",
            "tcpdump",
            "python3",
            "curl",
        ] {
            tool(name);
        }
        let mut lan = Lan::new(NODE_IP, 24);
        lan.add_host("a", A_IP);
        lan.add_host("b", B_IP);
        lan.add_host("c", C_IP);

        let control_plane = lan.control_plane(&[(A_TOKEN, A_ID), (B_TOKEN, B_ID)]);
        let sidecar_bin = sidecar_for_proxy_uid(&lan);
        let certs_a = certify(&lan, &control_plane, "a", A_ID, A_TOKEN);
        let certs_b = certify(&lan, &control_plane, "b", B_ID, B_TOKEN);
        let policy_dir = lan.dir().join("policy-b");
        fs::create_dir(&policy_dir).expect("mkdir");
        let policy = policy_dir.join("policy.yaml");
        write_policy(&policy, ALLOW_ALL);

        let (a, b, c) = (lan.host("a"), lan.host("b"), lan.host("c"));
        let nat_before_a = a.nat();
        let nat_before_b = b.nat();
        let exclude_out = format!("--exclude-outbound-ports={EXCLUDED_PORT}");
        let exclude_in = format!("--exclude-inbound-ports={EXCLUDED_PORT}");
        a.exec(&sidecar_bin, &["init", "--ipv6=false", &exclude_out]);
        b.exec(&sidecar_bin, &["init", "--ipv6=false", &exclude_in]);

        let apps = [
            App::start(&lan, b, &User::root(), "b", &[APP_PORT, EXCLUDED_PORT]),
            App::start(&lan, c, &User::root(), "c", &[APP_PORT]),
        ];
        let policy_flag = format!("--policy={}", policy.display());
        let sidecar_a = Sidecar::start(&lan, a, "a", &sidecar_bin, &certs_a, &[]);
        let sidecar_b = Sidecar::start(&lan, b, "b", &sidecar_bin, &certs_b, &[&policy_flag]);
        Self {
            _sidecar_a: sidecar_a,
            sidecar_b,
            _apps: apps,
            sidecar_bin,
            certs_b,
            policy,
            nat_before_a,
            nat_before_b,
            _control_plane: control_plane,
            lan,
        }
    }

    fn a(&self) -> &Netns {
        self.lan.host("a")
    }

    fn c(&self) -> &Netns {
        self.lan.host("c")
    }

    /// Asserts that app a's `line` reaches app b through both sidecars: the
    /// mesh works before the step changes anything.
    fn a_reaches_b(&self, line: &str) {
        assert_eq!(
            send(self.a(), B_IP, APP_PORT, line),
            Ok(App::reply("b", line, B_IP, APP_PORT)),
            "before anything else, app a must reach app b through both sidecars"
        );
    }

    /// The `/metrics` of the sidecar of `pod`, fetched inside the pod.
    fn metrics(&self, pod: &str) -> String {
        self.lan.host(pod).exec(
            tool("curl"),
            &["-sf", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
        )
    }

    /// Replaces b's policy file in one rename, as a ConfigMap update would.
    fn write_policy(&self, text: &str) {
        write_policy(&self.policy, text);
    }

    /// Stops b's sidecar with SIGTERM (it must exit cleanly) and starts it
    /// again with `extra` flags.
    fn restart_b(&mut self, extra: &[&str]) {
        self.sidecar_b.terminate();
        let policy_flag = format!("--policy={}", self.policy.display());
        let flags: Vec<&str> = [policy_flag.as_str()]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        self.sidecar_b = Sidecar::start(
            &self.lan,
            self.lan.host("b"),
            "b-restarted",
            &self.sidecar_bin,
            &self.certs_b,
            &flags,
        );
    }
}

// === impl Sidecar ===

impl Sidecar {
    /// Starts the sidecar of `pod`, logging to `sidecar-NAME.log`, and waits
    /// for its `/ready`.
    fn start(
        lan: &Lan,
        pod: &Netns,
        name: &str,
        bin: &Path,
        cert_dir: &Path,
        extra: &[&str],
    ) -> Self {
        let log = lan.log(&format!("sidecar-{name}"));
        let mut proc = pod.spawn(
            &format!("sidecar {name}"),
            &User::uid(PROXY_UID),
            bin,
            |command| {
                command
                    .args(["run", "--cert-dir"])
                    .arg(cert_dir)
                    .args([
                        &format!("--mesh-networks={MESH_NETWORKS}"),
                        "--outbound-addr=127.0.0.1:15001",
                        "--inbound-addr=0.0.0.0:15006",
                        "--admin-addr=0.0.0.0:15020",
                        "--log-level=debug",
                    ])
                    .args(extra)
                    .stdout(log.try_clone().expect("log file"))
                    .stderr(log);
            },
        );
        eventually(
            Duration::from_secs(15),
            &format!("sidecar {name} to answer /ready with 200"),
            || {
                if let Some(status) = proc.exited() {
                    panic!("sidecar {name} exited ({status}) before it was ready");
                }
                (curl_status(pod, "http://127.0.0.1:15020/ready") == "200").then_some(())
            },
        );
        Self(proc)
    }

    /// SIGTERM: the sidecar must drain and exit cleanly.
    fn terminate(&mut self) {
        let status = self.0.stop(Signal::TERM);
        assert!(
            status.is_some_and(|s| s.success()),
            "{} must exit cleanly on SIGTERM; got {status:?}",
            self.0.what()
        );
    }
}

// === set-up ===

/// Replaces the policy file in one rename, as a ConfigMap update would.
fn write_policy(path: &Path, text: &str) {
    let next = path.with_extension("next");
    fs::write(&next, text).expect("write the policy");
    fs::rename(&next, path).expect("replace the policy");
}
