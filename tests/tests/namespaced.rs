//! Pods as network namespaces, with the real iptables rules, sidecars and
//! control plane: what a user of the mesh would see on a node.
//!
//! ```text
//!  host netns: control plane on 127.0.0.1 (certificates for app-a and app-b)
//!
//!  netns node: bridge br0 ── veth ── pod a 198.18.0.1  app client, sidecar (uid 1337), init rules
//!                        ├── veth ── pod b 198.18.0.2  apps :8080 :9090, sidecar (uid 1337), init rules
//!                        └── veth ── c   198.18.0.129  app :8080, no sidecar: a plain host
//! ```
//!
//! All three share 198.18.0.0/24; the sidecars take `--mesh-networks
//! 198.18.0.0/25`: a and b are mesh peers, c is outside the mesh networks.
//!
//! Steps (1)..(7) follow the issue; every failure message names its step and
//! ends with the tails of every log and the pods' nat tables. Needs root (CI
//! runs as root): without it the test fails, never skips. Namespaces and
//! processes are removed by drop guards, also when a step panics; the children
//! also get a parent-death signal, so a killed run leaves no sidecar, app or
//! tcpdump behind, and the next run deletes the namespaces it left.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs::{self, File},
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::{PermissionsExt, chown},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use palisade_tests::{ControlPlane, bin, metric, require_root, require_tool};

const A_ID: &str = "spiffe://cluster.local/ns/a/sa/app-a";
const B_ID: &str = "spiffe://cluster.local/ns/b/sa/app-b";
const A_TOKEN: &str = "token-of-app-a-0123456789";
const B_TOKEN: &str = "token-of-app-b-0123456789";
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 129);
/// Holds a and b, not c.
const MESH_NETWORKS: &str = "198.18.0.0/25";
/// The app port of b and c that the mesh carries.
const APP_PORT: u16 = 8080;
/// b's port that both pods exclude from capture.
const EXCLUDED_PORT: u16 = 9090;
const PROXY_UID: u32 = 1337;
/// Every namespace of this file starts with it, followed by the test's pid.
const NETNS_PREFIX: &str = "palisade-e2e-";

const ALLOW_ALL: &str = "default: allow\nrules: []\n";
const DENY_A_ON_APP_PORT: &str = "\
default: allow
rules:
  - port: 8080
    allow:
      - spiffe://cluster.local/ns/other/*
";

/// An app: answers the first line of every connection with
/// `NAME got LINE from PEER-IP`, so the client sees who connected to the app.
const SERVER: &str = r#"
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(64)
def serve(conn, peer):
    with conn:
        conn.settimeout(10)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                return
            line += chunk
        conn.sendall(f"{name} got {line.decode().strip()} from {peer[0]}\n".encode())
print("ready", flush=True)
while True:
    conn, peer = s.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"#;

/// A client app: a plain `connect()`, one line out, everything back until EOF.
const CLIENT: &str = r#"
import socket, sys
host, port, line = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = socket.create_connection((host, port), timeout=5)
conn.sendall(line.encode() + b"\n")
reply = b""
while True:
    chunk = conn.recv(4096)
    if not chunk:
        break
    reply += chunk
sys.stdout.write(reply.decode(errors="replace"))
"#;

/// Fails the test with `$msg`, the logs and the nat tables unless `$cond` holds.
macro_rules! check {
    ($pods:expr, $cond:expr, $($msg:tt)+) => {
        let holds: bool = $cond;
        if !holds {
            $pods.fail(format!($($msg)+));
        }
    };
}

#[test]
fn two_pods_talk_mtls_through_their_sidecars_and_nothing_else_changes() {
    require_root();
    for tool in [
        "ip",
        "iptables-save",
        "setpriv",
        "tcpdump",
        "python3",
        "curl",
        "timeout",
        "kill",
    ] {
        require_tool(tool);
    }
    let started = Instant::now();
    sweep_stale_namespaces();

    // Declaration order is the reverse of drop order: the processes go
    // first, then the namespaces they ran in, then the control plane and files.
    let dir = tempfile::Builder::new()
        .prefix("palisade-e2e-")
        .tempdir()
        .expect("tempdir");
    let root = dir.path().to_owned();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
    let cp_dir = root.join("control-plane");
    fs::create_dir(&cp_dir).expect("mkdir");
    let cp = ControlPlane::start(&cp_dir, &[(A_TOKEN, A_ID), (B_TOKEN, B_ID)], &[])
        .expect("the control plane starts");
    let pods = Pods::new(&root);
    let sidecar_bin = sidecar_for_proxy_uid(&pods);
    let certs_a = certify(&pods, &cp, "a", A_ID, A_TOKEN);
    let certs_b = certify(&pods, &cp, "b", B_ID, B_TOKEN);
    let policy_dir = root.join("policy-b");
    fs::create_dir(&policy_dir).expect("mkdir");
    let policy = policy_dir.join("policy.yaml");
    write_policy(&policy, ALLOW_ALL);

    let nat_before_a = pods.a.nat();
    let nat_before_b = pods.b.nat();
    let exclude_out = format!("--exclude-outbound-ports={EXCLUDED_PORT}");
    let exclude_in = format!("--exclude-inbound-ports={EXCLUDED_PORT}");
    pods.a
        .exec(&sidecar_bin, &["init", "--ipv6=false", &exclude_out]);
    pods.b
        .exec(&sidecar_bin, &["init", "--ipv6=false", &exclude_in]);

    let _app_b = start_app(&pods, &pods.b, "b", APP_PORT);
    let _app_b_excluded = start_app(&pods, &pods.b, "b", EXCLUDED_PORT);
    let _app_c = start_app(&pods, &pods.c, "c", APP_PORT);
    let policy_flag = format!("--policy={}", policy.display());
    let _sidecar_a = Sidecar::start(&pods, &pods.a, "a", &sidecar_bin, &certs_a, &[]);
    let mut sidecar_b =
        Sidecar::start(&pods, &pods.b, "b", &sidecar_bin, &certs_b, &[&policy_flag]);

    let mesh_secret = secret("mesh");
    let excluded_secret = secret("excluded-port");
    let outside_secret = secret("outside-mesh");
    let pcap = root.join("link.pcap");
    let capture = Capture::start(&pods, &pcap);

    // (1) a plain connect() from app a to b's pod IP reaches app b, which sees
    // the connection come from its own sidecar, not from a.
    let reply = send(&pods.a, B_IP, APP_PORT, &mesh_secret);
    check!(
        pods,
        reply == Ok(format!("b got {mesh_secret} from {B_IP}\n")),
        "(1) app a -> {B_IP}:{APP_PORT} must reach app b through both sidecars; got {reply:?}"
    );

    // (6) an excluded port and a destination outside the mesh networks.
    let reply = send(&pods.a, B_IP, EXCLUDED_PORT, &excluded_secret);
    check!(
        pods,
        reply == Ok(format!("b got {excluded_secret} from {A_IP}\n")),
        "(6) app a -> {B_IP}:{EXCLUDED_PORT} (excluded) must reach app b straight from a; \
         got {reply:?}"
    );
    let reply = send(&pods.a, C_IP, APP_PORT, &outside_secret);
    check!(
        pods,
        reply == Ok(format!("c got {outside_secret} from {A_IP}\n")),
        "(6) app a -> {C_IP}:{APP_PORT} (outside the mesh networks) must reach app c; \
         got {reply:?}"
    );
    let captured = capture.stop(&pods);

    // (2) on the wire between the pods: TLS, and none of the apps' plaintext.
    let segments = tcp_segments(&captured);
    let to_b = stream(&segments, A_IP, SocketAddrV4::new(B_IP, APP_PORT));
    let from_b = stream_back(&segments, SocketAddrV4::new(B_IP, APP_PORT), A_IP);
    check!(
        pods,
        !contains(&captured, mesh_secret.as_bytes()),
        "(2) the plaintext {mesh_secret:?} crossed the link between the pods in clear \
         ({} bytes captured)",
        captured.len()
    );
    check!(
        pods,
        to_b.starts_with(&[0x16, 0x03]) && contains(&to_b, b"palisade/1"),
        "(2) a -> b:{APP_PORT} must open with a TLS ClientHello offering ALPN palisade/1; \
         the first captured bytes are {:02x?}",
        &to_b[..to_b.len().min(16)]
    );
    check!(
        pods,
        contains(&from_b, &[0x17, 0x03, 0x03]),
        "(2) b:{APP_PORT} -> a must answer with TLS application data records; \
         {} bytes captured, starting {:02x?}",
        from_b.len(),
        &from_b[..from_b.len().min(16)]
    );

    // (6) on the wire: the excluded port and the outside destination carry the
    // apps' bytes exactly as they wrote them.
    for (server, secret, name) in [
        (
            SocketAddrV4::new(B_IP, EXCLUDED_PORT),
            &excluded_secret,
            "b",
        ),
        (SocketAddrV4::new(C_IP, APP_PORT), &outside_secret, "c"),
    ] {
        let request = stream(&segments, A_IP, server);
        let response = stream_back(&segments, server, A_IP);
        check!(
            pods,
            request == format!("{secret}\n").as_bytes()
                && response == format!("{name} got {secret} from {A_IP}\n").as_bytes(),
            "(6) a <-> {server} must pass untouched; captured request {:?}, response {:?}",
            String::from_utf8_lossy(&request),
            String::from_utf8_lossy(&response)
        );
    }

    // (3) b counts an inbound mTLS connection from a, a an outbound one to b; a's
    // connection to c went out as plaintext.
    let b_metrics = pods.b.metrics();
    let inbound_from_a = metric(
        &b_metrics,
        "palisade_connections_opened_total",
        &[
            ("direction", "inbound"),
            ("security", "mtls"),
            ("peer_identity", A_ID),
        ],
    );
    check!(
        pods,
        inbound_from_a >= 1.0,
        "(3) b must count an inbound mTLS connection from {A_ID}; got {inbound_from_a}"
    );
    let a_metrics = pods.a.metrics();
    let outbound_to_b = metric(
        &a_metrics,
        "palisade_connections_opened_total",
        &[
            ("direction", "outbound"),
            ("security", "mtls"),
            ("peer_identity", B_ID),
        ],
    );
    check!(
        pods,
        outbound_to_b >= 1.0,
        "(3) a must count an outbound mTLS connection to {B_ID}; got {outbound_to_b}"
    );
    let outbound_plain = metric(
        &a_metrics,
        "palisade_connections_opened_total",
        &[("direction", "outbound"), ("security", "plaintext")],
    );
    check!(
        pods,
        outbound_plain >= 1.0,
        "(6) a must count its connection to {C_IP} (outside the mesh) as outbound plaintext; \
         got {outbound_plain}"
    );

    // (4) a deny policy on b refuses a, and counts it; allowing again lets a in.
    let denied = |pods: &Pods| {
        metric(
            &pods.b.metrics(),
            "palisade_authz_denied_total",
            &[("port", "8080"), ("peer_identity", A_ID)],
        )
    };
    check!(pods, denied(&pods) == 0.0, "(4) nothing is denied yet");
    write_policy(&policy, DENY_A_ON_APP_PORT);
    let deny_secret = secret("denied");
    let refused = poll(Duration::from_secs(10), || {
        send(&pods.a, B_IP, APP_PORT, &deny_secret)
            != Ok(format!("b got {deny_secret} from {B_IP}\n"))
    });
    check!(
        pods,
        refused,
        "(4) within 10 s of the policy change, b must refuse a on port {APP_PORT}"
    );
    let denied_now = denied(&pods);
    check!(
        pods,
        denied_now == 1.0,
        "(4) the refusal must be counted once in palisade_authz_denied_total{{port=\"8080\",\
         peer_identity=\"{A_ID}\"}}; got {denied_now}"
    );
    write_policy(&policy, ALLOW_ALL);
    let allowed = poll(Duration::from_secs(10), || {
        send(&pods.a, B_IP, APP_PORT, &deny_secret)
            == Ok(format!("b got {deny_secret} from {B_IP}\n"))
    });
    check!(
        pods,
        allowed,
        "(4) within 10 s of allowing every peer again, a must get through"
    );

    // (5) permissive: a client without a sidecar reaches the app.
    let plain_secret = secret("permissive");
    let reply = send(&pods.c, B_IP, APP_PORT, &plain_secret);
    check!(
        pods,
        reply == Ok(format!("b got {plain_secret} from {B_IP}\n")),
        "(5) in permissive mode c's plaintext must reach app b through b's sidecar; \
         got {reply:?}"
    );
    let inbound_plain = metric(
        &pods.b.metrics(),
        "palisade_connections_opened_total",
        &[("direction", "inbound"), ("security", "plaintext")],
    );
    check!(
        pods,
        inbound_plain >= 1.0,
        "(5) b must count c's connection as inbound plaintext; got {inbound_plain}"
    );

    // (5) strict: the same client is refused and counted; a mesh client is not.
    sidecar_b.terminate(&pods);
    sidecar_b = Sidecar::start(
        &pods,
        &pods.b,
        "b-strict",
        &sidecar_bin,
        &certs_b,
        &[&policy_flag, "--inbound-mode=strict"],
    );
    let strict_secret = secret("strict");
    let reply = send(&pods.c, B_IP, APP_PORT, &strict_secret);
    check!(
        pods,
        !reply.as_ref().is_ok_and(|r| r.contains(&strict_secret)),
        "(5) in strict mode c's plaintext must not reach app b; got {reply:?}"
    );
    let plaintext_refused = metric(
        &pods.b.metrics(),
        "palisade_tls_handshakes_total",
        &[
            ("direction", "inbound"),
            ("result", "failure"),
            ("reason", "plaintext"),
        ],
    );
    check!(
        pods,
        plaintext_refused == 1.0,
        "(5) strict mode must count c's attempt as an inbound handshake failure with \
         reason plaintext; got {plaintext_refused}"
    );
    let reply = send(&pods.a, B_IP, APP_PORT, &strict_secret);
    check!(
        pods,
        reply == Ok(format!("b got {strict_secret} from {B_IP}\n")),
        "(5) in strict mode a (in the mesh) must still reach app b; got {reply:?}"
    );
    drop(sidecar_b);

    // (7) `init --remove` leaves the nat tables as they were before `init`.
    pods.a
        .exec(&sidecar_bin, &["init", "--remove", "--ipv6=false"]);
    pods.b
        .exec(&sidecar_bin, &["init", "--remove", "--ipv6=false"]);
    for (pod, before) in [(&pods.a, &nat_before_a), (&pods.b, &nat_before_b)] {
        let after = pod.nat();
        check!(
            pods,
            &after == before,
            "(7) after `init --remove` the nat table of {} must be as before `init`:\n\
             before {before:#?}\nafter {after:#?}",
            pod.name
        );
    }
    eprintln!("the namespaced scenario took {:?}", started.elapsed());
}

// === the pods ===

/// The namespaces of one test run and the directory of its files and logs.
struct Pods {
    dir: PathBuf,
    // The pods are deleted before the node with the bridge their veths join.
    a: Netns,
    b: Netns,
    c: Netns,
    node: Netns,
}

/// A network namespace of this test, deleted when dropped (also on panic).
struct Netns {
    name: String,
}

// === impl Pods ===

impl Pods {
    /// `node` with bridge `br0`; `a`, `b`, `c` each with `eth0` on the bridge.
    fn new(dir: &Path) -> Self {
        let node = Netns::new("node");
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&["link", "set", "br0", "up"]);
        let pod = |role: &str, ip: Ipv4Addr| {
            let ns = Netns::new(role);
            let peer = format!("veth-{role}");
            ns.ip(&[
                "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &node.name,
            ]);
            node.ip(&["link", "set", &peer, "master", "br0"]);
            node.ip(&["link", "set", &peer, "up"]);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns
        };
        Self {
            dir: dir.to_owned(),
            a: pod("a", A_IP),
            b: pod("b", B_IP),
            c: pod("c", C_IP),
            node,
        }
    }

    /// Panics with `message`, then the tail of every log and the nat tables.
    fn fail(&self, message: String) -> ! {
        panic!("{message}\n{}", self.diagnostics());
    }

    fn diagnostics(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension() == Some(OsStr::new("log")));
        logs.sort();
        for log in logs {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(
                out,
                "--- {} (last {} of {} lines)",
                log.file_name().unwrap_or_default().to_string_lossy(),
                lines.len().min(40),
                lines.len()
            );
            for line in &lines[lines.len().saturating_sub(40)..] {
                let _ = writeln!(out, "{line}");
            }
        }
        for pod in [&self.a, &self.b] {
            let save = pod
                .command(tool("iptables-save"))
                .args(["-t", "nat"])
                .output();
            let text = save
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let _ = writeln!(out, "--- nat table of {}\n{text}", pod.name);
        }
        out
    }
}

// === impl Netns ===

impl Netns {
    fn new(role: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{NETNS_PREFIX}{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new(tool("ip")).args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME args`; panics unless it succeeds.
    fn ip(&self, args: &[&str]) {
        run(Command::new(tool("ip")).args(["-n", &self.name]).args(args));
    }

    /// A command running `program` inside the namespace (`ip netns exec`
    /// execs it in place, so the child's pid is the program's).
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(tool("ip"));
        command
            .args(["netns", "exec", &self.name])
            .arg(program)
            .stdin(Stdio::null());
        command
    }

    /// Runs `program args` inside; panics unless it succeeds; returns stdout.
    fn exec(&self, program: impl AsRef<OsStr>, args: &[&str]) -> String {
        run(self.command(program).args(args))
    }

    /// `iptables-save -t nat` without comments and counters.
    fn nat(&self) -> Vec<String> {
        self.exec(tool("iptables-save"), &["-t", "nat"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
                (true, Some(at)) => format!("{} [0:0]", &l[..at]),
                _ => l.to_owned(),
            })
            .collect()
    }

    /// The sidecar's `/metrics`, fetched inside the pod.
    fn metrics(&self) -> String {
        self.exec(
            tool("curl"),
            &["-sf", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deleted = Command::new(tool("ip"))
            .args(["netns", "delete", &self.name])
            .status();
        if !deleted.is_ok_and(|s| s.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

/// Deletes namespaces an earlier run of this file left behind when it was
/// killed before its guards ran: those whose test process is gone.
fn sweep_stale_namespaces() {
    let Ok(list) = Command::new(tool("ip")).args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            eprintln!("deleting the stale network namespace {name}");
            let _ = Command::new(tool("ip"))
                .args(["netns", "delete", name])
                .status();
        }
    }
}

// === processes in the pods ===

/// A long-running child process, killed when dropped. It is also started with
/// a parent-death signal, so it dies with the test process whatever happens.
struct Proc {
    child: Child,
    what: String,
}

/// A `palisade-sidecar run` as uid 1337 inside a pod.
struct Sidecar(Proc);

/// tcpdump on the bridge the pods are plugged into.
struct Capture {
    proc: Proc,
    file: PathBuf,
}

// === impl Proc ===

impl Proc {
    /// Runs `setpriv [setpriv_args] --pdeathsig KILL program args...` in `ns`.
    fn spawn(
        ns: &Netns,
        what: String,
        setpriv_args: &[&str],
        program: impl AsRef<OsStr>,
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let mut command = ns.command(tool("setpriv"));
        command
            .args(setpriv_args)
            .args(["--pdeathsig", "KILL"])
            .arg(program);
        configure(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Self { child, what }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` and waits up to 10 s for the exit; kills it after that.
    fn stop(&mut self, signal: &str) -> Option<std::process::ExitStatus> {
        let _ = Command::new(tool("kill"))
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} ignored SIG{signal} for 10 s: killing it", self.what);
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === impl Sidecar ===

impl Sidecar {
    /// Starts the sidecar of `pod`, logging to `sidecar-NAME.log`, and waits
    /// for its `/ready`.
    fn start(
        pods: &Pods,
        pod: &Netns,
        name: &str,
        bin: &Path,
        cert_dir: &Path,
        extra: &[&str],
    ) -> Self {
        let log = File::create(pods.dir.join(format!("sidecar-{name}.log"))).expect("log file");
        let uid = PROXY_UID.to_string();
        let mut proc = Proc::spawn(
            pod,
            format!("sidecar {name}"),
            &["--reuid", &uid, "--regid", &uid, "--clear-groups"],
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
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let code = pod
                .command(tool("curl"))
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "1",
                ])
                .arg("http://127.0.0.1:15020/ready")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if code == "200" {
                return Self(proc);
            }
            if let Some(status) = proc.exited() {
                pods.fail(format!(
                    "sidecar {name} exited ({status}) before it was ready"
                ));
            }
            if Instant::now() > deadline {
                pods.fail(format!(
                    "sidecar {name} was not ready within 15 s (last /ready: {code:?})"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM: the sidecar must drain and exit cleanly.
    fn terminate(&mut self, pods: &Pods) {
        let status = self.0.stop("TERM");
        check!(
            pods,
            status.is_some_and(|s| s.success()),
            "{} must exit cleanly on SIGTERM; got {status:?}",
            self.0.what
        );
    }
}

/// Starts the `SERVER` app as `name` on `port` in `ns` and waits until it listens.
fn start_app(pods: &Pods, ns: &Netns, name: &str, port: u16) -> Proc {
    let log = File::create(pods.dir.join(format!("app-{name}-{port}.log"))).expect("log");
    let mut proc = Proc::spawn(
        ns,
        format!("app {name}:{port}"),
        &[],
        tool("python3"),
        |c| {
            c.args(["-u", "-c", SERVER, name, &port.to_string()])
                .stdout(Stdio::piped())
                .stderr(log);
        },
    );
    let mut line = String::new();
    if let Some(stdout) = proc.child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    check!(
        pods,
        line.trim() == "ready",
        "app {name} on port {port} did not start"
    );
    proc
}

// === impl Capture ===

impl Capture {
    /// Starts capturing the TCP frames crossing `br0` into `file`.
    fn start(pods: &Pods, file: &Path) -> Self {
        let log_path = pods.dir.join("tcpdump.log");
        let log = File::create(&log_path).expect("log file");
        let mut proc = Proc::spawn(&pods.node, "tcpdump".into(), &[], tool("tcpdump"), |c| {
            // Every packet is handed over and written at once: without
            // --immediate-mode, frames still in the kernel's ring when SIGINT
            // arrives never reach the file. -Z root: keep the right to write it.
            c.args([
                "-i",
                "br0",
                "-n",
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
                "-w",
            ])
            .arg(file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(log);
        });
        let listening = poll(Duration::from_secs(10), || {
            fs::read_to_string(&log_path).is_ok_and(|t| t.contains("listening on"))
        });
        if !listening {
            let status = proc.exited();
            pods.fail(format!(
                "tcpdump did not start capturing (exit: {status:?})"
            ));
        }
        Self {
            proc,
            file: file.to_owned(),
        }
    }

    /// Stops the capture and returns the pcap file's bytes.
    fn stop(mut self, pods: &Pods) -> Vec<u8> {
        // The last frames of the exchanges (FINs) may still be in flight.
        std::thread::sleep(Duration::from_millis(200));
        let status = self.proc.stop("INT");
        check!(pods, status.is_some(), "tcpdump did not stop on SIGINT");
        fs::read(&self.file).expect("the capture file")
    }
}

// === the apps' client ===

/// Runs `CLIENT` in `ns`: connects to `ip:port`, sends `line`, returns the
/// reply, or why there was none.
fn send(ns: &Netns, ip: Ipv4Addr, port: u16, line: &str) -> Result<String, String> {
    let output = ns
        .command(tool("timeout"))
        .arg("10")
        .arg(tool("python3"))
        .args(["-c", CLIENT, &ip.to_string(), &port.to_string(), line])
        .output()
        .expect("run the client");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "{}: {}",
            output.status,
            stderr.lines().last().unwrap_or_default()
        ))
    }
}

/// A marker no other run and no other step uses.
fn secret(step: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("PALISADE-SECRET-{step}-{}-{nanos:x}", std::process::id())
}

// === set-up ===

/// Gets a certificate for `identity` from the control plane with
/// `palisade-sidecar certify`, in the host namespace, into a directory the
/// sidecar's uid owns.
fn certify(pods: &Pods, cp: &ControlPlane, name: &str, identity: &str, token: &str) -> PathBuf {
    let token_file = pods.dir.join(format!("token-{name}"));
    fs::write(&token_file, token).expect("write token");
    let out = pods.dir.join(format!("certs-{name}"));
    run(Command::new(bin("palisade-sidecar"))
        .args([
            "certify",
            "--control-plane",
            &format!("https://{}", cp.grpc_addr),
        ])
        .arg("--bundle")
        .arg(cp.ca_dir.join("ca.crt"))
        .args(["--identity", identity])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--out")
        .arg(&out));
    let owned = [out.clone()].into_iter().chain(
        fs::read_dir(&out)
            .expect("read certs")
            .flatten()
            .map(|e| e.path()),
    );
    for path in owned {
        chown(&path, Some(PROXY_UID), Some(PROXY_UID)).expect("chown to the proxy uid");
    }
    if !as_proxy_uid("-r", &out.join("tls.key")) {
        pods.fail(format!(
            "uid {PROXY_UID} cannot read {}: is a directory above it closed to others? \
             point TMPDIR somewhere world-traversable",
            out.display()
        ));
    }
    out
}

/// The sidecar binary at a path uid 1337 can execute: the built one, or a
/// link or copy of it in the test's directory when `target/` is closed to it.
fn sidecar_for_proxy_uid(pods: &Pods) -> PathBuf {
    let built = bin("palisade-sidecar");
    if as_proxy_uid("-x", &built) {
        return built;
    }
    let dir = pods.dir.join("bin");
    fs::create_dir(&dir).expect("mkdir");
    let copy = dir.join("palisade-sidecar");
    if fs::hard_link(&built, &copy).is_err() {
        fs::copy(&built, &copy).expect("copy the sidecar binary");
    }
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
    if !as_proxy_uid("-x", &copy) {
        pods.fail(format!("uid {PROXY_UID} cannot execute {}", copy.display()));
    }
    copy
}

/// `test FLAG path` as the proxy uid.
fn as_proxy_uid(flag: &str, path: &Path) -> bool {
    let uid = PROXY_UID.to_string();
    Command::new(tool("setpriv"))
        .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
        .arg(tool("test"))
        .arg(flag)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// Replaces the policy file in one rename, as a ConfigMap update would.
fn write_policy(path: &Path, text: &str) {
    let next = path.with_extension("next");
    fs::write(&next, text).expect("write the policy");
    fs::rename(&next, path).expect("replace the policy");
}

// === tools ===

/// A tool's path, from the system directories first (so a language version
/// manager's shims do not stand in for the real program).
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is needed by this test: \
                 apt-get install iptables iproute2 tcpdump python3 util-linux curl procps"
            )
        })
}

/// Runs `command`; panics with its stderr unless it succeeds; returns stdout.
fn run(command: &mut Command) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        status.success(),
        "{command:?} failed ({status}): {}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8_lossy(&stdout).into_owned()
}

/// Calls `done` every 100 ms until it holds or `timeout` passes.
fn poll(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// === reading the capture ===

/// A TCP segment that carried data.
struct Segment {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: Vec<u8>,
}

/// The data-carrying IPv4 TCP segments of a pcap file of Ethernet frames
/// (what `tcpdump -w` writes for a bridge), in capture order.
fn tcp_segments(pcap: &[u8]) -> Vec<Segment> {
    let little_endian = match pcap.get(..4) {
        Some([0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]) => true,
        Some([0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d]) => false,
        other => panic!("the capture is not a pcap file (magic {other:02x?})"),
    };
    let u32_at = |at: usize| -> Option<usize> {
        let bytes: [u8; 4] = pcap.get(at..at + 4)?.try_into().ok()?;
        let value = if little_endian {
            u32::from_le_bytes(bytes)
        } else {
            u32::from_be_bytes(bytes)
        };
        usize::try_from(value).ok()
    };
    assert_eq!(u32_at(20), Some(1), "the capture's link type is Ethernet");
    let mut segments = Vec::new();
    let mut at = 24;
    // A record cut short by the end of the capture ends the walk.
    while let Some(len) = u32_at(at + 8) {
        let Some(frame) = pcap.get(at + 16..at + 16 + len) else {
            break;
        };
        at += 16 + len;
        segments.extend(tcp_segment(frame));
    }
    segments
}

fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    if ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // Ethernet pads short frames; the IP length says where the packet ends.
    let ip = ip.get(..total)?;
    let tcp = ip.get(header..)?;
    let payload = tcp.get(usize::from(*tcp.get(12)? >> 4) * 4..)?;
    if payload.is_empty() {
        return None;
    }
    let addr = |ip: &[u8], port: &[u8]| {
        Some(SocketAddrV4::new(
            Ipv4Addr::new(*ip.first()?, *ip.get(1)?, *ip.get(2)?, *ip.get(3)?),
            u16::from_be_bytes([*port.first()?, *port.get(1)?]),
        ))
    };
    Some(Segment {
        src: addr(ip.get(12..16)?, tcp.get(0..2)?)?,
        dst: addr(ip.get(16..20)?, tcp.get(2..4)?)?,
        payload: payload.to_vec(),
    })
}

/// Every byte `client` sent to `server`, over all its connections.
fn stream(segments: &[Segment], client: Ipv4Addr, server: SocketAddrV4) -> Vec<u8> {
    segments
        .iter()
        .filter(|s| *s.src.ip() == client && s.dst == server)
        .flat_map(|s| s.payload.iter().copied())
        .collect()
}

/// Every byte `server` sent back to `client`.
fn stream_back(segments: &[Segment], server: SocketAddrV4, client: Ipv4Addr) -> Vec<u8> {
    segments
        .iter()
        .filter(|s| s.src == server && *s.dst.ip() == client)
        .flat_map(|s| s.payload.iter().copied())
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
