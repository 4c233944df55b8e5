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
//!    thread's own CPU time (`/proc/thread-self/schedstat`), so other work on a
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
//! cargo build --release -p palisade-control-plane -p palisade-tests
//! ./target/release/palisade-bench-issuance --rounds 3 --json issuance.json
//! ```
//!
//! The exit code is non-zero if any request failed.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    hint::black_box,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aws_lc_rs::{
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
        UnparsedPublicKey,
    },
};
use clap::Parser;
use palisade_proto::identity::v1::{
    CertifyRequest, CertifyResponse, identity_client::IdentityClient,
};
use palisade_tests::process_ticks;
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType, string::Ia5String,
};
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// Bytes signed and verified by the ceiling: about a leaf's TBSCertificate.
const MESSAGE_LEN: usize = 400;
/// How long the control plane gets to print its `serving` line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the control plane gets to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// A Certify call the client gives up on (the server's own limit is 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Headroom of the CSR pool over the two-core ceiling.
const POOL_HEADROOM: f64 = 1.25;
/// Failure messages kept for the report.
const FAILURE_EXAMPLES: usize = 5;

/// Certificates per second from the control plane, next to the ECDSA ceiling.
#[derive(Debug, Parser)]
#[command(name = "palisade-bench-issuance", version, about)]
struct Args {
    /// Concurrent clients, each calling Certify back to back with its own identity and token.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// HTTP/2 connections the clients share round-robin [default: one per client].
    #[arg(long)]
    channels: Option<usize>,
    /// Measured duration of each round's load.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured load before each measured window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Duration of each crypto ceiling measurement (sign, then verify).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    crypto_duration: Duration,
    /// Ceiling + load pairs to run; the report gives each and their median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The control-plane binary [default: `palisade-control-plane` next to this one].
    #[arg(long, value_name = "PATH")]
    control_plane: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Passed to the control plane as `--max-concurrent-signings` [default: its own].
    #[arg(long)]
    max_concurrent_signings: Option<usize>,
    /// Passed to the control plane as `--log-level`; must keep its `serving` line (info).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Pre-generated keys and CSRs per client [default: enough to run at the
    /// two-core ceiling for warmup + duration, with 25 % headroom]; a client that
    /// runs out starts over, and the report counts those calls.
    #[arg(long)]
    csrs_per_client: Option<usize>,
    /// Worker threads of the clients' tokio runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
}

/// One client's identity, token and pre-generated CSRs.
#[derive(Debug)]
struct ClientPlan {
    identity: String,
    token: Vec<u8>,
    csrs: Vec<Vec<u8>>,
    /// The SubjectPublicKeyInfo of `csrs[0]`, to check the response to it.
    first_spki: Vec<u8>,
}

/// A control plane started for the run; stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
struct ControlPlane {
    child: Option<Child>,
    pid: u32,
    grpc: SocketAddr,
}

/// ECDSA P-256 operations per second on one core: per second of the measuring
/// thread's CPU time (what a core can do), and per second of wall time (what the
/// thread got on a shared machine).
#[derive(Clone, Copy, Debug)]
struct CryptoRates {
    sign: f64,
    verify: f64,
    sign_wall: f64,
    verify_wall: f64,
}

/// Operations per second of CPU time and of wall time.
#[derive(Clone, Copy, Debug)]
struct OpsRate {
    cpu: f64,
    wall: f64,
}

/// CPU clock ticks of the control plane, of this process and of the machine.
#[derive(Clone, Copy, Debug)]
struct CpuSample {
    at: Instant,
    server: u64,
    client: u64,
    machine: MachineTicks,
}

/// The first line of `/proc/stat`, summed.
#[derive(Clone, Copy, Debug, Default)]
struct MachineTicks {
    total: u64,
    idle: u64,
    steal: u64,
}

/// What the clients saw in one round.
#[derive(Debug, Default)]
struct ClientStats {
    /// Latencies of the successful calls that completed in the measured window, ns.
    latencies_ns: Vec<u64>,
    /// Successful calls that completed during the warmup.
    warmup_ok: u64,
    /// Calls that were sent again with a CSR from earlier in the round.
    reused_csrs: u64,
    failures: Failures,
}

/// Failed calls by kind (the gRPC code, or what the check found), with examples.
#[derive(Debug, Default)]
struct Failures {
    by_kind: BTreeMap<String, u64>,
    examples: Vec<String>,
}

/// The outcome of one round.
#[derive(Debug)]
struct Round {
    before: CryptoRates,
    after: CryptoRates,
    stats: ClientStats,
    window: (CpuSample, CpuSample),
    duration: Duration,
    clk_tck: f64,
}

/// A figure of the report: a row of the table and a key of the JSON.
#[derive(Debug)]
struct Figure {
    key: &'static str,
    label: &'static str,
    decimals: usize,
    value: fn(&Round) -> f64,
}

/// A line of the report's table.
#[derive(Debug)]
enum Row {
    Section(&'static str),
    Figure(Figure),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("palisade-bench-issuance: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the clients' runtime and runs the benchmark on it, until done or Ctrl-C.
fn run(args: &Args) -> Result<ExitCode> {
    args.check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = bench(args) => result,
            // Dropping `bench` stops the control plane and removes the temp dir.
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    })
}

/// Runs every round and prints the report; `FAILURE` if any call failed.
async fn bench(args: &Args) -> Result<ExitCode> {
    let binary = args.control_plane_binary()?;
    let clk_tck = clock_ticks_per_second();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let channels = args.channels.unwrap_or(args.clients);

    // Declared before the control plane, so it is removed after the process stopped.
    let dir = tempfile::Builder::new()
        .prefix("palisade-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let ca_dir = dir.path().join("ca");
    let status = Command::new(&binary)
        .args(["ca", "init", "--out"])
        .arg(&ca_dir)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {} ca init", binary.display()))?;
    ensure!(
        status.success(),
        "{} ca init failed: {status}",
        binary.display()
    );
    let ca_pem = fs::read(ca_dir.join("ca.crt")).context("reading the new root ca.crt")?;
    // The token file gets a directory of its own: the control plane watches it.
    let tokens_dir = dir.path().join("tokens");
    fs::create_dir(&tokens_dir).context("creating the token directory")?;
    let tokens = tokens_dir.join("tokens.yaml");
    fs::write(&tokens, token_file(args.clients)).context("writing the static token file")?;

    let mut control_plane = ControlPlane::start(
        &binary,
        &ca_dir,
        &tokens,
        &dir.path().join("control-plane.log"),
        args,
    )?;
    eprintln!(
        "control plane {} (pid {}) serving gRPC on {}",
        binary.display(),
        control_plane.pid,
        control_plane.grpc
    );

    let mut plans: Option<Arc<[ClientPlan]>> = None;
    let mut rounds = Vec::with_capacity(args.rounds);
    for n in 1..=args.rounds {
        eprintln!("round {n}/{}: crypto ceiling", args.rounds);
        let before = measure_ceiling(args.crypto_duration).await?;
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
                    tokio::task::spawn_blocking(move || generate_plans(clients, per_client))
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
        let (stats, window) = run_load(&plans, &control_plane, &ca_pem, channels, args).await?;
        eprintln!("round {n}/{}: crypto ceiling again", args.rounds);
        let after = measure_ceiling(args.crypto_duration).await?;
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
    print!("{}", table(args, &rounds, channels, cpus, &exit));
    if let Some(path) = &args.json {
        let report = json_report(&config, &rounds, &exit);
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

// === impl Args ===

impl Args {
    /// Refuses values the benchmark cannot run with, naming the flag.
    fn check(&self) -> Result<()> {
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
    fn control_plane_binary(&self) -> Result<PathBuf> {
        let path = match &self.control_plane {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context("finding this executable, to find the control plane next to it")?
                .parent()
                .context("this executable has no parent directory")?
                .join("palisade-control-plane"),
        };
        ensure!(
            path.is_file(),
            "the control plane {} does not exist: build it with \
             `cargo build --release -p palisade-control-plane` or pass --control-plane PATH",
            path.display()
        );
        Ok(path)
    }
}

// === impl ClientPlan ===

impl ClientPlan {
    /// Client `index`'s identity and token, and `count` fresh keys and CSRs.
    fn generate(index: usize, count: usize) -> Result<Self> {
        ensure!(count >= 1, "a client needs at least one CSR");
        let identity = identity(index);
        let san = Ia5String::try_from(identity.as_str())
            .with_context(|| format!("{identity} is not an IA5 string"))?;
        let mut csrs = Vec::with_capacity(count);
        let mut first_spki = Vec::new();
        for i in 0..count {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .context("generating a P-256 key")?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(san.clone())];
            let csr = params
                .serialize_request(&key)
                .context("serializing a CSR")?;
            csrs.push(csr.der().to_vec());
            if i == 0 {
                first_spki = key.subject_public_key_info();
            }
        }
        Ok(Self {
            identity,
            token: token(index).into_bytes(),
            csrs,
            first_spki,
        })
    }

    /// Checks the certificate issued for `csrs[0]`: the one URI SAN is the
    /// identity, and the key is the CSR's.
    fn check_first(&self, response: &CertifyResponse) -> Result<()> {
        let (_, cert) = X509Certificate::from_der(&response.certificate)
            .map_err(|e| anyhow!("the certificate does not parse: {e}"))?;
        ensure!(
            cert.public_key().raw == self.first_spki.as_slice(),
            "the certificate's public key is not the CSR's"
        );
        let san = cert
            .subject_alternative_name()
            .map_err(|e| anyhow!("the SAN extension does not parse: {e}"))?
            .context("the certificate has no SAN")?;
        let names = &san.value.general_names;
        ensure!(
            matches!(names.as_slice(), [GeneralName::URI(uri)] if *uri == self.identity),
            "the SAN is {names:?}, not exactly the URI {}",
            self.identity
        );
        ensure!(
            !response.trust_bundle.is_empty(),
            "the response carries no trust bundle"
        );
        Ok(())
    }
}

fn identity(index: usize) -> String {
    format!("spiffe://cluster.local/ns/bench/sa/client-{index}")
}

fn token(index: usize) -> String {
    format!("bench-token-{index:010}")
}

/// The static token file: one token and identity per client.
fn token_file(clients: usize) -> String {
    let mut text = String::from("tokens:\n");
    for i in 0..clients {
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "  - token: \"{}\"\n    identity: {}",
            token(i),
            identity(i)
        );
    }
    text
}

/// Generates every client's plan, spread over the machine's cores.
fn generate_plans(clients: usize, per_client: usize) -> Result<Vec<ClientPlan>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(clients);
    let indices: Vec<usize> = (0..clients).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = indices
            .chunks(clients.div_ceil(threads))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&i| ClientPlan::generate(i, per_client))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut plans = Vec::with_capacity(clients);
        for worker in workers {
            let chunk = worker
                .join()
                .map_err(|_| anyhow!("a CSR generator thread panicked"))??;
            plans.extend(chunk);
        }
        Ok(plans)
    })
}

// === impl ControlPlane ===

impl ControlPlane {
    /// Starts `serve` on loopback ports and waits for its `serving` line.
    fn start(binary: &Path, ca_dir: &Path, tokens: &Path, log: &Path, args: &Args) -> Result<Self> {
        let log_file = fs::File::create(log)
            .with_context(|| format!("creating the control-plane log {}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--ca-dir")
            .arg(ca_dir)
            .args(["--authenticator", "static", "--static-tokens"])
            .arg(tokens)
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--log-format", "text", "--log-level", &args.log_level]);
        if let Some(n) = args.max_concurrent_signings {
            command.args(["--max-concurrent-signings", &n.to_string()]);
        }
        // The flags above are the whole configuration: no PALISADE_* from the caller's shell.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PALISADE_") {
                command.env_remove(name);
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut control_plane = Self {
            pid: child.id(),
            child: Some(child),
            grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        control_plane.grpc = control_plane.wait_serving(log)?;
        Ok(control_plane)
    }

    /// Polls the log for `serving grpc=ADDR`; fails if the process exits first.
    fn wait_serving(&mut self, log: &Path) -> Result<SocketAddr> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = fs::read_to_string(log)
                .with_context(|| format!("reading the control-plane log {}", log.display()))?;
            if let Some(addr) = text.lines().find_map(parse_serving_line) {
                return addr;
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("checking the control plane")?
            {
                bail!(
                    "the control plane exited ({status}) before serving:\n{}",
                    tail(&text, 20)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the control plane printed no `serving grpc=` line within {}s \
                     (is --log-level at least info?):\n{}",
                    START_TIMEOUT.as_secs(),
                    tail(&text, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits; SIGKILL if it does not stop in time.
    fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the control plane was already stopped");
        };
        if let Some(status) = child.try_wait().context("checking the control plane")? {
            return Ok(status);
        }
        let term = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if term.is_ok_and(|s| s.success()) {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().context("waiting for the control plane")? {
                    return Ok(status);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!(
                "the control plane did not stop within {}s of SIGTERM; killing it",
                STOP_TIMEOUT.as_secs()
            );
        }
        child.kill().context("killing the control plane")?;
        child.wait().context("waiting for the killed control plane")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(error) = self.stop()
        {
            eprintln!("stopping the control plane (pid {}): {error:#}", self.pid);
        }
    }
}

/// `Some(addr)` for the control plane's `serving grpc=ADDR admin=...` line.
fn parse_serving_line(line: &str) -> Option<Result<SocketAddr>> {
    let rest = &line[line.find(" serving ")?..];
    let value = rest
        .split_whitespace()
        .find_map(|f| f.strip_prefix("grpc="))?;
    Some(
        value
            .parse()
            .with_context(|| format!("the serving line's grpc={value} is not an address")),
    )
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// === impl CryptoRates ===

impl CryptoRates {
    /// The median (the mean, for two) of two measurements.
    fn median_of(a: Self, b: Self) -> Self {
        Self {
            sign: (a.sign + b.sign) / 2.0,
            verify: (a.verify + b.verify) / 2.0,
            sign_wall: (a.sign_wall + b.sign_wall) / 2.0,
            verify_wall: (a.verify_wall + b.verify_wall) / 2.0,
        }
    }

    /// Issuances per second one core could do: one sign plus one verify each.
    fn one_core(&self) -> f64 {
        1.0 / (1.0 / self.sign + 1.0 / self.verify)
    }

    /// CPU µs of the minimum crypto in one issuance.
    fn crypto_us(&self) -> f64 {
        1e6 / self.one_core()
    }
}

/// Measures signs/s, then verifies/s, each for `each` on one blocking thread.
async fn measure_ceiling(each: Duration) -> Result<CryptoRates> {
    tokio::task::spawn_blocking(move || measure_ceiling_blocking(each))
        .await
        .context("the crypto ceiling thread panicked")?
}

fn measure_ceiling_blocking(each: Duration) -> Result<CryptoRates> {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
        .context("generating a P-256 key for the ceiling")?;
    let message = [0x5a_u8; MESSAGE_LEN];
    let sign = ops_per_second(each, || {
        let signature = key
            .sign(&rng, black_box(&message))
            .context("ECDSA P-256 sign")?;
        black_box(signature);
        Ok(())
    })?;
    let signature = key.sign(&rng, &message).context("ECDSA P-256 sign")?;
    let public =
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
    let verify = ops_per_second(each, || {
        public
            .verify(black_box(&message), black_box(signature.as_ref()))
            .context("ECDSA P-256 verify of a good signature")
    })?;
    Ok(CryptoRates {
        sign: sign.cpu,
        verify: verify.cpu,
        sign_wall: sign.wall,
        verify_wall: verify.wall,
    })
}

/// Runs `op` in batches until `each` of wall time has passed; returns operations
/// per second of this thread's CPU time and of wall time.
fn ops_per_second(each: Duration, mut op: impl FnMut() -> Result<()>) -> Result<OpsRate> {
    const BATCH: u64 = 32;
    for _ in 0..BATCH {
        op()?;
    }
    let start = Instant::now();
    let cpu_start = thread_cpu_ns()?;
    let mut ops = 0_u64;
    loop {
        for _ in 0..BATCH {
            op()?;
        }
        ops += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= each {
            let cpu_ns = thread_cpu_ns()?.saturating_sub(cpu_start).max(1);
            return Ok(OpsRate {
                cpu: ops as f64 / (cpu_ns as f64 / 1e9),
                wall: ops as f64 / elapsed.as_secs_f64(),
            });
        }
    }
}

/// The CPU time this thread has run, ns: the first field of
/// `/proc/thread-self/schedstat` (the scheduler's own accounting, not ticks).
fn thread_cpu_ns() -> Result<u64> {
    const PATH: &str = "/proc/thread-self/schedstat";
    fs::read_to_string(PATH)
        .with_context(|| format!("reading {PATH}"))?
        .split_whitespace()
        .next()
        .with_context(|| format!("{PATH} is empty"))?
        .parse()
        .with_context(|| format!("{PATH}: the run time is not a number"))
}

// === load ===

/// Opens the connections, runs warmup and measured window, samples CPU around
/// the window.
async fn run_load(
    plans: &Arc<[ClientPlan]>,
    control_plane: &ControlPlane,
    ca_pem: &[u8],
    channels: usize,
    args: &Args,
) -> Result<(ClientStats, (CpuSample, CpuSample))> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    let endpoint = Endpoint::from_shared(format!("https://{}", control_plane.grpc))
        .context("building the gRPC endpoint")?
        .tls_config(tls)
        .context("configuring TLS for the gRPC endpoint")?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10));
    let mut connections = Vec::with_capacity(channels);
    for _ in 0..channels {
        connections.push(endpoint.connect().await.with_context(|| {
            format!("connecting to the control plane at {}", control_plane.grpc)
        })?);
    }

    let measure_from = Instant::now() + args.warmup;
    let end = measure_from + args.duration;
    let pid = control_plane.pid;
    let sampler = std::thread::spawn(move || -> Result<(CpuSample, CpuSample)> {
        std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
        let first = CpuSample::take(pid)?;
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        Ok((first, CpuSample::take(pid)?))
    });

    let mut clients = JoinSet::new();
    for index in 0..plans.len() {
        let channel = connections[index % connections.len()].clone();
        clients.spawn(client(plans.clone(), index, channel, measure_from, end));
    }
    let mut stats = ClientStats::default();
    while let Some(joined) = clients.join_next().await {
        stats.merge(joined.context("a client task panicked")?);
    }
    let window = tokio::task::spawn_blocking(move || sampler.join())
        .await
        .context("joining the CPU sampler")?
        .map_err(|_| anyhow!("the CPU sampler panicked"))??;
    Ok((stats, window))
}

/// One client: Certify back to back until `end`, each call with the next CSR.
async fn client(
    plans: Arc<[ClientPlan]>,
    index: usize,
    channel: Channel,
    measure_from: Instant,
    end: Instant,
) -> ClientStats {
    let plan = &plans[index];
    let mut identity_client = IdentityClient::new(channel);
    let mut stats = ClientStats::default();
    let mut next = 0_usize;
    while Instant::now() < end {
        let slot = next % plan.csrs.len();
        if next >= plan.csrs.len() {
            stats.reused_csrs += 1;
        }
        next += 1;
        let request = CertifyRequest {
            identity: plan.identity.clone(),
            token: plan.token.clone(),
            csr: plan.csrs[slot].clone(),
            requested_lifetime: None,
        };
        let started = Instant::now();
        let result = tokio::time::timeout(CALL_TIMEOUT, identity_client.certify(request)).await;
        let done = Instant::now();
        let outcome = match result {
            Err(_) => Err((
                "client_timeout".to_owned(),
                format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
            )),
            Ok(Err(status)) => Err((format!("{:?}", status.code()), status.message().to_owned())),
            Ok(Ok(response)) if slot == 0 => plan
                .check_first(response.get_ref())
                .map_err(|e| ("bad_certificate".to_owned(), format!("{e:#}"))),
            Ok(Ok(_)) => Ok(()),
        };
        match outcome {
            Ok(()) if done < measure_from => stats.warmup_ok += 1,
            Ok(()) if done < end => {
                let ns = u64::try_from(done.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
                stats.latencies_ns.push(ns);
            }
            // Completed after the window: neither counted nor timed.
            Ok(()) => {}
            Err((kind, message)) => stats.failures.record(kind, &plan.identity, &message),
        }
    }
    stats
}

// === impl ClientStats ===

impl ClientStats {
    fn merge(&mut self, other: Self) {
        self.latencies_ns.extend(other.latencies_ns);
        self.warmup_ok += other.warmup_ok;
        self.reused_csrs += other.reused_csrs;
        self.failures.merge(other.failures);
    }
}

// === impl Failures ===

impl Failures {
    fn record(&mut self, kind: String, identity: &str, message: &str) {
        if self.examples.len() < FAILURE_EXAMPLES {
            self.examples.push(format!("{identity}: {kind}: {message}"));
        }
        *self.by_kind.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Self) {
        for (kind, n) in other.by_kind {
            *self.by_kind.entry(kind).or_default() += n;
        }
        let room = FAILURE_EXAMPLES.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
    }

    fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }
}

// === impl CpuSample ===

impl CpuSample {
    fn take(server_pid: u32) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            server: process_ticks(&server_pid.to_string())?,
            client: process_ticks("self")?,
            machine: MachineTicks::read()?,
        })
    }
}

// === impl MachineTicks ===

impl MachineTicks {
    /// The `cpu` line of `/proc/stat`: all cores together.
    fn read() -> Result<Self> {
        let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no `cpu` line")?;
        let values: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| {
                v.parse()
                    .context("/proc/stat: a `cpu` field is not a number")
            })
            .collect::<Result<_>>()?;
        let at = |i: usize| values.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal; guest time is inside user.
        Ok(Self {
            total: (0..8).map(at).sum(),
            idle: at(3) + at(4),
            steal: at(7),
        })
    }

    /// Ticks some task ran: neither idle nor stolen by the hypervisor.
    fn busy(&self) -> u64 {
        self.total
            .saturating_sub(self.idle)
            .saturating_sub(self.steal)
    }
}

/// `getconf CLK_TCK`, or Linux's usual 100 if that cannot be run.
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

// === impl Round ===

impl Round {
    fn ceiling(&self) -> CryptoRates {
        CryptoRates::median_of(self.before, self.after)
    }

    fn certs(&self) -> u64 {
        self.stats.latencies_ns.len() as u64
    }

    fn certs_per_second(&self) -> f64 {
        self.certs() as f64 / self.duration.as_secs_f64()
    }

    fn failures(&self) -> u64 {
        self.stats.failures.total()
    }

    /// Latency percentile `p` (nearest rank) in ms; 0 without samples.
    fn latency_ms(&self, p: f64) -> f64 {
        let mut sorted = self.stats.latencies_ns.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6
    }

    /// The length of the CPU sampling window, s.
    fn cpu_window(&self) -> f64 {
        self.window
            .1
            .at
            .duration_since(self.window.0.at)
            .as_secs_f64()
    }

    /// Cores used on average over the window, from a tick difference.
    fn cores(&self, ticks: impl Fn(&CpuSample) -> u64) -> f64 {
        let used = ticks(&self.window.1).saturating_sub(ticks(&self.window.0));
        used as f64 / self.clk_tck / self.cpu_window()
    }

    fn server_cores(&self) -> f64 {
        self.cores(|s| s.server)
    }

    fn client_cores(&self) -> f64 {
        self.cores(|s| s.client)
    }

    /// CPU µs per certificate from cores used and certificates per second (the
    /// CPU and the count windows differ by a scheduling delay).
    fn us_per_cert(&self, cores: f64) -> f64 {
        let rate = self.certs_per_second();
        if rate > 0.0 { cores / rate * 1e6 } else { 0.0 }
    }

    /// Cores of the whole machine spent on `part` over the window.
    fn machine_cores(&self, part: impl Fn(&MachineTicks) -> u64) -> f64 {
        self.cores(|s| part(&s.machine))
    }
}

// === report ===

/// Every figure of the report, in table order.
fn rows() -> Vec<Row> {
    use Row::{Figure as F, Section as S};
    let f = |key, label, decimals, value| {
        F(Figure {
            key,
            label,
            decimals,
            value,
        })
    };
    vec![
        S("crypto ceiling: ECDSA P-256 on one thread, per second of its CPU time"),
        f("sign_per_s_before", "  sign/s before load", 0, |r| {
            r.before.sign
        }),
        f("sign_per_s_after", "  sign/s after load", 0, |r| {
            r.after.sign
        }),
        f("verify_per_s_before", "  verify/s before load", 0, |r| {
            r.before.verify
        }),
        f("verify_per_s_after", "  verify/s after load", 0, |r| {
            r.after.verify
        }),
        f("sign_per_s", "  sign/s (median)", 0, |r| r.ceiling().sign),
        f("verify_per_s", "  verify/s (median)", 0, |r| {
            r.ceiling().verify
        }),
        f(
            "sign_per_wall_s",
            "  sign/s of wall time (median)",
            0,
            |r| r.ceiling().sign_wall,
        ),
        f(
            "verify_per_wall_s",
            "  verify/s of wall time (median)",
            0,
            |r| r.ceiling().verify_wall,
        ),
        f(
            "ceiling_one_core_per_s",
            "  issuances/s ceiling, one core",
            0,
            |r| r.ceiling().one_core(),
        ),
        f(
            "ceiling_two_cores_per_s",
            "  issuances/s ceiling, two cores",
            0,
            |r| 2.0 * r.ceiling().one_core(),
        ),
        f(
            "crypto_us_per_cert",
            "  crypto CPU µs per issuance",
            1,
            |r| r.ceiling().crypto_us(),
        ),
        S("issuance"),
        f(
            "certificates_per_s",
            "  certificates/s",
            0,
            Round::certs_per_second,
        ),
        f("certificates", "  certificates in the window", 0, |r| {
            r.certs() as f64
        }),
        f(
            "ratio_to_two_core_ceiling",
            "  / two-core ceiling",
            3,
            |r| r.certs_per_second() / (2.0 * r.ceiling().one_core()),
        ),
        f("latency_p50_ms", "  latency p50 ms", 2, |r| {
            r.latency_ms(50.0)
        }),
        f("latency_p90_ms", "  latency p90 ms", 2, |r| {
            r.latency_ms(90.0)
        }),
        f("latency_p99_ms", "  latency p99 ms", 2, |r| {
            r.latency_ms(99.0)
        }),
        f("latency_max_ms", "  latency max ms", 2, |r| {
            r.latency_ms(100.0)
        }),
        f("failures", "  failures (warmup + window)", 0, |r| {
            r.failures() as f64
        }),
        f("reused_csrs", "  calls with a reused CSR", 0, |r| {
            r.stats.reused_csrs as f64
        }),
        S("CPU in the measured window"),
        f("control_plane_cpu_s", "  control plane CPU s", 2, |r| {
            r.server_cores() * r.cpu_window()
        }),
        f(
            "control_plane_cores",
            "  control plane cores",
            2,
            Round::server_cores,
        ),
        f(
            "control_plane_cpu_us_per_cert",
            "  control plane CPU µs/cert",
            1,
            |r| r.us_per_cert(r.server_cores()),
        ),
        f(
            "certificates_per_control_plane_core_s",
            "  certificates/s per control plane core",
            0,
            |r| r.certs_per_second() / r.server_cores().max(f64::MIN_POSITIVE),
        ),
        f(
            "crypto_share_of_control_plane_cpu",
            "  crypto share of control plane CPU",
            3,
            |r| {
                let total = r.us_per_cert(r.server_cores());
                if total > 0.0 {
                    r.ceiling().crypto_us() / total
                } else {
                    0.0
                }
            },
        ),
        f(
            "client_cores",
            "  bench clients cores",
            2,
            Round::client_cores,
        ),
        f(
            "client_cpu_us_per_cert",
            "  bench clients CPU µs/cert",
            1,
            |r| r.us_per_cert(r.client_cores()),
        ),
        f("other_processes_cores", "  other processes cores", 2, |r| {
            (r.machine_cores(|m| m.busy()) - r.server_cores() - r.client_cores()).max(0.0)
        }),
        f("machine_busy_cores", "  machine busy cores", 2, |r| {
            r.machine_cores(|m| m.busy())
        }),
        f("machine_steal_cores", "  machine steal cores", 2, |r| {
            r.machine_cores(|m| m.steal)
        }),
    ]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The human-readable report.
fn table(args: &Args, rounds: &[Round], channels: usize, cpus: usize, exit: &ExitStatus) -> String {
    const LABEL: usize = 40;
    const COLUMN: usize = 11;
    let mut out = String::new();
    // Writing to a String cannot fail, hence the ignored results below.
    let _ = writeln!(
        out,
        "\npalisade-bench-issuance: {} clients on {channels} HTTP/2 connections, {} warmup + {} \
         measured per round, {} rounds, {cpus} CPUs, control plane log level {}",
        args.clients,
        humantime::format_duration(args.warmup),
        humantime::format_duration(args.duration),
        rounds.len(),
        args.log_level,
    );
    let _ = writeln!(
        out,
        "command: {}\n",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let _ = write!(out, "{:LABEL$}", "");
    for n in 1..=rounds.len() {
        let _ = write!(out, "{:>COLUMN$}", format!("round {n}"));
    }
    let _ = writeln!(out, "{:>COLUMN$}", "median");
    for row in rows() {
        match row {
            Row::Section(title) => {
                let _ = writeln!(out, "{title}");
            }
            Row::Figure(f) => {
                let values: Vec<f64> = rounds.iter().map(f.value).collect();
                let _ = write!(out, "{:LABEL$}", f.label);
                for v in &values {
                    let _ = write!(out, "{:>COLUMN$.*}", f.decimals, v);
                }
                let _ = writeln!(out, "{:>COLUMN$.*}", f.decimals, median(values));
            }
        }
    }
    let mut failures = Failures::default();
    for r in rounds {
        failures.merge(Failures {
            by_kind: r.stats.failures.by_kind.clone(),
            examples: r.stats.failures.examples.clone(),
        });
    }
    let _ = writeln!(out);
    if failures.total() == 0 {
        let _ = writeln!(out, "failures: none");
    } else {
        let _ = writeln!(out, "failures: {} {:?}", failures.total(), failures.by_kind);
        for example in &failures.examples {
            let _ = writeln!(out, "  {example}");
        }
    }
    let _ = writeln!(out, "control plane exit: {exit}");
    out
}

/// The JSON report: the configuration, each round, the medians, the failures.
fn json_report(config: &Value, rounds: &[Round], exit: &ExitStatus) -> Value {
    let figures: Vec<Figure> = rows()
        .into_iter()
        .filter_map(|r| match r {
            Row::Figure(f) => Some(f),
            Row::Section(_) => None,
        })
        .collect();
    let per_round: Vec<Value> = rounds
        .iter()
        .map(|r| {
            let mut m: Map<String, Value> = figures
                .iter()
                .map(|f| (f.key.to_owned(), json!((f.value)(r))))
                .collect();
            m.insert("failures_by_kind".into(), json!(r.stats.failures.by_kind));
            m.insert("failure_examples".into(), json!(r.stats.failures.examples));
            m.insert("warmup_certificates".into(), json!(r.stats.warmup_ok));
            m.insert("cpu_window_s".into(), json!(r.cpu_window()));
            Value::Object(m)
        })
        .collect();
    let medians: Map<String, Value> = figures
        .iter()
        .map(|f| {
            let values = rounds.iter().map(f.value).collect();
            (f.key.to_owned(), json!(median(values)))
        })
        .collect();
    json!({
        "benchmark": "palisade-bench-issuance",
        "command": std::env::args().collect::<Vec<_>>(),
        "config": config,
        "rounds": per_round,
        "median": medians,
        "failures_total": rounds.iter().map(Round::failures).sum::<u64>(),
        "control_plane_exit": exit.to_string(),
    })
}
