//! The app's kubelet probes in network namespaces: the webhook rewrote them to
//! `/app-health/app/<probe>` on the sidecar's admin port, and the sidecar of
//! a strict pod with real capture rules performs the originals against its
//! app, while the app's ports stay closed to plaintext.
//!
//! ```text
//!  host netns: control plane on 127.0.0.1 (a certificate for app-b)
//!
//!  netns node: bridge br0 198.18.0.254  "kubelet": GET http://198.18.0.2:15020/app-health/app/<probe>
//!                 ├── a      198.18.0.1  no sidecar, no rules: a plain host of the pod network
//!                 └── pod b  198.18.0.2  init rules, sidecar (uid 1337, strict, --app-probes,
//!                                        --pod-ip 198.18.0.2), apps as uid 1000:
//!                                        HTTP :8080 (readiness), TCP :7001 (liveness)
//! ```
//!
//! The readiness probe is an `httpGet` of a path with a header, which the
//! HTTP app checks (it answers 404 to anything else, and kubelet's rules fail
//! a 404); the liveness probe is a `tcpSocket`. A probe the capture rules
//! caught would be refused as plaintext (HTTP) or accepted by the sidecar
//! itself (TCP): only the dead app tells the second apart.
//!
//! Each test builds a pod of its own ([`Pod::start`]). Needs root (CI runs as
//! root): without it every test fails, never skips. A failing test prints the
//! tail of every log and the hosts' nat tables; namespaces and processes are
//! removed when it ends, whatever happens (see `palisade_tests::netns`).

use std::{fs, net::Ipv4Addr, process::Stdio, time::Duration};

use palisade_tests::{
    ControlPlane, eventually, metric,
    netns::{
        App, Lan, Netns, Proc, Signal, User, curl, curl_status, mesh_pod, secret, send,
        sidecar_for_proxy_uid, tool,
    },
};

const B_ID: &str = "spiffe://cluster.local/ns/b/sa/app-b";
const B_TOKEN: &str = "token-of-app-b-0123456789";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const MESH_NETWORKS: &str = "198.18.0.0/24";
/// The uid b's apps run as: neither root nor the sidecar's.
const APP_UID: u32 = 1000;
/// The HTTP app's port, which the readiness probe gets.
const HTTP_PORT: u16 = 8080;
/// The TCP app's port, which the liveness probe connects to.
const TCP_PORT: u16 = 7001;
/// What the readiness probe asks for; the HTTP app answers 404 to anything else.
const HEALTH_PATH: &str = "/healthz";
const PROBE_HEADER: (&str, &str) = ("X-Probe-Token", "from-the-pod-spec");
/// The sidecar's start, and a probe's first answer.
const WAIT: Duration = Duration::from_secs(15);
/// A dead app's probe fails once the last result (reused for 250 ms) is stale.
const FAILS_WITHIN: Duration = Duration::from_secs(5);

// === the scenario, one step per test ===

#[test]
fn kubelet_s_rewritten_probes_pass_from_the_node_performed_at_the_pod_s_address() {
    let pod = Pod::start();
    for probe in ["readiness", "liveness"] {
        let answer = eventually(WAIT, &format!("the {probe} probe to pass"), || {
            Some(pod.kubelet_get(&format!("/app-health/app/{probe}"))).filter(|(s, _)| *s == 200)
        });
        assert_eq!(
            answer,
            (200, "ok\n".to_owned()),
            "GET /app-health/app/{probe} from the node must pass while b's app is up"
        );
    }

    // The app got the original probe: its path and header, kubelet's user
    // agent, from the pod's own address (not loopback, not the node).
    let seen = fs::read_to_string(pod.lan.dir().join("app-b-http.log")).unwrap_or_default();
    let (name, value) = PROBE_HEADER;
    assert!(
        seen.lines().any(|l| l.starts_with(&format!(
            "{B_IP} GET {HEALTH_PATH} {name}={value} user-agent=kube-probe/"
        ))),
        "b's HTTP app must see the readiness probe's GET {HEALTH_PATH} with {name}: {value} \
         and kubelet's user agent, from {B_IP}; it saw:\n{seen}"
    );
    // The probes left as uid 1337 and reached the app directly: the inbound
    // listener saw nothing.
    let metrics = pod.metrics();
    for family in [
        "palisade_connections_opened_total",
        "palisade_tls_handshakes_total",
    ] {
        assert_eq!(
            metric(&metrics, family, &[("direction", "inbound")]),
            0.0,
            "the probes must bypass b's inbound listener, yet {family} counted inbound ones"
        );
    }
}

#[test]
fn in_strict_mode_the_probed_ports_stay_closed_to_a_plain_host() {
    let pod = Pod::start();
    pod.probes_pass();

    let line = secret("probed-port");
    let reply = send(pod.a(), B_IP, TCP_PORT, &line);
    assert!(
        !reply.as_ref().is_ok_and(|r| r.contains(&line)),
        "in strict mode a's plaintext to {B_IP}:{TCP_PORT} must not reach b's app; got {reply:?}"
    );
    let status = curl_status(pod.a(), &format!("http://{B_IP}:{HTTP_PORT}{HEALTH_PATH}"));
    assert_eq!(
        status, "000",
        "in strict mode a's plain GET {B_IP}:{HTTP_PORT}{HEALTH_PATH} must get no HTTP answer"
    );
    let seen = fs::read_to_string(pod.lan.dir().join("app-b-http.log")).unwrap_or_default();
    assert!(
        !seen.contains(&A_IP.to_string()),
        "b's HTTP app must never see a connection from {A_IP}; it saw:\n{seen}"
    );
    let plaintext_refused = metric(
        &pod.metrics(),
        "palisade_tls_handshakes_total",
        &[
            ("direction", "inbound"),
            ("result", "failure"),
            ("reason", "plaintext"),
        ],
    );
    assert_eq!(
        plaintext_refused, 2.0,
        "b's sidecar must count both of a's attempts as inbound handshake failures with reason \
         plaintext"
    );
}

#[test]
fn a_dead_app_fails_its_probe_and_an_unknown_probe_is_not_found() {
    let mut pod = Pod::start();
    pod.probes_pass();

    // The TCP app dies: only its own probe fails, and says why.
    let status = pod.tcp_app.process().stop(Signal::KILL);
    assert!(status.is_some(), "b's TCP app must die on SIGKILL");
    let (_, why) = eventually(FAILS_WITHIN, "the liveness probe to fail", || {
        Some(pod.kubelet_get("/app-health/app/liveness")).filter(|(s, _)| *s == 503)
    });
    assert!(
        why.contains(&format!("{B_IP}:{TCP_PORT}"))
            && why.ends_with('\n')
            && why.lines().count() == 1,
        "the failed liveness probe must say in one line what it could not reach; got {why:?}"
    );
    assert_eq!(
        pod.kubelet_get("/app-health/app/readiness"),
        (200, "ok\n".to_owned()),
        "the readiness probe of the HTTP app, still up, must still pass"
    );

    // kubelet restarts the container: the probe passes again.
    pod.tcp_app = App::start(&pod.lan, pod.b(), &User::uid(APP_UID), "b-tcp", &[TCP_PORT]);
    eventually(WAIT, "the liveness probe to pass again", || {
        (pod.kubelet_get("/app-health/app/liveness").0 == 200).then_some(())
    });

    // The HTTP app dies too.
    let status = pod.http_app.stop(Signal::KILL);
    assert!(status.is_some(), "b's HTTP app must die on SIGKILL");
    let (_, why) = eventually(FAILS_WITHIN, "the readiness probe to fail", || {
        Some(pod.kubelet_get("/app-health/app/readiness")).filter(|(s, _)| *s == 503)
    });
    assert!(
        why.contains(&format!("{B_IP}:{HTTP_PORT}")),
        "the failed readiness probe must name what it could not reach; got {why:?}"
    );

    for unknown in ["/app-health/app/startup", "/app-health/other/readiness"] {
        assert_eq!(
            pod.kubelet_get(unknown).0,
            404,
            "GET {unknown}: no such probe was handed to the sidecar"
        );
    }
}

// === the pod every step starts from ===

/// Pod b (capture rules, its two apps, a strict sidecar with the rewritten
/// probes) and plain host a, on one LAN.
struct Pod {
    // Dropped in this order: the processes, the control plane, then the LAN
    // (which prints its logs if the test failed, then deletes the namespaces).
    _sidecar: Proc,
    tcp_app: App,
    http_app: Proc,
    _control_plane: ControlPlane,
    lan: Lan,
}

/// The readiness probe's app: answers `GET HEALTH_PATH` carrying the header
/// with 200, anything else with 404, and logs `PEER GET PATH NAME=VALUE
/// user-agent=AGENT -> STATUS` for each request.
const HTTP_APP: &str = r#"
import http.server, sys
port, path, name, value = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        got = self.headers.get(name)
        status = 200 if self.path == path and got == value else 404
        agent = self.headers.get("User-Agent")
        print(f"{self.client_address[0]} GET {self.path} {name}={got} user-agent={agent} -> {status}",
              file=sys.stderr, flush=True)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Health)
print("ready", flush=True)
server.serve_forever()
"#;

// === impl Pod ===

impl Pod {
    /// Builds the LAN, certifies b, installs b's capture rules with
    /// `palisade-sidecar init`, starts b's apps and its sidecar with the
    /// probes the webhook would hand it, and returns once the sidecar is
    /// ready.
    fn start() -> Self {
        for name in ["ip", "iptables-save", "setpriv", "python3", "curl"] {
            tool(name);
        }
        let mut lan = Lan::new(NODE_IP, 24);
        lan.add_host("a", A_IP);
        lan.add_host("b", B_IP);

        let control_plane = lan.control_plane(&[(B_TOKEN, B_ID)]);
        let b = lan.host("b");
        let app_user = User::uid(APP_UID);
        let tcp_app = App::start(&lan, b, &app_user, "b-tcp", &[TCP_PORT]);
        let http_app = start_http_app(&lan, b, &app_user);

        let (name, value) = PROBE_HEADER;
        let probes = serde_json::json!({
            "app/readiness": {
                "httpGet": {
                    "port": HTTP_PORT,
                    "path": HEALTH_PATH,
                    "scheme": "HTTP",
                    "httpHeaders": [{"name": name, "value": value}],
                },
                "timeoutSeconds": 1,
            },
            "app/liveness": {"tcpSocket": {"port": TCP_PORT}},
        });
        let sidecar = mesh_pod(
            &lan,
            b,
            &control_plane,
            &sidecar_for_proxy_uid(&lan),
            B_ID,
            B_TOKEN,
            MESH_NETWORKS,
            &[
                "--inbound-mode=strict",
                &format!("--app-probes={probes}"),
                &format!("--pod-ip={B_IP}"),
            ],
        );
        Self {
            _sidecar: sidecar,
            tcp_app,
            http_app,
            _control_plane: control_plane,
            lan,
        }
    }

    fn a(&self) -> &Netns {
        self.lan.host("a")
    }

    fn b(&self) -> &Netns {
        self.lan.host("b")
    }

    /// `GET path` on b's admin port from the node, as kubelet sends it: the
    /// status (0 when nothing answered within 5 s) and the body.
    fn kubelet_get(&self, path: &str) -> (u16, String) {
        let output = self
            .lan
            .node()
            .command(tool("curl"))
            .args(["-s", "--max-time", "5", "-w", "\n%{http_code}"])
            .arg(format!("http://{B_IP}:15020{path}"))
            .output()
            .expect("run curl in the node");
        let text = String::from_utf8_lossy(&output.stdout);
        let (body, status) = text.rsplit_once('\n').unwrap_or_default();
        (status.parse().unwrap_or(0), body.to_owned())
    }

    /// Waits until both probes pass: the apps are up before a step changes
    /// anything.
    fn probes_pass(&self) {
        for probe in ["readiness", "liveness"] {
            eventually(WAIT, &format!("the {probe} probe to pass"), || {
                (self.kubelet_get(&format!("/app-health/app/{probe}")).0 == 200).then_some(())
            });
        }
    }

    /// The `/metrics` of b's sidecar, fetched inside b.
    fn metrics(&self) -> String {
        curl(self.b(), "http://127.0.0.1:15020/metrics")
    }
}

// === set-up ===

/// Starts [`HTTP_APP`] in `pod` as `user`, logging to `app-b-http.log`, and
/// returns once it listens.
fn start_http_app(lan: &Lan, pod: &Netns, user: &User) -> Proc {
    let log = lan.log("app-b-http");
    let (name, value) = PROBE_HEADER;
    let mut proc = pod.spawn("app b-http", user, tool("python3"), |c| {
        c.args(["-u", "-c", HTTP_APP, &HTTP_PORT.to_string(), HEALTH_PATH])
            .args([name, value])
            .stdout(Stdio::piped())
            .stderr(log);
    });
    let line = proc.read_line(Duration::from_secs(10));
    assert_eq!(
        line.as_deref(),
        Some("ready"),
        "b's HTTP app on {HTTP_PORT} did not start (exit: {:?})",
        proc.exited()
    );
    proc
}
