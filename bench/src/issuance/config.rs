//! The issuance benchmark's flags.

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, ensure};
use clap::Parser;

use crate::process::find_binary;

/// Certificates per second from the control plane, next to the ECDSA ceiling.
#[derive(Debug, Parser)]
#[command(name = "palisade-bench-issuance", version)]
pub struct Args {
    /// Concurrent clients, each calling Certify back to back with its own identity and token.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// HTTP/2 connections the clients share round-robin [default: one per client].
    #[arg(long)]
    pub channels: Option<usize>,
    /// Measured duration of each round's load.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured load before each measured window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Duration of each crypto ceiling measurement (sign, then verify).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub crypto_duration: Duration,
    /// Ceiling + load pairs to run; the report gives each and their median.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The control-plane binary [default: `palisade-control-plane` next to this one].
    #[arg(long, value_name = "PATH")]
    pub control_plane: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Passed to the control plane as `--max-concurrent-signings` [default: its own].
    #[arg(long)]
    pub max_concurrent_signings: Option<usize>,
    /// Passed to the control plane as `--log-level`; must keep its `serving` line (info).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Pre-generated keys and CSRs per client [default: enough to run at the
    /// two-core ceiling for warmup + duration, with 25 % headroom]; a client that
    /// runs out starts over, and the report counts those calls.
    #[arg(long)]
    pub csrs_per_client: Option<usize>,
    /// Worker threads of the clients' tokio runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
}

// === impl Args ===

impl Args {
    /// Refuses values the benchmark cannot run with, naming the flag.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.clients >= 1,
            "--clients {}: at least one client is needed",
            self.clients
        );
        ensure!(
            self.rounds >= 1,
            "--rounds {}: at least one round is needed",
            self.rounds
        );
        ensure!(
            !self.duration.is_zero(),
            "--duration 0s: the measured window must not be empty"
        );
        ensure!(
            !self.crypto_duration.is_zero(),
            "--crypto-duration 0s: the ceiling needs time to measure"
        );
        ensure!(
            self.client_threads >= 1,
            "--client-threads 0: the clients need a thread"
        );
        ensure!(
            self.csrs_per_client != Some(0),
            "--csrs-per-client 0: each client needs at least one CSR"
        );
        if let Some(n) = self.channels {
            ensure!(
                (1..=self.clients).contains(&n),
                "--channels {n}: must lie between 1 and --clients {}",
                self.clients
            );
        }
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
    fn the_defaults_pass_the_check_and_a_bad_value_names_its_flag() {
        Args::parse_from(["x"])
            .check()
            .expect("the defaults are valid");
        let error = Args::parse_from(["x", "--channels", "40"])
            .check()
            .expect_err("more channels than clients");
        assert!(error.to_string().starts_with("--channels 40"), "{error}");
    }
}
