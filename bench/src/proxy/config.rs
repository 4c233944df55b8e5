//! The proxy benchmark's flags, and the settings they come to once the
//! defaults and `--quick` are applied.

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, ensure};
use clap::Parser;

use super::systems::System;

/// Palisade against haproxy, nginx and stunnel as mutual-TLS proxy pairs.
#[derive(Debug, Parser)]
#[command(name = "palisade-bench-proxy", version)]
pub struct Args {
    /// Rounds; systems alternate within each round [default: 3; --quick: 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Measured seconds of each bulk and connection-rate window, e.g. 5 or 5s
    /// [default: 5; --quick: 1].
    #[arg(long, value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// Unmeasured load before each window [default: 1s; --quick: 0.5s].
    #[arg(long, value_parser = parse_secs)]
    pub warmup: Option<Duration>,
    /// Systems to run, comma-separated [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    pub systems: Vec<System>,
    /// Skip the idle-connection memory test.
    #[arg(long)]
    pub skip_memory: bool,
    /// Skip the control plane's issuance benchmark.
    #[arg(long)]
    pub skip_issuance: bool,
    /// A smoke test: 1 round, short windows, fewer latency samples.
    #[arg(long)]
    pub quick: bool,
    /// The sidecar binary [default: `palisade-sidecar` next to this one].
    #[arg(long, value_name = "PATH")]
    pub sidecar: Option<PathBuf>,
    /// The issuance benchmark [default: `palisade-bench-issuance` next to this one].
    #[arg(long, value_name = "PATH")]
    pub issuance_bench: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Also write every figure of every round as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Closed-loop workers of the connection-rate test.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Measured 1 KiB round trips of the latency test [default: 20000; --quick: 3000].
    #[arg(long)]
    pub latency_requests: Option<usize>,
    /// Idle connections held in the memory test, cumulative steps.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 10000])]
    pub connections: Vec<usize>,
    /// Seconds of quiet before reading RSS in the memory test.
    #[arg(long, value_parser = parse_secs, default_value = "2")]
    pub idle_settle: Duration,
    /// Thread-CPU seconds of each crypto reference measurement [default: 2; --quick: 0.5].
    #[arg(long, value_parser = parse_secs)]
    pub crypto_duration: Option<Duration>,
    /// Worker threads of the load generator's runtime (the backend has its own thread).
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
}

/// `Args` with the defaults and `--quick` applied.
#[derive(Debug)]
pub struct Settings {
    /// The flags as given.
    pub args: Args,
    /// The command line, for the report.
    pub command: Vec<String>,
    pub rounds: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// The systems to run, in a fixed order, each once.
    pub systems: Vec<System>,
    pub latency_requests: usize,
    pub crypto_duration: Duration,
}

// === impl Settings ===

impl Settings {
    /// Applies the defaults; refuses values the benchmark cannot run with.
    pub fn new(args: Args) -> Result<Self> {
        let q = args.quick;
        let systems = if args.systems.is_empty() {
            System::all().to_vec()
        } else {
            let mut s = args.systems.clone();
            s.sort();
            s.dedup();
            s
        };
        let settings = Self {
            command: std::env::args().collect(),
            rounds: args.rounds.unwrap_or(if q { 1 } else { 3 }),
            duration: args
                .duration
                .unwrap_or(Duration::from_secs(if q { 1 } else { 5 })),
            warmup: args
                .warmup
                .unwrap_or(Duration::from_millis(if q { 500 } else { 1000 })),
            latency_requests: args
                .latency_requests
                .unwrap_or(if q { 3000 } else { 20_000 }),
            crypto_duration: args.crypto_duration.unwrap_or(Duration::from_millis(if q {
                500
            } else {
                2000
            })),
            systems,
            args,
        };
        ensure!(settings.rounds >= 1, "--rounds must be at least 1");
        ensure!(
            !settings.duration.is_zero(),
            "--duration must be above zero"
        );
        ensure!(settings.args.clients >= 1, "--clients must be at least 1");
        ensure!(
            settings.latency_requests >= 1,
            "--latency-requests must be at least 1"
        );
        ensure!(
            settings.args.client_threads >= 1,
            "--client-threads must be at least 1"
        );
        ensure!(
            settings.args.connections.iter().all(|n| *n >= 1),
            "--connections: every step must be at least 1"
        );
        Ok(settings)
    }

    /// The memory steps, ascending.
    pub fn connection_steps(&self) -> Vec<usize> {
        let mut steps = self.args.connections.clone();
        steps.sort_unstable();
        steps.dedup();
        steps
    }
}

/// A number of seconds (`5`, `0.5`) or a humantime duration (`5s`, `500ms`).
fn parse_secs(text: &str) -> Result<Duration, String> {
    if let Ok(secs) = text.parse::<f64>() {
        return if secs.is_finite() && secs >= 0.0 {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err(format!("{text}: not a number of seconds"))
        };
    }
    humantime::parse_duration(text).map_err(|e| format!("{text}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_a_number_or_a_duration() {
        assert_eq!(parse_secs("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("soon").is_err());
    }

    #[test]
    fn quick_shortens_what_was_not_given() {
        let s = Settings::new(Args::parse_from(["x", "--quick", "--rounds", "2"]))
            .expect("valid flags");
        assert_eq!(s.rounds, 2);
        assert_eq!(s.duration, Duration::from_secs(1));
        assert_eq!(s.latency_requests, 3000);
        let s = Settings::new(Args::parse_from(["x"])).expect("valid flags");
        assert_eq!((s.rounds, s.duration), (3, Duration::from_secs(5)));
        assert_eq!(s.systems, System::all().to_vec());
        assert_eq!(s.connection_steps(), vec![1000, 10_000]);
    }
}
