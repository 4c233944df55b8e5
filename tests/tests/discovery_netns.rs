//! Discovery in network namespaces: pods with real capture rules whose
//! sidecars take their certificates and their outbound decisions from a real
//! control plane, which follows a discovery file.
//!
//! ```text
//!  netns node: bridge br0 198.18.0.254 ── cp    198.18.0.200  control plane (--discovery-source file)
//!                                      ├── pod a 198.18.0.1    app client, sidecar (discovery), init rules
//!                                      ├── pod b 198.18.0.2    app :8080, sidecar (discovery), init rules
//!                                      ├── h     198.18.0.3    app :8080, no sidecar: a plain host
//!                                      └── c     198.18.0.4    app :8080, sidecar (Services test only)
//! ```
//!
//! The Services test adds cluster addresses in 198.19.0.0/24 that no host
//! has and nothing rewrites (no kube-proxy): a's only route there is a
//! default route to the node, which forwards nothing. A connection to one
//! works only because a's sidecar dials an endpoint itself.
//!
//! All of them share 198.18.0.0/24, which is also every sidecar's
//! `--mesh-networks`: without discovery a sidecar would take h for a mesh
//! peer. The attackers (`m` of `ns/evil/sa/m`, and `n`, a later workload)
//! have real sidecars with real certificates of the mesh: what they lack is
//! discovery's word that they belong at the address.
//!
//! Each test builds a mesh of its own. Needs root (CI runs as root): without
//! it every test fails, never skips; namespaces and processes are removed
//! when a test ends, whatever happens.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::chown,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use palisade_tests::{
    bin, eventually, metric,
    netns::{
        App, Lan, Netns, PROXY_UID, Proc, User, contains, curl, curl_status, run, secret, send,
        send_timed, sidecar_for_proxy_uid, tool,
    },
    write_tokens,
};

const A_ID: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B_ID: &str = "spiffe://cluster.local/ns/shop/sa/b";
const M_ID: &str = "spiffe://cluster.local/ns/evil/sa/m";
const N_ID: &str = "spiffe://cluster.local/ns/shop/sa/n";
const C_ID: &str = "spiffe://cluster.local/ns/shop/sa/c";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const CP_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const H_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
/// The Service shop/web: b and c behind it.
const WEB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// The Service web/legacy: h (no sidecar) behind it.
const LEGACY_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const SERVICE_PORT: u16 = 80;
const MESH_NETWORKS: &str = "198.18.0.0/24";
const APP_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(15);

// === the scenario, one step per test ===

#[test]
fn a_pod_of_another_identity_at_b_s_address_gets_no_byte_of_a_s_data() {
    let mut mesh = Mesh::start();
    mesh.a_reaches_b(&secret("before"));

    // m (ns/evil/sa/m, with a real mesh certificate) takes b's address;
    // discovery still says b must answer there.
    mesh.replace_b_with("m", M_ID);
    let line = secret("takeover");
    let capture = mesh.lan.capture("takeover", "tcp");
    let answer = send(mesh.a(), B_IP, APP_PORT, &line);
    let pcap = capture.stop();
    assert!(
        refused(&answer),
        "a's app must be refused at m, got {answer:?}"
    );
    assert!(
        !contains(pcap.bytes(), line.as_bytes()),
        "a's data crossed the wire in the clear"
    );
    let m_app = fs::read_to_string(mesh.lan.dir().join("app-m.log")).unwrap_or_default();
    assert!(
        !m_app.contains(&line),
        "m's app received a's data:\n{m_app}"
    );
    let text = mesh.metrics("a");
    assert!(
        metric(
            &text,
            "palisade_tls_handshakes_total",
            &[("direction", "outbound"), ("reason", "unexpected_identity")]
        ) >= 1.0,
        "a counts the refusal as unexpected_identity"
    );
    assert!(
        metric(
            &text,
            "palisade_outbound_decisions_total",
            &[("kind", "meshed")]
        ) >= 2.0
    );
    let log = fs::read_to_string(mesh.lan.dir().join("sidecar-a.log")).unwrap_or_default();
    assert!(
        log.lines().any(|l| l.contains("unexpected_identity")
            && l.contains(M_ID)
            && l.contains(B_ID)
            && l.contains(&B_IP.to_string())),
        "a logs the refusal with the destination, the expected and the presented identity"
    );
}

#[test]
fn a_plain_host_in_the_pod_network_is_reached_in_plain_tcp_at_once() {
    let mesh = Mesh::start();
    let line = secret("plain");
    let (reply, took) = send_timed(mesh.a(), H_IP, APP_PORT, &line).expect("a reaches h");
    assert_eq!(
        reply,
        App::reply("h", &line, A_IP, APP_PORT),
        "plain TCP, from a's address"
    );
    eprintln!("a reached the plain host h in {took:?} (connect to the end of the reply)");
    assert!(
        took < Duration::from_millis(50),
        "h answered after {took:?}"
    );
    let text = mesh.metrics("a");
    assert_eq!(
        metric(
            &text,
            "palisade_outbound_decisions_total",
            &[("kind", "unmeshed")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "palisade_connections_opened_total",
            &[("direction", "outbound"), ("security", "plaintext")]
        ),
        1.0
    );
    // An address discovery does not know, in the same network: plain TCP
    // too (permissive), counted apart.
    let nobody = send(mesh.a(), Ipv4Addr::new(198, 18, 0, 99), APP_PORT, "nobody");
    assert!(refused(&nobody), "nobody is at 198.18.0.99: {nobody:?}");
    assert_eq!(
        metric(
            &mesh.metrics("a"),
            "palisade_outbound_decisions_total",
            &[("kind", "unknown")]
        ),
        1.0
    );
}

#[test]
fn a_reused_address_answers_as_the_new_workload_once_discovery_says_so() {
    let mut mesh = Mesh::start();
    mesh.a_reaches_b(&secret("before"));

    // A bad edit of the discovery file keeps the state in use.
    fs::write(
        mesh.discovery.with_extension("next"),
        "workloads: [{name: x}]\n",
    )
    .expect("write");
    fs::rename(mesh.discovery.with_extension("next"), &mesh.discovery).expect("rename");
    eventually(WAIT, "the bad edit to be refused", || {
        (metric(
            &mesh.cp_metrics(),
            "palisade_ca_reloads_total",
            &[("source", "discovery_file"), ("result", "failure")],
        ) >= 1.0)
            .then_some(())
    });
    mesh.a_reaches_b(&secret("after-bad-edit"));

    // Both b and n claim the address: it fails closed.
    mesh.write_discovery(&[("shop/b", B_IP, Some(B_ID)), ("shop/n", B_IP, Some(N_ID))]);
    eventually(WAIT, "a to refuse the contested address", || {
        refused(&send(mesh.a(), B_IP, APP_PORT, "contested")).then_some(())
    });
    assert!(
        metric(
            &mesh.metrics("a"),
            "palisade_outbound_refusals_total",
            &[("reason", "conflict")]
        ) >= 1.0
    );

    // b is deleted and n has the address now; b's sidecar still answers
    // there (a terminating pod): the old identity is refused.
    mesh.write_discovery(&[("shop/n", B_IP, Some(N_ID))]);
    let line = secret("stale-b");
    let unexpected = |mesh: &Mesh| {
        metric(
            &mesh.metrics("a"),
            "palisade_tls_handshakes_total",
            &[("direction", "outbound"), ("reason", "unexpected_identity")],
        )
    };
    eventually(WAIT, "a to refuse b, now that n must answer", || {
        let answer = send(mesh.a(), B_IP, APP_PORT, &line);
        (refused(&answer) && unexpected(&mesh) >= 1.0).then_some(())
    });
    let b_app = fs::read_to_string(mesh.lan.dir().join("app-b.log")).unwrap_or_default();
    assert!(!b_app.contains(&line), "the stale b got a's data");

    // n takes the address: accepted.
    mesh.replace_b_with("n", N_ID);
    let line = secret("n");
    assert_eq!(
        send(mesh.a(), B_IP, APP_PORT, &line),
        Ok(App::reply("n", &line, B_IP, APP_PORT)),
        "a reaches n through both sidecars"
    );
}

#[test]
fn strict_outbound_mode_refuses_plain_tcp_to_the_pod_network() {
    let mesh = Mesh::start_with(&["--outbound-mode=strict"]);
    mesh.a_reaches_b(&secret("strict"));
    let answer = send(mesh.a(), H_IP, APP_PORT, &secret("h"));
    assert!(refused(&answer), "h is unmeshed: {answer:?}");
    let h_app = fs::read_to_string(mesh.lan.dir().join("app-h.log")).unwrap_or_default();
    assert!(
        !h_app.contains("PALISADE-SECRET"),
        "h got a's data:\n{h_app}"
    );
    let text = mesh.metrics("a");
    assert_eq!(
        metric(
            &text,
            "palisade_outbound_refusals_total",
            &[("reason", "strict_unmeshed")]
        ),
        1.0
    );
}

#[test]
fn a_service_address_nobody_has_reaches_each_endpoint_verified_as_its_own_identity() {
    let mut mesh = Mesh::start();
    mesh.add_pod("c", C_IP, C_ID);
    // As in a pod: a default route, here to the node, which has no route
    // to the cluster addresses and forwards nothing.
    mesh.a()
        .ip(&["route", "add", "default", "via", &NODE_IP.to_string()]);
    let services = format!(
        "services:\n\
         \x20 - name: shop/web\n    addresses: [{WEB_IP}]\n    ports:\n\
         \x20     - port: {SERVICE_PORT}\n        endpoints: [\"{B_IP}:{APP_PORT}\", \"{C_IP}:{APP_PORT}\"]\n\
         \x20 - name: web/legacy\n    addresses: [{LEGACY_IP}]\n    ports:\n\
         \x20     - port: {SERVICE_PORT}\n        endpoints: [\"{H_IP}:{APP_PORT}\"]\n"
    );
    let pods = [("shop/b", B_IP, Some(B_ID)), ("shop/c", C_IP, Some(C_ID))];
    mesh.write_discovery_with(&pods, &services);
    eventually(WAIT, "a's sidecar to know the Service", || {
        send(mesh.a(), WEB_IP, SERVICE_PORT, "hello")
            .ok()
            .filter(|r| !r.is_empty())
    });

    // Both endpoints serve, each through its own sidecar, and nothing is
    // ever sent to the cluster address.
    let capture = mesh
        .lan
        .capture("service", &format!("host {WEB_IP} or host {LEGACY_IP}"));
    let mut answered = Vec::new();
    for n in 0..16 {
        let line = secret(&format!("web-{n}"));
        let reply = send(mesh.a(), WEB_IP, SERVICE_PORT, &line).expect("a reaches the Service");
        let from = if reply == App::reply("b", &line, B_IP, APP_PORT) {
            "b"
        } else if reply == App::reply("c", &line, C_IP, APP_PORT) {
            "c"
        } else {
            panic!("an answer from neither endpoint, or not through its sidecar: {reply:?}");
        };
        answered.push(from);
    }
    assert!(
        answered.contains(&"b") && answered.contains(&"c"),
        "both endpoints serve: {answered:?}"
    );
    let text = mesh.metrics("a");
    let opened = |identity: &str| {
        metric(
            &text,
            "palisade_connections_opened_total",
            &[
                ("direction", "outbound"),
                ("security", "mtls"),
                ("peer_identity", identity),
            ],
        )
    };
    let to_b = answered.iter().filter(|h| **h == "b").count();
    assert!(
        opened(B_ID) >= to_b as f64 && opened(C_ID) >= (answered.len() - to_b) as f64,
        "each connection verified as its endpoint's own identity"
    );
    assert!(
        metric(
            &text,
            "palisade_outbound_decisions_total",
            &[("kind", "service")]
        ) >= 16.0
    );

    // The unmeshed endpoint gets plain TCP.
    let line = secret("legacy");
    assert_eq!(
        send(mesh.a(), LEGACY_IP, SERVICE_PORT, &line),
        Ok(App::reply("h", &line, A_IP, APP_PORT)),
        "plain TCP to h, from a's address"
    );
    let pcap = capture.stop();
    for cluster_ip in [WEB_IP, LEGACY_IP] {
        assert!(
            !pcap.contains(&cluster_ip.octets()),
            "a packet was sent to the cluster address {cluster_ip}"
        );
    }
    assert!(
        metric(
            &mesh.metrics("a"),
            "palisade_connections_opened_total",
            &[("direction", "outbound"), ("security", "plaintext")]
        ) >= 1.0
    );

    // c's sidecar dies (its pod is going away): connections still succeed,
    // on b, before discovery says so ...
    mesh.sidecars.retain(|(host, _)| host != "c");
    for n in 0..8 {
        let line = secret(&format!("c-down-{n}"));
        assert_eq!(
            send(mesh.a(), WEB_IP, SERVICE_PORT, &line),
            Ok(App::reply("b", &line, B_IP, APP_PORT)),
            "the refusing endpoint is skipped for the next"
        );
    }
    let failures = metric(
        &mesh.metrics("a"),
        "palisade_outbound_endpoint_failures_total",
        &[],
    );
    assert!(
        (1.0..=2.0).contains(&failures),
        "c is tried, marked down and passed over: {failures} failures"
    );

    // ... and once discovery has removed it, no connection fails.
    let updates = |mesh: &Mesh| {
        metric(
            &mesh.metrics("a"),
            "palisade_discovery_updates_total",
            &[("result", "success")],
        )
    };
    let before = updates(&mesh);
    mesh.write_discovery_with(
        &[("shop/b", B_IP, Some(B_ID))],
        &services.replace(&format!(", \"{C_IP}:{APP_PORT}\""), ""),
    );
    eventually(WAIT, "a's sidecar to apply the update", || {
        (updates(&mesh) > before).then_some(())
    });
    for n in 0..16 {
        let line = secret(&format!("after-{n}"));
        assert_eq!(
            send(mesh.a(), WEB_IP, SERVICE_PORT, &line),
            Ok(App::reply("b", &line, B_IP, APP_PORT)),
            "connection {n} after the update"
        );
    }
}

#[test]
fn an_inbound_policy_refuses_before_the_app_audit_lets_through_and_the_deny_list_cuts_open_connections()
 {
    let mut mesh = Mesh::start();
    // c: a client pod of the mesh, following discovery as a does.
    mesh.lan.add_host("c", C_IP);
    mesh.lan
        .host("c")
        .exec(&mesh.sidecar_bin, &["init", "--ipv6=false"]);
    let pods = [("shop/b", B_IP, Some(B_ID)), ("shop/c", C_IP, Some(C_ID))];
    mesh.write_discovery_with(&pods, "");
    mesh.start_sidecar("c", "c", C_ID, true, &[]);
    let before = mesh.policy_version("b");
    let line = secret("c-before");
    assert_eq!(
        send(mesh.lan.host("c"), B_IP, APP_PORT, &line),
        Ok(App::reply("b", &line, B_IP, APP_PORT)),
        "without a policy the mesh default allows c"
    );

    // deny by default, and 8080 for a alone.
    let policy = |enforcement: &str| {
        format!(
            "policies:\n\
             \x20 - name: shop/b-inbound\n    spec:\n\
             \x20     podSelector: {{matchLabels: {{app: b}}}}\n\
             \x20     defaultAction: deny\n\
             \x20     enforcement: {enforcement}\n\
             \x20     rules: [{{ports: [http], allow: [{{serviceAccount: {{namespace: shop, name: a}}}}]}}]\n"
        )
    };
    mesh.write_discovery_with(&pods, &policy("enforce"));
    let enforced = mesh.wait_policy_change("b", &before);
    mesh.a_reaches_b(&secret("a-allowed"));
    let line = secret("c-refused");
    let answer = send(mesh.lan.host("c"), B_IP, APP_PORT, &line);
    assert!(refused(&answer), "c must be refused at b, got {answer:?}");
    let b_app = fs::read_to_string(mesh.lan.dir().join("app-b.log")).unwrap_or_default();
    assert!(
        !b_app.contains(&line),
        "b's app received c's bytes:\n{b_app}"
    );
    let decisions = |mesh: &Mesh, decision: &str| {
        metric(
            &mesh.metrics("b"),
            "palisade_authz_decisions_total",
            &[
                ("decision", decision),
                ("port", "8080"),
                ("policy", "shop/b-inbound"),
            ],
        )
    };
    assert!(decisions(&mesh, "deny") >= 1.0, "b counts the refusal");
    assert!(decisions(&mesh, "allow") >= 1.0, "and a's allow");
    // The access log: one JSON line per judged connection, with the peer.
    let access = access_log(&mesh);
    let logged = |peer: &str, decision: &str| {
        access.iter().any(|e| {
            e["peer"] == peer
                && e["decision"] == decision
                && e["port"] == 8080
                && e["policy"] == "shop/b-inbound"
        })
    };
    assert!(
        logged(C_ID, "deny"),
        "b's access log has c's refusal: {access:?}"
    );
    assert!(
        access.iter().any(|e| e["peer"] == A_ID
            && e["decision"] == "allow"
            && e["bytes_in"].as_u64() > Some(0)),
        "and a's allowed connection with its bytes: {access:?}"
    );

    // audit: c passes, counted as what enforce would refuse.
    mesh.write_discovery_with(&pods, &policy("audit"));
    let audited = mesh.wait_policy_change("b", &enforced);
    let line = secret("c-audited");
    assert_eq!(
        send(mesh.lan.host("c"), B_IP, APP_PORT, &line),
        Ok(App::reply("b", &line, B_IP, APP_PORT)),
        "audit mode refuses nothing"
    );
    assert!(
        decisions(&mesh, "audit_deny") >= 1.0,
        "b counts c as audit_deny"
    );

    // The deny list: c's open connection to b is cut, whatever the policy.
    let mut open =
        mesh.lan
            .host("c")
            .spawn("c's open connection", &User::root(), tool("python3"), |c| {
                c.args(["-c", HOLD, &B_IP.to_string(), &APP_PORT.to_string()])
                    .stdout(Stdio::piped());
            });
    assert_eq!(
        open.read_line(WAIT).as_deref(),
        Some("open"),
        "c connects to b"
    );
    eventually(WAIT, "c's connection to be open at b", || {
        (metric(
            &mesh.metrics("b"),
            "palisade_connections_active",
            &[("direction", "inbound")],
        ) >= 1.0)
            .then_some(())
    });
    let deny = format!(
        "{}denyLists:\n  - name: incident-42\n    spec: {{identities: [{C_ID}]}}\n",
        policy("audit")
    );
    let written = std::time::Instant::now();
    mesh.write_discovery_with(&pods, &deny);
    let closed = open.read_line(Duration::from_secs(9));
    let took = written.elapsed();
    assert_eq!(closed.as_deref(), Some("closed"), "b closes c's connection");
    eprintln!("the deny list cut c's open connection {took:?} after the file changed");
    assert!(took <= Duration::from_secs(5), "cut after {took:?}");
    let text = mesh.metrics("b");
    assert!(metric(&text, "palisade_connections_revoked_total", &[]) >= 1.0);
    // The cut connection is logged with what it moved ("half a line").
    let cut = eventually(WAIT, "b to log c's cut connection", || {
        access_log(&mesh)
            .into_iter()
            .find(|e| e["peer"] == C_ID && e["decision"] == "audit_deny" && e["bytes_in"] == 11)
    });
    assert!(cut["duration_ms"].as_u64() > Some(0), "{cut}");
    let line = secret("c-denied");
    assert!(
        refused(&send(mesh.lan.host("c"), B_IP, APP_PORT, &line)),
        "c stays refused"
    );
    assert!(
        metric(
            &mesh.metrics("b"),
            "palisade_authz_decisions_total",
            &[("decision", "deny"), ("policy", "deny-list")]
        ) >= 1.0
    );
    mesh.a_reaches_b(&secret("a-still"));
    assert_eq!(
        audited,
        mesh.policy_version("b"),
        "the deny list is not b's policy: its version stays"
    );
}

/// The lines of b's access log (its sidecar's stdout, beside its logs).
fn access_log(mesh: &Mesh) -> Vec<serde_json::Value> {
    let log = fs::read_to_string(mesh.lan.dir().join("sidecar-b.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.starts_with("{\"time\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Holds one connection open: sends half a line, says `open`, and says
/// `closed` when the other side closes it.
const HOLD: &str = r#"
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
conn.sendall(b"half a line")
print("open", flush=True)
while conn.recv(4096):
    pass
print("closed", flush=True)
"#;

// === the mesh every step starts from ===

/// The control plane, pods a and b with sidecars following discovery, and
/// plain host h, on one LAN.
struct Mesh {
    // Dropped in this order: the processes, then the LAN (which prints its
    // logs if the test failed, then deletes the namespaces).
    sidecars: Vec<(String, Proc)>,
    apps: Vec<(String, App)>,
    _control_plane: Proc,
    sidecar_bin: PathBuf,
    ca_dir: PathBuf,
    cp: ControlPlaneAddr,
    discovery: PathBuf,
    lan: Lan,
}

/// Where the control plane of the LAN answers.
struct ControlPlaneAddr {
    grpc: String,
}

// === impl Mesh ===

impl Mesh {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// Builds the LAN, starts the control plane in its own namespace with
    /// the discovery file, installs capture rules in a and b, starts the
    /// apps and the sidecars, and returns once a's stream is synced.
    fn start_with(a_flags: &[&str]) -> Self {
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
        lan.add_host("cp", CP_IP);
        lan.add_host("a", A_IP);
        lan.add_host("b", B_IP);
        lan.add_host("h", H_IP);

        let ca_dir = lan.dir().join("ca");
        run(Command::new(bin("palisade-control-plane"))
            .args(["ca", "init", "--out"])
            .arg(&ca_dir)
            .stdout(Stdio::null()));
        let tokens = lan.dir().join("tokens.yaml");
        write_tokens(
            &tokens,
            &[
                (&token(A_ID), A_ID),
                (&token(B_ID), B_ID),
                (&token(M_ID), M_ID),
                (&token(N_ID), N_ID),
                (&token(C_ID), C_ID),
            ],
        )
        .expect("tokens");
        let discovery = lan.dir().join("discovery.yaml");
        write_discovery(
            &discovery,
            &[
                ("shop/a", A_IP, Some(A_ID)),
                ("shop/b", B_IP, Some(B_ID)),
                ("web/h", H_IP, None),
            ],
            "",
        );
        let grpc = format!("{CP_IP}:15012");
        let log = lan.log("control-plane");
        let control_plane = lan.host("cp").spawn(
            "control plane",
            &User::root(),
            bin("palisade-control-plane"),
            |c| {
                c.arg("serve")
                    .arg("--ca-dir")
                    .arg(&ca_dir)
                    .args(["--authenticator", "static", "--static-tokens"])
                    .arg(&tokens)
                    .args([
                        "--grpc-addr",
                        &grpc,
                        "--admin-addr",
                        &format!("{CP_IP}:15014"),
                    ])
                    .args(["--discovery-source", "file", "--discovery-file"])
                    .arg(&discovery)
                    .args(["--log-level", "debug"])
                    .stdout(log.try_clone().expect("log"))
                    .stderr(log);
            },
        );
        let mut mesh = Self {
            sidecars: Vec::new(),
            apps: Vec::new(),
            _control_plane: control_plane,
            sidecar_bin: sidecar_for_proxy_uid(&lan),
            ca_dir,
            cp: ControlPlaneAddr { grpc },
            discovery,
            lan,
        };
        eventually(WAIT, "the control plane to be ready", || {
            (curl_status(mesh.lan.host("cp"), &format!("http://{CP_IP}:15014/ready")) == "200")
                .then_some(())
        });
        fs::copy(
            mesh.ca_dir.join("ca.crt"),
            mesh.lan.dir().join("bundle.crt"),
        )
        .expect("bundle");

        for pod in ["a", "b"] {
            mesh.lan
                .host(pod)
                .exec(&mesh.sidecar_bin, &["init", "--ipv6=false"]);
        }
        mesh.start_app("b", "b");
        mesh.start_app("h", "h");
        mesh.start_sidecar("a", "a", A_ID, true, a_flags);
        mesh.start_sidecar("b", "b", B_ID, true, &[]);
        mesh
    }

    fn a(&self) -> &Netns {
        self.lan.host("a")
    }

    fn start_app(&mut self, host: &str, name: &str) {
        let app = App::start(
            &self.lan,
            self.lan.host(host),
            &User::root(),
            name,
            &[APP_PORT],
        );
        self.apps.push((host.to_owned(), app));
    }

    /// Starts a sidecar in `host` for `identity`, certified by the control
    /// plane; with `discovery`, it follows the stream and is returned only
    /// once the stream has delivered its snapshot.
    fn start_sidecar(
        &mut self,
        host: &str,
        name: &str,
        identity: &str,
        discovery: bool,
        extra: &[&str],
    ) {
        let token_file = self.lan.dir().join(format!("token-{name}"));
        fs::write(&token_file, token(identity)).expect("token");
        chown(&token_file, Some(PROXY_UID), Some(PROXY_UID)).expect("chown");
        let log = self.lan.log(&format!("sidecar-{name}"));
        let pod = self.lan.host(host);
        let bundle = self.lan.dir().join("bundle.crt");
        let proc = pod.spawn(
            &format!("sidecar {name}"),
            &User::uid(PROXY_UID),
            &self.sidecar_bin,
            |c| {
                c.args([
                    "run",
                    "--control-plane",
                    &format!("https://{}", self.cp.grpc),
                ])
                .arg("--bundle")
                .arg(&bundle)
                .args(["--identity", identity])
                .arg("--token-file")
                .arg(&token_file)
                .args([
                    &format!("--discovery={discovery}"),
                    &format!("--mesh-networks={MESH_NETWORKS}"),
                    "--outbound-addr=127.0.0.1:15001",
                    "--inbound-addr=0.0.0.0:15006",
                    "--admin-addr=0.0.0.0:15020",
                    "--log-level=debug",
                    "--access-log=json",
                ])
                .args(extra)
                .stdout(log.try_clone().expect("log"))
                .stderr(log);
            },
        );
        self.sidecars.push((host.to_owned(), proc));
        eventually(WAIT, &format!("sidecar {name} to be ready"), || {
            let ready = curl_status(pod, "http://127.0.0.1:15020/ready") == "200";
            let synced = !discovery
                || metric(
                    &self.metrics(host),
                    "palisade_discovery_stream_connected",
                    &[],
                ) == 1.0;
            (ready && synced).then_some(())
        });
    }

    /// Adds pod `name` at `address`: capture rules, its app, and a sidecar of
    /// `identity` (a server: it does not follow discovery).
    fn add_pod(&mut self, name: &str, address: Ipv4Addr, identity: &str) {
        self.lan.add_host(name, address);
        self.lan
            .host(name)
            .exec(&self.sidecar_bin, &["init", "--ipv6=false"]);
        self.start_app(name, name);
        self.start_sidecar(name, name, identity, false, &[]);
    }

    /// Takes pod b's host away and puts host `name` (with a sidecar of
    /// `identity`, not following discovery) at b's address.
    fn replace_b_with(&mut self, name: &str, identity: &str) {
        self.sidecars.retain(|(host, _)| host != "b");
        self.apps.retain(|(host, _)| host != "b");
        self.lan.remove_host("b");
        self.lan.add_host(name, B_IP);
        // The others still know b's MAC at the address, as a node does
        // until its neighbour entry goes stale.
        for host in ["a", "h", "cp"] {
            self.lan.host(host).ip(&["neigh", "flush", "all"]);
        }
        self.lan
            .host(name)
            .exec(&self.sidecar_bin, &["init", "--ipv6=false"]);
        self.start_app(name, name);
        self.start_sidecar(name, name, identity, false, &[]);
    }

    /// Asserts that app a's `line` reaches app b through both sidecars.
    fn a_reaches_b(&self, line: &str) {
        assert_eq!(
            send(self.a(), B_IP, APP_PORT, line),
            Ok(App::reply("b", line, B_IP, APP_PORT)),
            "app a must reach app b through both sidecars"
        );
    }

    /// The `/metrics` of the sidecar in `host`, fetched inside it.
    fn metrics(&self, host: &str) -> String {
        curl(self.lan.host(host), "http://127.0.0.1:15020/metrics")
    }

    /// The control plane's `/metrics`.
    fn cp_metrics(&self) -> String {
        curl(
            self.lan.host("cp"),
            &format!("http://{CP_IP}:15014/metrics"),
        )
    }

    /// The version of the policy in force in `host`'s sidecar.
    fn policy_version(&self, host: &str) -> String {
        let text = self.metrics(host);
        text.lines()
            .find(|l| l.starts_with("palisade_policy_info{"))
            .and_then(|l| l.split("version=\"").nth(1))
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until `host`'s policy version is no longer `before`; the new one.
    fn wait_policy_change(&self, host: &str, before: &str) -> String {
        eventually(
            WAIT,
            &format!("{host}'s sidecar to take the new policy"),
            || {
                let now = self.policy_version(host);
                (now != before && !now.is_empty()).then_some(now)
            },
        )
    }

    /// Rewrites the discovery file with a and h as at the start, and
    /// `workloads`.
    fn write_discovery(&self, workloads: &[(&str, Ipv4Addr, Option<&str>)]) {
        self.write_discovery_with(workloads, "");
    }

    /// [`Self::write_discovery`], and `services` (the file's `services:`).
    fn write_discovery_with(&self, workloads: &[(&str, Ipv4Addr, Option<&str>)], services: &str) {
        let mut all = vec![("shop/a", A_IP, Some(A_ID)), ("web/h", H_IP, None)];
        all.extend_from_slice(workloads);
        write_discovery(&self.discovery, &all, services);
    }
}

// === set-up ===

/// Whether the app's connection got no answer: the sidecar closed it (an
/// empty reply) or it failed.
fn refused(answer: &Result<String, String>) -> bool {
    !matches!(answer, Ok(reply) if !reply.is_empty())
}

/// The static token of `identity` (at least 16 characters).
fn token(identity: &str) -> String {
    format!("token-for-{}", identity.replace('/', "-"))
}

/// Replaces the discovery file in one rename, as a ConfigMap update would.
fn write_discovery(path: &Path, workloads: &[(&str, Ipv4Addr, Option<&str>)], services: &str) {
    let mut text = String::from("workloads:\n");
    for (name, address, identity) in workloads {
        text.push_str(&format!("  - name: {name}\n    addresses: [{address}]\n"));
        match identity {
            Some(id) => {
                // Labelled and declaring its port, as a pod of a Deployment.
                let app = name.rsplit('/').next().unwrap_or(name);
                text.push_str(&format!(
                    "    identity: {id}\n    labels: {{app: {app}}}\n    ports: [{{name: http, port: {APP_PORT}}}]\n"
                ));
            }
            None => text.push_str("    unmeshed: true\n"),
        }
    }
    text.push_str(services);
    let next = path.with_extension("next");
    fs::write(&next, text).expect("write the discovery file");
    fs::rename(&next, path).expect("replace the discovery file");
}
