//! Command line and environment: the only place that reads either. Every flag
//! has a `PALISADE_*` variable; a bad value names the flag, the value and why.
//!
//! The flags of `serve` are grouped by the component they configure, and each
//! group checks and turns itself into that component's configuration:
//!
//! - [`ca`]: the CA directory and the lifetimes it grants; `ca init`.
//! - [`authn`]: the authenticator and its settings.
//! - [`grpc`]: the identity API's address, serving names and bounds.
//! - [`kubernetes`]: the injection webhook and the bundle publisher.
//! - [`discovery`]: where discovery learns which workload is at which address.
//!
//! The logging flags are the ones both binaries share
//! ([`palisade_runtime::telemetry::LogArgs`]).

mod authn;
mod ca;
mod discovery;
mod grpc;
mod kubernetes;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use palisade_proto::TrustDomain;
use palisade_runtime::telemetry::{LogArgs, LogConfig};
use serde::Serialize;

pub use self::{
    authn::{AuthenticatorConfig, AuthenticatorKind, AuthnArgs},
    ca::{CaArgs, InitArgs},
    discovery::{DiscoveryArgs, DiscoverySource},
    grpc::GrpcArgs,
    kubernetes::{PublishArgs, WebhookArgs, WebhookConfig},
};
use crate::{ca::LifetimePolicy, policy::MeshDefault, publish::PublishConfig};

/// The mesh certificate authority: issues short-lived SPIFFE certificates to
/// sidecars over gRPC.
#[derive(Debug, Parser)]
#[command(name = "palisade-control-plane", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the identity API (gRPC, 15012) and the admin endpoints (15014).
    Serve(Box<ServeArgs>),
    /// Manage the certificate authority's files.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print the CRDs of the policy resources (group policy.palisade.io) as YAML, as the chart ships them.
    Crds,
}

/// `ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a fresh ECDSA P-256 root (tls.crt, tls.key with mode 0600, ca.crt) for local use.
    Init(InitArgs),
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub ca: CaArgs,
    #[command(flatten)]
    pub grpc: GrpcArgs,
    /// Address of the admin server (/metrics, /ready, /live; /config on loopback only).
    #[arg(long, env = "PALISADE_ADMIN_ADDR", default_value = "0.0.0.0:15014")]
    pub admin_addr: SocketAddr,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    #[command(flatten)]
    pub authn: AuthnArgs,
    /// On SIGTERM/SIGINT, in-flight calls get this long to finish.
    #[arg(long, env = "PALISADE_SHUTDOWN_GRACE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    #[command(flatten)]
    pub webhook: WebhookArgs,
    #[command(flatten)]
    pub publish: PublishArgs,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
}

/// The validated configuration of `serve`.
#[derive(Clone, Debug, Serialize)]
pub struct ServeConfig {
    pub ca_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub trust_domain: TrustDomain,
    pub server_names: Vec<String>,
    pub authenticator: AuthenticatorConfig,
    pub lifetimes: LifetimePolicy,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    pub max_concurrent_signings: usize,
    #[serde(with = "humantime_serde")]
    pub signing_queue_timeout: Duration,
    pub max_pending_handshakes: usize,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The injection webhook, when enabled.
    pub webhook: Option<WebhookConfig>,
    /// Where the trust bundle is published in the cluster.
    pub publish: PublishConfig,
    /// Where discovery comes from, when it is served.
    pub discovery: Option<DiscoverySource>,
    /// The mesh-wide policy default discovery sends.
    pub policy_default: MeshDefault,
    pub log: LogConfig,
}

/// A flag combination that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value}: {why}")]
pub struct ConfigError {
    flag: &'static str,
    value: String,
    why: String,
}

// === impl ConfigError ===

impl ConfigError {
    fn new(flag: &'static str, value: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            flag,
            value: value.into(),
            why: why.into(),
        }
    }
}

// === impl ServeArgs ===

impl ServeArgs {
    /// Checks what clap cannot check alone; `log` is the logging the command
    /// line asked for.
    pub fn into_config(self, log: LogConfig) -> Result<ServeConfig, ConfigError> {
        let lifetimes = self.ca.lifetimes()?;
        let server_names = self.grpc.server_names()?;
        let max_concurrent_signings = self.grpc.max_concurrent_signings()?;
        let authenticator = self.authn.authenticator(&self.trust_domain)?;
        Ok(ServeConfig {
            ca_dir: self.ca.ca_dir,
            grpc_addr: self.grpc.grpc_addr,
            admin_addr: self.admin_addr,
            trust_domain: self.trust_domain,
            server_names,
            authenticator,
            lifetimes,
            request_timeout: self.grpc.request_timeout,
            handshake_timeout: self.grpc.handshake_timeout,
            max_concurrent_signings,
            signing_queue_timeout: self.grpc.signing_queue_timeout,
            max_pending_handshakes: self.grpc.max_pending_handshakes.max(1),
            shutdown_grace: self.shutdown_grace,
            webhook: self.webhook.webhook(),
            publish: self.publish.into_config(self.authn.kube_timeout)?,
            policy_default: self.discovery.mesh_default(),
            discovery: self.discovery.source()?,
            log,
        })
    }
}

/// A duration as the flags spell it, for messages.
fn text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServeConfig, String> {
        let mut argv = vec!["palisade-control-plane", "serve", "--ca-dir", "/ca"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let log = cli.log.config();
        match cli.command {
            Command::Serve(args) => args.into_config(log).map_err(|e| e.to_string()),
            Command::Ca(_) | Command::Crds => Err("wrong subcommand".into()),
        }
    }

    #[test]
    fn defaults_follow_the_design() {
        let config =
            parse(&["--authenticator", "static", "--static-tokens", "/t.yaml"]).expect("valid");
        assert_eq!(config.grpc_addr.port(), 15012);
        assert_eq!(config.admin_addr.port(), 15014);
        assert_eq!(config.trust_domain.as_str(), "cluster.local");
        assert_eq!(config.lifetimes.default, Duration::from_secs(3600));
        assert_eq!(config.lifetimes.min, Duration::from_secs(60));
        assert_eq!(config.lifetimes.max, Duration::from_secs(86400));
    }

    #[test]
    fn bad_values_name_the_flag_and_why() {
        for (args, needle) in [
            (&["--min-lifetime", "2h"][..], "--max-lifetime"),
            (&["--default-lifetime", "30s"][..], "--default-lifetime 30s"),
            (&["--authenticator", "static"][..], "--static-tokens"),
            (&["--static-tokens", "/t"][..], "--static-tokens /t"),
            (&["--trust-domain", "Bad:Domain"][..], "--trust-domain"),
            (&["--max-lifetime", "soon"][..], "--max-lifetime"),
            (
                &["--bundle-configmap", "Trust_Bundle"][..],
                "--bundle-configmap",
            ),
            (
                &["--webhook-configuration", "x-"][..],
                "--webhook-configuration",
            ),
            (&["--publish-resync", "0s"][..], "--publish-resync"),
            (&["--discovery-source", "file"][..], "--discovery-file"),
            (
                &["--discovery-file", "/d.yaml"][..],
                "--discovery-file /d.yaml",
            ),
            (&["--discovery-source", "dns"][..], "--discovery-source"),
        ] {
            let err = parse(args).expect_err("invalid");
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
