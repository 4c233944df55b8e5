//! `palisade-bench-issuance`: how many certificates per second the control plane
//! issues, set against what the CPU could do at best, measured in the same run.
//!
//! Each round has three parts:
//!
//! 1. The crypto ceiling: ECDSA P-256/SHA-256 signs per second, then verifies per
//!    second, each for `--crypto-duration` on one thread (aws-lc-rs, the control
//!    plane's own provider). An issuance costs at least one CSR verify and one
//!    certificate sign, so one core issues at most `1 / (1/sign + 1/verify)`
//!    certificates per second, two cores twice that. Rates are per second of the
//!    thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`), so other work on a
//!    shared machine does not lower what "one core" can do; the wall-clock rates
//!    are reported next to them and show how contended the machine was.
//! 2. The load: `--clients` tokio tasks call `Certify` back to back against a
//!    `palisade-control-plane serve` started for the run (a fresh root from
//!    `ca init`, the static authenticator with one token and identity per
//!    client) for `--warmup`, then for `--duration` measured. A request counts
//!    in the window it completes in. Every latency is recorded and every failure
//!    counted; the control plane's CPU time over the measured window comes from
//!    `/proc/PID/stat`.
//! 3. The crypto ceiling again: the machine is noisy, so a round's ceiling uses
//!    the median of the rates before and after its load.
//!
//! The report shows each round and the median of rounds (per figure):
//! certificates/s, latency p50/p90/p99/max, failures, the ratio to the two-core
//! ceiling, and control-plane CPU µs per certificate next to the crypto µs the
//! ceiling implies. Their quotient, the crypto share of the control plane's CPU,
//! is the ratio the control plane would reach with two cores to itself; the CPU
//! used by the bench clients and by other processes in the window is shown too.
//!
//! What is and is not measured:
//!
//! - Every request carries a distinct CSR for a fresh P-256 key, as a sidecar
//!   sends on each renewal. Keys and CSRs are generated before the first round
//!   (that is the sidecar's work, not the CA's), so the clients, which share the
//!   machine's cores with the control plane, spend as little CPU as possible
//!   while it is measured. The pool is sized from the ceiling, which no round
//!   can exceed; rounds reuse it (the CA keeps no state, so a CSR it saw in an
//!   earlier round costs the same). The first response of each client in each
//!   round is parsed and checked (URI SAN, public key).
//! - Each client has its own HTTP/2 connection by default, as each pod's sidecar
//!   does; `--channels N` makes the clients share N connections round-robin.
//!   Connections are opened before the warmup, so no TLS handshake is timed.
//! - The control plane runs with its default log level `info`, as in
//!   production, and its log goes to a file.
//!
//! Run it from release builds; the control plane is found next to this binary:
//!
//! ```text
//! cargo build --release -p palisade-control-plane -p palisade-bench
//! ./target/release/palisade-bench-issuance --rounds 3 --json issuance.json
//! ```
//!
//! The exit code is non-zero if any request failed.
//!
//! The modules: [`config`] (flags), [`load`] (the clients and their CSRs),
//! [`report`] (table and JSON). The ceiling is
//! [`crate::crypto::IssuanceCeiling`], the control plane
//! [`crate::control_plane::ControlPlane`].

use std::{fs, process::ExitCode, sync::Arc, time::Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::{
    control_plane::{self, ControlPlane},
    crypto::IssuanceCeiling,
    harness,
    process::procfs,
};

pub mod config;
pub mod load;
pub mod report;

pub use config::Args;

use load::ClientPlan;
use report::Round;

/// Headroom of the CSR pool over the two-core ceiling.
const POOL_HEADROOM: f64 = 1.25;

/// Runs the benchmark on a runtime with `--client-threads` workers until
/// done or a signal.
pub fn run(args: Args) -> Result<ExitCode> {
    args.check()?;
    harness::block_on(args.client_threads, bench(&args))
}

/// Runs every round and prints the report; `FAILURE` if any call failed.
async fn bench(args: &Args) -> Result<ExitCode> {
    let command: Vec<String> = std::env::args().collect();
    let binary = args.control_plane_binary()?;
    let clk_tck = procfs::clock_ticks_per_second();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let channels = args.channels.unwrap_or(args.clients);

    // Declared before the control plane, so it is removed after the process stopped.
    let dir = tempfile::Builder::new()
        .prefix("palisade-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let ca_dir = dir.path().join("ca");
    control_plane::ca_init(&binary, &ca_dir)?;
    let ca_pem = fs::read(ca_dir.join("ca.crt")).context("reading the new root ca.crt")?;
    // The token file gets a directory of its own: the control plane watches it.
    let tokens_dir = dir.path().join("tokens");
    fs::create_dir(&tokens_dir).context("creating the token directory")?;
    let tokens = tokens_dir.join("tokens.yaml");
    fs::write(
        &tokens,
        control_plane::token_file(load::tokens(args.clients)),
    )
    .context("writing the static token file")?;

    let mut extra = Vec::new();
    if let Some(n) = args.max_concurrent_signings {
        extra.extend(["--max-concurrent-signings".to_owned(), n.to_string()]);
    }
    let mut control_plane = ControlPlane::start(
        &binary,
        &ca_dir,
        &tokens,
        &dir.path().join("control-plane.log"),
        &args.log_level,
        &extra,
    )?;
    eprintln!(
        "control plane {} (pid {}) serving gRPC on {}",
        binary.display(),
        control_plane.pid(),
        control_plane.grpc
    );

    let mut plans: Option<Arc<[ClientPlan]>> = None;
    let mut rounds = Vec::with_capacity(args.rounds);
    for n in 1..=args.rounds {
        eprintln!("round {n}/{}: crypto ceiling", args.rounds);
        let before = IssuanceCeiling::measure(args.crypto_duration).await?;
        let plans = match &plans {
            Some(p) => p.clone(),
            None => {
                let per_client = args.csrs_per_client.unwrap_or_else(|| {
                    let load_secs = (args.warmup + args.duration).as_secs_f64();
                    let total = 2.0 * before.one_core() * load_secs * POOL_HEADROOM;
                    // The float is small and positive; `as` saturates anyway.
                    (total / args.clients as f64).ceil() as usize + 1
                });
                eprintln!(
                    "round {n}/{}: generating {} keys and CSRs ({per_client} per client)",
                    args.rounds,
                    per_client * args.clients
                );
                let started = Instant::now();
                let clients = args.clients;
                let generated: Arc<[ClientPlan]> =
                    tokio::task::spawn_blocking(move || load::generate_plans(clients, per_client))
                        .await
                        .context("the CSR generator panicked")??
                        .into();
                eprintln!("  took {:.1} s", started.elapsed().as_secs_f64());
                plans = Some(generated.clone());
                generated
            }
        };
        eprintln!(
            "round {n}/{}: load, {} clients on {channels} connections, {} warmup + {} measured",
            args.rounds,
            args.clients,
            humantime::format_duration(args.warmup),
            humantime::format_duration(args.duration)
        );
        let (stats, window) =
            load::run_load(&plans, &control_plane, &ca_pem, channels, args).await?;
        eprintln!("round {n}/{}: crypto ceiling again", args.rounds);
        let after = IssuanceCeiling::measure(args.crypto_duration).await?;
        let round = Round {
            before,
            after,
            stats,
            window,
            duration: args.duration,
            clk_tck,
        };
        eprintln!(
            "round {n}/{}: {:.0} certificates/s, {} failures",
            args.rounds,
            round.certs_per_second(),
            round.failures()
        );
        rounds.push(round);
    }

    let exit = control_plane.stop()?;
    let csrs_per_client = plans
        .as_ref()
        .and_then(|p| p.first())
        .map_or(0, |p| p.csrs.len());
    let config = json!({
        "clients": args.clients,
        "channels": channels,
        "warmup_s": args.warmup.as_secs_f64(),
        "duration_s": args.duration.as_secs_f64(),
        "crypto_duration_s": args.crypto_duration.as_secs_f64(),
        "rounds": args.rounds,
        "client_threads": args.client_threads,
        "control_plane": binary.display().to_string(),
        "control_plane_log_level": args.log_level,
        "max_concurrent_signings": args.max_concurrent_signings,
        "csrs_per_client": csrs_per_client,
        "cpus": cpus,
        "clk_tck": clk_tck,
    });
    print!(
        "{}",
        report::table(args, &command, &rounds, channels, cpus, &exit)
    );
    if let Some(path) = &args.json {
        let report = report::json_report(&command, &config, &rounds, &exit);
        let text = serde_json::to_string_pretty(&report).context("serializing the JSON report")?;
        fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    drop(control_plane);
    dir.close().context("removing the temporary directory")?;

    let failed: u64 = rounds.iter().map(Round::failures).sum();
    Ok(if failed == 0 && exit.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
