//! The outbound benchmark's flags, the settings they come to once the
//! defaults and `--quick` are applied, and the flags of the two subcommands
//! it runs inside the namespaces (the load generator and the app).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Result, ensure};
use clap::{Parser, Subcommand};

/// At most this many rounds: a run stays bounded in time.
const MAX_ROUNDS: usize = 20;
/// At most this long a measured window.
const MAX_WINDOW: Duration = Duration::from_secs(60);

/// New connections per second through a sidecar pair, the client-side
/// sidecar deciding each outbound connection with discovery on and off,
/// measured alternately in one run, in network namespaces with real
/// iptables capture (needs root).
#[derive(Debug, Parser)]
#[command(
    name = "palisade-bench-outbound",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// Rounds; the configurations alternate within each round [default: 5; --quick: 2].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Measured seconds of each window, e.g. 10 or 10s [default: 10; --quick: 2].
    #[arg(long, value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// Unmeasured load before each window [default: 2s; --quick: 0.5s].
    #[arg(long, value_parser = parse_secs)]
    pub warmup: Option<Duration>,
    /// Closed-loop connections in flight from the app in pod a.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Workloads in the discovery file, the three pods of the run among them.
    #[arg(long, default_value_t = 10_000)]
    pub workloads: usize,
    /// Services in the discovery file, the one backed by pod b among them.
    #[arg(long, default_value_t = 1_000)]
    pub services: usize,
    /// Leave out the third configuration (discovery on, to a Service's cluster address).
    #[arg(long)]
    pub skip_service: bool,
    /// Worker threads of each sidecar (`--worker-threads`).
    #[arg(long, default_value_t = 1)]
    pub sidecar_threads: usize,
    /// The uid the load generator and the app run as (not 1337: capture skips that one).
    #[arg(long, default_value_t = 1000)]
    pub app_uid: u32,
    /// A smoke test: 2 rounds of 2-second windows.
    #[arg(long)]
    pub quick: bool,
    /// The sidecar binary [default: `palisade-sidecar` next to this one].
    #[arg(long, value_name = "PATH")]
    pub sidecar: Option<PathBuf>,
    /// The control plane binary [default: `palisade-control-plane` next to this one].
    #[arg(long, value_name = "PATH")]
    pub control_plane: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// What the benchmark runs inside a namespace (started by the benchmark itself).
    #[command(subcommand)]
    pub inside: Option<Inside>,
}

/// The parts of the benchmark that run inside a pod's namespace: this same
/// binary, started there by the benchmark as the app's uid.
#[derive(Debug, Subcommand)]
pub enum Inside {
    /// The app's client: closed-loop connections, each a tiny request and
    /// response, reporting one measured window as JSON lines on stdout.
    #[command(hide = true)]
    Load(LoadArgs),
    /// The app in pod b: answers each connection's request and closes.
    #[command(hide = true)]
    Serve(ServeArgs),
}

/// Flags of `load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Where the app connects (its sidecar captures the connection).
    #[arg(long)]
    pub target: SocketAddr,
    /// Connections in flight.
    #[arg(long)]
    pub concurrency: usize,
    /// Unmeasured load first.
    #[arg(long, value_parser = parse_secs)]
    pub warmup: Duration,
    /// The measured window.
    #[arg(long, value_parser = parse_secs)]
    pub duration: Duration,
}

/// Flags of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Where the app listens.
    #[arg(long)]
    pub listen: SocketAddr,
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
}

// === impl Settings ===

impl Settings {
    /// Applies the defaults; refuses values the benchmark cannot run with or
    /// that would not end in reasonable time.
    pub fn new(args: Args) -> Result<Self> {
        let q = args.quick;
        let settings = Self {
            command: std::env::args().collect(),
            rounds: args.rounds.unwrap_or(if q { 2 } else { 5 }),
            duration: args
                .duration
                .unwrap_or(Duration::from_secs(if q { 2 } else { 10 })),
            warmup: args
                .warmup
                .unwrap_or(Duration::from_millis(if q { 500 } else { 2000 })),
            args,
        };
        ensure!(
            (1..=MAX_ROUNDS).contains(&settings.rounds),
            "--rounds must be 1 to {MAX_ROUNDS}"
        );
        ensure!(
            !settings.duration.is_zero() && settings.duration <= MAX_WINDOW,
            "--duration must be above zero and at most {} s",
            MAX_WINDOW.as_secs()
        );
        ensure!(
            settings.warmup <= MAX_WINDOW,
            "--warmup must be at most {} s",
            MAX_WINDOW.as_secs()
        );
        ensure!(
            (1..=4096).contains(&settings.args.concurrency),
            "--concurrency must be 1 to 4096"
        );
        ensure!(
            settings.args.sidecar_threads >= 1,
            "--sidecar-threads must be at least 1"
        );
        ensure!(
            settings.args.app_uid != palisade_tests::netns::PROXY_UID,
            "--app-uid {}: the capture rules skip the sidecar's uid, so the app's connections would bypass the sidecar",
            settings.args.app_uid
        );
        ensure!(
            settings.args.workloads >= super::discovery_file::POD_COUNT
                && settings.args.workloads <= super::discovery_file::MAX_WORKLOADS,
            "--workloads must be {} to {} (the run's own pods are among them)",
            super::discovery_file::POD_COUNT,
            super::discovery_file::MAX_WORKLOADS
        );
        ensure!(
            (1..=super::discovery_file::MAX_SERVICES).contains(&settings.args.services),
            "--services must be 1 to {} (the one backed by pod b is among them)",
            super::discovery_file::MAX_SERVICES
        );
        Ok(settings)
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
    fn quick_shortens_what_was_not_given() {
        let s = Settings::new(Args::parse_from(["x", "--quick", "--rounds", "3"]))
            .expect("valid flags");
        assert_eq!(s.rounds, 3);
        assert_eq!(s.duration, Duration::from_secs(2));
        let s = Settings::new(Args::parse_from(["x"])).expect("valid flags");
        assert_eq!((s.rounds, s.duration), (5, Duration::from_secs(10)));
        assert_eq!((s.args.workloads, s.args.services), (10_000, 1_000));
    }

    #[test]
    fn unbounded_or_bypassing_runs_are_refused() {
        for flags in [
            &["x", "--rounds", "0"][..],
            &["x", "--rounds", "21"],
            &["x", "--duration", "61"],
            &["x", "--app-uid", "1337"],
            &["x", "--workloads", "2"],
            &["x", "--services", "0"],
        ] {
            assert!(Settings::new(Args::parse_from(flags)).is_err(), "{flags:?}");
        }
    }

    #[test]
    fn the_inside_parts_are_subcommands() {
        let args = Args::parse_from([
            "x",
            "load",
            "--target",
            "198.18.0.2:8080",
            "--concurrency",
            "4",
            "--warmup",
            "0.5",
            "--duration",
            "2s",
        ]);
        assert!(matches!(args.inside, Some(Inside::Load(l)) if l.concurrency == 4));
    }
}
