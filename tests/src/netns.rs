//! Pods and plain hosts as Linux network namespaces, for the tests that need
//! real iptables rules, real routing and a real wire (root only).
//!
//! ```text
//!  netns node: bridge br0 (the LAN's bridge address) ── v-a ══ eth0  netns a  198.18.0.1
//!                                                    ├── v-b ══ eth0  netns b  198.18.0.2
//!                                                    └── ...
//! ```
//!
//! - [`Lan`]: a namespace `node` holding the bridge `br0`, and hosts plugged
//!   into it, each a namespace with `eth0` on one address of 198.18.0.0/15
//!   (RFC 2544's benchmarking range, which no real network routes). Every
//!   link lives inside a namespace of the LAN, so deleting the namespaces
//!   removes every link: nothing is added to the host's own network.
//! - [`Netns`]: one namespace; commands and processes inside it, as root or as
//!   a [`User`]; its iptables tables.
//! - [`Proc`]: a process started in a namespace, killed when dropped, and also
//!   when the test process dies (parent-death signal).
//! - [`Capture`]: `tcpdump` on the bridge, confirmed listening before it is
//!   handed back, stopped only once it has written every frame sent before
//!   the stop; [`Pcap`] reads the TCP streams back.
//! - [`App`] and [`send`]: a line-answering app and its client, so a test can
//!   see who reached whom.
//!
//! Cleanup: each namespace is deleted when its owner is dropped, also when the
//! test panics. Names are `palisade-test-<pid>-<n>-<role>`, with the test
//! process's pid; the first namespace a process makes first deletes those (and
//! the temporary directories named the same way) whose process is gone, so a
//! killed run leaves nothing for long. Separate LANs are separate network
//! stacks, so tests running in parallel may use the same addresses.
//!
//! When a test panics while a [`Lan`] is alive, the LAN prints the tail of
//! every `*.log` in its directory ([`Lan::log`]) and each host's nat table.
//!
//! Processes are tied to the thread that started them (the parent-death signal
//! fires when that thread ends): start them from the test's own thread, not
//! from a shared fixture another thread made.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs::{self, File},
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::Duration,
};

pub use rustix::process::Signal;
use wait_timeout::ChildExt;

use crate::{ControlPlane, eventually, require_root};

/// Every namespace and temporary directory of this harness starts with it,
/// followed by the pid of the test process that owns it.
pub const NAME_PREFIX: &str = "palisade-test-";

/// Prefixes the harnesses before this one used, swept the same way.
const OLD_PREFIXES: [&str; 2] = ["palisade-e2e-", "palisade-t-"];

/// The range every address of a test comes from: 198.18.0.0/15.
const TEST_RANGE: (Ipv4Addr, u32) = (Ipv4Addr::new(198, 18, 0, 0), 15);

/// The uid the sidecar runs as (capture skips its traffic).
pub const PROXY_UID: u32 = 1337;

/// The packages providing the tools the harness and its tests call.
const PACKAGES: &str = "iproute2 iptables tcpdump util-linux python3 curl coreutils";

/// The UDP port the capture barrier is sent to (discard).
const BARRIER_PORT: u16 = 9;

/// A LAN of test hosts: the namespace `node` with the bridge `br0`, and one
/// namespace per host, its `eth0` plugged into the bridge.
#[derive(Debug)]
pub struct Lan {
    // Drop order: the hosts, then the node with the bridge, then the files.
    hosts: Vec<Netns>,
    node: Netns,
    bridge: Ipv4Addr,
    prefix_len: u8,
    dir: tempfile::TempDir,
}

/// One network namespace, deleted when dropped (also when the test panics).
#[derive(Debug)]
pub struct Netns {
    name: String,
    role: String,
    addr: Option<Ipv4Addr>,
}

/// Who a process runs as: uid, gid and supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

/// A process started in a namespace; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: String,
    lines: Option<mpsc::Receiver<String>>,
}

/// `tcpdump` writing the frames that cross the bridge to a pcap file.
#[derive(Debug)]
pub struct Capture {
    proc: Proc,
    file: PathBuf,
    node: String,
    broadcast: Ipv4Addr,
    barrier: String,
}

/// A finished capture: pcap bytes of Ethernet frames.
#[derive(Debug, Clone)]
pub struct Pcap {
    bytes: Vec<u8>,
}

/// A TCP segment that carried data, from a [`Pcap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Who sent it.
    pub src: SocketAddrV4,
    /// Whom it was for.
    pub dst: SocketAddrV4,
    /// The bytes it carried.
    pub payload: Vec<u8>,
}

/// The test app: listens on each of its ports and answers the first line of
/// every connection with `NAME got LINE from PEER-IP on LOCAL-PORT`, so the
/// client learns which app it reached, from where it was seen, and on which
/// port it was accepted (a redirected connection shows the capture port).
/// Each line it gets is also written to its log.
#[derive(Debug)]
pub struct App(Proc);

const APP: &str = r#"
import selectors, socket, sys, threading
name, sel = sys.argv[1], selectors.DefaultSelector()
for port in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(64)
    sel.register(s, selectors.EVENT_READ)
def serve(conn, peer):
    with conn:
        conn.settimeout(10)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                return
            line += chunk
        port = conn.getsockname()[1]
        print(f"{peer[0]}:{peer[1]} -> :{port} {line!r}", file=sys.stderr, flush=True)
        conn.sendall(f"{name} got {line.decode().strip()} from {peer[0]} on {port}\n".encode())
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, peer = key.fileobj.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"#;

/// A client app: a plain `connect()`, one line out, everything back until
/// EOF. The first line it prints is the seconds from before `connect()` to
/// the end of the reply, measured inside the namespace; the reply follows.
const CLIENT: &str = r#"
import socket, sys, time
host, port, line = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start = time.monotonic()
conn = socket.create_connection((host, port), timeout=5)
conn.sendall(line.encode() + b"\n")
reply = b""
while True:
    chunk = conn.recv(4096)
    if not chunk:
        break
    reply += chunk
took = time.monotonic() - start
sys.stdout.write(f"{took}\n" + reply.decode(errors="replace"))
"#;

/// Sends one UDP datagram to a broadcast address (no neighbour to resolve).
const BROADCAST: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"#;

// === impl Lan ===

impl Lan {
    /// The namespace `node` with bridge `br0` at `bridge/prefix_len`, and a
    /// directory for the test's files and logs. Fails the test without root.
    pub fn new(bridge: Ipv4Addr, prefix_len: u8) -> Self {
        assert!(
            (TEST_RANGE.1..=30).contains(&u32::from(prefix_len)),
            "a LAN of /{prefix_len} is not one the harness builds: use /15 to /30, \
             inside {}/{}",
            TEST_RANGE.0,
            TEST_RANGE.1
        );
        assert_test_range(bridge);
        let node = Netns::new("node");
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&[
            "addr",
            "add",
            &format!("{bridge}/{prefix_len}"),
            "dev",
            "br0",
        ]);
        node.ip(&["link", "set", "br0", "up"]);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{NAME_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("make the test's directory");
        // Processes run as other users (the sidecar's uid) read and write here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("open the test's directory to other users");
        Self {
            hosts: Vec::new(),
            node,
            bridge,
            prefix_len,
            dir,
        }
    }

    /// Adds host `role` (at most 10 characters of `a-z0-9-`) at `addr`, its
    /// `eth0` plugged into the bridge.
    pub fn add_host(&mut self, role: &str, addr: Ipv4Addr) -> &Netns {
        assert!(
            self.hosts.iter().all(|h| h.role != role),
            "the LAN has a host {role} already"
        );
        assert_test_range(addr);
        assert!(
            self.contains(addr) && addr != self.bridge && addr != self.broadcast(),
            "{addr} is not a host address of the LAN {}/{}",
            self.bridge,
            self.prefix_len
        );
        let mut host = Netns::new(role);
        let port = format!("v-{role}");
        host.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.node.name,
        ]);
        self.node.ip(&["link", "set", &port, "master", "br0"]);
        self.node.ip(&["link", "set", &port, "up"]);
        host.ip(&[
            "addr",
            "add",
            &format!("{addr}/{}", self.prefix_len),
            "dev",
            "eth0",
        ]);
        host.ip(&["link", "set", "eth0", "up"]);
        host.addr = Some(addr);
        self.hosts.push(host);
        self.hosts.last().expect("just pushed")
    }

    /// Unplugs host `role` and deletes its namespace (what remains of a pod
    /// that was deleted).
    pub fn remove_host(&mut self, role: &str) {
        let at = self
            .hosts
            .iter()
            .position(|h| h.role == role)
            .unwrap_or_else(|| panic!("the LAN has no host {role}"));
        self.hosts.remove(at);
    }

    /// Host `role`.
    pub fn host(&self, role: &str) -> &Netns {
        self.hosts
            .iter()
            .find(|h| h.role == role)
            .unwrap_or_else(|| panic!("the LAN has no host {role}"))
    }

    /// The namespace holding the bridge: the node the pods run on. Processes
    /// started here reach every host at its address.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The bridge's own address, the node's address on the LAN.
    pub fn bridge_addr(&self) -> Ipv4Addr {
        self.bridge
    }

    /// The test's directory: world-readable, deleted with the LAN.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A control plane for the LAN's pods, on the host's loopback, with its
    /// CA and a static token file for `tokens` (token, identity) in
    /// `control-plane/` of the test's directory.
    pub fn control_plane(&self, tokens: &[(&str, &str)]) -> ControlPlane {
        let dir = self.dir().join("control-plane");
        fs::create_dir(&dir).expect("mkdir");
        ControlPlane::start(&dir, tokens, &[]).expect("the control plane starts")
    }

    /// Creates `NAME.log` in the test's directory; its tail is printed when
    /// the test fails.
    pub fn log(&self, name: &str) -> File {
        let path = self.dir().join(format!("{name}.log"));
        File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
    }

    /// Starts `tcpdump` on the bridge with the pcap `filter` (e.g. `tcp`),
    /// writing to `NAME.pcap`, and returns once it is listening.
    pub fn capture(&self, name: &str, filter: &str) -> Capture {
        let file = self.dir().join(format!("{name}.pcap"));
        let log_path = self.dir().join(format!("tcpdump-{name}.log"));
        let log = self.log(&format!("tcpdump-{name}"));
        let broadcast = self.broadcast();
        let barrier = format!(
            "palisade-capture-barrier-{}-{}",
            std::process::id(),
            next_id()
        );
        // The barrier datagram is captured whatever the test's filter says.
        let filter = format!(
            "({filter}) or (udp and dst port {BARRIER_PORT} and src host {})",
            self.bridge
        );
        let mut proc = self.node.spawn(
            &format!("tcpdump {name}"),
            &User::root(),
            tool("tcpdump"),
            |c| {
                // Every packet is handed over and written at once: without
                // --immediate-mode, frames still in the kernel's ring when
                // SIGINT arrives never reach the file. -Z root: keep the right
                // to write it.
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
                .arg(&file)
                .arg(&filter)
                .stdout(Stdio::null())
                .stderr(log);
            },
        );
        eventually(
            Duration::from_secs(10),
            &format!("tcpdump {name} listening on br0"),
            || {
                if let Some(status) = proc.exited() {
                    panic!(
                        "tcpdump {name} exited ({status}) before it listened: {}",
                        fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                fs::read_to_string(&log_path)
                    .is_ok_and(|t| t.contains("listening on"))
                    .then_some(())
            },
        );
        Capture {
            proc,
            file,
            node: self.node.name.clone(),
            broadcast,
            barrier,
        }
    }

    /// The tail of every log and each host's nat table.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = fs::read_dir(self.dir())
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
        for host in &self.hosts {
            let Some(save) = find_tool("iptables-save") else {
                break;
            };
            let text = host
                .command(save)
                .args(["-t", "nat"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "--- nat table of host {} ({})\n{text}",
                host.role, host.name
            );
        }
        out
    }

    fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix_len));
        u32::from(addr) & mask == u32::from(self.bridge) & mask
    }

    fn broadcast(&self) -> Ipv4Addr {
        let mask = u32::MAX << (32 - u32::from(self.prefix_len));
        Ipv4Addr::from(u32::from(self.bridge) | !mask)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "=== the LAN of the failed test ({}):\n{}",
                self.dir().display(),
                self.diagnostics()
            );
        }
    }
}

// === impl Netns ===

impl Netns {
    /// A new namespace with `lo` up, named after `role`; fails the test
    /// without root. The first call in a process deletes what dead test
    /// processes left behind.
    pub fn new(role: &str) -> Self {
        require_root();
        assert!(
            !role.is_empty()
                && role.len() <= 10
                && role
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "role {role:?}: use at most 10 characters of a-z, 0-9 and `-` \
             (it names links, which have 15)"
        );
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        let name = format!("{NAME_PREFIX}{}-{}-{role}", std::process::id(), next_id());
        run(Command::new(tool("ip")).args(["netns", "add", &name]));
        let ns = Self {
            name,
            role: role.to_owned(),
            addr: None,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, for `ip netns exec` and `-n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role it was made for (`a`, `node`, ...).
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The host's address on its LAN.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
            .unwrap_or_else(|| panic!("{} is not a host on a LAN", self.name))
    }

    /// `ip -n NAME args`; panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) {
        run(Command::new(tool("ip")).args(["-n", &self.name]).args(args));
    }

    /// A command running `program` inside the namespace as root, stdin closed
    /// (`ip netns exec` execs it in place, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(tool("ip"));
        command
            .args(["netns", "exec", &self.name])
            .arg(program)
            .stdin(Stdio::null());
        command
    }

    /// A command running `program` inside the namespace as `user`, killed
    /// when the thread that starts it ends.
    pub fn command_as(&self, user: &User, program: impl AsRef<OsStr>) -> Command {
        let mut command = self.command(tool("setpriv"));
        command
            .args(user.setpriv_args())
            .args(["--pdeathsig", "KILL"])
            .arg(program);
        command
    }

    /// Runs `program args` inside as root; panics unless it succeeds; returns
    /// stdout.
    pub fn exec(&self, program: impl AsRef<OsStr>, args: &[&str]) -> String {
        run(self.command(program).args(args))
    }

    /// Starts `program` inside as `user`; `configure` adds its arguments and
    /// where its output goes. `what` names it in failures.
    pub fn spawn(
        &self,
        what: &str,
        user: &User,
        program: impl AsRef<OsStr>,
        configure: impl FnOnce(&mut Command),
    ) -> Proc {
        let mut command = self.command_as(user, program);
        configure(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} in {}: {e}", self.name));
        Proc {
            child,
            what: what.to_owned(),
            lines: None,
        }
    }

    /// `SAVE_TOOL -t TABLE` (`iptables-save`, `ip6tables-save`, ...) without
    /// comments and with counters zeroed, one line per entry: comparable
    /// before and after.
    pub fn saved_table(&self, save_tool: &str, table: &str) -> Vec<String> {
        normalize_saved(&self.exec(tool(save_tool), &["-t", table]))
    }

    /// The IPv4 nat table, as [`saved_table`](Self::saved_table) shows it.
    pub fn nat(&self) -> Vec<String> {
        self.saved_table("iptables-save", "nat")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let Some(ip) = find_tool("ip") else {
            return;
        };
        let deleted = Command::new(ip)
            .args(["netns", "delete", &self.name])
            .status();
        if !deleted.is_ok_and(|s| s.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

// === impl User ===

impl User {
    /// Root, as the test runs.
    pub fn root() -> Self {
        Self {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// `uid` with the group of the same number and no supplementary groups
    /// (how the sidecar runs: uid 1337, gid 1337).
    pub fn uid(uid: u32) -> Self {
        Self {
            uid,
            gid: uid,
            groups: Vec::new(),
        }
    }

    /// The same user with primary group `gid`.
    pub fn gid(mut self, gid: u32) -> Self {
        self.gid = gid;
        self
    }

    /// The same user with these supplementary groups.
    pub fn groups(mut self, groups: &[u32]) -> Self {
        self.groups = groups.to_vec();
        self
    }

    fn setpriv_args(&self) -> Vec<String> {
        if *self == Self::root() {
            return Vec::new();
        }
        let groups = if self.groups.is_empty() {
            "--clear-groups".to_owned()
        } else {
            let list: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            format!("--groups={}", list.join(","))
        };
        vec![
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.gid),
            groups,
        ]
    }
}

// === impl Proc ===

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it is, as failures name it.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` and waits up to 10 s for the exit; `None` if it was
    /// still running then (it is killed when dropped).
    pub fn stop(&mut self, signal: Signal) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        // It may have exited since; the wait below tells.
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), signal);
        match self.child.wait_timeout(Duration::from_secs(10)) {
            Ok(Some(status)) => Some(status),
            _ => {
                eprintln!("{} ignored {signal:?} for 10 s", self.what);
                None
            }
        }
    }

    /// The next line of its stdout (started with `Stdio::piped()`), waiting
    /// at most `timeout`; `None` at end of file or past the timeout.
    pub fn read_line(&mut self, timeout: Duration) -> Option<String> {
        if self.lines.is_none() {
            let stdout = self.child.stdout.take()?;
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            self.lines = Some(rx);
        }
        self.lines.as_ref()?.recv_timeout(timeout).ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === impl App ===

impl App {
    /// Starts the app `name` on `ports` in `host` as `user`, logging to the
    /// LAN's `app-NAME.log`, and returns once it listens.
    pub fn start(lan: &Lan, host: &Netns, user: &User, name: &str, ports: &[u16]) -> Self {
        let log = lan.log(&format!("app-{name}"));
        let mut proc = host.spawn(&format!("app {name}"), user, tool("python3"), |c| {
            c.args(["-u", "-c", APP, name])
                .args(ports.iter().map(u16::to_string))
                .stdout(Stdio::piped())
                .stderr(log);
        });
        let line = proc.read_line(Duration::from_secs(10));
        assert_eq!(
            line.as_deref(),
            Some("ready"),
            "app {name} on {ports:?} in {} did not start (exit: {:?})",
            host.name,
            proc.exited()
        );
        Self(proc)
    }

    /// The app's process (every line it got is in its log).
    pub fn process(&mut self) -> &mut Proc {
        &mut self.0
    }

    /// What the app answers `line` sent by `peer` and accepted on `port`.
    pub fn reply(name: &str, line: &str, peer: Ipv4Addr, port: u16) -> String {
        format!("{name} got {line} from {peer} on {port}\n")
    }
}

// === impl Capture ===

impl Capture {
    /// Stops the capture once every frame sent before this call is in the
    /// file, and reads it back.
    ///
    /// tcpdump writes frames in the order it receives them, so the node sends
    /// a marker datagram across the bridge and waits until the file holds it:
    /// then everything before it is written too, and SIGINT loses nothing.
    pub fn stop(mut self) -> Pcap {
        let broadcast = self.broadcast.to_string();
        let port = BARRIER_PORT.to_string();
        eventually(
            Duration::from_secs(10),
            &format!("tcpdump writing {} up to the barrier", self.file.display()),
            || {
                let sent = Command::new(tool("ip"))
                    .args(["netns", "exec", &self.node])
                    .arg(tool("python3"))
                    .args(["-c", BROADCAST, &broadcast, &port, &self.barrier])
                    .status();
                assert!(
                    sent.is_ok_and(|s| s.success()),
                    "cannot send the capture barrier"
                );
                let pcap = Pcap {
                    bytes: fs::read(&self.file).unwrap_or_default(),
                };
                pcap.has_udp_payload(BARRIER_PORT, self.barrier.as_bytes())
                    .then_some(())
            },
        );
        let status = self.proc.stop(Signal::INT);
        assert!(
            status.is_some(),
            "{} did not stop on SIGINT",
            self.proc.what
        );
        Pcap {
            bytes: fs::read(&self.file)
                .unwrap_or_else(|e| panic!("read {}: {e}", self.file.display())),
        }
    }
}

// === impl Pcap ===

impl Pcap {
    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether `needle` appears anywhere in the capture, headers included.
    pub fn contains(&self, needle: &[u8]) -> bool {
        contains(&self.bytes, needle)
    }

    /// The data-carrying IPv4 TCP segments, in capture order.
    pub fn segments(&self) -> Vec<Segment> {
        self.packets()
            .into_iter()
            .filter(|p| p.protocol == 6)
            .map(|p| Segment {
                src: p.src,
                dst: p.dst,
                payload: p.payload,
            })
            .filter(|s| !s.payload.is_empty())
            .collect()
    }

    /// Every byte `client` sent to `server`, over all its connections.
    pub fn stream(&self, client: Ipv4Addr, server: SocketAddrV4) -> Vec<u8> {
        self.segments()
            .into_iter()
            .filter(|s| *s.src.ip() == client && s.dst == server)
            .flat_map(|s| s.payload)
            .collect()
    }

    /// Every byte `server` sent back to `client`.
    pub fn stream_back(&self, server: SocketAddrV4, client: Ipv4Addr) -> Vec<u8> {
        self.segments()
            .into_iter()
            .filter(|s| s.src == server && *s.dst.ip() == client)
            .flat_map(|s| s.payload)
            .collect()
    }

    fn has_udp_payload(&self, port: u16, payload: &[u8]) -> bool {
        // A file tcpdump has only begun to write is not yet a pcap file.
        self.bytes.len() >= 24
            && self
                .packets()
                .iter()
                .any(|p| p.protocol == 17 && p.dst.port() == port && p.payload == payload)
    }

    /// The IPv4 TCP and UDP packets of the Ethernet frames, in capture order.
    fn packets(&self) -> Vec<Packet> {
        let pcap = &self.bytes;
        let little_endian = match pcap.get(..4) {
            Some([0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]) => true,
            Some([0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d]) => false,
            None => return Vec::new(),
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
        let mut packets = Vec::new();
        let mut at = 24;
        // A record cut short by the end of the capture ends the walk.
        while let Some(len) = u32_at(at + 8) {
            let Some(frame) = pcap.get(at + 16..at + 16 + len) else {
                break;
            };
            at += 16 + len;
            packets.extend(Packet::parse(frame));
        }
        packets
    }
}

/// An IPv4 TCP or UDP packet.
struct Packet {
    protocol: u8,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: Vec<u8>,
}

impl Packet {
    fn parse(frame: &[u8]) -> Option<Self> {
        if frame.get(12..14)? != [0x08, 0x00] {
            return None;
        }
        let ip = frame.get(14..)?;
        if ip.first()? >> 4 != 4 {
            return None;
        }
        let protocol = *ip.get(9)?;
        let header = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
        // Ethernet pads short frames; the IP length says where the packet ends.
        let ip = ip.get(..total)?;
        let l4 = ip.get(header..)?;
        let payload = match protocol {
            6 => l4.get(usize::from(*l4.get(12)? >> 4) * 4..)?,
            17 => l4.get(8..)?,
            _ => return None,
        };
        let addr = |ip: &[u8], port: &[u8]| {
            Some(SocketAddrV4::new(
                Ipv4Addr::new(*ip.first()?, *ip.get(1)?, *ip.get(2)?, *ip.get(3)?),
                u16::from_be_bytes([*port.first()?, *port.get(1)?]),
            ))
        };
        Some(Self {
            protocol,
            src: addr(ip.get(12..16)?, l4.get(0..2)?)?,
            dst: addr(ip.get(16..20)?, l4.get(2..4)?)?,
            payload: payload.to_vec(),
        })
    }
}

// === clients ===

/// Runs the client app in `from` as root: connects to `ip:port`, sends `line`,
/// returns the reply, or why there was none.
pub fn send(from: &Netns, ip: Ipv4Addr, port: u16, line: &str) -> Result<String, String> {
    send_as(from, &User::root(), ip, port, line)
}

/// [`send`] as `user`.
pub fn send_as(
    from: &Netns,
    user: &User,
    ip: Ipv4Addr,
    port: u16,
    line: &str,
) -> Result<String, String> {
    exchange(from, user, ip, port, line).map(|(reply, _)| reply)
}

/// [`send`], and how long the exchange took from before `connect()` to the
/// end of the reply (measured by the client, so process start-up is not in it).
pub fn send_timed(
    from: &Netns,
    ip: Ipv4Addr,
    port: u16,
    line: &str,
) -> Result<(String, Duration), String> {
    exchange(from, &User::root(), ip, port, line)
}

/// Runs [`CLIENT`] in `from` as `user`: the reply and how long it took, or
/// why there was none.
fn exchange(
    from: &Netns,
    user: &User,
    ip: Ipv4Addr,
    port: u16,
    line: &str,
) -> Result<(String, Duration), String> {
    let output = from
        .command_as(user, tool("timeout"))
        .arg("10")
        .arg(tool("python3"))
        .args(["-c", CLIENT, &ip.to_string(), &port.to_string(), line])
        .output()
        .expect("run the client");
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "{}: {}",
            output.status,
            stderr.lines().last().unwrap_or_default()
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (took, reply) = stdout.split_once('\n').ok_or("no timing line")?;
    let took: f64 = took
        .parse()
        .map_err(|_| format!("bad timing line {took:?}"))?;
    Ok((reply.to_owned(), Duration::from_secs_f64(took)))
}

/// A marker no other run and no other step uses: a line to look for on
/// the wire and in an app's log.
pub fn secret(step: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("PALISADE-SECRET-{step}-{}-{nanos:x}", std::process::id())
}

/// `curl -sf URL` inside `host`: the body, or empty when it fails.
pub fn curl(host: &Netns, url: &str) -> String {
    host.command(tool("curl"))
        .args(["-sf", "--max-time", "5", url])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The HTTP status `url` answers inside `host` within a second (`000`, or
/// empty, when nothing answers).
pub fn curl_status(host: &Netns, url: &str) -> String {
    host.command(tool("curl"))
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "1",
            url,
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `test FLAG path` as the sidecar's uid.
pub fn as_proxy_uid(flag: &str, path: &Path) -> bool {
    Command::new(tool("setpriv"))
        .args(User::uid(PROXY_UID).setpriv_args())
        .arg(tool("test"))
        .arg(flag)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// The sidecar binary at a path the sidecar's uid can execute: the built
/// one, or a link or copy of it in the LAN's directory when `target/` is
/// closed to it.
pub fn sidecar_for_proxy_uid(lan: &Lan) -> PathBuf {
    let built = crate::bin("palisade-sidecar");
    if as_proxy_uid("-x", &built) {
        return built;
    }
    let dir = lan.dir().join("bin");
    fs::create_dir_all(&dir).expect("mkdir");
    let copy = dir.join("palisade-sidecar");
    if fs::hard_link(&built, &copy).is_err() {
        fs::copy(&built, &copy).expect("copy the sidecar binary");
    }
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
    assert!(
        as_proxy_uid("-x", &copy),
        "uid {PROXY_UID} cannot execute {}",
        copy.display()
    );
    copy
}

/// Whether `needle` (non-empty) appears in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// === tools ===

/// A tool's path, from the system directories first (so a language version
/// manager's shims do not stand in for the real program); fails the test,
/// naming the packages, when it is missing.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!("{name} is needed by this test: apt-get install {PACKAGES} (tests/run.sh does)")
    })
}

fn find_tool(name: &str) -> Option<PathBuf> {
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
}

/// Runs `command`; panics with its stderr unless it succeeds; returns stdout.
pub fn run(command: &mut Command) -> String {
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

/// `iptables-save` output without comments and with counters zeroed.
fn normalize_saved(save: &str) -> Vec<String> {
    save.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(at)) => format!("{} [0:0]", &l[..at]),
            _ => l.to_owned(),
        })
        .collect()
}

fn assert_test_range(addr: Ipv4Addr) {
    let (base, len) = TEST_RANGE;
    let mask = u32::MAX << (32 - len);
    assert!(
        u32::from(addr) & mask == u32::from(base),
        "{addr} is outside {base}/{len}: test hosts take addresses of the benchmarking range only"
    );
}

fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Deletes the namespaces and temporary directories that test processes now
/// gone left behind (killed before their guards ran).
fn sweep_stale() {
    let dead = |name: &str| -> bool {
        [NAME_PREFIX]
            .into_iter()
            .chain(OLD_PREFIXES)
            .find_map(|prefix| name.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !alive(pid))
    };
    if let Ok(list) = Command::new(tool("ip")).args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if dead(name) {
                eprintln!("deleting the stale network namespace {name}");
                // Another test process may be sweeping it at the same moment.
                let _ = Command::new(tool("ip"))
                    .args(["netns", "delete", name])
                    .status();
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(NAME_PREFIX) && dead(&name) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Whether process `pid` runs: a zombie (killed, not yet reaped) does not.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, Some("Z" | "X") | None)
    })
}

/// Starts `pod`'s sidecar (`bin`, from [`sidecar_for_proxy_uid`]) as uid
/// 1337 in file mode with its certificates from `cert_dir`: transparent
/// listeners on 15001 (loopback) and 15006, admin on 0.0.0.0:15020, mesh
/// networks `mesh_networks`, and `extra` flags. Logs to
/// `sidecar-<role>.log`; returns once its `/ready` answers 200.
pub fn start_sidecar(
    lan: &Lan,
    pod: &Netns,
    bin: &Path,
    cert_dir: &Path,
    mesh_networks: &str,
    extra: &[&str],
) -> Proc {
    let role = pod.role().to_owned();
    let log = lan.log(&format!("sidecar-{role}"));
    let mut proc = pod.spawn(
        &format!("sidecar {role}"),
        &User::uid(PROXY_UID),
        bin,
        |command| {
            command
                .args(["run", "--cert-dir"])
                .arg(cert_dir)
                .args([
                    &format!("--mesh-networks={mesh_networks}"),
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
        &format!("sidecar {role} to answer /ready with 200"),
        || {
            if let Some(status) = proc.exited() {
                panic!("sidecar {role} exited ({status}) before it was ready");
            }
            (curl_status(pod, "http://127.0.0.1:15020/ready") == "200").then_some(())
        },
    );
    proc
}

/// Makes `pod` a meshed pod in file mode: a certificate for `identity` from
/// `cp` ([`certify`], with `token`), the capture rules (`init
/// --ipv6=false`) and its sidecar ([`start_sidecar`], with `mesh_networks`
/// and `extra`), ready when this returns.
#[allow(clippy::too_many_arguments)]
pub fn mesh_pod(
    lan: &Lan,
    pod: &Netns,
    cp: &ControlPlane,
    bin: &Path,
    identity: &str,
    token: &str,
    mesh_networks: &str,
    extra: &[&str],
) -> Proc {
    let certs = certify(lan, cp, pod.role(), identity, token);
    pod.exec(bin, &["init", "--ipv6=false"]);
    start_sidecar(lan, pod, bin, &certs, mesh_networks, extra)
}

/// Gets a certificate for `identity` from the control plane `cp` with
/// `palisade-sidecar certify`, in the host namespace, into a directory the
/// sidecar's uid owns.
pub fn certify(lan: &Lan, cp: &ControlPlane, name: &str, identity: &str, token: &str) -> PathBuf {
    let token_file = lan.dir().join(format!("token-{name}"));
    fs::write(&token_file, token).expect("write token");
    let out = lan.dir().join(format!("certs-{name}"));
    run(Command::new(crate::bin("palisade-sidecar"))
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
        std::os::unix::fs::chown(&path, Some(PROXY_UID), Some(PROXY_UID))
            .expect("chown to the proxy uid");
    }
    assert!(
        as_proxy_uid("-r", &out.join("tls.key")),
        "uid {PROXY_UID} cannot read {}: is a directory above it closed to others? \
         point TMPDIR somewhere world-traversable",
        out.display()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_running_processes_are_alive() {
        assert!(alive(std::process::id()));
        let mut child = Command::new("true").spawn().expect("run true");
        let pid = child.id();
        // Exited and not yet reaped: a zombie, whose namespaces are stale.
        eventually(Duration::from_secs(5), "true to exit", || {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z"))
                .then_some(())
        });
        assert!(!alive(pid));
        child.wait().expect("reap true");
        assert!(!alive(pid));
    }

    #[test]
    fn users_become_setpriv_arguments() {
        assert!(User::root().setpriv_args().is_empty());
        assert_eq!(
            User::uid(1337).setpriv_args(),
            ["--reuid=1337", "--regid=1337", "--clear-groups"]
        );
        assert_eq!(
            User::uid(1000).gid(100).groups(&[4, 27]).setpriv_args(),
            ["--reuid=1000", "--regid=100", "--groups=4,27"]
        );
    }

    #[test]
    fn saved_tables_compare_without_counters_or_comments() {
        let saved = "# Generated by iptables-save v1.8.9\n*nat\n:OUTPUT ACCEPT [3:180]\n\
                     -A OUTPUT -j RETURN\nCOMMIT\n# Completed\n";
        assert_eq!(
            normalize_saved(saved),
            [
                "*nat",
                ":OUTPUT ACCEPT [0:0]",
                "-A OUTPUT -j RETURN",
                "COMMIT"
            ]
        );
    }

    #[test]
    fn addresses_come_from_the_benchmarking_range_only() {
        assert_test_range(Ipv4Addr::new(198, 18, 0, 1));
        assert_test_range(Ipv4Addr::new(198, 19, 255, 254));
        for outside in [
            Ipv4Addr::new(198, 17, 255, 255),
            Ipv4Addr::new(198, 20, 0, 1),
            Ipv4Addr::new(10, 0, 0, 1),
        ] {
            let refused = std::panic::catch_unwind(|| assert_test_range(outside));
            assert!(refused.is_err(), "{outside} was accepted");
        }
    }

    /// One Ethernet/IPv4 frame carrying `payload` over `protocol`.
    fn frame(protocol: u8, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let l4_header = if protocol == 6 { 20 } else { 8 };
        let total = 20 + l4_header + payload.len();
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00]);
        f.extend([0x45, 0, 0, 0, 0, 0, 0, 0, 64, protocol, 0, 0]);
        f[16..18].copy_from_slice(&u16::try_from(total).expect("small").to_be_bytes());
        f.extend(src.ip().octets());
        f.extend(dst.ip().octets());
        f.extend(src.port().to_be_bytes());
        f.extend(dst.port().to_be_bytes());
        if protocol == 6 {
            f.extend([0u8; 8]);
            f.extend([5 << 4, 0]);
            f.extend([0u8; 6]);
        } else {
            f.extend([0u8; 4]);
        }
        f.extend(payload);
        f
    }

    fn pcap(frames: &[Vec<u8>]) -> Pcap {
        let mut bytes = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        bytes.extend([0u8; 8]);
        bytes.extend(65535u32.to_le_bytes());
        bytes.extend(1u32.to_le_bytes());
        for f in frames {
            let len = u32::try_from(f.len()).expect("small");
            bytes.extend([0u8; 8]);
            bytes.extend(len.to_le_bytes());
            bytes.extend(len.to_le_bytes());
            bytes.extend(f);
        }
        Pcap { bytes }
    }

    #[test]
    fn a_capture_reads_back_as_streams_and_finds_its_barrier() {
        let a = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 40000);
        let b = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8080);
        let bridge = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 254), 5000);
        let all = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 255), BARRIER_PORT);
        let capture = pcap(&[
            frame(6, a, b, b"hel"),
            frame(6, b, a, b"back"),
            frame(6, a, b, b"lo"),
            frame(6, a, b, b""),
            frame(17, bridge, all, b"barrier-1"),
        ]);
        assert_eq!(capture.stream(*a.ip(), b), b"hello");
        assert_eq!(capture.stream_back(b, *a.ip()), b"back");
        assert_eq!(capture.segments().len(), 3, "empty segments are left out");
        assert!(capture.has_udp_payload(BARRIER_PORT, b"barrier-1"));
        assert!(!capture.has_udp_payload(BARRIER_PORT, b"barrier-2"));
        assert!(capture.contains(b"back") && !capture.contains(b"hello"));
        // A file tcpdump has only begun to write holds no barrier yet.
        assert!(!Pcap { bytes: Vec::new() }.has_udp_payload(BARRIER_PORT, b"barrier-1"));
    }
}
