//! Flags of the gRPC identity API: where it listens, its serving
//! certificate's names, and its bounds.

use std::{net::SocketAddr, time::Duration};

use clap::Args;

use super::ConfigError;

/// Flags of `serve` for the gRPC server.
#[derive(Debug, Args)]
pub struct GrpcArgs {
    /// Address of the gRPC identity API (TLS).
    #[arg(long, env = "PALISADE_GRPC_ADDR", default_value = "0.0.0.0:15012")]
    pub grpc_addr: SocketAddr,
    /// DNS names and IPs in the gRPC serving certificate (comma-separated or repeated).
    #[arg(
        long = "server-name",
        env = "PALISADE_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub server_names: Vec<String>,
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
}

// === impl GrpcArgs ===

impl GrpcArgs {
    /// The serving certificate's names, trimmed; at least one.
    pub fn server_names(&self) -> Result<Vec<String>, ConfigError> {
        let names: Vec<String> = self
            .server_names
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            return Err(ConfigError::new(
                "--server-name",
                "",
                "at least one name is needed",
            ));
        }
        Ok(names)
    }

    /// The number of signing slots, at least one.
    pub fn max_concurrent_signings(&self) -> Result<usize, ConfigError> {
        if self.max_concurrent_signings == 0 {
            return Err(ConfigError::new(
                "--max-concurrent-signings",
                "0",
                "must be at least 1",
            ));
        }
        Ok(self.max_concurrent_signings)
    }
}
