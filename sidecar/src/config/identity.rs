//! Flags of the identity client: where the sidecar's certificate comes from.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use palisade_proto::{SpiffeId, TrustDomain};
use serde::Serialize;

use super::ConfigError;
use crate::identity::{IdentityClientConfig, refresh::Schedule};

/// Flags of `run` for the certificate: file mode or control-plane mode.
#[derive(Debug, Args)]
pub struct IdentityArgs {
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

// === impl IdentityArgs ===

impl IdentityArgs {
    /// The credential source; `connect_timeout` bounds each call to the
    /// control plane (at least 5 s).
    pub fn into_source(
        self,
        trust_domain: &TrustDomain,
        connect_timeout: Duration,
    ) -> Result<CredentialSource, ConfigError> {
        match (self.cert_dir, self.control_plane) {
            (Some(dir), None) => Ok(CredentialSource::Files { dir }),
            (None, Some(control_plane)) => {
                let missing = |flag: &'static str| ConfigError {
                    flag,
                    value: String::new(),
                    why: "is required with --control-plane",
                };
                let identity = self.identity.ok_or_else(|| missing("--identity"))?;
                if !identity.is_member_of(trust_domain) {
                    return Err(ConfigError {
                        flag: "--identity",
                        value: identity.to_string(),
                        why: "is outside --trust-domain",
                    });
                }
                Ok(CredentialSource::ControlPlane {
                    client: IdentityClientConfig {
                        control_plane,
                        server_name: self.control_plane_name,
                        bundle_file: self.bundle.ok_or_else(|| missing("--bundle"))?,
                        identity,
                        token_file: self.token_file.ok_or_else(|| missing("--token-file"))?,
                        lifetime: self.lifetime,
                        timeout: connect_timeout.max(Duration::from_secs(5)),
                    },
                    schedule: Schedule {
                        min_interval: self.renew_min_interval,
                        max_interval: self.renew_max_interval,
                        backoff_cap: self.retry_cap,
                        ..Schedule::default()
                    },
                })
            }
            _ => Err(ConfigError {
                flag: "--cert-dir",
                value: String::new(),
                why: "give either --cert-dir (file mode) or --control-plane (control-plane mode)",
            }),
        }
    }
}
