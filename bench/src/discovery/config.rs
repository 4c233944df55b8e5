//! The discovery benchmark's flags.

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, ensure};
use clap::Parser;

use super::cluster::{MAX_PODS, MAX_SERVICES, MAX_STREAMS};
use crate::process::find_binary;

/// One control plane with a large synthetic cluster and many sidecar
/// discovery streams: change latency, a reconnect storm, control-plane
/// memory, and the memory of one sidecar's discovery state.
///
/// Quick smoke test: `--pods 500 --services 50 --streams 20 --changes 30 --rounds 1`.
#[derive(Debug, Parser)]
#[command(name = "palisade-bench-discovery", version)]
pub struct Args {
    /// Synthetic pods in the stand-in API server (`--streams` of them on
    /// loopback addresses, the rest in 198.18.0.0/15).
    #[arg(long, default_value_t = 10_000)]
    pub pods: usize,
    /// Services (cluster IPs in 198.19.0.0/16), each with one EndpointSlice
    /// over `--pods / --services` of the pods.
    #[arg(long, default_value_t = 1_000)]
    pub services: usize,
    /// Concurrent discovery streams over mTLS, one per meshed pod on loopback.
    #[arg(long, default_value_t = 1_000)]
    pub streams: usize,
    /// Changes per round (pod added, pod address moved, endpoint removed, in
    /// turn), each made once the previous one reached every stream.
    #[arg(long, default_value_t = 300)]
    pub changes: usize,
    /// Rounds; each is the changes, then a reconnect storm.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Pause between one change reaching every stream and the next change.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub pause: Duration,
    /// A change that has not reached every stream by then is counted as missed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub change_timeout: Duration,
    /// How long every stream gets to hold a complete snapshot (at the start
    /// and after each storm) before the run fails.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub snapshot_timeout: Duration,
    /// How long the control plane's memory settles before steady-state RSS is read.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// The control-plane binary [default: `palisade-control-plane` next to this one].
    #[arg(long, value_name = "PATH")]
    pub control_plane: Option<PathBuf>,
    /// Passed to the control plane as `--log-level`; must keep its `serving` line (info).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Worker threads of this process's runtime (stream clients and the
    /// stand-in API server).
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

// === impl Args ===

impl Args {
    /// Refuses values the benchmark cannot run with, naming the flag.
    pub fn check(&self) -> Result<()> {
        ensure!(
            (1..=MAX_SERVICES).contains(&self.services),
            "--services {}: between 1 and {MAX_SERVICES}",
            self.services
        );
        ensure!(
            (self.services..=MAX_PODS).contains(&self.pods),
            "--pods {}: between --services ({}) and {MAX_PODS}, so every Service has an endpoint",
            self.pods,
            self.services
        );
        ensure!(
            (1..=MAX_STREAMS.min(self.pods)).contains(&self.streams),
            "--streams {}: between 1 and {} (one pod each, at most {MAX_STREAMS})",
            self.streams,
            MAX_STREAMS.min(self.pods)
        );
        ensure!(
            self.rounds >= 1,
            "--rounds {}: at least one round is needed",
            self.rounds
        );
        let per_service = self.pods / self.services;
        ensure!(
            per_service >= 2,
            "--pods {} / --services {}: each Service needs at least 2 endpoints, so one can be removed",
            self.pods,
            self.services
        );
        // A third of the changes remove an endpoint; each Service keeps one.
        let removals = (self.changes * self.rounds).div_ceil(3);
        let removable = self.services * (per_service - 1);
        ensure!(
            removals <= removable,
            "--changes {} × --rounds {}: {removals} endpoint removals, but only {removable} endpoints can go",
            self.changes,
            self.rounds
        );
        let moves = (self.changes * self.rounds + 1) / 3;
        ensure!(
            moves <= self.pods - self.streams,
            "--changes {} × --rounds {}: {moves} pods move, but only {} pods are not a stream's",
            self.changes,
            self.rounds,
            self.pods - self.streams
        );
        ensure!(
            self.client_threads >= 1,
            "--client-threads 0: the clients need a thread"
        );
        ensure!(
            !self.change_timeout.is_zero() && !self.snapshot_timeout.is_zero(),
            "--change-timeout and --snapshot-timeout must not be 0s"
        );
        Ok(())
    }

    /// `--control-plane`, or `palisade-control-plane` next to this executable.
    pub fn control_plane_binary(&self) -> Result<PathBuf> {
        find_binary(
            self.control_plane.as_deref(),
            "palisade-control-plane",
            "palisade-control-plane",
            Some("--control-plane"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_and_the_quick_mode_pass_and_a_bad_value_names_its_flag() {
        Args::parse_from(["x"])
            .check()
            .expect("the defaults are valid");
        Args::parse_from(["x", "--pods", "500", "--services", "50", "--streams", "20"])
            .check()
            .expect("the quick mode is valid");
        let error = Args::parse_from(["x", "--streams", "20000"])
            .check()
            .expect_err("more streams than pods");
        assert!(error.to_string().starts_with("--streams 20000"), "{error}");
    }
}
