//! Flags of `certify`: one certificate from the control plane, written out.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use palisade_proto::SpiffeId;

use crate::identity::IdentityClientConfig;

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
