//! Command line and environment: the only place that reads either. Every flag
//! has a `PALISADE_*` variable; a bad value names the flag, the value and why.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use palisade_proto::TrustDomain;
use serde::Serialize;

use palisade_runtime::telemetry::LogConfig;

use crate::{
    authn::kubernetes::KubernetesConfig, ca::LifetimePolicy, inject::config::is_dns_label,
    publish::PublishConfig,
};

/// The mesh certificate authority: issues short-lived SPIFFE certificates to
/// sidecars over gRPC.
#[derive(Debug, Parser)]
#[command(name = "palisade-control-plane", version, about)]
pub struct Cli {
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
}

/// `ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a fresh ECDSA P-256 root (tls.crt, tls.key with mode 0600, ca.crt) for local use.
    Init(InitArgs),
}

/// Flags of `ca init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write tls.crt, tls.key and ca.crt into.
    #[arg(long, env = "PALISADE_CA_DIR", value_name = "DIR")]
    pub out: PathBuf,
    /// Trust domain written into the root's subject.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    /// How long the root is valid.
    #[arg(long, env = "PALISADE_CA_VALIDITY", default_value = "10years", value_parser = humantime::parse_duration)]
    pub validity: Duration,
    /// Replace an existing CA in the directory.
    #[arg(long)]
    pub force: bool,
}

/// Which authenticator checks tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthenticatorKind {
    /// Projected service-account tokens, validated with the TokenReview API.
    Kubernetes,
    /// A token file (token -> SPIFFE ID), for VMs, local runs and tests.
    Static,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory holding the issuer (tls.crt, tls.key) and the trust bundle (ca.crt); watched for changes.
    #[arg(long, env = "PALISADE_CA_DIR", value_name = "DIR")]
    pub ca_dir: PathBuf,
    /// Address of the gRPC identity API (TLS).
    #[arg(long, env = "PALISADE_GRPC_ADDR", default_value = "0.0.0.0:15012")]
    pub grpc_addr: SocketAddr,
    /// Address of the admin server (/metrics, /ready, /live, /config).
    #[arg(long, env = "PALISADE_ADMIN_ADDR", default_value = "0.0.0.0:15014")]
    pub admin_addr: SocketAddr,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    /// DNS names and IPs in the gRPC serving certificate (comma-separated or repeated).
    #[arg(
        long = "server-name",
        env = "PALISADE_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub server_names: Vec<String>,
    /// How callers authenticate.
    #[arg(
        long,
        env = "PALISADE_AUTHENTICATOR",
        value_enum,
        default_value = "kubernetes"
    )]
    pub authenticator: AuthenticatorKind,
    /// Token file for the static authenticator; watched for changes.
    #[arg(long, env = "PALISADE_STATIC_TOKENS", value_name = "FILE")]
    pub static_tokens: Option<PathBuf>,
    /// Audience service-account tokens must carry (kubernetes authenticator).
    #[arg(long, env = "PALISADE_TOKEN_AUDIENCE", default_value = "palisade")]
    pub token_audience: String,
    /// Timeout of one TokenReview call to the API server.
    #[arg(long, env = "PALISADE_KUBE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub kube_timeout: Duration,
    /// Lifetime of a certificate when the request names none.
    #[arg(long, env = "PALISADE_DEFAULT_LIFETIME", default_value = "1h", value_parser = humantime::parse_duration)]
    pub default_lifetime: Duration,
    /// Requests for a shorter lifetime are refused.
    #[arg(long, env = "PALISADE_MIN_LIFETIME", default_value = "60s", value_parser = humantime::parse_duration)]
    pub min_lifetime: Duration,
    /// Requests for a longer lifetime are clamped to this.
    #[arg(long, env = "PALISADE_MAX_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_lifetime: Duration,
    /// How far notBefore is set in the past, for clock skew.
    #[arg(long, env = "PALISADE_BACKDATE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub backdate: Duration,
    /// A Certify call is cancelled after this long.
    #[arg(long, env = "PALISADE_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// A TLS handshake on the gRPC port is abandoned after this long.
    #[arg(long, env = "PALISADE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// At most this many CSRs are checked and signed at once.
    #[arg(long, env = "PALISADE_MAX_CONCURRENT_SIGNINGS", default_value_t = 64)]
    pub max_concurrent_signings: usize,
    /// A request waiting longer than this for a signing slot gets UNAVAILABLE.
    #[arg(long, env = "PALISADE_SIGNING_QUEUE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub signing_queue_timeout: Duration,
    /// At most this many TLS handshakes on the gRPC port run at once.
    #[arg(long, env = "PALISADE_MAX_PENDING_HANDSHAKES", default_value_t = 1024)]
    pub max_pending_handshakes: usize,
    /// On SIGTERM/SIGINT, in-flight calls get this long to finish.
    #[arg(long, env = "PALISADE_SHUTDOWN_GRACE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Injection configuration (YAML); when set, the sidecar-injection webhook is served on --webhook-addr. Watched for changes.
    #[arg(long, env = "PALISADE_INJECTION_CONFIG", value_name = "FILE")]
    pub injection_config: Option<PathBuf>,
    /// Address of the injection webhook (HTTPS, path /inject).
    #[arg(long, env = "PALISADE_WEBHOOK_ADDR", default_value = "0.0.0.0:15017")]
    pub webhook_addr: SocketAddr,
    /// MutatingWebhookConfiguration whose webhooks' caBundle is kept equal to the trust bundle.
    #[arg(long, env = "PALISADE_WEBHOOK_CONFIGURATION", value_name = "NAME")]
    pub webhook_configuration: Option<String>,
    /// ConfigMap (key ca.crt) written into every namespace labelled palisade.io/inject=enabled.
    #[arg(long, env = "PALISADE_BUNDLE_CONFIGMAP", value_name = "NAME")]
    pub bundle_configmap: Option<String>,
    /// How often the webhook caBundle and the bundle ConfigMaps are re-checked without a change.
    #[arg(long, env = "PALISADE_PUBLISH_RESYNC", default_value = "5m", value_parser = humantime::parse_duration)]
    pub publish_resync: Duration,
    /// Log filter (`info`, `debug`, `palisade_control_plane=debug,info`, ...).
    #[arg(long, env = "PALISADE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "PALISADE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
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
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    #[serde(with = "duration_text")]
    pub handshake_timeout: Duration,
    pub max_concurrent_signings: usize,
    #[serde(with = "duration_text")]
    pub signing_queue_timeout: Duration,
    pub max_pending_handshakes: usize,
    #[serde(with = "duration_text")]
    pub shutdown_grace: Duration,
    /// The injection webhook, when enabled.
    pub webhook: Option<WebhookConfig>,
    /// Where the trust bundle is published in the cluster.
    pub publish: PublishConfig,
    pub log: LogConfig,
}

/// The injection webhook's listener and configuration file.
#[derive(Clone, Debug, Serialize)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    pub injection_config: PathBuf,
}

/// The authenticator and its settings.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AuthenticatorConfig {
    Static { path: PathBuf },
    Kubernetes(KubernetesConfig),
}

/// A flag combination that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value}: {why}")]
pub struct ConfigError {
    flag: &'static str,
    value: String,
    why: String,
}

// === impl ServeArgs ===

impl ServeArgs {
    /// Checks what clap cannot check alone.
    pub fn into_config(self) -> Result<ServeConfig, ConfigError> {
        let err = |flag, value: String, why: &str| ConfigError {
            flag,
            value,
            why: why.to_owned(),
        };
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if self.min_lifetime.is_zero() {
            return Err(err(
                "--min-lifetime",
                fmt(self.min_lifetime),
                "must be positive",
            ));
        }
        if self.max_lifetime < self.min_lifetime {
            return Err(err(
                "--max-lifetime",
                fmt(self.max_lifetime),
                &format!("is below --min-lifetime {}", fmt(self.min_lifetime)),
            ));
        }
        if self.default_lifetime < self.min_lifetime || self.default_lifetime > self.max_lifetime {
            return Err(err(
                "--default-lifetime",
                fmt(self.default_lifetime),
                &format!(
                    "must lie between --min-lifetime {} and --max-lifetime {}",
                    fmt(self.min_lifetime),
                    fmt(self.max_lifetime)
                ),
            ));
        }
        if self.server_names.iter().all(|n| n.trim().is_empty()) {
            return Err(err(
                "--server-name",
                String::new(),
                "at least one name is needed",
            ));
        }
        if self.max_concurrent_signings == 0 {
            return Err(err(
                "--max-concurrent-signings",
                "0".into(),
                "must be at least 1",
            ));
        }
        let authenticator = match (self.authenticator, self.static_tokens) {
            (AuthenticatorKind::Static, Some(path)) => AuthenticatorConfig::Static { path },
            (AuthenticatorKind::Static, None) => {
                return Err(err(
                    "--authenticator",
                    "static".into(),
                    "needs --static-tokens FILE (PALISADE_STATIC_TOKENS)",
                ));
            }
            (AuthenticatorKind::Kubernetes, Some(path)) => {
                return Err(err(
                    "--static-tokens",
                    path.display().to_string(),
                    "is only used with --authenticator static",
                ));
            }
            (AuthenticatorKind::Kubernetes, None) => {
                if self.token_audience.is_empty() {
                    return Err(err("--token-audience", String::new(), "must not be empty"));
                }
                AuthenticatorConfig::Kubernetes(KubernetesConfig {
                    audience: self.token_audience,
                    trust_domain: self.trust_domain.clone(),
                    request_timeout: self.kube_timeout,
                })
            }
        };
        for (flag, name) in [
            ("--webhook-configuration", &self.webhook_configuration),
            ("--bundle-configmap", &self.bundle_configmap),
        ] {
            if let Some(name) = name
                && !is_dns_label(name)
                && !name.split('.').all(is_dns_label)
            {
                return Err(err(
                    flag,
                    name.clone(),
                    "is not a Kubernetes object name (lowercase letters, digits, '-', '.')",
                ));
            }
        }
        if self.publish_resync < Duration::from_secs(1) {
            return Err(err(
                "--publish-resync",
                fmt(self.publish_resync),
                "must be at least 1s",
            ));
        }
        Ok(ServeConfig {
            ca_dir: self.ca_dir,
            grpc_addr: self.grpc_addr,
            admin_addr: self.admin_addr,
            trust_domain: self.trust_domain,
            server_names: self
                .server_names
                .into_iter()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty())
                .collect(),
            authenticator,
            lifetimes: LifetimePolicy {
                default: self.default_lifetime,
                min: self.min_lifetime,
                max: self.max_lifetime,
                backdate: self.backdate,
            },
            request_timeout: self.request_timeout,
            handshake_timeout: self.handshake_timeout,
            max_concurrent_signings: self.max_concurrent_signings,
            signing_queue_timeout: self.signing_queue_timeout,
            max_pending_handshakes: self.max_pending_handshakes.max(1),
            shutdown_grace: self.shutdown_grace,
            webhook: self.injection_config.map(|injection_config| WebhookConfig {
                addr: self.webhook_addr,
                injection_config,
            }),
            publish: PublishConfig {
                webhook_configuration: self.webhook_configuration,
                bundle_configmap: self.bundle_configmap,
                resync: self.publish_resync,
                request_timeout: self.kube_timeout,
            },
            log: LogConfig {
                level: self.log_level,
                json: self.log_format == LogFormat::Json,
            },
        })
    }
}

/// Serializes durations as humantime text for `/config`.
mod duration_text {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServeConfig, String> {
        let mut argv = vec!["palisade-control-plane", "serve", "--ca-dir", "/ca"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Serve(args) => args.into_config().map_err(|e| e.to_string()),
            Command::Ca(_) => Err("wrong subcommand".into()),
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
        ] {
            let err = parse(args).expect_err("invalid");
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
