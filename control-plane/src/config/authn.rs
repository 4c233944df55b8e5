//! Flags of the authenticators: how callers prove who they are.

use std::{path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use palisade_proto::TrustDomain;
use serde::Serialize;

use super::ConfigError;
use crate::authn::kubernetes::KubernetesConfig;

/// Flags of `serve` for authentication.
#[derive(Debug, Args)]
pub struct AuthnArgs {
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
    /// Timeout of one call to the Kubernetes API server (TokenReview, publishing).
    #[arg(long, env = "PALISADE_KUBE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub kube_timeout: Duration,
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

/// The authenticator and its settings.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AuthenticatorConfig {
    Static { path: PathBuf },
    Kubernetes(KubernetesConfig),
}

// === impl AuthnArgs ===

impl AuthnArgs {
    /// The authenticator; `--static-tokens` goes with `static` and only with it.
    pub fn authenticator(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<AuthenticatorConfig, ConfigError> {
        match (self.authenticator, &self.static_tokens) {
            (AuthenticatorKind::Static, Some(path)) => {
                Ok(AuthenticatorConfig::Static { path: path.clone() })
            }
            (AuthenticatorKind::Static, None) => Err(ConfigError::new(
                "--authenticator",
                "static",
                "needs --static-tokens FILE (PALISADE_STATIC_TOKENS)",
            )),
            (AuthenticatorKind::Kubernetes, Some(path)) => Err(ConfigError::new(
                "--static-tokens",
                path.display().to_string(),
                "is only used with --authenticator static",
            )),
            (AuthenticatorKind::Kubernetes, None) => {
                if self.token_audience.is_empty() {
                    return Err(ConfigError::new(
                        "--token-audience",
                        "",
                        "must not be empty",
                    ));
                }
                Ok(AuthenticatorConfig::Kubernetes(KubernetesConfig {
                    audience: self.token_audience.clone(),
                    trust_domain: trust_domain.clone(),
                    request_timeout: self.kube_timeout,
                }))
            }
        }
    }
}
