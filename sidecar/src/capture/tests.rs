//! Rule text and validation run anywhere; the namespaced tests need root: each
//! makes its own network namespace, runs the real iptables tools inside it and
//! deletes it when done, so the host's tables are never touched.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::symlink,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use super::iptables::{Batch, NatTable, failure, install_batch, parse_save, remove_batch};
use super::*;

const DEFAULT_V4: &str = "\
# palisade traffic capture (ipv4): iptables-restore --noflush
*nat
:PALISADE_INBOUND - [0:0]
:PALISADE_OUTPUT - [0:0]
-A PALISADE_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A PALISADE_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A PALISADE_OUTPUT -o lo -j RETURN
-A PALISADE_OUTPUT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j PALISADE_INBOUND
-A OUTPUT -p tcp -j PALISADE_OUTPUT
COMMIT
";

fn with_exclusions() -> CaptureConfig {
    CaptureConfig {
        exclude_outbound_ports: vec![9090, 443, 9090],
        exclude_inbound_ports: vec![8080],
        ..CaptureConfig::default()
    }
}

// === rule text ===

#[test]
fn default_rules_redirect_tcp_to_the_capture_ports() {
    let text = rules(&CaptureConfig::default(), Family::V4).expect("defaults are valid");
    assert_eq!(text, DEFAULT_V4);
}

#[test]
fn excluded_ports_return_before_the_redirect_sorted_and_once() {
    let text = rules(&with_exclusions(), Family::V4).expect("valid config");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("-A PALISADE_"))
        .collect();
    assert_eq!(
        lines,
        [
            "-A PALISADE_INBOUND -p tcp -m tcp --dport 8080 -j RETURN",
            "-A PALISADE_INBOUND -p tcp -j REDIRECT --to-ports 15006",
            "-A PALISADE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A PALISADE_OUTPUT -o lo -j RETURN",
            "-A PALISADE_OUTPUT -p tcp -m tcp --dport 443 -j RETURN",
            "-A PALISADE_OUTPUT -p tcp -m tcp --dport 9090 -j RETURN",
            "-A PALISADE_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        ]
    );
}

#[test]
fn rules_follow_the_configured_uid_and_ports() {
    let config = CaptureConfig {
        outbound_port: 16001,
        inbound_port: 16006,
        proxy_uid: 2102,
        ..CaptureConfig::default()
    };
    let text = rules(&config, Family::V4).expect("valid config");
    assert!(text.contains("-A PALISADE_OUTPUT -m owner --uid-owner 2102 -j RETURN\n"));
    assert!(text.contains("-A PALISADE_OUTPUT -p tcp -j REDIRECT --to-ports 16001\n"));
    assert!(text.contains("-A PALISADE_INBOUND -p tcp -j REDIRECT --to-ports 16006\n"));
    assert!(!text.contains("1337"));
    assert!(!text.contains("1500"));
}

#[test]
fn ipv6_rules_are_the_ipv4_rules_for_ip6tables() {
    let v4 = rules(&with_exclusions(), Family::V4).expect("valid config");
    let v6 = rules(&with_exclusions(), Family::V6).expect("valid config");
    assert!(v6.starts_with("# palisade traffic capture (ipv6): ip6tables-restore --noflush\n"));
    let body = |t: &str| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(body(&v4), body(&v6));
    assert_eq!(Family::V6.iptables(), "ip6tables");
    assert_eq!(Family::V6.save(), "ip6tables-save");
    assert_eq!(Family::V4.restore(), "iptables-restore");
}

// === validation ===

#[test]
fn port_zero_is_rejected_naming_the_field() {
    let cases = [
        (
            CaptureConfig {
                outbound_port: 0,
                ..CaptureConfig::default()
            },
            "outbound_port",
        ),
        (
            CaptureConfig {
                inbound_port: 0,
                ..CaptureConfig::default()
            },
            "inbound_port",
        ),
        (
            CaptureConfig {
                exclude_outbound_ports: vec![80, 0],
                ..CaptureConfig::default()
            },
            "exclude_outbound_ports",
        ),
        (
            CaptureConfig {
                exclude_inbound_ports: vec![0],
                ..CaptureConfig::default()
            },
            "exclude_inbound_ports",
        ),
    ];
    for (config, field) in cases {
        let error = rules(&config, Family::V4).expect_err("port 0 must be refused");
        assert_eq!(
            error.to_string(),
            format!("{field} is 0: ports must be in 1..=65535")
        );
    }
}

#[test]
fn capture_ports_cannot_be_excluded() {
    let config = CaptureConfig {
        exclude_outbound_ports: vec![80, 15001],
        ..CaptureConfig::default()
    };
    let error = rules(&config, Family::V4).expect_err("excluded capture port");
    assert_eq!(
        error.to_string(),
        "outbound_port 15001 is also in exclude_outbound_ports: \
         the sidecar's capture ports cannot be excluded from capture"
    );

    let config = CaptureConfig {
        exclude_inbound_ports: vec![15006],
        ..CaptureConfig::default()
    };
    // No tools on the search path: were validation skipped, nothing could run.
    let nothing = fake_tools(&[]);
    let runner = Runner::current().with_search_path(vec![nothing.path().to_owned()]);
    let error = install_with(&config, &runner).expect_err("validated before any command runs");
    assert!(matches!(
        error,
        CaptureError::CapturePortExcluded {
            field: "inbound_port",
            port: 15006,
            list: "exclude_inbound_ports"
        }
    ));
}

#[test]
fn capture_ports_must_differ() {
    let config = CaptureConfig {
        inbound_port: 15001,
        ..CaptureConfig::default()
    };
    let error = config.validate().expect_err("same ports");
    assert!(
        error
            .to_string()
            .starts_with("outbound_port and inbound_port are both 15001")
    );
}

// === reading iptables-save, planning batches ===

const SAVED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 18:45:27 2026
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [3:180]
:PALISADE_INBOUND - [0:0]
:PALISADE_OUTPUT - [0:0]
-A PREROUTING -p tcp -j PALISADE_INBOUND
-A OUTPUT -d 198.18.0.99/32 -j RETURN
-A OUTPUT -p tcp -j PALISADE_OUTPUT
-A OUTPUT -p tcp -j PALISADE_OUTPUT
-A OUTPUT -j PALISADE_OUTPUT
-A PALISADE_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed on Thu Nov 26 18:45:27 2026
";

#[test]
fn saved_table_is_parsed_into_chains_and_rules() {
    let table = parse_save(SAVED);
    assert!(table.chains.contains(OUTPUT_CHAIN));
    assert!(table.chains.contains("POSTROUTING"));
    assert_eq!(table.rules.len(), 6);
    assert_eq!(table.rules[1].chain, "OUTPUT");
    assert_eq!(table.rules[1].spec, "-d 198.18.0.99/32 -j RETURN");
    assert_eq!(parse_save(""), NatTable::default());
}

#[test]
fn install_keeps_one_jump_and_drops_duplicates_and_stale_forms() {
    let batch = install_batch(&CaptureConfig::default(), Family::V4, &parse_save(SAVED))
        .expect("valid config");
    let changes: Vec<&str> = batch
        .script
        .lines()
        .filter(|l| {
            l.starts_with("-A OUTPUT") || l.starts_with("-A PREROUTING") || l.starts_with("-D")
        })
        .collect();
    assert_eq!(
        changes,
        [
            "-D OUTPUT -p tcp -j PALISADE_OUTPUT",
            "-D OUTPUT -j PALISADE_OUTPUT",
        ]
    );
    assert_eq!((batch.jumps_added, batch.jumps_removed), (0, 2));
    // The foreign rule is never named, so --noflush leaves it alone.
    assert!(!batch.script.contains("198.18.0.99"));
}

#[test]
fn remove_deletes_only_our_jumps_and_chains() {
    let batch = remove_batch(&parse_save(SAVED)).expect("there is something to remove");
    assert_eq!(
        batch,
        Batch {
            script: "*nat\n\
                     -D PREROUTING -p tcp -j PALISADE_INBOUND\n\
                     -D OUTPUT -p tcp -j PALISADE_OUTPUT\n\
                     -D OUTPUT -p tcp -j PALISADE_OUTPUT\n\
                     -D OUTPUT -j PALISADE_OUTPUT\n\
                     -F PALISADE_INBOUND\n-X PALISADE_INBOUND\n\
                     -F PALISADE_OUTPUT\n-X PALISADE_OUTPUT\n\
                     COMMIT\n"
                .to_owned(),
            jumps_added: 0,
            jumps_removed: 4,
            chains_removed: 2,
        }
    );
    let clean = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -d 198.18.0.99/32 -j RETURN\nCOMMIT\n";
    assert_eq!(remove_batch(&parse_save(clean)), None);
}

// === errors an operator reads ===

#[test]
fn failures_say_what_to_check() {
    let denied = failure(
        Family::V4,
        "iptables-save -t nat".to_owned(),
        "exit 4",
        "iptables-save v1.8.9 (nf_tables): Could not fetch rule set generation id: \
         Permission denied (you must be root)\n",
    );
    assert_eq!(
        denied.to_string(),
        "iptables-save -t nat failed (exit 4): iptables-save v1.8.9 (nf_tables): Could not fetch \
         rule set generation id: Permission denied (you must be root); \
         does the container have NET_ADMIN?"
    );

    let no_nat = failure(
        Family::V6,
        "ip6tables-save -t nat".to_owned(),
        "exit 3",
        "ip6tables-save v1.8.9 (legacy): can't initialize ip6tables table `nat': \
         Table does not exist (do you need to insmod?)\n",
    );
    assert!(matches!(
        no_nat,
        CaptureError::NatUnavailable {
            family: Family::V6,
            ..
        }
    ));
    let message = no_nat.to_string();
    assert!(message.starts_with("the kernel offers no ipv6 nat table (ip6tables-save -t nat: "));
    assert!(message.ends_with("load ip6table_nat (legacy) or nft_chain_nat (nf_tables) on the node, or set --ipv6=false (PALISADE_IPV6=false)"));

    let busy = failure(
        Family::V4,
        "iptables-restore --noflush --wait=10".to_owned(),
        "exit 4",
        "iptables-restore v1.8.9 (nf_tables): \nline 2: CHAIN_DEL failed (Device or resource busy): chain PALISADE_OUTPUT\n",
    );
    assert!(busy.to_string().contains(
        "(exit 4): iptables-restore v1.8.9 (nf_tables): / line 2: CHAIN_DEL failed (Device or resource busy)"
    ));
    assert!(
        busy.to_string()
            .ends_with("still jumps to a palisade chain: delete it first")
    );
}

/// A directory of stand-in tools: symlinks to `true`/`false`, so nothing is
/// written that a concurrently forked test could hold open (ETXTBSY).
fn fake_tools(tools: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, target) in tools {
        let target = ["/bin", "/usr/bin"]
            .iter()
            .map(|d| PathBuf::from(d).join(target))
            .find(|p| p.exists())
            .expect("coreutils true/false");
        symlink(target, dir.path().join(name)).expect("symlink");
    }
    dir
}

#[test]
fn missing_tools_are_named_before_anything_changes() {
    let empty = fake_tools(&[]);
    let runner = Runner::current().with_search_path(vec![empty.path().to_owned()]);
    let error = install_with(&CaptureConfig::default(), &runner).expect_err("no tools");
    assert_eq!(
        error.to_string(),
        "iptables-save is not installed: install the iptables package in the init image"
    );

    // iptables is there but ip6tables is not: install fails before it applies
    // anything (there is no iptables-restore to apply with, and it is not asked for).
    let v4_only = fake_tools(&[("iptables-save", "true")]);
    let runner = Runner::current().with_search_path(vec![v4_only.path().to_owned()]);
    let error = install_with(&CaptureConfig::default(), &runner).expect_err("no ip6tables");
    assert_eq!(
        error.to_string(),
        "ip6tables-save is not installed: install the iptables package in the init image, \
         or set --ipv6=false (PALISADE_IPV6=false)"
    );
    let v4 = CaptureConfig {
        ipv6: false,
        ..CaptureConfig::default()
    };
    let error = install_with(&v4, &runner).expect_err("no iptables-restore");
    assert!(matches!(
        error,
        CaptureError::NotInstalled {
            tool: "iptables-restore",
            ..
        }
    ));

    // Nothing of ours can exist without ip6tables, so remove is content.
    remove_with(&CaptureConfig::default(), &runner).expect("nothing to remove");
}

#[test]
fn a_refused_batch_reports_the_command_and_status() {
    let dir = fake_tools(&[("iptables-save", "true"), ("iptables-restore", "false")]);
    let runner = Runner::current().with_search_path(vec![dir.path().to_owned()]);
    let v4 = CaptureConfig {
        ipv6: false,
        ..CaptureConfig::default()
    };
    let error = install_with(&v4, &runner).expect_err("restore fails");
    assert_eq!(
        error.to_string(),
        "iptables-restore --noflush --wait=10 failed (exit 1): ; does the container have NET_ADMIN?"
    );
}

// === namespaced: real iptables in a throwaway network namespace ===

/// Fails the test unless it runs as root; CI does, and a skipped test would
/// hide a broken install.
fn require_root() {
    let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status is readable");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .expect("/proc/self/status has a Uid line");
    assert_eq!(
        euid, "0",
        "this test needs root: it creates network namespaces and runs iptables inside them \
         (CI runs `cargo test` as root; run it with sudo)"
    );
}

/// Finds a tool the way the module does, for commands the tests run themselves.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is needed by this test: apt-get install iptables iproute2 util-linux python3"))
}

/// A network namespace that exists for one test and is deleted when dropped,
/// also when the test panics.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        require_root();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!(
            "palisade-t-{}-{}-{nanos:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new(tool("ip"))
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(status.success(), "ip netns add {name} failed");
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    fn runner(&self) -> Runner {
        Runner::netns(&self.name)
    }

    /// Runs `program args` inside the namespace; panics unless it succeeds.
    fn exec(&self, program: &str, args: &[&str]) -> String {
        let output = Command::new(tool("ip"))
            .args(["netns", "exec", &self.name])
            .arg(tool(program))
            .args(args)
            .output()
            .expect("run ip netns exec");
        assert!(
            output.status.success(),
            "{program} {args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `ip -n NAME args`.
    fn ip(&self, args: &[&str]) {
        let status = Command::new(tool("ip"))
            .args(["-n", &self.name])
            .args(args)
            .status()
            .expect("run ip");
        assert!(status.success(), "ip -n {} {args:?} failed", self.name);
    }

    /// The nat table without comments and counters.
    fn nat(&self, family: Family) -> Vec<String> {
        normalize(&self.exec(family.save(), &["-t", "nat"]))
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

fn normalize(save: &str) -> Vec<String> {
    save.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(at)) => format!("{} [0:0]", &l[..at]),
            _ => l.to_owned(),
        })
        .collect()
}

/// Asserts that `nat` holds exactly the rules `config` asks for, once.
fn assert_installed(nat: &[String], config: &CaptureConfig, family: Family) {
    let expected = rules(config, family).expect("valid config");
    for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
        let prefix = format!("-A {chain} ");
        let want: Vec<&str> = expected
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect();
        let have: Vec<&str> = nat
            .iter()
            .map(String::as_str)
            .filter(|l| l.starts_with(&prefix))
            .collect();
        assert_eq!(have, want, "{family} chain {chain}");
    }
    for jump in [
        "-A PREROUTING -p tcp -j PALISADE_INBOUND",
        "-A OUTPUT -p tcp -j PALISADE_OUTPUT",
    ] {
        let count = nat.iter().filter(|l| *l == jump).count();
        assert_eq!(
            count, 1,
            "{family}: `{jump}` appears {count} times in {nat:#?}"
        );
    }
}

#[test]
fn install_puts_the_rules_in_both_families() {
    let ns = Netns::new();
    let config = with_exclusions();
    install_with(&config, &ns.runner()).expect("install");
    assert_installed(&ns.nat(Family::V4), &config, Family::V4);
    assert_installed(&ns.nat(Family::V6), &config, Family::V6);
}

#[test]
fn installing_twice_leaves_one_copy() {
    let ns = Netns::new();
    let config = with_exclusions();
    install_with(&config, &ns.runner()).expect("first install");
    let once = (ns.nat(Family::V4), ns.nat(Family::V6));
    install_with(&config, &ns.runner()).expect("second install");
    assert_eq!((ns.nat(Family::V4), ns.nat(Family::V6)), once);
}

#[test]
fn reinstalling_with_new_settings_replaces_the_old_rules() {
    let ns = Netns::new();
    install_with(&with_exclusions(), &ns.runner()).expect("first install");
    let changed = CaptureConfig {
        exclude_outbound_ports: vec![5432],
        proxy_uid: 2102,
        ..CaptureConfig::default()
    };
    install_with(&changed, &ns.runner()).expect("second install");
    let nat = ns.nat(Family::V4);
    assert_installed(&nat, &changed, Family::V4);
    assert!(!nat.iter().any(|l| l.contains("9090") || l.contains("1337")));
}

#[test]
fn foreign_rules_survive_install_and_remove() {
    let ns = Netns::new();
    ns.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "198.18.0.99",
            "-j",
            "RETURN",
        ],
    );
    ns.exec("iptables", &["-t", "nat", "-N", "OTHER_MESH"]);
    ns.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "-j",
            "OTHER_MESH",
        ],
    );
    ns.exec(
        "ip6tables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "2001:2::99",
            "-j",
            "RETURN",
        ],
    );
    let before = (ns.nat(Family::V4), ns.nat(Family::V6));

    install_with(&CaptureConfig::default(), &ns.runner()).expect("install");
    let v4 = ns.nat(Family::V4);
    assert_installed(&v4, &CaptureConfig::default(), Family::V4);
    for foreign in &before.0 {
        assert!(v4.contains(foreign), "install dropped `{foreign}`");
    }
    assert!(
        ns.nat(Family::V6)
            .contains(&"-A OUTPUT -d 2001:2::99/128 -j RETURN".to_owned())
    );

    remove_with(&CaptureConfig::default(), &ns.runner()).expect("remove");
    assert_eq!((ns.nat(Family::V4), ns.nat(Family::V6)), before);
}

#[test]
fn remove_on_a_clean_namespace_changes_nothing() {
    let ns = Netns::new();
    let before = (ns.nat(Family::V4), ns.nat(Family::V6));
    remove_with(&CaptureConfig::default(), &ns.runner()).expect("remove without rules");
    install_with(&CaptureConfig::default(), &ns.runner()).expect("install");
    remove_with(&CaptureConfig::default(), &ns.runner()).expect("remove");
    remove_with(&CaptureConfig::default(), &ns.runner()).expect("remove again");
    assert_eq!((ns.nat(Family::V4), ns.nat(Family::V6)), before);
}

#[test]
fn install_repairs_duplicated_jumps() {
    let ns = Netns::new();
    ns.exec("iptables", &["-t", "nat", "-N", OUTPUT_CHAIN]);
    for _ in 0..2 {
        ns.exec(
            "iptables",
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN],
        );
    }
    ns.exec(
        "iptables",
        &["-t", "nat", "-A", "OUTPUT", "-j", OUTPUT_CHAIN],
    );
    install_with(&CaptureConfig::default(), &ns.runner()).expect("install");
    let nat = ns.nat(Family::V4);
    assert_installed(&nat, &CaptureConfig::default(), Family::V4);
    assert!(!nat.contains(&"-A OUTPUT -j PALISADE_OUTPUT".to_owned()));
}

#[test]
fn ipv6_off_leaves_ip6tables_alone() {
    let ns = Netns::new();
    let before = ns.nat(Family::V6);
    let config = CaptureConfig {
        ipv6: false,
        ..CaptureConfig::default()
    };
    install_with(&config, &ns.runner()).expect("install");
    assert_installed(&ns.nat(Family::V4), &config, Family::V4);
    assert_eq!(ns.nat(Family::V6), before);
}

// === namespaced: the rules steer real connections ===

/// Listens on each port given after the name and answers every connection with
/// `name:local-port`: a redirected connection reports the capture port.
const LISTENER: &str = r#"
import selectors, socket, sys
name, sel = sys.argv[1], selectors.DefaultSelector()
for port in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(16)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.sendall(f"{name}:{conn.getsockname()[1]}\n".encode())
        conn.close()
"#;

/// A listener process inside a namespace, killed when dropped.
struct Listener(Child);

impl Listener {
    fn start(ns: &Netns, name: &str, ports: &[u16]) -> Self {
        let mut child = Command::new(tool("ip"))
            .args(["netns", "exec", &ns.name])
            .arg(tool("python3"))
            .args(["-u", "-c", LISTENER, name])
            .args(ports.iter().map(u16::to_string))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the python3 listener");
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("read the listener's readiness");
        }
        let listener = Self(child);
        assert_eq!(
            line.trim(),
            "ready",
            "listener {name} on {ports:?} did not start"
        );
        listener
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // It may already be gone if the namespace setup failed.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects from inside `ns`, as `uid` if given, and returns what the far end said.
fn connect(ns: &Netns, uid: Option<u32>, host: &str, port: u16) -> String {
    let mut command = Command::new(tool("ip"));
    command
        .args(["netns", "exec", &ns.name])
        .arg(tool("timeout"))
        .arg("5");
    if let Some(uid) = uid {
        command
            .arg(tool("setpriv"))
            .args([format!("--reuid={uid}"), format!("--regid={uid}")])
            .arg("--clear-groups");
    }
    let output = command
        .arg(tool("bash"))
        .args([
            "-c",
            "exec 3<>/dev/tcp/$0/$1 && cat <&3",
            host,
            &port.to_string(),
        ])
        .output()
        .expect("run the client");
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success(),
        "connect to {host}:{port} as {uid:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    answer
}

#[test]
fn capture_redirects_the_app_but_not_the_proxy_or_excluded_ports() {
    // pod (198.18.0.2) <-veth-> peer (198.18.0.1); rules only in the pod.
    let pod = Netns::new();
    let peer = Netns::new();
    pod.ip(&[
        "link", "add", "vpod", "type", "veth", "peer", "name", "vpeer", "netns", &peer.name,
    ]);
    pod.ip(&["addr", "add", "198.18.0.2/24", "dev", "vpod"]);
    pod.ip(&["link", "set", "vpod", "up"]);
    peer.ip(&["addr", "add", "198.18.0.1/24", "dev", "vpeer"]);
    peer.ip(&["link", "set", "vpeer", "up"]);

    let config = CaptureConfig {
        exclude_outbound_ports: vec![9090],
        exclude_inbound_ports: vec![8080],
        ..CaptureConfig::default()
    };
    install_with(&config, &pod.runner()).expect("install");
    let _in_pod = Listener::start(&pod, "pod", &[15001, 15006, 8080, 80]);
    let _in_peer = Listener::start(&peer, "peer", &[80, 9090]);

    assert_eq!(
        connect(&pod, None, "198.18.0.1", 80),
        "pod:15001",
        "app traffic is captured"
    );
    assert_eq!(
        connect(&pod, Some(1337), "198.18.0.1", 80),
        "peer:80",
        "the proxy uid goes straight out"
    );
    assert_eq!(
        connect(&pod, None, "198.18.0.1", 9090),
        "peer:9090",
        "excluded outbound port"
    );
    assert_eq!(
        connect(&pod, None, "127.0.0.1", 80),
        "pod:80",
        "loopback is not captured"
    );
    assert_eq!(
        connect(&peer, None, "198.18.0.2", 80),
        "pod:15006",
        "inbound traffic is captured"
    );
    assert_eq!(
        connect(&peer, None, "198.18.0.2", 8080),
        "pod:8080",
        "excluded inbound port"
    );
}

/// Rules are compared with iptables-save output as plain strings, so both
/// backends must print them the same way; this runs the legacy one.
#[test]
fn legacy_backend_gets_the_same_rules() {
    let ns = Netns::new();
    // xtables-legacy-multi picks its personality from the name it is run by.
    let legacy = tempfile::tempdir().expect("temp dir");
    for name in Family::ALL.iter().flat_map(|f| [f.save(), f.restore()]) {
        symlink(tool("xtables-legacy-multi"), legacy.path().join(name)).expect("symlink");
    }
    symlink(tool("ip"), legacy.path().join("ip")).expect("symlink");
    let runner = ns.runner().with_search_path(vec![legacy.path().to_owned()]);
    let nat = |family: Family| {
        let save = format!("{}-legacy-save", family.iptables());
        normalize(&ns.exec(&save, &["-t", "nat"]))
    };
    let before = (nat(Family::V4), nat(Family::V6));

    let config = with_exclusions();
    install_with(&config, &runner).expect("install");
    install_with(&config, &runner).expect("install again");
    assert_installed(&nat(Family::V4), &config, Family::V4);
    assert_installed(&nat(Family::V6), &config, Family::V6);
    remove_with(&config, &runner).expect("remove");
    assert_eq!((nat(Family::V4), nat(Family::V6)), before);
}
