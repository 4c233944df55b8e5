//! Whole-system test support for Palisade: starts the real binaries as child
//! processes on loopback, talks to them with real clients, and cleans up.
//!
//! - [`bin`]: where the built `palisade-*` binaries are.
//! - [`ControlPlane`]: a `palisade-control-plane serve` process with its own CA
//!   directory and token file.
//! - [`identity_client`]: a tonic client that trusts only the mesh's bundle.
//! - [`http_get`]: a one-shot HTTP/1.1 GET for admin endpoints.
//! - [`metric`]: a sample from Prometheus text; an absent family fails.
//! - [`eventually`], [`eventually_async`]: wait for a condition, with a deadline.
//! - [`listening_ports`]: where a child started on port 0 listens.
//! - [`require_tool`], [`require_root`]: fail loudly when a test cannot run.
//! - [`netns`]: pods and plain hosts as network namespaces on a bridge, with
//!   processes as a given user, packet capture and cleanup (root only).
//! - [`admission`]: AdmissionReviews posted to the webhook like the API
//!   server, patches applied, pods checked against the Kubernetes schemas.
//! - [`kube`]: the stand-in Kubernetes API server every Kubernetes-path test
//!   runs against (also the `palisade-kube-stand-in` binary).

#![forbid(unsafe_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use palisade_proto::identity::v1::identity_client::IdentityClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub mod admission;
pub mod kube;
pub mod netns;

/// Echoes `child`'s piped stderr as `[tag] line` (so a failing test shows
/// it) and hands each line to the returned receiver; `None` when stderr was
/// not piped.
pub fn follow_stderr(child: &mut Child, tag: &str) -> Option<mpsc::Receiver<String>> {
    let stderr = child.stderr.take()?;
    let (tx, lines) = mpsc::channel();
    let tag = tag.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Some(lines)
}

/// Path of a workspace binary, next to the test executable's `deps/` folder.
/// The test command builds them first (`cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the whole-system tests",
        path.display()
    );
    path
}

/// A running control plane. Dropping it kills the process.
#[derive(Debug)]
pub struct ControlPlane {
    child: Child,
    /// Where gRPC is served.
    pub grpc_addr: SocketAddr,
    /// Where the admin endpoints are served.
    pub admin_addr: SocketAddr,
    /// Where the injection webhook is served, when enabled.
    pub webhook_addr: Option<SocketAddr>,
    /// The CA directory (tls.crt, tls.key, ca.crt).
    pub ca_dir: PathBuf,
    /// The static token file (empty with another authenticator).
    pub tokens: PathBuf,
    log: mpsc::Receiver<String>,
}

// === impl ControlPlane ===

impl ControlPlane {
    /// Runs `ca init` in `dir/ca`, writes `tokens` (token, identity) to
    /// `dir/tokens.yaml`, and starts `serve` with `extra` flags.
    pub fn start(dir: &Path, tokens: &[(&str, &str)], extra: &[&str]) -> Result<Self> {
        let ca_dir = dir.join("ca");
        let status = Command::new(bin("palisade-control-plane"))
            .args(["ca", "init", "--out"])
            .arg(&ca_dir)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("ca init failed: {status}");
        }
        let token_file = dir.join("tokens.yaml");
        write_tokens(&token_file, tokens)?;
        Self::serve(&ca_dir, &token_file, extra)
    }

    /// Starts `serve` on an existing CA directory and token file.
    pub fn serve(ca_dir: &Path, tokens: &Path, extra: &[&str]) -> Result<Self> {
        let token_flag = tokens.display().to_string();
        let mut cp = Self::spawn(
            ca_dir,
            &["--authenticator", "static", "--static-tokens", &token_flag],
            &[],
            extra,
        )?;
        cp.tokens = tokens.to_owned();
        Ok(cp)
    }

    /// Starts `serve` on an existing CA directory with the given authenticator
    /// flags and extra environment variables.
    pub fn spawn(
        ca_dir: &Path,
        authenticator: &[&str],
        env: &[(&str, &Path)],
        extra: &[&str],
    ) -> Result<Self> {
        let mut child = Command::new(bin("palisade-control-plane"))
            .arg("serve")
            .arg("--ca-dir")
            .arg(ca_dir)
            .args(authenticator)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .args(if extra.contains(&"--grpc-addr") {
                &[][..]
            } else {
                &["--grpc-addr", "127.0.0.1:0"][..]
            })
            .args(if extra.contains(&"--admin-addr") {
                &[][..]
            } else {
                &["--admin-addr", "127.0.0.1:0"][..]
            })
            .args(["--log-level", "info"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting palisade-control-plane")?;
        let log = follow_stderr(&mut child, "control-plane").context("stderr is piped")?;
        let mut cp = Self {
            child,
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            webhook_addr: None,
            ca_dir: ca_dir.to_owned(),
            tokens: PathBuf::new(),
            log,
        };
        let line = cp
            .wait_for_log("serving grpc=", Duration::from_secs(20))
            .context("the control plane did not start")?;
        cp.grpc_addr = field(&line, "grpc=")?;
        cp.admin_addr = field(&line, "admin=")?;
        cp.webhook_addr = field(&line, "webhook=").ok();
        Ok(cp)
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        bail!("the control plane exited ({status}) before logging {needle:?}");
                    }
                    bail!("no log line with {needle:?} within {timeout:?}");
                }
            }
        }
    }

    /// The trust bundle's PEM.
    pub fn bundle_pem(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(self.ca_dir.join("ca.crt"))?)
    }

    /// An identity client that trusts only the mesh bundle.
    pub async fn client(&self) -> Result<IdentityClient<Channel>> {
        identity_client(self.grpc_addr, &self.bundle_pem()?).await
    }

    /// The text of `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(self.admin_addr, "/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = std::time::Instant::now() + timeout;
        for attempt in 0.. {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep(poll_interval(attempt).min(deadline - now));
        }
        bail!("still running {timeout:?} after SIGTERM")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a static token file.
pub fn write_tokens(path: &Path, tokens: &[(&str, &str)]) -> Result<()> {
    let mut text = String::from("tokens:\n");
    for (token, identity) in tokens {
        text.push_str(&format!("  - token: {token}\n    identity: {identity}\n"));
    }
    std::fs::write(path, text)?;
    Ok(())
}

fn field(line: &str, key: &str) -> Result<SocketAddr> {
    let start = line
        .find(key)
        .ok_or_else(|| anyhow!("{key} missing from {line:?}"))?
        + key.len();
    let value = line[start..].split_whitespace().next().unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("{key}{value} is not an address"))
}

/// A tonic identity client for `addr`, verifying the server as `localhost`
/// against `bundle_pem` only.
pub async fn identity_client(
    addr: SocketAddr,
    bundle_pem: &[u8],
) -> Result<IdentityClient<Channel>> {
    Ok(IdentityClient::new(grpc_channel(addr, bundle_pem).await?))
}

/// A gRPC channel to the control plane at `addr` that trusts only
/// `bundle_pem` and presents no client certificate.
pub async fn grpc_channel(addr: SocketAddr, bundle_pem: &[u8]) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(channel)
}

/// A one-shot `GET path` over HTTP/1.1 with `Connection: close`; returns the
/// status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The sum of the samples `name{labels...}` in Prometheus text: 0 when the
/// family is there but no series matches (a counter not incremented yet).
/// Panics when the text has no family `name` at all: a renamed or
/// unregistered metric must fail the test, not read as zero.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let family = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|base| text.contains(&format!("# TYPE {base} histogram")))
        .unwrap_or(name);
    assert!(
        text.lines()
            .any(|l| l.strip_prefix("# TYPE ").and_then(|t| t.split(' ').next()) == Some(family)),
        "the metrics have no family {family}"
    );
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How long to wait between two polls: short at first, then up to 200 ms.
fn poll_interval(attempt: u32) -> Duration {
    Duration::from_millis(10u64.saturating_mul(1 << attempt.min(5)).min(200))
}

/// Polls `condition` until it returns `Some`, and returns that; panics
/// naming `what` when `timeout` passes first. The one way whole-system
/// tests wait for something: no fixed sleeps, no hand-written deadlines.
pub fn eventually<T>(timeout: Duration, what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    for attempt in 0.. {
        if let Some(value) = condition() {
            return value;
        }
        let now = std::time::Instant::now();
        assert!(
            now < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(poll_interval(attempt).min(deadline - now));
    }
    unreachable!("the loop returns or panics")
}

/// [`eventually`] for async conditions, sleeping on tokio's clock.
pub async fn eventually_async<T, F>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> F,
) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    for attempt in 0.. {
        if let Some(value) = condition().await {
            return value;
        }
        let now = tokio::time::Instant::now();
        assert!(
            now < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(poll_interval(attempt).min(deadline - now)).await;
    }
    unreachable!("the loop returns or panics")
}

/// The TCP ports process `pid` listens on, from `/proc`: how a test learns
/// where a child it started on port 0 is listening, without binding a port
/// itself, dropping it and hoping nobody takes it first.
pub fn listening_ports(pid: u32) -> Result<Vec<u16>> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode.
            let (Some(local), Some(&"0A"), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if inodes.contains(*inode)
                && let Some(port) = local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// Whether `tool` is on PATH; a test that needs it fails loudly when not.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "this test needs `{tool}` on PATH; the test command (tests/run.sh) installs it"
    );
}

/// Fails the calling test unless it runs as root (effective uid 0). Tests that
/// build pods out of network namespaces need it; CI runs as root, and a test
/// that skipped itself would hide a broken data plane.
pub fn require_root() {
    let status =
        std::fs::read_to_string("/proc/self/status").expect("/proc/self/status is readable");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .expect("/proc/self/status has a Uid line");
    assert_eq!(
        euid, "0",
        "this test needs root (CI runs as root): it creates network namespaces, veth \
         pairs and iptables rules inside them; run it as root, e.g. with sudo"
    );
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn eventually_returns_the_value_once_the_condition_holds() {
        let mut calls = 0;
        let value = eventually(Duration::from_secs(5), "the third call", || {
            calls += 1;
            (calls == 3).then_some(calls * 10)
        });
        assert_eq!(value, 30);
    }

    #[test]
    fn eventually_names_what_it_waited_for_after_the_timeout() {
        let started = Instant::now();
        let failure = std::panic::catch_unwind(|| {
            eventually(
                Duration::from_millis(200),
                "a condition that never holds",
                || None::<()>,
            )
        })
        .expect_err("the condition never holds");
        let waited = started.elapsed();
        let message = failure
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert_eq!(
            message,
            "timed out after 200ms waiting for a condition that never holds"
        );
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2));
    }
}
