//! Command line and environment: the only place that reads either. Every flag
//! has a `PALISADE_*` variable; a bad value names the flag, the value and why.

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Args, Parser, Subcommand};
use ipnet::IpNet;
use palisade_proto::{SpiffeId, TrustDomain};
use palisade_runtime::telemetry::LogConfig;
use serde::Serialize;

use crate::{
    capture::CaptureConfig,
    identity::{IdentityClientConfig, refresh::Schedule},
    proxy::{
        Limits,
        inbound::{InboundTarget, Mode},
        outbound::OutboundTarget,
    },
    tls::{KxGroup, Suite, TlsSettings},
};

/// Palisade's sidecar: transparent mutual TLS between pods.
#[derive(Debug, Parser)]
#[command(name = "palisade-sidecar", version, about)]
pub struct Cli {
    /// Log filter (`info`, `debug`, `palisade_sidecar=debug,info`, ...).
    #[arg(
        long,
        global = true,
        env = "PALISADE_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
    /// Log as JSON lines.
    #[arg(long, global = true, env = "PALISADE_LOG_JSON")]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy: capture listeners (15001/15006), explicit listeners, admin (15020).
    Run(Box<RunArgs>),
    /// Install (or with --remove, remove) the iptables capture rules in this network namespace.
    Init(InitArgs),
    /// Obtain one certificate from the control plane and write it, its key and
    /// the trust bundle to a directory (tls.crt, tls.key [0600], ca.crt).
    Certify(CertifyArgs),
}

/// Flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    /// File mode: a directory with tls.crt, tls.key and ca.crt, watched for changes.
    #[arg(
        long,
        env = "PALISADE_CERT_DIR",
        value_name = "DIR",
        conflicts_with = "control_plane"
    )]
    pub cert_dir: Option<PathBuf>,
    /// Control-plane mode: the control plane's gRPC address (e.g. https://palisade.palisade-system.svc:15012).
    #[arg(long, env = "PALISADE_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// The DNS name in the control plane's serving certificate.
    #[arg(long, env = "PALISADE_CONTROL_PLANE_NAME", default_value = "localhost")]
    pub control_plane_name: String,
    /// PEM bundle the control plane's certificate chains to (control-plane mode).
    #[arg(long, env = "PALISADE_BUNDLE", value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// The SPIFFE ID to claim (control-plane mode).
    #[arg(long, env = "PALISADE_IDENTITY")]
    pub identity: Option<SpiffeId>,
    /// File holding the token, read on every renewal (control-plane mode).
    #[arg(long, env = "PALISADE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Certificate lifetime to ask for (the control plane clamps it).
    #[arg(long, env = "PALISADE_LIFETIME", value_parser = humantime::parse_duration)]
    pub lifetime: Option<Duration>,
    /// Never renew sooner than this after an issuance.
    #[arg(long, env = "PALISADE_RENEW_MIN_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub renew_min_interval: Duration,
    /// Never wait longer than this between renewals.
    #[arg(long, env = "PALISADE_RENEW_MAX_INTERVAL", default_value = "12h", value_parser = humantime::parse_duration)]
    pub renew_max_interval: Duration,
    /// Longest wait between retries after a failed renewal.
    #[arg(long, env = "PALISADE_RETRY_CAP", default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_cap: Duration,
    /// Run the iptables-captured listeners (outbound 15001, inbound 15006).
    #[arg(long, env = "PALISADE_TRANSPARENT", default_value_t = true, action = ArgAction::Set)]
    pub transparent: bool,
    /// Addresses of the captured outbound listener (comma-separated).
    #[arg(
        long,
        env = "PALISADE_OUTBOUND_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:15001"
    )]
    pub outbound_addr: Vec<SocketAddr>,
    /// Addresses of the captured inbound listener (comma-separated).
    #[arg(
        long,
        env = "PALISADE_INBOUND_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15006"
    )]
    pub inbound_addr: Vec<SocketAddr>,
    /// Inbound traffic that is not mesh TLS: passed to the app (permissive) or refused (strict).
    #[arg(
        long,
        env = "PALISADE_INBOUND_MODE",
        value_enum,
        default_value = "permissive"
    )]
    pub inbound_mode: Mode,
    /// Destinations in these networks are mesh peers; others pass through untouched.
    #[arg(
        long,
        env = "PALISADE_MESH_NETWORKS",
        value_delimiter = ',',
        default_value = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fd00::/8"
    )]
    pub mesh_networks: Vec<IpNet>,
    /// Outbound destination ports never wrapped in mesh TLS (comma-separated).
    #[arg(long, env = "PALISADE_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound ports whose protocol speaks first from the server (no detection).
    #[arg(long, env = "PALISADE_SERVER_FIRST_PORTS", value_delimiter = ',')]
    pub server_first_ports: Vec<u16>,
    /// An explicit outbound listener: LISTEN=UPSTREAM,SPIFFE_ID (repeatable).
    #[arg(long = "explicit-outbound", env = "PALISADE_EXPLICIT_OUTBOUND", value_delimiter = ';', value_parser = parse_explicit_outbound)]
    pub explicit_outbound: Vec<ExplicitOutbound>,
    /// An explicit inbound listener: LISTEN=LOCAL_APP (repeatable); mesh TLS only.
    #[arg(long = "explicit-inbound", env = "PALISADE_EXPLICIT_INBOUND", value_delimiter = ';', value_parser = parse_explicit_inbound)]
    pub explicit_inbound: Vec<ExplicitInbound>,
    /// Authorization policy file (YAML); watched. Without it every peer is allowed.
    #[arg(long, env = "PALISADE_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Address of the admin server (/metrics, /ready, /live, /config).
    #[arg(long, env = "PALISADE_ADMIN_ADDR", default_value = "0.0.0.0:15020")]
    pub admin_addr: SocketAddr,
    /// A TLS handshake is abandoned after this long.
    #[arg(long, env = "PALISADE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// An inbound client that sends nothing is dropped after this long.
    #[arg(long, env = "PALISADE_DETECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,
    /// Connecting to the app or a peer gives up after this long.
    #[arg(long, env = "PALISADE_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Close connections idle this long (0 = never).
    #[arg(long, env = "PALISADE_IDLE_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// At most this many connections are proxied at once; more wait in the backlog.
    #[arg(long, env = "PALISADE_MAX_CONNECTIONS", default_value_t = 16384)]
    pub max_connections: usize,
    /// On SIGTERM, open connections get this long to finish.
    #[arg(long, env = "PALISADE_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Key-exchange groups offered and accepted, in preference order (comma-separated).
    #[arg(
        long,
        env = "PALISADE_TLS_GROUPS",
        value_enum,
        value_delimiter = ',',
        default_value = "x25519mlkem768,x25519"
    )]
    pub tls_groups: Vec<KxGroup>,
    /// TLS 1.3 cipher suites, in preference order (comma-separated).
    #[arg(
        long,
        env = "PALISADE_TLS_CIPHER_SUITES",
        value_enum,
        value_delimiter = ',',
        default_value = "aes128gcm,aes256gcm,chacha20poly1305"
    )]
    pub tls_cipher_suites: Vec<Suite>,
    /// Threads that run the proxy (0: one per CPU).
    #[arg(long, env = "PALISADE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

/// `LISTEN=UPSTREAM,SPIFFE_ID`.
#[derive(Clone, Debug, Serialize)]
pub struct ExplicitOutbound {
    pub listen: SocketAddr,
    pub upstream: String,
    pub identity: SpiffeId,
}

/// `LISTEN=LOCAL_APP`.
#[derive(Clone, Debug, Serialize)]
pub struct ExplicitInbound {
    pub listen: SocketAddr,
    pub app: SocketAddr,
}

fn parse_explicit_outbound(s: &str) -> Result<ExplicitOutbound, String> {
    let (listen, rest) = s
        .split_once('=')
        .ok_or("expected LISTEN=UPSTREAM,SPIFFE_ID, e.g. 127.0.0.1:7001=10.0.0.7:15006,spiffe://cluster.local/ns/prod/sa/api")?;
    let (upstream, identity) = rest
        .split_once(',')
        .ok_or("expected LISTEN=UPSTREAM,SPIFFE_ID: the SPIFFE ID after the comma is missing")?;
    if !upstream.contains(':') {
        return Err(format!("upstream {upstream:?} needs a port (HOST:PORT)"));
    }
    Ok(ExplicitOutbound {
        listen: listen
            .parse()
            .map_err(|e| format!("listen address {listen:?}: {e}"))?,
        upstream: upstream.to_owned(),
        identity: identity
            .parse()
            .map_err(|e| format!("identity {identity:?}: {e}"))?,
    })
}

fn parse_explicit_inbound(s: &str) -> Result<ExplicitInbound, String> {
    let (listen, app) = s
        .split_once('=')
        .ok_or("expected LISTEN=LOCAL_APP, e.g. 0.0.0.0:7002=127.0.0.1:8080")?;
    Ok(ExplicitInbound {
        listen: listen
            .parse()
            .map_err(|e| format!("listen address {listen:?}: {e}"))?,
        app: app
            .parse()
            .map_err(|e| format!("app address {app:?}: {e}"))?,
    })
}

/// Flags of `init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Remove the rules instead of installing them.
    #[arg(long)]
    pub remove: bool,
    /// Print the rules instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// Port of the captured outbound listener.
    #[arg(long, env = "PALISADE_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port of the captured inbound listener.
    #[arg(long, env = "PALISADE_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// The uid the sidecar runs as; its own traffic is never captured.
    #[arg(long, env = "PALISADE_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Outbound destination ports left alone (comma-separated).
    #[arg(long, env = "PALISADE_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound ports left alone (comma-separated).
    #[arg(long, env = "PALISADE_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// The sidecar's admin port: always left alone inbound, so probes and
    /// Prometheus reach it even in strict mode.
    #[arg(long, env = "PALISADE_ADMIN_PORT", default_value_t = 15020)]
    pub admin_port: u16,
    /// Also install the rules with ip6tables.
    #[arg(long, env = "PALISADE_IPV6", default_value_t = true, action = ArgAction::Set)]
    pub ipv6: bool,
}

/// Flags of `certify`.
#[derive(Debug, Args)]
pub struct CertifyArgs {
    /// The control plane's gRPC address.
    #[arg(
        long,
        env = "PALISADE_CONTROL_PLANE",
        default_value = "https://localhost:15012"
    )]
    pub control_plane: String,
    /// The DNS name in the control plane's serving certificate.
    #[arg(long, env = "PALISADE_CONTROL_PLANE_NAME", default_value = "localhost")]
    pub control_plane_name: String,
    /// PEM bundle of the roots the control plane's certificate chains to.
    #[arg(long, env = "PALISADE_BUNDLE", value_name = "FILE")]
    pub bundle: PathBuf,
    /// The SPIFFE ID to claim.
    #[arg(long, env = "PALISADE_IDENTITY")]
    pub identity: SpiffeId,
    /// File holding the authentication token.
    #[arg(long, env = "PALISADE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: PathBuf,
    /// Lifetime to request (the control plane clamps it).
    #[arg(long, env = "PALISADE_LIFETIME", value_parser = humantime::parse_duration)]
    pub lifetime: Option<Duration>,
    /// Deadline of the request.
    #[arg(long, env = "PALISADE_CERTIFY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Directory to write tls.crt, tls.key and ca.crt into.
    #[arg(long, env = "PALISADE_CERT_DIR", value_name = "DIR")]
    pub out: PathBuf,
}

/// Where the sidecar's certificate comes from.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialSource {
    /// A watched directory managed elsewhere.
    Files { dir: PathBuf },
    /// The control plane, renewed on a schedule.
    ControlPlane {
        client: IdentityClientConfig,
        schedule: Schedule,
    },
}

/// The validated configuration of `run`.
#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    pub trust_domain: TrustDomain,
    pub credentials: CredentialSource,
    /// (address, target) of every inbound listener.
    pub inbound: Vec<(SocketAddr, InboundTarget)>,
    /// (address, target) of every outbound listener.
    pub outbound: Vec<(SocketAddr, OutboundTarget)>,
    pub policy: Option<PathBuf>,
    pub admin_addr: SocketAddr,
    pub limits: Limits,
    pub max_connections: usize,
    #[serde(with = "duration_text")]
    pub drain_timeout: Duration,
    pub tls: TlsSettings,
    /// Threads of the runtime; 0 is one per CPU.
    pub worker_threads: usize,
}

/// A flag combination that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value}: {why}")]
pub struct ConfigError {
    flag: &'static str,
    value: String,
    why: &'static str,
}

// === impl Cli ===

impl Cli {
    /// The logging settings.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            level: self.log_level.clone(),
            json: self.log_json,
        }
    }
}

// === impl RunArgs ===

impl RunArgs {
    /// Checks what clap cannot check alone.
    pub fn into_config(self) -> Result<RunConfig, ConfigError> {
        let mut inbound = Vec::new();
        let mut outbound = Vec::new();
        if self.transparent {
            let server_first_ports: HashSet<u16> =
                self.server_first_ports.iter().copied().collect();
            for addr in &self.inbound_addr {
                inbound.push((
                    *addr,
                    InboundTarget::Transparent {
                        mode: self.inbound_mode,
                        server_first_ports: server_first_ports.clone(),
                    },
                ));
            }
            for addr in &self.outbound_addr {
                outbound.push((
                    *addr,
                    OutboundTarget::Transparent {
                        mesh_networks: self.mesh_networks.clone(),
                        exclude_ports: self.exclude_outbound_ports.iter().copied().collect(),
                    },
                ));
            }
        }
        for e in self.explicit_inbound {
            inbound.push((e.listen, InboundTarget::Explicit { app: e.app }));
        }
        for e in self.explicit_outbound {
            if !e.identity.is_member_of(&self.trust_domain) {
                return Err(ConfigError {
                    flag: "--explicit-outbound",
                    value: e.identity.to_string(),
                    why: "the expected identity is outside --trust-domain",
                });
            }
            outbound.push((
                e.listen,
                OutboundTarget::Explicit {
                    upstream: e.upstream,
                    identity: e.identity,
                },
            ));
        }
        if inbound.is_empty() && outbound.is_empty() {
            return Err(ConfigError {
                flag: "--transparent",
                value: "false".into(),
                why: "with no --explicit-inbound or --explicit-outbound there is nothing to run",
            });
        }
        let credentials = match (self.cert_dir, self.control_plane) {
            (Some(dir), None) => CredentialSource::Files { dir },
            (None, Some(control_plane)) => {
                let missing = |flag: &'static str| ConfigError {
                    flag,
                    value: String::new(),
                    why: "is required with --control-plane",
                };
                let identity = self.identity.ok_or_else(|| missing("--identity"))?;
                if !identity.is_member_of(&self.trust_domain) {
                    return Err(ConfigError {
                        flag: "--identity",
                        value: identity.to_string(),
                        why: "is outside --trust-domain",
                    });
                }
                CredentialSource::ControlPlane {
                    client: IdentityClientConfig {
                        control_plane,
                        server_name: self.control_plane_name,
                        bundle_file: self.bundle.ok_or_else(|| missing("--bundle"))?,
                        identity,
                        token_file: self.token_file.ok_or_else(|| missing("--token-file"))?,
                        lifetime: self.lifetime,
                        timeout: self.connect_timeout.max(Duration::from_secs(5)),
                    },
                    schedule: Schedule {
                        min_interval: self.renew_min_interval,
                        max_interval: self.renew_max_interval,
                        backoff_cap: self.retry_cap,
                        ..Schedule::default()
                    },
                }
            }
            _ => {
                return Err(ConfigError {
                    flag: "--cert-dir",
                    value: String::new(),
                    why: "give either --cert-dir (file mode) or --control-plane (control-plane mode)",
                });
            }
        };
        if self.max_connections == 0 {
            return Err(ConfigError {
                flag: "--max-connections",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        Ok(RunConfig {
            trust_domain: self.trust_domain,
            credentials,
            inbound,
            outbound,
            policy: self.policy,
            admin_addr: self.admin_addr,
            limits: Limits {
                handshake: self.handshake_timeout,
                detect: self.detect_timeout,
                connect: self.connect_timeout,
                idle: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            },
            max_connections: self.max_connections,
            drain_timeout: self.drain_timeout,
            tls: TlsSettings {
                groups: dedup(self.tls_groups),
                cipher_suites: dedup(self.tls_cipher_suites),
            },
            worker_threads: self.worker_threads,
        })
    }
}

// === impl InitArgs ===

impl InitArgs {
    /// The capture rules' configuration.
    pub fn capture_config(&self) -> CaptureConfig {
        CaptureConfig {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_uid: self.proxy_uid,
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_inbound_ports: self
                .exclude_inbound_ports
                .iter()
                .copied()
                .chain([self.admin_port])
                .collect(),
            ipv6: self.ipv6,
        }
    }
}

// === impl CertifyArgs ===

impl CertifyArgs {
    /// The identity client's configuration.
    pub fn client_config(&self) -> IdentityClientConfig {
        IdentityClientConfig {
            control_plane: self.control_plane.clone(),
            server_name: self.control_plane_name.clone(),
            bundle_file: self.bundle.clone(),
            identity: self.identity.clone(),
            token_file: self.token_file.clone(),
            lifetime: self.lifetime,
            timeout: self.timeout,
        }
    }
}

/// Serializes durations as humantime text for `/config`.
pub mod duration_text {
    use std::time::Duration;

    use serde::Serializer;

    /// Serializes `d` as e.g. `"10s"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// Serializes optional durations as humantime text or `null`.
pub mod duration_text_opt {
    use std::time::Duration;

    use serde::Serializer;

    /// Serializes `d` as e.g. `"10s"`, or `null`.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

/// `list` without repeats, first occurrence kept.
fn dedup<T: PartialEq>(list: Vec<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<RunConfig, String> {
        let mut argv = vec!["palisade-sidecar", "run"];
        if !args.contains(&"--control-plane") {
            argv.extend(["--cert-dir", "/certs"]);
        }
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(args) => args.into_config().map_err(|e| e.to_string()),
            _ => Err("wrong subcommand".into()),
        }
    }

    #[test]
    fn defaults_capture_on_the_design_ports() {
        let config = run(&[]).expect("valid");
        assert_eq!(config.outbound[0].0.port(), 15001);
        assert_eq!(config.inbound[0].0.port(), 15006);
        assert_eq!(config.admin_addr.port(), 15020);
    }

    #[test]
    fn tls_groups_suites_and_threads_are_chosen_in_order() {
        let config = run(&[]).expect("valid");
        assert_eq!(config.tls, TlsSettings::default());
        assert_eq!(config.tls.groups[0], KxGroup::X25519mlkem768);
        assert_eq!(config.worker_threads, 0);
        let config = run(&[
            "--tls-groups",
            "x25519,x25519",
            "--tls-cipher-suites",
            "aes256gcm,aes128gcm",
            "--worker-threads",
            "1",
        ])
        .expect("valid");
        assert_eq!(config.tls.groups, [KxGroup::X25519]);
        assert_eq!(
            config.tls.cipher_suites,
            [Suite::Aes256gcm, Suite::Aes128gcm]
        );
        assert_eq!(config.worker_threads, 1);
        let err = run(&["--tls-groups", "x448"]).expect_err("unknown group");
        assert!(err.contains("x448"), "{err}");
    }

    #[test]
    fn explicit_listeners_parse_and_bad_ones_say_why() {
        let config = run(&[
            "--transparent=false",
            "--explicit-outbound",
            "127.0.0.1:7001=127.0.0.1:7002,spiffe://cluster.local/ns/a/sa/b",
            "--explicit-inbound",
            "127.0.0.1:7002=127.0.0.1:8080",
        ])
        .expect("valid");
        assert_eq!(config.outbound.len(), 1);
        assert_eq!(config.inbound.len(), 1);

        for (args, needle) in [
            (&["--transparent=false"][..], "nothing to run"),
            (&["--explicit-outbound", "127.0.0.1:1=x:2"][..], "SPIFFE ID"),
            (
                &[
                    "--explicit-outbound",
                    "127.0.0.1:1=x,spiffe://cluster.local/a",
                ][..],
                "needs a port",
            ),
            (
                &["--explicit-outbound", "127.0.0.1:1=x:2,spiffe://other.td/a"][..],
                "outside --trust-domain",
            ),
            (&["--explicit-inbound", "nope"][..], "LISTEN=LOCAL_APP"),
            (&["--mesh-networks", "10.0.0.0/33"][..], "--mesh-networks"),
            (&["--control-plane", "https://cp:15012"][..], "--identity"),
            (
                &[
                    "--control-plane",
                    "https://cp:15012",
                    "--identity",
                    "spiffe://x.td/a",
                    "--bundle",
                    "/b",
                    "--token-file",
                    "/t",
                ][..],
                "outside --trust-domain",
            ),
        ] {
            let err = run(args).expect_err("invalid");
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
