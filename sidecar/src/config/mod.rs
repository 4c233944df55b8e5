//! Command line and environment: the only place that reads either. Every flag
//! has a `PALISADE_*` variable; a bad value names the flag, the value and why.
//!
//! The flags of `run` are grouped by the component they configure, and each
//! group turns itself into that component's configuration:
//!
//! - [`identity`]: where the certificate comes from (file or control-plane
//!   mode, the renewal schedule).
//! - [`proxy`]: the listeners (transparent and explicit, the inbound mode,
//!   the mesh networks) and the data plane's timeouts and bounds.
//! - [`tls`]: key exchange groups and cipher suites.
//! - [`init`]: the flags of `init`, the capture rules.
//! - [`certify`]: the flags of `certify`.
//!
//! The logging flags are the ones both binaries share
//! ([`palisade_runtime::telemetry::LogArgs`]).

mod certify;
mod identity;
mod init;
mod proxy;
mod tls;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use palisade_proto::TrustDomain;
use palisade_runtime::telemetry::{LogArgs, LogConfig};
use serde::Serialize;

pub use self::{
    certify::CertifyArgs,
    identity::{CredentialSource, IdentityArgs},
    init::InitArgs,
    proxy::{ExplicitInbound, ExplicitOutbound, LimitArgs, ListenerArgs, Listeners},
    tls::TlsArgs,
};
use crate::{
    discovery::StreamConfig,
    policy::DefaultAction,
    probe::AppProbes,
    proxy::{Limits, access::AccessLog, inbound::InboundTarget, outbound::OutboundTarget},
    tls::TlsSettings,
};

/// Palisade's sidecar: transparent mutual TLS between pods.
#[derive(Debug, Parser)]
#[command(name = "palisade-sidecar", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
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
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub listeners: ListenerArgs,
    /// Authorization policy file (YAML); watched. For use without discovery, which delivers the policy of the pod instead.
    #[arg(long, env = "PALISADE_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// The mesh-wide action on every port without --policy, until discovery delivers the pod's policy: allow or deny.
    #[arg(
        long,
        env = "PALISADE_DEFAULT_ACTION",
        value_enum,
        default_value = "allow"
    )]
    pub default_action: DefaultAction,
    /// One line per inbound connection the policy judged, on stdout: off or json (peer identity, port, decision, policy, bytes, duration).
    #[arg(long, env = "PALISADE_ACCESS_LOG", value_enum, default_value = "off")]
    pub access_log: AccessLog,
    /// Address of the admin server (/metrics, /ready, /live, /identity, /app-health/<container>/<probe>; /config on loopback only).
    #[arg(long, env = "PALISADE_ADMIN_ADDR", default_value = "0.0.0.0:15020")]
    pub admin_addr: SocketAddr,
    /// The app's original kubelet probes as JSON, written by the webhook when it rewrote them to /app-health on the admin port.
    #[arg(
        long,
        env = "PALISADE_APP_PROBES",
        value_name = "JSON",
        hide_env_values = true
    )]
    pub app_probes: Option<String>,
    /// The pod's address, where the app's probes are sent (kubelet's target); loopback without it.
    #[arg(long, env = "PALISADE_POD_IP", value_name = "ADDRESS")]
    pub pod_ip: Option<IpAddr>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// The validated configuration of `run`.
#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    pub trust_domain: TrustDomain,
    pub credentials: CredentialSource,
    /// The discovery stream, when outbound decisions come from it.
    pub discovery: Option<StreamConfig>,
    /// (address, target) of every inbound listener.
    pub inbound: Listeners<InboundTarget>,
    /// (address, target) of every outbound listener.
    pub outbound: Listeners<OutboundTarget>,
    pub policy: Option<PathBuf>,
    /// The default before a policy arrives, without `policy`.
    pub default_action: DefaultAction,
    pub access_log: AccessLog,
    pub admin_addr: SocketAddr,
    /// The app's probes the admin server performs; `/config` shows their
    /// names only (a probe's headers can carry a credential).
    #[serde(serialize_with = "probe_names")]
    pub app_probes: AppProbes,
    pub pod_ip: Option<IpAddr>,
    pub limits: Limits,
    pub max_connections: usize,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    pub tls: TlsSettings,
    /// Threads of the runtime; 0 is one per CPU.
    pub worker_threads: usize,
}

fn probe_names<S: serde::Serializer>(probes: &AppProbes, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(probes.0.keys())
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
        self.log.config()
    }
}

// === impl RunArgs ===

impl RunArgs {
    /// Checks what clap cannot check alone.
    pub fn into_config(self) -> Result<RunConfig, ConfigError> {
        let discovery = self.listeners.discovery;
        let credentials = self
            .identity
            .into_source(&self.trust_domain, self.limits.connect_timeout)?;
        let (inbound, outbound) = self.listeners.into_listeners(
            &self.trust_domain,
            matches!(credentials, CredentialSource::ControlPlane { .. }),
        )?;
        let discovery = match (&credentials, discovery) {
            (CredentialSource::ControlPlane { client, schedule }, true) => Some(StreamConfig {
                control_plane: client.control_plane.clone(),
                server_name: client.server_name.clone(),
                bundle_file: client.bundle_file.clone(),
                connect_timeout: self.limits.connect_timeout,
                retry: schedule.clone(),
            }),
            _ => None,
        };
        if let (Some(path), Some(_)) = (&self.policy, &discovery) {
            return Err(ConfigError {
                flag: "--policy",
                value: path.display().to_string(),
                why: "with --discovery the control plane delivers the pod's policy; the file is for use without discovery",
            });
        }
        // Parsed here, not by clap, whose errors quote the value: a probe's
        // headers can hold a credential.
        let app_probes = match &self.app_probes {
            None => AppProbes::default(),
            Some(json) => json.parse().map_err(|e: crate::probe::ProbesError| ConfigError {
                flag: "--app-probes",
                value: e.to_string(),
                why: "expected the probes the webhook writes (the value is not shown: a probe's headers can hold a credential)",
            })?,
        };
        Ok(RunConfig {
            discovery,
            credentials,
            inbound,
            outbound,
            policy: self.policy,
            default_action: self.default_action,
            access_log: self.access_log,
            admin_addr: self.admin_addr,
            app_probes,
            pod_ip: self.pod_ip,
            limits: self.limits.limits(),
            max_connections: self.limits.max_connections()?,
            drain_timeout: self.limits.drain_timeout,
            tls: self.tls.into_settings(),
            worker_threads: self.limits.worker_threads,
            trust_domain: self.trust_domain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{KxGroup, Suite};

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
    fn the_app_s_probes_parse_and_config_shows_their_names_only() {
        let probes = r#"{"web/readiness": {"httpGet": {"port": 8080, "path": "/ready",
            "httpHeaders": [{"name": "Authorization", "value": "Bearer s3cret-probe-token"}]}}}"#;
        let config = run(&["--app-probes", probes, "--pod-ip", "198.18.0.2"]).expect("valid");
        assert_eq!(config.pod_ip, Some("198.18.0.2".parse().expect("ip")));
        assert_eq!(config.app_probes.0["web/readiness"].timeout_seconds, 1);
        let shown = serde_json::to_string(&config).expect("serializable");
        assert!(
            shown.contains(r#""app_probes":["web/readiness"]"#),
            "{shown}"
        );
        assert!(!shown.contains("s3cret"), "{shown}");
        // A bad value names the flag and quotes nothing of it.
        let error = run(&["--app-probes", r#"{"web/readiness": {"exec": "s3cret"}}"#])
            .expect_err("unknown field");
        assert!(
            error.contains("--app-probes") && !error.contains("s3cret"),
            "{error}"
        );
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
            (&["--discovery", "true"][..], "needs --control-plane"),
            (&["--outbound-mode", "strict"][..], "needs --discovery true"),
            (&["--outbound-mode", "lenient"][..], "--outbound-mode"),
            (&["--discovery-wait", "soon"][..], "--discovery-wait"),
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
