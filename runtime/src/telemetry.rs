//! Logging: `tracing` to stderr, as text or JSON, filtered by `--log-level`.
//!
//! Both binaries take the same flags, [`LogArgs`]: `--log-level` and
//! `--log-format text|json` (`--log-json`, the sidecar's older spelling, is
//! kept as a hidden alias of `--log-format json`).

use std::io::IsTerminal;

use serde::Serialize;
use tracing_subscriber::{EnvFilter, fmt};

/// The logging flags both binaries share; flatten them into a `Cli`.
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log filter: `info`, `debug`, or per module, e.g. `palisade_sidecar=debug,info`.
    #[arg(
        long = "log-level",
        global = true,
        env = "PALISADE_LOG_LEVEL",
        default_value = "info"
    )]
    pub level: String,
    /// Log line format.
    #[arg(
        long = "log-format",
        global = true,
        env = "PALISADE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub format: LogFormat,
    /// The same as `--log-format json` (kept for existing deployments).
    #[arg(
        long = "log-json",
        global = true,
        env = "PALISADE_LOG_JSON",
        hide = true
    )]
    pub json: bool,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (with colours on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Log output settings.
#[derive(Clone, Debug, Serialize)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `palisade_control_plane=debug`.
    pub level: String,
    /// Text or JSON lines.
    pub format: LogFormat,
}

// === impl LogArgs ===

impl LogArgs {
    /// The settings these flags ask for.
    pub fn config(&self) -> LogConfig {
        LogConfig {
            level: self.level.clone(),
            format: if self.json {
                LogFormat::Json
            } else {
                self.format
            },
        }
    }
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
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    fn parse(args: &[&str]) -> LogConfig {
        let argv = std::iter::once("bin").chain(args.iter().copied());
        Cli::try_parse_from(argv).expect("valid flags").log.config()
    }

    #[test]
    fn log_json_is_an_alias_of_log_format_json() {
        assert_eq!(parse(&[]).format, LogFormat::Text);
        assert_eq!(parse(&["--log-format", "json"]).format, LogFormat::Json);
        assert_eq!(parse(&["--log-json"]).format, LogFormat::Json);
        assert_eq!(parse(&["--log-level", "debug"]).level, "debug");
        assert!(Cli::try_parse_from(["bin", "--log-format", "xml"]).is_err());
    }
}
