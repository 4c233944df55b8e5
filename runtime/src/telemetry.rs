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

/// Installs the global subscriber. `forced` directives are appended to the
/// configured level and win over it (e.g. to keep a chatty dependency quiet).
pub fn init(config: &LogConfig, forced: &[&str]) -> Result<(), String> {
    let mut directives = config.level.clone();
    for d in forced {
        directives.push(',');
        directives.push_str(d);
    }
    let filter = EnvFilter::try_new(&directives)
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
