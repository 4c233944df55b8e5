//! The mesh a run measures, built with the whole-system tests' namespace
//! harness (`palisade_tests::netns`), as `tests/discovery_netns.rs` builds
//! it:
//!
//! ```text
//!  netns node: bridge br0 198.18.0.254 ── cp    198.18.0.200  control plane (--discovery-source file)
//!                                      ├── a-off 198.18.0.1    load generator, sidecar --discovery=false
//!                                      ├── a-on  198.18.0.3    load generator, sidecar --discovery=true
//!                                      └── b     198.18.0.2    app :8080, sidecar
//! ```
//!
//! Each pod has `palisade-sidecar init` capture rules, a default route to the
//! node (which forwards nothing: a Service's cluster address is reached only
//! because the sidecar dials an endpoint itself) and the same sidecar flags
//! but `--discovery`. The two client pods are identical otherwise, so the
//! two configurations alternate without restarting a sidecar.
//!
//! Every binary runs from a copy in the LAN's directory (world-readable): the
//! sidecar's uid 1337 and the app's uid may not be able to reach `target/`.
//! The namespaces and processes go when the [`Mesh`] is dropped; a run killed
//! with SIGKILL leaves namespaces that the next run (or namespaced test)
//! deletes, and its processes die with it (parent-death signal).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::{PermissionsExt as _, chown},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use palisade_tests::{
    metric,
    netns::{self, Lan, Netns, PROXY_UID, User, curl, curl_status, run, tool},
    write_tokens,
};

use super::discovery_file::{self, Pod, Service};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const CP_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
pub const A_OFF_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const A_ON_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The Service bench/web, backed by b.
pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 10);
pub const SERVICE_PORT: u16 = 80;
pub const APP_PORT: u16 = 8080;
pub const A_OFF_ID: &str = "spiffe://cluster.local/ns/bench/sa/client-off";
pub const A_ON_ID: &str = "spiffe://cluster.local/ns/bench/sa/client-on";
pub const B_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
const MESH_NETWORKS: &str = "198.18.0.0/24";
/// How long the control plane and a sidecar get to become ready (a sidecar
/// following discovery: to hold the whole snapshot).
const READY: Duration = Duration::from_secs(60);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(100);

/// The per-namespace settings of every pod, so that connection churn does not
/// run out of ports or conntrack entries: connections of the same four-tuple
/// space may reuse a TIME_WAIT port after a second (timestamps), ephemeral
/// ports come from 20000-65000 (above the mesh's ports), and conntrack forgets
/// a closed connection after 10 s instead of 120 s (the table of 262,144
/// entries would fill at 1,100 connections per second otherwise, two entries
/// per connection).
const SYSCTLS: [&str; 3] = [
    "net.ipv4.tcp_tw_reuse=1",
    "net.ipv4.ip_local_port_range=20000 65000",
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait=10",
];

/// The tools the harness calls, from the packages the brief's machine has.
const TOOLS: [&str; 6] = [
    "ip",
    "iptables",
    "iptables-save",
    "setpriv",
    "sysctl",
    "curl",
];

/// The running mesh.
#[derive(Debug)]
pub struct Mesh {
    // Dropped in this order: the sidecars, the app, the control plane, then
    // the LAN (which deletes the namespaces and the directory).
    pub a_off: Sidecar,
    pub a_on: Sidecar,
    pub b: Sidecar,
    pub app: netns::Proc,
    pub control_plane: netns::Proc,
    /// This benchmark's binary, runnable by the app's uid.
    pub bench: PathBuf,
    /// The app's uid.
    pub app_user: User,
    pub lan: Lan,
}

/// A sidecar in a pod.
#[derive(Debug)]
pub struct Sidecar {
    pub proc: netns::Proc,
    /// The pod's role on the LAN.
    pub pod: &'static str,
}

/// What the mesh is built with.
#[derive(Debug)]
pub struct Setup<'a> {
    pub sidecar: &'a Path,
    pub control_plane: &'a Path,
    pub workloads: usize,
    pub services: usize,
    pub sidecar_threads: usize,
    pub app_uid: u32,
}

// === impl Mesh ===

impl Mesh {
    /// Builds the LAN, starts the control plane with the discovery file,
    /// installs the capture rules, starts the app and the three sidecars, and
    /// returns once each is ready and a-on's sidecar holds every workload
    /// and Service.
    pub fn start(setup: &Setup<'_>) -> Result<Self> {
        ensure!(
            rustix::process::geteuid().is_root(),
            "this benchmark needs root: it makes network namespaces and installs iptables rules"
        );
        for name in TOOLS {
            tool(name);
        }
        let mut lan = Lan::new(NODE_IP, 24);
        lan.add_host("cp", CP_IP);
        lan.add_host("a-off", A_OFF_IP);
        lan.add_host("a-on", A_ON_IP);
        lan.add_host("b", B_IP);
        let bin = lan.dir().join("bin");
        fs::create_dir(&bin)?;
        let sidecar = runnable_copy(setup.sidecar, &bin)?;
        let bench = runnable_copy(
            &std::env::current_exe().context("finding this executable")?,
            &bin,
        )?;

        let ca_dir = lan.dir().join("ca");
        run(Command::new(setup.control_plane)
            .args(["ca", "init", "--out"])
            .arg(&ca_dir)
            .stdout(Stdio::null()));
        let bundle = lan.dir().join("bundle.crt");
        fs::copy(ca_dir.join("ca.crt"), &bundle)?;
        let tokens = lan.dir().join("tokens.yaml");
        let ids = [A_OFF_ID, A_ON_ID, B_ID];
        let pairs: Vec<(String, &str)> = ids.iter().map(|id| (token(id), *id)).collect();
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(t, id)| (t.as_str(), *id)).collect();
        write_tokens(&tokens, &pairs)?;
        let discovery = lan.dir().join("discovery.yaml");
        fs::write(
            &discovery,
            discovery_file::render(
                &[
                    Pod {
                        name: "bench/client-off",
                        address: A_OFF_IP,
                        identity: A_OFF_ID,
                    },
                    Pod {
                        name: "bench/client-on",
                        address: A_ON_IP,
                        identity: A_ON_ID,
                    },
                    Pod {
                        name: "bench/server",
                        address: B_IP,
                        identity: B_ID,
                    },
                ],
                &Service {
                    name: "bench/web",
                    address: WEB_IP,
                    port: SERVICE_PORT,
                    endpoints: vec![SocketAddrV4::new(B_IP, APP_PORT)],
                },
                setup.workloads,
                setup.services,
            ),
        )?;

        let grpc = format!("{CP_IP}:15012");
        let log = lan.log("control-plane");
        let log_err = log.try_clone()?;
        let mut control_plane =
            lan.host("cp")
                .spawn("control plane", &User::root(), setup.control_plane, |c| {
                    c.arg("serve")
                        .arg("--ca-dir")
                        .arg(&ca_dir)
                        .args(["--authenticator", "static", "--static-tokens"])
                        .arg(&tokens)
                        .args(["--grpc-addr", &grpc])
                        .args(["--admin-addr", &format!("{CP_IP}:15014")])
                        .args(["--discovery-source", "file", "--discovery-file"])
                        .arg(&discovery)
                        .args(["--log-level", "warn"])
                        .stdout(log)
                        .stderr(log_err);
                });
        wait(READY, "the control plane to be ready", || {
            if let Some(status) = control_plane.exited() {
                bail!(
                    "the control plane exited ({status}): {}",
                    tail(&lan.dir().join("control-plane.log"))
                );
            }
            let url = format!("http://{CP_IP}:15014/ready");
            Ok((curl_status(lan.host("cp"), &url) == "200").then_some(()))
        })?;

        for pod in ["a-off", "a-on", "b"] {
            let host = lan.host(pod);
            host.exec(&sidecar, &["init", "--ipv6=false"]);
            // After `init`: its nat rules load conntrack, whose sysctls
            // appear with it.
            host.exec(tool("sysctl"), &[&["-q", "-w"][..], &SYSCTLS[..]].concat());
            host.ip(&["route", "add", "default", "via", &NODE_IP.to_string()]);
        }

        let app_user = User::uid(setup.app_uid);
        let mut app = lan.host("b").spawn("app", &app_user, &bench, |c| {
            c.args(["serve", "--listen", &format!("0.0.0.0:{APP_PORT}")])
                .stdout(Stdio::piped())
                .stderr(lan.log("app"));
        });
        let line = app.read_line(Duration::from_secs(10));
        ensure!(
            line.as_deref() == Some("ready"),
            "the app in b did not start ({line:?}, exit {:?}): {}",
            app.exited(),
            tail(&lan.dir().join("app.log"))
        );

        let sidecars = Sidecars {
            lan: &lan,
            binary: &sidecar,
            bundle: &bundle,
            grpc: &grpc,
            threads: setup.sidecar_threads,
        };
        let b = sidecars.start("b", B_ID, false, (0, 0))?;
        let a_off = sidecars.start("a-off", A_OFF_ID, false, (0, 0))?;
        let a_on = sidecars.start("a-on", A_ON_ID, true, (setup.workloads, setup.services))?;
        Ok(Self {
            a_off,
            a_on,
            b,
            app,
            control_plane,
            bench,
            app_user,
            lan,
        })
    }

    /// The `/metrics` of the sidecar in `pod`, fetched inside the pod.
    pub fn metrics(&self, pod: &str) -> String {
        curl(self.lan.host(pod), "http://127.0.0.1:15020/metrics")
    }

    /// The pod's namespace.
    pub fn host(&self, pod: &str) -> &Netns {
        self.lan.host(pod)
    }
}

/// What the three sidecars share.
struct Sidecars<'a> {
    lan: &'a Lan,
    binary: &'a Path,
    bundle: &'a Path,
    grpc: &'a str,
    threads: usize,
}

impl Sidecars<'_> {
    /// Starts the sidecar of `pod` as uid 1337, certified by the control
    /// plane as `identity`; returns once `/ready` answers and, with
    /// `discovery`, the stream has delivered every workload and Service.
    fn start(
        &self,
        pod: &'static str,
        identity: &str,
        discovery: bool,
        (workloads, service_count): (usize, usize),
    ) -> Result<Sidecar> {
        let token_file = self.lan.dir().join(format!("token-{pod}"));
        fs::write(&token_file, token(identity))?;
        chown(&token_file, Some(PROXY_UID), Some(PROXY_UID))?;
        let log = self.lan.log(&format!("sidecar-{pod}"));
        let log_err = log.try_clone()?;
        let host = self.lan.host(pod);
        let mut proc = host.spawn(
            &format!("sidecar {pod}"),
            &User::uid(PROXY_UID),
            self.binary,
            |c| {
                c.args(["--log-level", "warn", "run", "--control-plane"])
                    .arg(format!("https://{}", self.grpc))
                    .arg("--bundle")
                    .arg(self.bundle)
                    .args(["--identity", identity])
                    .arg("--token-file")
                    .arg(&token_file)
                    .args([
                        &format!("--discovery={discovery}"),
                        &format!("--mesh-networks={MESH_NETWORKS}"),
                        "--outbound-addr=127.0.0.1:15001",
                        "--inbound-addr=0.0.0.0:15006",
                        "--admin-addr=0.0.0.0:15020",
                        &format!("--worker-threads={}", self.threads),
                    ])
                    .stdout(log)
                    .stderr(log_err);
            },
        );
        let what = if discovery {
            format!(
                "sidecar {pod} to be ready and hold {workloads} workloads and {service_count} Services"
            )
        } else {
            format!("sidecar {pod} to be ready")
        };
        wait(READY, &what, || {
            if let Some(status) = proc.exited() {
                bail!(
                    "sidecar {pod} exited ({status}): {}",
                    tail(&self.lan.dir().join(format!("sidecar-{pod}.log")))
                );
            }
            if curl_status(host, "http://127.0.0.1:15020/ready") != "200" {
                return Ok(None);
            }
            if !discovery {
                return Ok(Some(()));
            }
            let text = curl(host, "http://127.0.0.1:15020/metrics");
            let addresses = metric(&text, "palisade_discovery_addresses_known", &[]);
            let services = metric(&text, "palisade_discovery_services_known", &[]);
            Ok((addresses >= workloads as f64 && services >= service_count as f64).then_some(()))
        })?;
        Ok(Sidecar { proc, pod })
    }
}

// === impl Sidecar ===

impl Sidecar {
    /// Its pid (`ip netns exec` and `setpriv` exec in place).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Polls `condition` until it gives `Some` or fails; fails naming `what`
/// after `timeout`.
fn wait<T>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// A copy of `binary` in `dir` that every uid can run.
fn runnable_copy(binary: &Path, dir: &Path) -> Result<PathBuf> {
    let name = binary
        .file_name()
        .with_context(|| format!("{} has no file name", binary.display()))?;
    let copy = dir.join(name);
    if fs::hard_link(binary, &copy).is_err() {
        fs::copy(binary, &copy).with_context(|| format!("copying {}", binary.display()))?;
    }
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

/// The static token of `identity` (at least 16 characters).
fn token(identity: &str) -> String {
    format!("token-for-{}", identity.replace('/', "-"))
}

/// The last lines of a log, for an error.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}
