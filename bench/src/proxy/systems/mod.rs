//! The systems under test and how each is started as a mutually
//! authenticating pair: a client-side proxy (plain TCP in, mutual TLS out)
//! and a server-side proxy (mutual TLS in, plain TCP out to the backend),
//! each its own process, with the same certificates. "direct" has no proxies:
//! the load generator talks to the backend, the limit.
//!
//! - `palisade`: two sidecars in explicit mode, file-mode certificates.
//! - `haproxy`, `nginx` (stream module), `stunnel`: their configuration files.

use std::{
    ffi::OsString,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, bail};
use clap::ValueEnum;
use palisade_tests::http_get;

use super::{config::Settings, note};
use crate::{
    certs::CertFiles,
    process::{Group, Groups, Output, Proc, free_port, procfs},
};

mod haproxy;
mod nginx;
mod palisade;
mod stunnel;

pub use palisade::SidecarInfo;

/// How long a started proxy gets to listen (and, for Palisade, be ready).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After SIGTERM, how long a proxy gets before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// The file-descriptor limit asked for (10,000 idle connections need ~3 per
/// connection in the proxies and one here).
const NOFILE_WANTED: u64 = 262_144;
/// Descriptors kept free of the idle connections (listeners, logs, runtime).
const FD_RESERVE: u64 = 256;
/// The peers of the goals.
pub const PEERS: [System; 3] = [System::Haproxy, System::Nginx, System::Stunnel];

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum System {
    /// No proxies: the load generator talks to the backend.
    Direct,
    /// Two sidecars, X25519 only.
    #[value(name = "palisade", alias = "palisade-x25519")]
    Palisade,
    /// Two sidecars, X25519MLKEM768 first (Palisade's default).
    #[value(name = "palisade-pq", alias = "palisade-hybrid")]
    PalisadePq,
    Haproxy,
    Nginx,
    Stunnel,
}

/// Which half of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Plain TCP in, TLS out.
    Client,
    /// TLS in, plain TCP out.
    Server,
}

/// Everything the systems are started from.
#[derive(Debug)]
pub struct Ctx {
    /// The run's temporary directory: configuration files and logs.
    pub dir: PathBuf,
    pub certs: CertFiles,
    /// The sidecar, when a Palisade system runs.
    pub sidecar: Option<SidecarInfo>,
    /// nginx's stream module, when it is a dynamic one.
    nginx_module: Option<PathBuf>,
    /// The process groups started, for the watchdog.
    groups: Arc<Groups>,
    pub clk_tck: f64,
    /// The open-file limit every process here runs with (after raising it).
    pub nofile: u64,
    /// Distinguishes the config files and logs of every process started.
    serial: AtomicU64,
}

/// Two proxies; `entry` is where the load generator connects.
#[derive(Debug)]
pub struct Pair {
    // Client first: dropped (stopped) before the server.
    pub client: Proc,
    pub server: Proc,
    pub entry: SocketAddr,
}

// === impl System ===

impl System {
    /// Every system, in the report's order.
    pub fn all() -> [Self; 6] {
        [
            Self::Direct,
            Self::Palisade,
            Self::PalisadePq,
            Self::Haproxy,
            Self::Nginx,
            Self::Stunnel,
        ]
    }

    /// The report's name.
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Palisade => "palisade (X25519)",
            Self::PalisadePq => "palisade (X25519MLKEM768)",
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
            Self::Stunnel => "stunnel",
        }
    }

    /// The JSON key.
    pub fn key(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Palisade => "palisade",
            Self::PalisadePq => "palisade-pq",
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
            Self::Stunnel => "stunnel",
        }
    }
}

// === impl Ctx ===

impl Ctx {
    /// Finds the binaries the systems of `s` need, or says how to get them.
    pub fn new(s: &Settings, dir: PathBuf, certs: CertFiles, groups: Arc<Groups>) -> Result<Self> {
        let wants = |x: System| s.systems.contains(&x);
        let sidecar = if wants(System::Palisade) || wants(System::PalisadePq) {
            Some(SidecarInfo::find(s.args.sidecar.as_deref())?)
        } else {
            None
        };
        for (sys, tool) in [
            (System::Haproxy, "haproxy"),
            (System::Nginx, "nginx"),
            (System::Stunnel, "stunnel4"),
        ] {
            if wants(sys) && !on_path(tool) {
                bail!(
                    "`{tool}` is not installed; deploy/bench/proxy.sh installs the peers \
                     (or leave {} out of --systems)",
                    sys.key()
                );
            }
        }
        let nginx_module = if wants(System::Nginx) {
            nginx::stream_module()?
        } else {
            None
        };
        Ok(Self {
            dir,
            certs,
            sidecar,
            nginx_module,
            groups,
            clk_tck: procfs::clock_ticks_per_second(),
            nofile: rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(u64::MAX),
            serial: AtomicU64::new(0),
        })
    }

    /// Idle connections a pair can hold: each proxy needs two descriptors per
    /// connection, and so does this process (client socket + backend socket).
    pub fn max_idle(&self) -> usize {
        usize::try_from(self.nofile.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX)
    }

    /// `max_idle` for one system: stunnel also caps its clients itself at
    /// 125/256 of its open-file limit and resets connections beyond that.
    pub fn max_idle_for(&self, sys: System) -> usize {
        let own = match sys {
            System::Stunnel => {
                usize::try_from((self.nofile * 125 / 256).saturating_sub(16)).unwrap_or(usize::MAX)
            }
            _ => usize::MAX,
        };
        self.max_idle().min(own)
    }

    /// haproxy's `maxconn` (it refuses to start if 2 × maxconn exceeds the limit).
    pub fn haproxy_maxconn(&self) -> u64 {
        (self.nofile.saturating_sub(100) / 2).min(60_000)
    }

    /// nginx's `worker_connections`.
    pub fn nginx_worker_connections(&self) -> u64 {
        self.nofile.saturating_sub(100).min(60_000)
    }

    /// Starts `program` as `name` in the run's directory, its output in
    /// `name.log`, watched by the watchdog.
    pub fn spawn(&self, name: &str, program: &Path, args: &[OsString]) -> Result<Proc> {
        let mut command = Command::new(program);
        command.args(args).current_dir(&self.dir);
        let log = self.dir.join(format!("{name}.log"));
        let proc = Proc::spawn(name, command, Output::Log(log), Group::Own, STOP_TIMEOUT)?;
        Ok(proc.watched_by(&self.groups))
    }
}

// === impl Pair ===

impl Pair {
    /// Starts the server side (to `backend`), then the client side (to the server side).
    pub fn start(ctx: &Ctx, sys: System, backend: SocketAddr) -> Result<Self> {
        let entry = free_port()?;
        let tls = free_port()?;
        let server = start_side(ctx, sys, Side::Server, tls, backend)?;
        let client = start_side(ctx, sys, Side::Client, entry, tls)?;
        Ok(Self {
            client,
            server,
            entry,
        })
    }

    /// An error if either proxy is no longer running.
    pub fn check_alive(&self) -> Result<()> {
        for p in [&self.client, &self.server] {
            if !p.alive() {
                return Err(p.exited_error());
            }
        }
        Ok(())
    }

    /// RSS of the client side and of the server side, KiB.
    pub fn rss(&self) -> Result<(u64, u64)> {
        Ok((self.client.rss_kib()?, self.server.rss_kib()?))
    }
}

/// Starts one half of a pair and waits until it listens (and, for Palisade,
/// is ready).
pub fn start_side(
    ctx: &Ctx,
    sys: System,
    side: Side,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Proc> {
    let serial = ctx.serial.fetch_add(1, Ordering::Relaxed);
    let side_name = match side {
        Side::Client => "client",
        Side::Server => "server",
    };
    let name = format!("{}-{side_name}-{serial}", sys.key());
    let (proc, admin) = match sys {
        System::Direct => bail!("the direct path has no proxies"),
        System::Palisade | System::PalisadePq => {
            palisade::start(ctx, sys, side, &name, listen, upstream)?
        }
        System::Haproxy => {
            let conf = ctx.dir.join(format!("{name}.cfg"));
            fs::write(
                &conf,
                haproxy::config(&ctx.certs, side, listen, upstream, ctx.haproxy_maxconn()),
            )?;
            let args = vec!["-db".into(), "-f".into(), conf.into_os_string()];
            (ctx.spawn(&name, Path::new("haproxy"), &args)?, None)
        }
        System::Nginx => {
            let conf = ctx.dir.join(format!("{name}.conf"));
            let prefix = ctx.dir.join(&name);
            fs::create_dir_all(&prefix)?;
            fs::write(&conf, nginx::config(ctx, side, listen, upstream, &prefix))?;
            let args = vec![
                "-p".into(),
                prefix.clone().into_os_string(),
                "-e".into(),
                prefix.join("error.log").into_os_string(),
                "-c".into(),
                conf.into_os_string(),
            ];
            (ctx.spawn(&name, Path::new("nginx"), &args)?, None)
        }
        System::Stunnel => {
            let conf = ctx.dir.join(format!("{name}.conf"));
            fs::write(
                &conf,
                stunnel::config(
                    &ctx.certs,
                    side,
                    listen,
                    upstream,
                    &ctx.dir.join(format!("{name}.out")),
                ),
            )?;
            let args = vec![conf.into_os_string()];
            (ctx.spawn(&name, Path::new("stunnel4"), &args)?, None)
        }
    };
    proc.wait_ready(START_TIMEOUT, &format!("on {listen}"), || {
        let listening = procfs::is_listening(listen.port());
        let ready = match admin {
            Some(a) => listening && matches!(http_get(a, "/ready"), Ok((200, _))),
            None => listening,
        };
        // nginx listens in the master before its worker exists.
        let worker = sys != System::Nginx || proc.pids().len() >= 2;
        Ok((ready && worker).then_some(()))
    })?;
    Ok(proc)
}

/// Whether `tool` is on PATH.
fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Raises RLIMIT_NOFILE (children inherit it); a note when it cannot.
pub fn raise_nofile(notes: &mut Vec<String>) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let soft = now.current.unwrap_or(u64::MAX);
    if soft >= NOFILE_WANTED {
        return;
    }
    let hard = now.maximum.unwrap_or(u64::MAX);
    let want = Rlimit {
        current: Some(NOFILE_WANTED),
        maximum: Some(hard.max(NOFILE_WANTED)),
    };
    if setrlimit(Resource::Nofile, want).is_ok() {
        return;
    }
    let fallback = Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    let _ = setrlimit(Resource::Nofile, fallback);
    let got = getrlimit(Resource::Nofile).current.unwrap_or(0);
    note(
        notes,
        format!(
            "the open-file limit is {got} and could not be raised to {NOFILE_WANTED} \
             (that needs CAP_SYS_RESOURCE)"
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_ctx(dir: &Path, nofile: u64) -> Ctx {
        Ctx {
            dir: dir.to_owned(),
            certs: CertFiles::write(dir).expect("the certificates"),
            sidecar: None,
            nginx_module: None,
            groups: Arc::new(Groups::new(dir)),
            clk_tck: 100.0,
            nofile,
            serial: AtomicU64::new(0),
        }
    }

    fn assert_has(what: &str, config: &str, wanted: &[&str]) {
        for want in wanted {
            assert!(config.contains(want), "{what} lacks {want:?}:\n{config}");
        }
    }

    #[test]
    fn every_peer_side_is_tls13_aes128gcm_x25519_without_resumption() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let ctx = test_ctx(dir.path(), 20_000);
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().expect("an address"),
            "127.0.0.1:2".parse().expect("an address"),
        );
        for side in [Side::Client, Side::Server] {
            assert_has(
                &format!("haproxy {side:?}"),
                &haproxy::config(&ctx.certs, side, a, b, ctx.haproxy_maxconn()),
                &[
                    "ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3",
                    "ciphersuites TLS_AES_128_GCM_SHA256",
                    "no-tls-tickets",
                    "tune.ssl.cachesize 0",
                    "verify required",
                ],
            );
            assert_has(
                &format!("nginx {side:?}"),
                &nginx::config(&ctx, side, a, b, dir.path()),
                &["TLSv1.3;", "TLS_AES_128_GCM_SHA256;", "X25519;"],
            );
            assert_has(
                &format!("stunnel {side:?}"),
                &stunnel::config(&ctx.certs, side, a, b, dir.path()),
                &[
                    "sslVersion = TLSv1.3",
                    "ciphersuites = TLS_AES_128_GCM_SHA256",
                    "curves = X25519",
                    "options = NO_TICKET",
                    "sessionResume = no",
                    "verifyChain = yes",
                ],
            );
        }
        assert_has(
            "nginx server",
            &nginx::config(&ctx, Side::Server, a, b, dir.path()),
            &[
                "ssl_verify_client on;",
                "ssl_session_cache off;",
                "ssl_session_tickets off;",
                "NumTickets 0;",
            ],
        );
        assert_has(
            "nginx client",
            &nginx::config(&ctx, Side::Client, a, b, dir.path()),
            &["proxy_ssl_session_reuse off;", "proxy_ssl_verify on;"],
        );
        assert_has(
            "stunnel server",
            &stunnel::config(&ctx.certs, Side::Server, a, b, dir.path()),
            &["requireCert = yes"],
        );
    }

    #[test]
    fn idle_connection_limits_follow_the_open_file_limit() {
        // The figures deploy/bench/README.md gives for a hard limit of 20,000.
        let dir = tempfile::tempdir().expect("a temp dir");
        let ctx = test_ctx(dir.path(), 20_000);
        assert_eq!(ctx.max_idle(), 9_872);
        assert_eq!(ctx.max_idle_for(System::Stunnel), 9_749);
        assert_eq!(ctx.max_idle_for(System::Haproxy), 9_872);
        assert_eq!(ctx.haproxy_maxconn(), 9_950);
        assert_eq!(ctx.nginx_worker_connections(), 19_900);
        let big = test_ctx(dir.path(), 262_144);
        assert_eq!(big.haproxy_maxconn(), 60_000);
        assert_eq!(big.nginx_worker_connections(), 60_000);
    }
}
