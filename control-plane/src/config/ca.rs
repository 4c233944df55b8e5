//! Flags of the certificate authority: the CA directory, the lifetimes it
//! grants, and `ca init`.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use palisade_proto::TrustDomain;

use super::{ConfigError, text};
use crate::ca::LifetimePolicy;

/// Flags of `serve` for the CA.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// Directory holding the issuer (tls.crt, tls.key) and the trust bundle (ca.crt); watched for changes.
    #[arg(long, env = "PALISADE_CA_DIR", value_name = "DIR")]
    pub ca_dir: PathBuf,
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

// === impl CaArgs ===

impl CaArgs {
    /// The lifetimes the CA grants; the default must lie between the minimum
    /// and the maximum.
    pub fn lifetimes(&self) -> Result<LifetimePolicy, ConfigError> {
        if self.min_lifetime.is_zero() {
            return Err(ConfigError::new(
                "--min-lifetime",
                text(self.min_lifetime),
                "must be positive",
            ));
        }
        if self.max_lifetime < self.min_lifetime {
            return Err(ConfigError::new(
                "--max-lifetime",
                text(self.max_lifetime),
                format!("is below --min-lifetime {}", text(self.min_lifetime)),
            ));
        }
        if self.default_lifetime < self.min_lifetime || self.default_lifetime > self.max_lifetime {
            return Err(ConfigError::new(
                "--default-lifetime",
                text(self.default_lifetime),
                format!(
                    "must lie between --min-lifetime {} and --max-lifetime {}",
                    text(self.min_lifetime),
                    text(self.max_lifetime)
                ),
            ));
        }
        Ok(LifetimePolicy {
            default: self.default_lifetime,
            min: self.min_lifetime,
            max: self.max_lifetime,
            backdate: self.backdate,
        })
    }
}
