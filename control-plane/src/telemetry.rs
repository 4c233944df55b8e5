//! Logging: `tracing` to stderr, as text or JSON, filtered by `--log-level`.

use std::io::IsTerminal;

use serde::Serialize;
use tracing_subscriber::{EnvFilter, fmt};

/// Log output settings.
#[derive(Clone, Debug, Serialize)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `palisade_control_plane=debug`.
    pub level: String,
    /// `text` or `json`.
    pub json: bool,
}

/// Installs the global subscriber.
pub fn init(config: &LogConfig) -> Result<(), String> {
    // kube's client logs whole response bodies on some errors, and a TokenReview
    // response echoes the token under review: keep that module to errors only.
    let filter = EnvFilter::try_new(format!("{},kube_client::client=error", config.level))
        .map_err(|e| format!("--log-level {:?}: {e}", config.level))?;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = if config.json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| e.to_string())
}
