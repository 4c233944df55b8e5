//! `palisade-bench-proxy`: Palisade's data plane side by side with haproxy,
//! nginx (stream module) and stunnel, on this machine, in one run.
//!
//! Every system carries the same path: load generator → client-side proxy →
//! mutual TLS → server-side proxy → backend. Each is configured as a mutually
//! authenticating pair with the same files: one ECDSA P-256 CA made here with
//! rcgen, a client and a server leaf (one SPIFFE URI SAN each, DNS SAN
//! `localhost`, serverAuth + clientAuth), TLS 1.3 only, TLS_AES_128_GCM_SHA256,
//! X25519, session resumption off, one worker thread where the system allows
//! it. Palisade runs twice: with `--tls-groups x25519` like the peers, and with
//! its default post-quantum hybrid (`x25519mlkem768,x25519`). "direct" is the
//! load generator talking to the backend without proxies: the limit.
//!
//! Each of the two proxies is its own process (two sidecars, two haproxy, two
//! nginx, two stunnel instances), started in its own process group, so its CPU
//! time (`/proc/PID/stat` utime + stime, all threads; for nginx master +
//! worker) and memory (`VmRSS`, nginx master + worker) can be read apart.
//!
//! Measured, per system and round:
//!
//! 1. bulk: one TCP stream writing 64 KiB buffers for `--duration` after
//!    `--warmup`, into a backend that discards and counts; Gbit/s from the
//!    bytes the backend received, CPU-s/GB from the CPU both proxies used in
//!    the same window;
//! 2. connections: `--clients` closed-loop workers, each connect → 1 byte →
//!    1 byte echoed → close (a full mutual handshake per connection); conn/s
//!    and CPU-µs per connection of both proxies; errors are counted;
//! 3. latency: one kept-alive connection, 1 KiB request, 1 KiB echo, repeated
//!    `--latency-requests` times after a warm-up; p50/p99, and added latency =
//!    system − direct of the same round;
//! 4. memory (a fresh pair): RSS of both proxies before any connection, then
//!    with 1,000 and 10,000 idle connections open (each proven by a 1-byte
//!    echo, then `--idle-settle` of quiet): KiB per connection =
//!    (RSS now − RSS idle) / N, both proxies together.
//!
//! Systems alternate (round-robin, starting one further in each round) so
//! that their ratios hold on a noisy machine; the report gives medians of the
//! rounds. Each round starts with the crypto reference: the CPU, on one thread
//! of this process (aws-lc-rs), of the asymmetric operations of one mutual
//! TLS 1.3 handshake for the pair: 2 ECDSA P-256 signs (both
//! CertificateVerify), 4 verifies (each side checks the peer leaf's CA
//! signature and the peer's CertificateVerify), 2 X25519 key generations and
//! agreements, and for the hybrid also one ML-KEM-768 key generation,
//! encapsulation and decapsulation. After the rounds, `palisade-bench-issuance
//! --rounds 1` runs and its figures are included.
//!
//! Before the rounds, a TLS check shows what each side really negotiates and
//! whether resumption is off: each client-side proxy is pointed at a rustls
//! server here that issues tickets and would resume any session offered
//! (counts resumed handshakes), and a rustls client here that keeps tickets
//! connects three times to each server-side proxy (counts tickets received and
//! resumed handshakes).
//!
//! The backend (echo, or discard when the first byte is `S`) runs on a thread
//! of its own; the load generator on a tokio runtime with `--client-threads`
//! workers; both are in this process for every system.
//!
//! ```text
//! deploy/bench/proxy.sh --rounds 3 --json proxy.json --markdown proxy.md
//! # or, with the peers installed and release builds:
//! ./target/release/palisade-bench-proxy --rounds 3
//! ```
//!
//! Every process started here runs in a process group of its own and the
//! group is killed at the end, on error and on SIGINT/SIGTERM/SIGHUP; if this
//! process is killed with SIGKILL, a watchdog shell kills the groups still
//! running and removes the temporary directory.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt::Write as _,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aws_lc_rs::{
    agreement::{
        EphemeralPrivateKey, UnparsedPublicKey as AgreePublicKey, X25519, agree_ephemeral,
    },
    kem::{DecapsulationKey, ML_KEM_768},
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
        UnparsedPublicKey,
    },
};
use clap::{Parser, ValueEnum};
use palisade_tests::{http_get, process_ticks};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, RootCertStore, ServerConfig, ServerConnection,
    StreamOwned,
    client::{ClientSessionMemoryCache, ClientSessionStore, Resumption},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::WebPkiClientVerifier,
};
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    task::JoinSet,
};

/// The trust domain of the bench certificates.
const TRUST_DOMAIN: &str = "bench.local";
const CLIENT_ID: &str = "spiffe://bench.local/ns/bench/sa/client";
const SERVER_ID: &str = "spiffe://bench.local/ns/bench/sa/server";
/// The mesh ALPN; Palisade's inbound side requires it.
const ALPN: &[u8] = b"palisade/1";
/// Bulk write size.
const BULK_BUF: usize = 64 * 1024;
/// Latency request and response size.
const LATENCY_MSG: usize = 1024;
/// Latency round trips before the measured ones.
const LATENCY_WARMUP: usize = 1000;
/// Idle connections being opened at once in the memory test.
const OPEN_CONCURRENCY: usize = 64;
/// A single connection attempt (connect + 1-byte echo) gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a started proxy gets to listen (and, for Palisade, be ready).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After SIGTERM, how long a proxy gets before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections of each TLS check.
const PROBE_CONNECTIONS: usize = 3;
/// The file-descriptor limit asked for (10,000 idle connections need ~3 per
/// connection in the proxies and one here).
const NOFILE_WANTED: u64 = 262_144;
/// Descriptors kept free of the idle connections (listeners, logs, runtime).
const FD_RESERVE: u64 = 256;
/// The peers of the goals.
const PEERS: [System; 3] = [System::Haproxy, System::Nginx, System::Stunnel];

/// Palisade against haproxy, nginx and stunnel as mutual-TLS proxy pairs.
#[derive(Debug, Parser)]
#[command(name = "palisade-bench-proxy", version, about)]
struct Args {
    /// Rounds; systems alternate within each round [default: 3; --quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Measured seconds of each bulk and connection-rate window, e.g. 5 or 5s
    /// [default: 5; --quick: 1].
    #[arg(long, value_parser = parse_secs)]
    duration: Option<Duration>,
    /// Unmeasured load before each window [default: 1s; --quick: 0.5s].
    #[arg(long, value_parser = parse_secs)]
    warmup: Option<Duration>,
    /// Systems to run, comma-separated [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    systems: Vec<System>,
    /// Skip the idle-connection memory test.
    #[arg(long)]
    skip_memory: bool,
    /// Skip the control plane's issuance benchmark.
    #[arg(long)]
    skip_issuance: bool,
    /// A smoke test: 1 round, short windows, fewer latency samples.
    #[arg(long)]
    quick: bool,
    /// The sidecar binary [default: `palisade-sidecar` next to this one].
    #[arg(long, value_name = "PATH")]
    sidecar: Option<PathBuf>,
    /// The issuance benchmark [default: `palisade-bench-issuance` next to this one].
    #[arg(long, value_name = "PATH")]
    issuance_bench: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Also write every figure of every round as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Closed-loop workers of the connection-rate test.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Measured 1 KiB round trips of the latency test [default: 20000; --quick: 3000].
    #[arg(long)]
    latency_requests: Option<usize>,
    /// Idle connections held in the memory test, cumulative steps.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 10000])]
    connections: Vec<usize>,
    /// Seconds of quiet before reading RSS in the memory test.
    #[arg(long, value_parser = parse_secs, default_value = "2")]
    idle_settle: Duration,
    /// Thread-CPU seconds of each crypto reference measurement [default: 2; --quick: 0.5].
    #[arg(long, value_parser = parse_secs)]
    crypto_duration: Option<Duration>,
    /// Worker threads of the load generator's runtime (the backend has its own thread).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
}

/// `Args` with the defaults and `--quick` applied.
#[derive(Debug)]
struct Settings {
    args: Args,
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    systems: Vec<System>,
    latency_requests: usize,
    crypto_duration: Duration,
}

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum System {
    /// No proxies: the load generator talks to the backend.
    Direct,
    /// Two sidecars, X25519 only.
    #[value(name = "palisade", alias = "palisade-x25519")]
    Palisade,
    /// Two sidecars, X25519MLKEM768 first (Palisade's default).
    #[value(name = "palisade-pq", alias = "palisade-hybrid")]
    PalisadePq,
    Haproxy,
    Nginx,
    Stunnel,
}

/// Which half of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// Plain TCP in, TLS out.
    Client,
    /// TLS in, plain TCP out.
    Server,
}

/// One round's figures of one system (keys as in the JSON).
type Figures = BTreeMap<String, f64>;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("palisade-bench-proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the load generator's runtime and runs the benchmark on this (the
/// main) thread until done, an error, or a signal; dropping the benchmark's
/// future stops every process it started.
fn run(args: Args) -> Result<ExitCode> {
    let settings = Settings::new(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.args.client_threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        tokio::select! {
            result = bench(&settings) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (SIGINT)")),
            _ = term.recv() => Err(anyhow!("terminated (SIGTERM)")),
            _ = hup.recv() => Err(anyhow!("hung up (SIGHUP)")),
        }
    })
}

// === impl Settings ===

impl Settings {
    fn new(args: Args) -> Result<Self> {
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
    fn connection_steps(&self) -> Vec<usize> {
        let mut steps = self.args.connections.clone();
        steps.sort_unstable();
        steps.dedup();
        steps
    }
}

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

// === impl System ===

impl System {
    fn all() -> [Self; 6] {
        [
            Self::Direct,
            Self::Palisade,
            Self::PalisadePq,
            Self::Haproxy,
            Self::Nginx,
            Self::Stunnel,
        ]
    }

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Palisade => "palisade (X25519)",
            Self::PalisadePq => "palisade (X25519MLKEM768)",
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
            Self::Stunnel => "stunnel",
        }
    }

    /// The JSON key.
    fn key(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Palisade => "palisade",
            Self::PalisadePq => "palisade-pq",
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
            Self::Stunnel => "stunnel",
        }
    }
}

// === the benchmark ===

/// Everything the systems are started from.
#[derive(Debug)]
struct Ctx {
    dir: PathBuf,
    certs: CertFiles,
    sidecar: Option<SidecarInfo>,
    nginx_module: Option<PathBuf>,
    /// The process groups started, for the watchdog.
    groups: Arc<Groups>,
    clk_tck: f64,
    /// The open-file limit every process here runs with (after raising it).
    nofile: u64,
    /// Distinguishes the config files and logs of every process started.
    serial: AtomicU64,
}

/// The sidecar binary and the flags it knows.
#[derive(Debug)]
struct SidecarInfo {
    path: PathBuf,
    version: String,
    worker_threads: bool,
    tls_groups: bool,
    tls_cipher_suites: bool,
}

/// What the run collected.
#[derive(Debug, Default)]
struct Results {
    /// Per system, one `Figures` per round (perf and memory merged).
    rounds: BTreeMap<System, Vec<Figures>>,
    /// Crypto reference per round.
    crypto: Vec<CryptoCost>,
    tls: BTreeMap<System, Result<TlsCheck, String>>,
    issuance: Option<Value>,
    /// Things that went wrong or need saying, in order.
    notes: Vec<String>,
}

async fn bench(s: &Settings) -> Result<ExitCode> {
    let started_at = SystemTime::now();
    let mut results = Results::default();
    raise_nofile(&mut results.notes);

    // Declared before every process, so removed after they stopped.
    let tmp = tempfile::Builder::new()
        .prefix("palisade-bench-proxy-")
        .tempdir()
        .context("creating a temporary directory")?;
    let groups = Arc::new(Groups::new(tmp.path()));
    // Declared before every process, so stopped after them.
    let _watchdog = Watchdog::start(&groups, tmp.path())?;
    let certs = CertFiles::write(tmp.path()).context("making the certificates")?;
    let ctx = Ctx::new(s, tmp.path().to_owned(), certs, groups)?;
    let backend = Backend::start().context("starting the backend")?;
    if let Some(&largest) = s.connection_steps().last()
        && !s.args.skip_memory
        && largest > ctx.max_idle()
    {
        note(
            &mut results.notes,
            format!(
                "with {} open files per process, a pair holds at most {} idle connections \
                 (2 descriptors per connection in each proxy and in this process): steps above \
                 that are measured at {} connections (stunnel: {}, as it refuses clients beyond \
                 125/256 of its open-file limit) and marked; haproxy runs with maxconn {}, nginx \
                 with worker_connections {}",
                ctx.nofile,
                ctx.max_idle(),
                ctx.max_idle(),
                ctx.max_idle_for(System::Stunnel),
                ctx.haproxy_maxconn(),
                ctx.nofile.saturating_sub(100).min(60_000)
            ),
        );
    }
    let facts = machine_facts(&ctx);
    eprintln!(
        "palisade-bench-proxy: systems {}, {} rounds, {:.1} s + {:.1} s warm-up windows, backend on {}",
        s.systems
            .iter()
            .map(|x| x.key())
            .collect::<Vec<_>>()
            .join(","),
        s.rounds,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        backend.addr
    );
    if let Some(info) = &ctx.sidecar {
        let missing: Vec<&str> = [
            ("--worker-threads", info.worker_threads),
            ("--tls-groups", info.tls_groups),
            ("--tls-cipher-suites", info.tls_cipher_suites),
        ]
        .iter()
        .filter(|(_, known)| !known)
        .map(|(flag, _)| *flag)
        .collect();
        if !missing.is_empty() {
            note(
                &mut results.notes,
                format!(
                    "{} does not know {}: Palisade ran with its defaults there (the X25519 row may \
                     negotiate the hybrid group; see the TLS check)",
                    info.path.display(),
                    missing.join(", ")
                ),
            );
        }
    }

    // What each side negotiates, and that resumption is off.
    for &sys in s.systems.iter().filter(|x| **x != System::Direct) {
        eprintln!("TLS check: {}", sys.label());
        let check = tls_check(&ctx, sys, &backend)
            .await
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &check {
            note(
                &mut results.notes,
                format!("TLS check of {}: {e}", sys.label()),
            );
        }
        results.tls.insert(sys, check);
    }

    for round in 0..s.rounds {
        let n = round + 1;
        eprintln!("round {n}/{}: crypto reference", s.rounds);
        let crypto = CryptoCost::measure(s.crypto_duration)?;
        eprintln!(
            "  one mutual handshake: {:.0} µs (X25519), {:.0} µs (X25519MLKEM768)",
            crypto.handshake_us(false),
            crypto.handshake_us(true)
        );
        results.crypto.push(crypto);
        for sys in rotated(&s.systems, round) {
            eprintln!("round {n}/{}: {}", s.rounds, sys.label());
            let figures = match perf(&ctx, sys, &backend, s).await {
                Ok(f) => f,
                Err(e) => {
                    note(
                        &mut results.notes,
                        format!("round {n}, {}: {e:#}", sys.label()),
                    );
                    Figures::new()
                }
            };
            results.rounds.entry(sys).or_default().push(figures);
        }
        if !s.args.skip_memory {
            let systems: Vec<System> = s
                .systems
                .iter()
                .copied()
                .filter(|x| *x != System::Direct)
                .collect();
            for sys in rotated(&systems, round) {
                eprintln!("round {n}/{}: {} idle connections", s.rounds, sys.label());
                let figures = memory(&ctx, sys, &backend, s, &mut results.notes, n).await;
                if let Some(last) = results.rounds.entry(sys).or_default().last_mut() {
                    last.extend(figures);
                }
            }
        }
        // Added latency against the direct path of the same round.
        let direct = results
            .rounds
            .get(&System::Direct)
            .and_then(|r| r.get(round))
            .cloned();
        if let Some(direct) = direct {
            for (sys, rounds) in results.rounds.iter_mut() {
                if *sys == System::Direct {
                    continue;
                }
                if let Some(f) = rounds.get_mut(round) {
                    for p in ["p50", "p99"] {
                        if let (Some(v), Some(d)) =
                            (f.get(&format!("{p}_us")), direct.get(&format!("{p}_us")))
                        {
                            let added = v - d;
                            f.insert(format!("added_{p}_us"), added);
                        }
                    }
                }
            }
        }
    }

    if !s.args.skip_issuance {
        eprintln!("control plane issuance (palisade-bench-issuance --rounds 1)");
        match issuance(s, &ctx).await {
            Ok(v) => results.issuance = Some(v),
            Err(e) => note(&mut results.notes, format!("issuance benchmark: {e:#}")),
        }
    }

    drop(backend);
    let report = Report {
        s,
        ctx: &ctx,
        results: &results,
        facts: &facts,
        started_at,
    };
    let markdown = report.markdown();
    print!("{markdown}");
    if let Some(path) = &s.args.markdown {
        fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &s.args.json {
        let text = serde_json::to_string_pretty(&report.json()).context("serializing the JSON")?;
        fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let errors: f64 = results
        .rounds
        .values()
        .flatten()
        .filter_map(|f| f.get("conn_errors"))
        .sum();
    Ok(
        if results.notes.iter().any(|n| n.starts_with("round ")) || errors > 0.0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        },
    )
}

fn note(notes: &mut Vec<String>, text: String) {
    eprintln!("  note: {text}");
    notes.push(text);
}

/// `systems` starting at index `round` (mod len).
fn rotated(systems: &[System], round: usize) -> Vec<System> {
    let n = systems.len();
    (0..n).map(|i| systems[(i + round) % n]).collect()
}

/// The perf tests of one system: bulk, connection rate, latency, on one pair.
async fn perf(ctx: &Ctx, sys: System, backend: &Backend, s: &Settings) -> Result<Figures> {
    let pair = match sys {
        System::Direct => None,
        _ => Some(Pair::start(ctx, sys, backend.addr)?),
    };
    let entry = pair.as_ref().map_or(backend.addr, |p| p.entry);
    wait_echo(entry).await?;
    let mut f = Figures::new();
    bulk(entry, pair.as_ref(), backend, s, ctx, &mut f).await?;
    eprintln!(
        "  bulk {:.2} Gbit/s{}",
        f["gbps"],
        f.get("cpu_s_per_gb")
            .map(|c| format!(", {c:.2} CPU-s/GB"))
            .unwrap_or_default()
    );
    conn_rate(entry, pair.as_ref(), s, ctx, &mut f).await?;
    eprintln!(
        "  {:.0} conn/s{}, {} errors",
        f["conn_per_s"],
        f.get("cpu_us_per_conn")
            .map(|c| format!(", {c:.0} CPU-µs/conn"))
            .unwrap_or_default(),
        f["conn_errors"]
    );
    // Let the connection test's sockets wind down first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    latency(entry, s, &mut f).await?;
    eprintln!(
        "  latency p50 {:.1} µs, p99 {:.1} µs",
        f["p50_us"], f["p99_us"]
    );
    if let Some(pair) = &pair {
        pair.check_alive()?;
    }
    Ok(f)
}

// === certificates ===

/// The PEM files every system uses, in the layouts they want.
#[derive(Debug)]
struct CertFiles {
    ca: PathBuf,
    /// Per side: (dir with tls.crt/tls.key/ca.crt, cert PEM, key PEM, cert+key PEM).
    client: LeafFiles,
    server: LeafFiles,
    /// DER forms, for the rustls probes here.
    ca_der: CertificateDer<'static>,
}

#[derive(Debug)]
struct LeafFiles {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    combined: PathBuf,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl CertFiles {
    fn write(dir: &Path) -> Result<Self> {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "palisade bench CA");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        ca_params.not_before = (now - Duration::from_secs(3600)).into();
        ca_params.not_after = (now + Duration::from_secs(30 * 86_400)).into();
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let ca = dir.join("ca.pem");
        fs::write(&ca, &ca_pem)?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let leaf = |name: &str, id: &str| -> Result<LeafFiles> {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![
                SanType::URI(id.try_into()?),
                SanType::DnsName("localhost".try_into()?),
            ];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.use_authority_key_identifier_extension = true;
            params.not_before = (now - Duration::from_secs(3600)).into();
            params.not_after = (now + Duration::from_secs(7 * 86_400)).into();
            let cert = params.signed_by(&key, &issuer)?;
            let side_dir = dir.join(name);
            fs::create_dir_all(&side_dir)?;
            // File mode of the sidecar: tls.crt, tls.key, ca.crt.
            fs::write(side_dir.join("tls.crt"), cert.pem())?;
            fs::write(side_dir.join("tls.key"), key.serialize_pem())?;
            fs::write(side_dir.join("ca.crt"), &ca_pem)?;
            let combined = dir.join(format!("{name}.pem"));
            fs::write(&combined, format!("{}{}", cert.pem(), key.serialize_pem()))?;
            Ok(LeafFiles {
                cert: side_dir.join("tls.crt"),
                key: side_dir.join("tls.key"),
                dir: side_dir,
                combined,
                der: cert.der().clone(),
                key_der: key.serialize_der(),
            })
        };
        Ok(Self {
            client: leaf("client", CLIENT_ID)?,
            server: leaf("server", SERVER_ID)?,
            ca,
            ca_der: ca_cert.der().clone(),
        })
    }
}

// === the backend ===

/// Echo server on its own thread; a connection whose first byte is `S` is a
/// sink instead: everything after it is discarded and counted.
#[derive(Debug)]
struct Backend {
    addr: SocketAddr,
    sunk: Arc<AtomicU64>,
}

impl Backend {
    fn start() -> Result<Self> {
        let sunk = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let counter = sunk.clone();
        std::thread::Builder::new()
            .name("backend".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow!(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match listen("127.0.0.1:0".parse().expect("an address")) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(listener.local_addr().map_err(Into::into));
                    while let Ok((tcp, _)) = listener.accept().await {
                        let counter = counter.clone();
                        tokio::spawn(async move {
                            let _ = serve(tcp, &counter).await;
                        });
                    }
                });
            })
            .context("spawning the backend thread")?;
        let addr = rx.recv().context("the backend thread died")??;
        Ok(Self { addr, sunk })
    }

    fn sunk(&self) -> u64 {
        self.sunk.load(Ordering::Relaxed)
    }
}

fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(4096)?)
}

async fn serve(mut tcp: TcpStream, sunk: &AtomicU64) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut buf = vec![0u8; BULK_BUF];
    let n = tcp.read(&mut buf).await?;
    if n == 0 {
        return Ok(());
    }
    if buf[0] == b'S' {
        sunk.fetch_add(n as u64 - 1, Ordering::Relaxed);
        loop {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            sunk.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    tcp.write_all(&buf[..n]).await?;
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            tcp.shutdown().await?;
            return Ok(());
        }
        tcp.write_all(&buf[..n]).await?;
    }
}

// === processes ===

/// A started process, in its own process group; the group is stopped
/// (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
    groups: Arc<Groups>,
}

/// The process groups started here and still running, listed in a file for
/// the watchdog.
#[derive(Debug)]
struct Groups {
    file: PathBuf,
    live: Mutex<Vec<u32>>,
}

impl Groups {
    fn new(dir: &Path) -> Self {
        Self {
            file: dir.join("process-groups"),
            live: Mutex::new(Vec::new()),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Vec<u32>)) {
        if let Ok(mut live) = self.live.lock() {
            f(&mut live);
            let text: String = live.iter().map(|g| format!("{g}\n")).collect();
            let tmp = self.file.with_extension("tmp");
            if fs::write(&tmp, text).is_ok() {
                let _ = fs::rename(&tmp, &self.file);
            }
        }
    }
}

/// A shell in its own process group that waits for this process to end and
/// then kills every process group still listed and removes the temporary
/// directory: what `Drop` cannot do when this process is killed with SIGKILL
/// (an nginx worker, for one, outlives its master). Stopped on drop.
#[derive(Debug)]
struct Watchdog(Child);

impl Watchdog {
    fn start(groups: &Groups, dir: &Path) -> Result<Self> {
        let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
if [ -f "$2" ]; then while read -r g; do kill -9 "-$g" 2>/dev/null; done < "$2"; fi
rm -rf "$3""#;
        let child = Command::new("sh")
            .args(["-c", script, "palisade-bench-proxy-watchdog"])
            .arg(std::process::id().to_string())
            .arg(&groups.file)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the watchdog shell")?;
        Ok(Self(child))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn spawn(ctx: &Ctx, name: &str, program: &Path, args: &[OsString]) -> Result<Self> {
        let log = ctx.dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&ctx.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pgid = child.id();
        ctx.groups.update(|g| g.push(pgid));
        Ok(Self {
            child,
            name: name.to_owned(),
            log,
            groups: ctx.groups.clone(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its descendants (nginx: master and worker).
    fn pids(&self) -> Vec<u32> {
        process_tree(self.pid())
    }

    fn alive(&self) -> bool {
        process_state(self.pid()).is_some_and(|s| s != 'Z' && s != 'X')
    }

    fn cpu_ticks(&self) -> Result<u64> {
        let mut sum = 0;
        for pid in self.pids() {
            sum += process_ticks(&pid.to_string())?;
        }
        Ok(sum)
    }

    fn rss_kib(&self) -> Result<u64> {
        let mut sum = 0;
        for pid in self.pids() {
            sum += status_kib(pid, "VmRSS")?;
        }
        Ok(sum)
    }

    fn pss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(pss_kib).sum()
    }

    fn threads(&self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|p| status_kib(p, "Threads").ok())
            .sum()
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n    ")
    }

    fn exited_error(&self) -> anyhow::Error {
        anyhow!(
            "{} (pid {}) is not running; its log {}:\n    {}",
            self.name,
            self.pid(),
            self.log.display(),
            self.log_tail()
        )
    }

    /// Waits for the process to exit, polling, so a signal can still stop the run.
    async fn wait(&mut self) -> Result<std::process::ExitStatus> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        use rustix::process::{Pid, Signal, kill_process_group};
        let Some(pgid) = i32::try_from(self.pid()).ok().and_then(Pid::from_raw) else {
            return;
        };
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = kill_process_group(pgid, Signal::TERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill_process_group(pgid, Signal::KILL);
        let _ = self.child.wait();
        let pid = self.pid();
        self.groups.update(|g| g.retain(|x| *x != pid));
    }
}

/// Two proxies; `entry` is where the load generator connects.
#[derive(Debug)]
struct Pair {
    // Client first: dropped (stopped) before the server.
    client: Proc,
    server: Proc,
    entry: SocketAddr,
}

/// CPU ticks of a pair's processes, this process and the machine at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    client: u64,
    server: u64,
    harness: u64,
    machine_busy: u64,
}

/// CPU used over a window, seconds.
#[derive(Clone, Copy, Debug)]
struct Window {
    secs: f64,
    client: f64,
    server: f64,
    harness: f64,
    machine: f64,
}

impl Pair {
    fn start(ctx: &Ctx, sys: System, backend: SocketAddr) -> Result<Self> {
        let entry = free_port()?;
        let tls = free_port()?;
        let server = start_side(ctx, sys, Side::Server, tls, backend)?;
        let client = start_side(ctx, sys, Side::Client, entry, tls)?;
        Ok(Self {
            client,
            server,
            entry,
        })
    }

    fn check_alive(&self) -> Result<()> {
        for p in [&self.client, &self.server] {
            if !p.alive() {
                return Err(p.exited_error());
            }
        }
        Ok(())
    }

    fn rss(&self) -> Result<(u64, u64)> {
        Ok((self.client.rss_kib()?, self.server.rss_kib()?))
    }
}

impl Sample {
    fn take(pair: Option<&Pair>) -> Result<Self> {
        let (client, server) = match pair {
            Some(p) => (p.client.cpu_ticks()?, p.server.cpu_ticks()?),
            None => (0, 0),
        };
        Ok(Self {
            at: Instant::now(),
            client,
            server,
            harness: process_ticks("self")?,
            machine_busy: machine_busy_ticks()?,
        })
    }

    fn until(&self, later: &Self, clk_tck: f64) -> Window {
        let d = |a: u64, b: u64| b.saturating_sub(a) as f64 / clk_tck;
        Window {
            secs: later.at.duration_since(self.at).as_secs_f64(),
            client: d(self.client, later.client),
            server: d(self.server, later.server),
            harness: d(self.harness, later.harness),
            machine: d(self.machine_busy, later.machine_busy),
        }
    }
}

impl Window {
    fn proxies(&self) -> f64 {
        self.client + self.server
    }

    /// Records the window's CPU figures under `prefix`.
    fn record(&self, prefix: &str, f: &mut Figures, pair: bool) {
        if pair {
            f.insert(format!("{prefix}_client_cpu_s"), self.client);
            f.insert(format!("{prefix}_server_cpu_s"), self.server);
        }
        f.insert(format!("{prefix}_window_s"), self.secs);
        f.insert(format!("{prefix}_harness_cpu_s"), self.harness);
        f.insert(
            format!("{prefix}_other_cores"),
            ((self.machine - self.proxies() - self.harness) / self.secs).max(0.0),
        );
    }
}

/// Starts one half of a pair and waits until it listens (and, for Palisade,
/// is ready).
fn start_side(
    ctx: &Ctx,
    sys: System,
    side: Side,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Proc> {
    let serial = ctx.serial.fetch_add(1, Ordering::Relaxed);
    let side_name = match side {
        Side::Client => "client",
        Side::Server => "server",
    };
    let name = format!("{}-{side_name}-{serial}", sys.key());
    let (proc, admin) = match sys {
        System::Direct => bail!("the direct path has no proxies"),
        System::Palisade | System::PalisadePq => {
            start_palisade(ctx, sys, side, &name, listen, upstream)?
        }
        System::Haproxy => {
            let conf = ctx.dir.join(format!("{name}.cfg"));
            fs::write(
                &conf,
                haproxy_config(&ctx.certs, side, listen, upstream, ctx.haproxy_maxconn()),
            )?;
            let args = vec!["-db".into(), "-f".into(), conf.into_os_string()];
            (Proc::spawn(ctx, &name, Path::new("haproxy"), &args)?, None)
        }
        System::Nginx => {
            let conf = ctx.dir.join(format!("{name}.conf"));
            let prefix = ctx.dir.join(&name);
            fs::create_dir_all(&prefix)?;
            fs::write(&conf, nginx_config(ctx, side, listen, upstream, &prefix))?;
            let args = vec![
                "-p".into(),
                prefix.clone().into_os_string(),
                "-e".into(),
                prefix.join("error.log").into_os_string(),
                "-c".into(),
                conf.into_os_string(),
            ];
            (Proc::spawn(ctx, &name, Path::new("nginx"), &args)?, None)
        }
        System::Stunnel => {
            let conf = ctx.dir.join(format!("{name}.conf"));
            fs::write(
                &conf,
                stunnel_config(
                    &ctx.certs,
                    side,
                    listen,
                    upstream,
                    &ctx.dir.join(format!("{name}.out")),
                ),
            )?;
            let args = vec![conf.into_os_string()];
            (Proc::spawn(ctx, &name, Path::new("stunnel4"), &args)?, None)
        }
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if !proc.alive() {
            return Err(proc.exited_error());
        }
        let listening = is_listening(listen.port());
        let ready = match admin {
            Some(a) => listening && matches!(http_get(a, "/ready"), Ok((200, _))),
            None => listening,
        };
        // nginx listens in the master before its worker exists.
        let worker = sys != System::Nginx || proc.pids().len() >= 2;
        if ready && worker {
            return Ok(proc);
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not become ready on {listen} within {START_TIMEOUT:?}; log:\n    {}",
                proc.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn start_palisade(
    ctx: &Ctx,
    sys: System,
    side: Side,
    name: &str,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<(Proc, Option<SocketAddr>)> {
    let info = ctx
        .sidecar
        .as_ref()
        .context("the sidecar binary was not found")?;
    let admin = free_port()?;
    let dir = match side {
        Side::Client => &ctx.certs.client.dir,
        Side::Server => &ctx.certs.server.dir,
    };
    let mut args: Vec<OsString> = vec![
        "--log-level".into(),
        "warn".into(),
        "run".into(),
        "--transparent=false".into(),
        "--cert-dir".into(),
        dir.clone().into_os_string(),
        "--admin-addr".into(),
        admin.to_string().into(),
        "--trust-domain".into(),
        TRUST_DOMAIN.into(),
        "--max-connections".into(),
        "50000".into(),
        "--drain-timeout".into(),
        "1s".into(),
    ];
    match side {
        Side::Client => {
            args.push("--explicit-outbound".into());
            args.push(format!("{listen}={upstream},{SERVER_ID}").into());
        }
        Side::Server => {
            args.push("--explicit-inbound".into());
            args.push(format!("{listen}={upstream}").into());
        }
    }
    if info.worker_threads {
        args.extend(["--worker-threads".into(), "1".into()]);
    }
    if info.tls_groups {
        let groups = match sys {
            System::PalisadePq => "x25519mlkem768,x25519",
            _ => "x25519",
        };
        args.extend(["--tls-groups".into(), groups.into()]);
    }
    if info.tls_cipher_suites {
        args.extend(["--tls-cipher-suites".into(), "aes128gcm".into()]);
    }
    Ok((Proc::spawn(ctx, name, &info.path, &args)?, Some(admin)))
}

fn haproxy_config(
    c: &CertFiles,
    side: Side,
    listen: SocketAddr,
    upstream: SocketAddr,
    maxconn: u64,
) -> String {
    let mut conf = format!(
        "global\n\
         \x20   nbthread 1\n\
         \x20   maxconn {maxconn}\n\
         \x20   # no server-side session cache: with it, OpenSSL sends stateful\n\
         \x20   # TLS 1.3 tickets even with no-tls-tickets\n\
         \x20   tune.ssl.cachesize 0\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   maxconn {maxconn}\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 10m\n\
         \x20   timeout server 10m\n",
    );
    let tls = "ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256";
    let _ = match side {
        // haproxy 2.6 has no `curves` on server lines: the client side offers
        // OpenSSL's default groups (X25519 first); the server side allows X25519 only.
        Side::Client => write!(
            conf,
            "frontend fe\n    bind {listen}\n    default_backend be\n\
             backend be\n    server s {upstream} ssl verify required ca-file {ca} crt {crt} \
             alpn palisade/1 no-ssl-reuse no-tls-tickets {tls}\n",
            ca = c.ca.display(),
            crt = c.client.combined.display(),
        ),
        Side::Server => write!(
            conf,
            "frontend fe\n    bind {listen} ssl crt {crt} ca-file {ca} verify required \
             alpn palisade/1 curves X25519 no-tls-tickets {tls}\n    default_backend be\n\
             backend be\n    server app {upstream}\n",
            ca = c.ca.display(),
            crt = c.server.combined.display(),
        ),
    };
    conf
}

fn nginx_config(
    ctx: &Ctx,
    side: Side,
    listen: SocketAddr,
    upstream: SocketAddr,
    prefix: &Path,
) -> String {
    let c = &ctx.certs;
    let mut conf = String::new();
    if let Some(module) = &ctx.nginx_module {
        let _ = writeln!(conf, "load_module {};", module.display());
    }
    let _ = write!(
        conf,
        "daemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile {nofile};\n\
         pid {pid};\nerror_log {err} warn;\n\
         events {{ worker_connections {conns}; multi_accept on; }}\n\
         stream {{\n",
        nofile = ctx.nofile.min(200_000),
        conns = ctx.nofile.saturating_sub(100).min(60_000),
        pid = prefix.join("nginx.pid").display(),
        err = prefix.join("error.log").display(),
    );
    let _ = match side {
        Side::Client => write!(
            conf,
            "  server {{\n\
             \x20   listen {listen} backlog=4096;\n\
             \x20   proxy_pass {upstream};\n\
             \x20   proxy_connect_timeout 5s;\n\
             \x20   proxy_timeout 10m;\n\
             \x20   proxy_ssl on;\n\
             \x20   proxy_ssl_certificate {crt};\n\
             \x20   proxy_ssl_certificate_key {key};\n\
             \x20   proxy_ssl_trusted_certificate {ca};\n\
             \x20   proxy_ssl_verify on;\n\
             \x20   proxy_ssl_verify_depth 2;\n\
             \x20   proxy_ssl_name localhost;\n\
             \x20   proxy_ssl_protocols TLSv1.3;\n\
             \x20   proxy_ssl_session_reuse off;\n\
             \x20   proxy_ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;\n\
             \x20   proxy_ssl_conf_command Groups X25519;\n\
             \x20 }}\n}}\n",
            crt = c.client.cert.display(),
            key = c.client.key.display(),
            ca = c.ca.display(),
        ),
        Side::Server => write!(
            conf,
            "  server {{\n\
             \x20   listen {listen} ssl backlog=4096;\n\
             \x20   proxy_pass {upstream};\n\
             \x20   proxy_connect_timeout 5s;\n\
             \x20   proxy_timeout 10m;\n\
             \x20   ssl_certificate {crt};\n\
             \x20   ssl_certificate_key {key};\n\
             \x20   ssl_client_certificate {ca};\n\
             \x20   ssl_verify_client on;\n\
             \x20   ssl_verify_depth 2;\n\
             \x20   ssl_protocols TLSv1.3;\n\
             \x20   ssl_ecdh_curve X25519;\n\
             \x20   ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;\n\
             \x20   ssl_session_cache off;\n\
             \x20   ssl_session_tickets off;\n\
             \x20   ssl_conf_command NumTickets 0;\n\
             \x20   ssl_handshake_timeout 10s;\n\
             \x20 }}\n}}\n",
            crt = c.server.cert.display(),
            key = c.server.key.display(),
            ca = c.ca.display(),
        ),
    };
    conf
}

fn stunnel_config(
    c: &CertFiles,
    side: Side,
    listen: SocketAddr,
    upstream: SocketAddr,
    output: &Path,
) -> String {
    let (client, leaf) = match side {
        Side::Client => ("yes", &c.client),
        Side::Server => ("no", &c.server),
    };
    let mut conf = format!(
        "foreground = yes\npid =\noutput = {out}\ndebug = 4\n\n[bench]\nclient = {client}\n\
         accept = {listen}\nconnect = {upstream}\ncert = {crt}\nkey = {key}\nCAfile = {ca}\n\
         verifyChain = yes\nsslVersion = TLSv1.3\nciphersuites = TLS_AES_128_GCM_SHA256\n\
         curves = X25519\noptions = NO_TICKET\nsessionResume = no\nsessionCacheSize = 1\n\
         TIMEOUTidle = 600\nTIMEOUTclose = 0\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
        out = output.display(),
        crt = leaf.cert.display(),
        key = leaf.key.display(),
        ca = c.ca.display(),
    );
    if side == Side::Server {
        conf.push_str("requireCert = yes\n");
    }
    conf
}

// === Ctx ===

impl Ctx {
    /// Idle connections a pair can hold: each proxy needs two descriptors per
    /// connection, and so does this process (client socket + backend socket).
    fn max_idle(&self) -> usize {
        usize::try_from(self.nofile.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX)
    }

    /// `max_idle` for one system: stunnel also caps its clients itself at
    /// 125/256 of its open-file limit and resets connections beyond that.
    fn max_idle_for(&self, sys: System) -> usize {
        let own = match sys {
            System::Stunnel => {
                usize::try_from((self.nofile * 125 / 256).saturating_sub(16)).unwrap_or(usize::MAX)
            }
            _ => usize::MAX,
        };
        self.max_idle().min(own)
    }

    /// haproxy's `maxconn` (it refuses to start if 2 × maxconn exceeds the limit).
    fn haproxy_maxconn(&self) -> u64 {
        (self.nofile.saturating_sub(100) / 2).min(60_000)
    }

    fn new(s: &Settings, dir: PathBuf, certs: CertFiles, groups: Arc<Groups>) -> Result<Self> {
        let wants = |x: System| s.systems.contains(&x);
        let sidecar = if wants(System::Palisade) || wants(System::PalisadePq) {
            Some(SidecarInfo::find(s.args.sidecar.as_deref())?)
        } else {
            None
        };
        for (sys, tool) in [
            (System::Haproxy, "haproxy"),
            (System::Nginx, "nginx"),
            (System::Stunnel, "stunnel4"),
        ] {
            if wants(sys) && !on_path(tool) {
                bail!(
                    "`{tool}` is not installed; deploy/bench/proxy.sh installs the peers \
                     (or leave {} out of --systems)",
                    sys.key()
                );
            }
        }
        let nginx_module = if wants(System::Nginx) {
            nginx_stream_module()?
        } else {
            None
        };
        Ok(Self {
            dir,
            certs,
            sidecar,
            nginx_module,
            groups,
            clk_tck: clock_ticks_per_second(),
            nofile: rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(u64::MAX),
            serial: AtomicU64::new(0),
        })
    }
}

impl SidecarInfo {
    fn find(path: Option<&Path>) -> Result<Self> {
        let path = match path {
            Some(p) => p.to_owned(),
            None => sibling("palisade-sidecar")?,
        };
        ensure!(
            path.is_file(),
            "the sidecar {} does not exist: build it with \
             `cargo build --release -p palisade-sidecar` or pass --sidecar PATH",
            path.display()
        );
        let help = Command::new(&path)
            .args(["run", "--help"])
            .output()
            .with_context(|| format!("running {} run --help", path.display()))?;
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let version = command_line(&path, &["--version"]);
        Ok(Self {
            worker_threads: help.contains("--worker-threads"),
            tls_groups: help.contains("--tls-groups"),
            tls_cipher_suites: help.contains("--tls-cipher-suites"),
            version,
            path,
        })
    }
}

/// `name` next to this executable.
fn sibling(name: &str) -> Result<PathBuf> {
    Ok(std::env::current_exe()
        .context("finding this executable")?
        .parent()
        .context("this executable has no directory")?
        .join(name))
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `load_module` path of the stream module when nginx has it as a dynamic module.
fn nginx_stream_module() -> Result<Option<PathBuf>> {
    let out = Command::new("nginx")
        .arg("-V")
        .output()
        .context("running nginx -V")?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    if !text.contains("--with-stream=dynamic") {
        ensure!(
            text.contains("--with-stream"),
            "this nginx has no stream module"
        );
        return Ok(None);
    }
    let modules = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("--modules-path="))
        .unwrap_or("/usr/lib/nginx/modules");
    let path = Path::new(modules).join("ngx_stream_module.so");
    ensure!(
        path.is_file(),
        "{} is missing: install libnginx-mod-stream",
        path.display()
    );
    Ok(Some(path))
}

fn free_port() -> Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Raises RLIMIT_NOFILE (children inherit it).
fn raise_nofile(notes: &mut Vec<String>) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let soft = now.current.unwrap_or(u64::MAX);
    if soft >= NOFILE_WANTED {
        return;
    }
    let hard = now.maximum.unwrap_or(u64::MAX);
    let want = Rlimit {
        current: Some(NOFILE_WANTED),
        maximum: Some(hard.max(NOFILE_WANTED)),
    };
    if setrlimit(Resource::Nofile, want).is_ok() {
        return;
    }
    let fallback = Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    let _ = setrlimit(Resource::Nofile, fallback);
    let got = getrlimit(Resource::Nofile).current.unwrap_or(0);
    note(
        notes,
        format!(
            "the open-file limit is {got} and could not be raised to {NOFILE_WANTED} \
             (that needs CAP_SYS_RESOURCE)"
        ),
    );
}

// === measurements ===

/// Waits until a 1-byte echo through `entry` works.
async fn wait_echo(entry: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), echo_conn(entry)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => {
                bail!("no echo through {entry}: {e}")
            }
            Err(_) if Instant::now() > deadline => bail!("no echo through {entry}: timed out"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Connects, sends one byte and reads its echo; the connection stays open.
async fn echo_conn(entry: SocketAddr) -> std::io::Result<TcpStream> {
    let mut tcp = TcpStream::connect(entry).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(b"E").await?;
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await?;
    Ok(tcp)
}

async fn bulk(
    entry: SocketAddr,
    pair: Option<&Pair>,
    backend: &Backend,
    s: &Settings,
    ctx: &Ctx,
    f: &mut Figures,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tcp = TcpStream::connect(entry).await?;
            tcp.set_nodelay(true)?;
            tcp.write_all(b"S").await?;
            let buf = vec![0x5au8; BULK_BUF];
            while !stop.load(Ordering::Relaxed) {
                tcp.write_all(&buf).await?;
            }
            tcp.shutdown().await?;
            Ok::<_, std::io::Error>(())
        })
    };
    tokio::time::sleep(s.warmup).await;
    let (b0, s0) = (backend.sunk(), Sample::take(pair)?);
    tokio::time::sleep(s.duration).await;
    let (b1, s1) = (backend.sunk(), Sample::take(pair)?);
    stop.store(true, Ordering::Relaxed);
    let finished = writer.is_finished();
    match tokio::time::timeout(Duration::from_secs(10), writer).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => bail!(
            "bulk stream failed{}: {e}",
            if finished { " early" } else { "" }
        ),
        Ok(Err(e)) => bail!("bulk writer panicked: {e}"),
        Err(_) => bail!("bulk writer did not stop within 10 s"),
    }
    let w = s0.until(&s1, ctx.clk_tck);
    let bytes = b1.saturating_sub(b0) as f64;
    ensure!(
        bytes > 0.0,
        "no bytes reached the backend in the bulk window"
    );
    f.insert("bulk_bytes".into(), bytes);
    f.insert("gbps".into(), bytes * 8.0 / w.secs / 1e9);
    if pair.is_some() {
        f.insert("cpu_s_per_gb".into(), w.proxies() / (bytes / 1e9));
    }
    w.record("bulk", f, pair.is_some());
    Ok(())
}

async fn conn_rate(
    entry: SocketAddr,
    pair: Option<&Pair>,
    s: &Settings,
    ctx: &Ctx,
    f: &mut Figures,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut workers = JoinSet::new();
    for _ in 0..s.args.clients {
        let (stop, done, errors, first_error) = (
            stop.clone(),
            done.clone(),
            errors.clone(),
            first_error.clone(),
        );
        workers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(CONNECT_TIMEOUT, echo_conn(entry)).await {
                    Ok(Ok(tcp)) => {
                        drop(tcp);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    outcome => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let text = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert(text);
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    tokio::time::sleep(s.warmup).await;
    let (d0, s0) = (done.load(Ordering::Relaxed), Sample::take(pair)?);
    tokio::time::sleep(s.duration).await;
    let (d1, s1) = (done.load(Ordering::Relaxed), Sample::take(pair)?);
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(2), async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    workers.abort_all();
    let w = s0.until(&s1, ctx.clk_tck);
    let n = d1.saturating_sub(d0) as f64;
    f.insert("connections".into(), n);
    f.insert("conn_per_s".into(), n / w.secs);
    f.insert("conn_errors".into(), errors.load(Ordering::Relaxed) as f64);
    if let Some(e) = first_error.lock().ok().and_then(|e| e.clone()) {
        eprintln!("  first connection error: {e}");
    }
    if pair.is_some() && n > 0.0 {
        f.insert("cpu_us_per_conn".into(), w.proxies() * 1e6 / n);
    }
    w.record("conn", f, pair.is_some());
    Ok(())
}

async fn latency(entry: SocketAddr, s: &Settings, f: &mut Figures) -> Result<()> {
    let n = s.latency_requests;
    let task = tokio::spawn(async move {
        let mut tcp = echo_conn(entry).await?;
        let request = vec![0x41u8; LATENCY_MSG];
        let mut response = vec![0u8; LATENCY_MSG];
        let mut samples = Vec::with_capacity(n);
        for i in 0..LATENCY_WARMUP + n {
            let t = Instant::now();
            tcp.write_all(&request).await?;
            tcp.read_exact(&mut response).await?;
            if i >= LATENCY_WARMUP {
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        Ok::<_, std::io::Error>(samples)
    });
    let limit = Duration::from_secs(60) + Duration::from_millis(n as u64);
    let mut samples = tokio::time::timeout(limit, task)
        .await
        .context("the latency test timed out")?
        .context("the latency task panicked")?
        .context("the latency connection failed")?;
    samples.sort_unstable();
    f.insert("p50_us".into(), percentile(&samples, 50.0) / 1e3);
    f.insert("p99_us".into(), percentile(&samples, 99.0) / 1e3);
    f.insert("latency_samples".into(), samples.len() as f64);
    Ok(())
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// The idle-connection memory test on a fresh pair. Never fails the run: what
/// went wrong goes to the notes and the figures say how far it got.
async fn memory(
    ctx: &Ctx,
    sys: System,
    backend: &Backend,
    s: &Settings,
    notes: &mut Vec<String>,
    round: usize,
) -> Figures {
    let mut f = Figures::new();
    let pair = match Pair::start(ctx, sys, backend.addr) {
        Ok(p) => p,
        Err(e) => {
            note(
                notes,
                format!("round {round}, {} memory: {e:#}", sys.label()),
            );
            return f;
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = match pair.rss() {
        Ok(r) => r,
        Err(e) => {
            note(
                notes,
                format!("round {round}, {} memory: {e:#}", sys.label()),
            );
            return f;
        }
    };
    f.insert("idle_rss_client_kib".into(), idle.0 as f64);
    f.insert("idle_rss_server_kib".into(), idle.1 as f64);
    f.insert("idle_pss_client_kib".into(), pair.client.pss_kib() as f64);
    f.insert("idle_pss_server_kib".into(), pair.server.pss_kib() as f64);
    f.insert("idle_threads_client".into(), pair.client.threads() as f64);
    f.insert("idle_threads_server".into(), pair.server.threads() as f64);
    eprintln!(
        "  idle RSS {} + {} KiB, threads {} + {}",
        idle.0,
        idle.1,
        pair.client.threads(),
        pair.server.threads()
    );
    let mut conns: Vec<TcpStream> = Vec::new();
    for target in s.connection_steps() {
        // What the open-file limit allows; the figure is per connection open.
        let goal = target.min(ctx.max_idle_for(sys));
        if goal < conns.len() {
            break;
        }
        let started = Instant::now();
        let outcome = open_idle(pair.entry, goal - conns.len(), &mut conns).await;
        let open_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(s.args.idle_settle).await;
        f.insert(format!("conns_{target}"), conns.len() as f64);
        if let Err(e) = pair.check_alive() {
            note(
                notes,
                format!(
                    "round {round}, {} memory: failed at {} connections: {e:#}",
                    sys.label(),
                    conns.len()
                ),
            );
            f.insert(format!("failed_at_{target}"), conns.len() as f64);
            break;
        }
        let Ok(rss) = pair.rss() else { break };
        f.insert(format!("rss_client_kib_{target}"), rss.0 as f64);
        f.insert(format!("rss_server_kib_{target}"), rss.1 as f64);
        f.insert(
            format!("threads_{target}"),
            (pair.client.threads() + pair.server.threads()) as f64,
        );
        let grown = (rss.0 + rss.1) as f64 - (idle.0 + idle.1) as f64;
        match outcome {
            Ok(()) => {
                let per = grown / conns.len().max(1) as f64;
                f.insert(format!("kib_per_conn_{target}"), per);
                eprintln!(
                    "  {} idle connections (opened in {open_secs:.1} s): RSS {} + {} KiB, {per:.1} KiB per connection",
                    conns.len(),
                    rss.0,
                    rss.1
                );
            }
            Err(e) => {
                f.insert(format!("failed_at_{target}"), conns.len() as f64);
                note(
                    notes,
                    format!(
                        "{} memory, round {round}: failed at {} of {target} connections: {e}",
                        sys.label(),
                        conns.len()
                    ),
                );
                break;
            }
        }
    }
    drop(conns);
    drop(pair);
    f
}

/// Opens `n` more connections through `entry`, each proven by a 1-byte echo,
/// `OPEN_CONCURRENCY` at a time; stops at the first failure.
async fn open_idle(entry: SocketAddr, n: usize, conns: &mut Vec<TcpStream>) -> Result<(), String> {
    let mut set = JoinSet::new();
    let mut launched = 0;
    let mut first_error: Option<String> = None;
    let mut next_report = conns.len() + 2000;
    while (first_error.is_none() && launched < n) || !set.is_empty() {
        while first_error.is_none() && launched < n && set.len() < OPEN_CONCURRENCY {
            set.spawn(tokio::time::timeout(CONNECT_TIMEOUT, echo_conn(entry)));
            launched += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(Ok(tcp)))) => {
                conns.push(tcp);
                if conns.len() >= next_report {
                    eprintln!("    {} connections open", conns.len());
                    next_report += 2000;
                }
            }
            Some(Ok(Ok(Err(e)))) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
            Some(Ok(Err(_))) => {
                first_error.get_or_insert_with(|| "connect + echo timed out".to_owned());
            }
            Some(Err(e)) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
            None => break,
        }
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

// === TLS check ===

/// What one handshake negotiated.
#[derive(Clone, Debug)]
struct Handshake {
    version: String,
    suite: String,
    group: String,
    resumed: bool,
    alpn: String,
    peer_cert: bool,
}

/// What each side of a system negotiated with the probes here.
#[derive(Debug)]
struct TlsCheck {
    /// The client-side proxy as seen by a rustls server that would resume.
    client: Vec<Handshake>,
    /// The server-side proxy as seen by a rustls client that keeps tickets.
    server: Vec<Handshake>,
    /// Session tickets the server side sent to the probe client.
    tickets: u64,
}

async fn tls_check(ctx: &Ctx, sys: System, backend: &Backend) -> Result<TlsCheck> {
    // The client side against a rustls server.
    let listener = StdListener::bind("127.0.0.1:0")?;
    let probe_addr = listener.local_addr()?;
    let config = probe_server_config(&ctx.certs)?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("tls-probe-server".into())
        .spawn(move || {
            for tcp in listener.incoming() {
                let result = tcp
                    .map_err(anyhow::Error::from)
                    .and_then(|tcp| probe_serve(tcp, config.clone()));
                if tx.send(result).is_err() {
                    return;
                }
            }
        })?;
    let client_side = {
        let entry = free_port()?;
        let proc = start_side(ctx, sys, Side::Client, entry, probe_addr)?;
        let mut seen = Vec::new();
        for _ in 0..PROBE_CONNECTIONS {
            let tcp = echo_conn(entry).await.with_context(|| {
                format!("a connection through {} to the probe server", proc.name)
            })?;
            drop(tcp);
            let hs = rx
                .recv_timeout(CONNECT_TIMEOUT)
                .context("the probe server saw no handshake")??;
            seen.push(hs);
        }
        seen
    };
    // The server side against a rustls client.
    let tls = free_port()?;
    let proc = start_side(ctx, sys, Side::Server, tls, backend.addr)?;
    let store = Arc::new(CountingStore::new());
    let config = probe_client_config(&ctx.certs, store.clone())?;
    let server_side = tokio::task::spawn_blocking(move || {
        (0..PROBE_CONNECTIONS)
            .map(|_| probe_connect(tls, config.clone()))
            .collect::<Result<Vec<_>>>()
    })
    .await
    .context("the probe client panicked")??;
    drop(proc);
    Ok(TlsCheck {
        client: client_side,
        server: server_side,
        tickets: store.tickets.load(Ordering::Relaxed),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(c: &CertFiles) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(c.ca_der.clone())?;
    Ok(Arc::new(roots))
}

fn key_der(leaf: &LeafFiles) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()))
}

/// A server that requires a client certificate, issues tickets and resumes
/// any session a client offers.
fn probe_server_config(c: &CertFiles) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(c)?, provider()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![c.server.der.clone()], key_der(&c.server))?;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

fn probe_client_config(c: &CertFiles, store: Arc<CountingStore>) -> Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(c)?)
        .with_client_auth_cert(vec![c.client.der.clone()], key_der(&c.client))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::store(store);
    Ok(Arc::new(config))
}

fn describe(conn: &rustls::CommonState) -> Handshake {
    Handshake {
        version: conn
            .protocol_version()
            .map_or("-".into(), |v| format!("{v:?}")),
        suite: conn
            .negotiated_cipher_suite()
            .map_or("-".into(), |s| format!("{:?}", s.suite())),
        group: conn
            .negotiated_key_exchange_group()
            .map_or("-".into(), |g| format!("{:?}", g.name())),
        resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
        alpn: conn
            .alpn_protocol()
            .map_or("-".into(), |a| String::from_utf8_lossy(a).into_owned()),
        peer_cert: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
    }
}

/// One connection of the probe server: handshake, echo one byte, wait for EOF.
fn probe_serve(tcp: StdStream, config: Arc<ServerConfig>) -> Result<Handshake> {
    tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let conn = ServerConnection::new(config)?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let hs = describe(&tls.conn);
    let mut b = [0u8; 1];
    tls.read_exact(&mut b)?;
    tls.write_all(&b)?;
    tls.flush()?;
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    Ok(hs)
}

/// One connection of the probe client: handshake, one byte and its echo.
fn probe_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<Handshake> {
    let tcp = StdStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let conn = ClientConnection::new(config, ServerName::try_from("localhost")?)?;
    let mut tls = StreamOwned::new(conn, tcp);
    tls.write_all(b"E")?;
    tls.flush()?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b)?;
    let hs = describe(&tls.conn);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(hs)
}

/// The rustls client's session store, counting the TLS 1.3 tickets received.
#[derive(Debug)]
struct CountingStore {
    inner: ClientSessionMemoryCache,
    tickets: AtomicU64,
}

impl CountingStore {
    fn new() -> Self {
        Self {
            inner: ClientSessionMemoryCache::new(64),
            tickets: AtomicU64::new(0),
        }
    }
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(server_name, value);
    }
    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, Ordering::Relaxed);
        self.inner.insert_tls13_ticket(server_name, value);
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

// === crypto reference ===

/// Thread-CPU µs per operation, measured on one thread of this process.
#[derive(Clone, Copy, Debug)]
struct CryptoCost {
    sign_us: f64,
    verify_us: f64,
    /// One side's X25519: key generation, public key, agreement.
    x25519_us: f64,
    /// ML-KEM-768 key generation + encapsulation + decapsulation.
    mlkem_us: f64,
}

impl CryptoCost {
    fn measure(budget: Duration) -> Result<Self> {
        let each = budget / 4;
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| anyhow!("P-256 key generation failed"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
            .map_err(|_| anyhow!("P-256 key parsing failed"))?;
        // TLS 1.3 CertificateVerify content: 64 spaces, context, 0, hash.
        let message = [0x20u8; 130];
        let signature = key
            .sign(&rng, &message)
            .map_err(|_| anyhow!("P-256 sign failed"))?;
        let public =
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
        let sign_us = per_op_us(each, || {
            let s = key.sign(&rng, &message).map_err(|_| anyhow!("sign"))?;
            std::hint::black_box(s);
            Ok(())
        })?;
        let verify_us = per_op_us(each, || {
            public
                .verify(&message, signature.as_ref())
                .map_err(|_| anyhow!("verify"))
        })?;
        let peer = EphemeralPrivateKey::generate(&X25519, &rng)
            .map_err(|_| anyhow!("x25519"))?
            .compute_public_key()
            .map_err(|_| anyhow!("x25519"))?;
        let peer = peer.as_ref().to_vec();
        let x25519_us = per_op_us(each, || {
            let mine =
                EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| anyhow!("x25519"))?;
            let public = mine.compute_public_key().map_err(|_| anyhow!("x25519"))?;
            std::hint::black_box(public.as_ref());
            agree_ephemeral(
                mine,
                AgreePublicKey::new(&X25519, &peer),
                anyhow!("x25519 agreement"),
                |secret| {
                    std::hint::black_box(secret);
                    Ok(())
                },
            )
        })?;
        let mlkem_us = per_op_us(each, || {
            let dk = DecapsulationKey::generate(&ML_KEM_768).map_err(|_| anyhow!("ml-kem"))?;
            let ek = dk.encapsulation_key().map_err(|_| anyhow!("ml-kem"))?;
            let (ct, ss) = ek.encapsulate().map_err(|_| anyhow!("ml-kem"))?;
            let ss2 = dk.decapsulate(ct).map_err(|_| anyhow!("ml-kem"))?;
            std::hint::black_box((ss, ss2));
            Ok(())
        })?;
        Ok(Self {
            sign_us,
            verify_us,
            x25519_us,
            mlkem_us,
        })
    }

    /// The asymmetric crypto of one mutual handshake, both sides together, µs.
    fn handshake_us(&self, hybrid: bool) -> f64 {
        let classic = 2.0 * self.sign_us + 4.0 * self.verify_us + 2.0 * self.x25519_us;
        if hybrid {
            classic + self.mlkem_us
        } else {
            classic
        }
    }

    fn json(&self) -> Value {
        json!({
            "ecdsa_p256_sign_us": self.sign_us,
            "ecdsa_p256_verify_us": self.verify_us,
            "x25519_keygen_agree_us": self.x25519_us,
            "mlkem768_keygen_encaps_decaps_us": self.mlkem_us,
            "handshake_x25519_us": self.handshake_us(false),
            "handshake_hybrid_us": self.handshake_us(true),
        })
    }
}

/// Thread-CPU µs per call of `op`, calling it until `budget` of CPU is spent.
fn per_op_us(budget: Duration, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = thread_cpu_ns();
    let budget = budget.as_nanos() as u64;
    let mut count = 0u64;
    loop {
        for _ in 0..16 {
            op()?;
        }
        count += 16;
        let spent = thread_cpu_ns().saturating_sub(start);
        if spent >= budget {
            return Ok(spent as f64 / 1e3 / count as f64);
        }
    }
}

fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

// === issuance ===

/// Runs `palisade-bench-issuance --rounds 1 --json FILE` and returns its JSON.
async fn issuance(s: &Settings, ctx: &Ctx) -> Result<Value> {
    let path = match &s.args.issuance_bench {
        Some(p) => p.clone(),
        None => sibling("palisade-bench-issuance")?,
    };
    ensure!(
        path.is_file(),
        "{} is missing: build it with `cargo build --release -p palisade-tests -p palisade-control-plane`",
        path.display()
    );
    let out = ctx.dir.join("issuance.json");
    let mut args: Vec<OsString> = vec![
        "--rounds".into(),
        "1".into(),
        "--json".into(),
        out.clone().into_os_string(),
    ];
    if s.args.quick {
        for a in [
            "--duration",
            "3s",
            "--warmup",
            "1s",
            "--crypto-duration",
            "1s",
        ] {
            args.push(a.into());
        }
    }
    let mut proc = Proc::spawn(ctx, "issuance", &path, &args)?;
    let status = proc.wait().await?;
    let text = fs::read_to_string(&out).with_context(|| {
        format!(
            "{} exited with {status} and wrote no JSON; its output:\n    {}",
            path.display(),
            proc.log_tail()
        )
    })?;
    let mut value: Value = serde_json::from_str(&text).context("parsing the issuance JSON")?;
    if let Some(m) = value.as_object_mut() {
        m.insert("exit_status".into(), json!(status.to_string()));
    }
    Ok(value)
}

// === /proc ===

fn process_state(pid: u32) -> Option<char> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text.rsplit_once(')')?.1.trim_start().chars().next()
}

/// `pid` and all its descendants.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(text) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid = text
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for (p, pp) in &parents {
            if *pp == parent && !tree.contains(p) {
                tree.push(*p);
            }
        }
        i += 1;
    }
    tree
}

/// A `Key:  N kB` (or plain number) line of `/proc/PID/status`.
fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{path} has no {key}"))
}

fn pss_kib(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Whether something listens on 127.0.0.1:`port` (or any address), from
/// `/proc/net/tcp`, without connecting.
fn is_listening(port: u16) -> bool {
    let needle = format!(":{port:04X}");
    fs::read_to_string("/proc/net/tcp").is_ok_and(|text| {
        text.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&needle) && f[3] == "0A"
        })
    })
}

/// Busy ticks of the whole machine (neither idle, iowait nor steal).
fn machine_busy_ticks() -> Result<u64> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let total: u64 = (0..8).map(at).sum();
    Ok(total - at(3) - at(4) - at(7))
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

// === machine facts ===

/// The first line a command prints (stdout, else stderr), or "not found".
fn command_line(program: &Path, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let out = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&out)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_owned()
        }
        Err(_) => "not found".to_owned(),
    }
}

fn machine_facts(ctx: &Ctx) -> Vec<(&'static str, String)> {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|x| x.1.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    let stunnel = Command::new("stunnel4")
        .arg("-version")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stderr).into_owned();
            text.lines()
                .filter(|l| l.starts_with("stunnel ") || l.contains("OpenSSL"))
                .map(|l| l.trim().to_owned())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_else(|_| "not found".into());
    vec![
        ("nproc", nproc.to_string()),
        ("cpu", cpu),
        ("kernel", kernel),
        (
            "memory",
            fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines()
                        .next()
                        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
                })
                .unwrap_or_default(),
        ),
        (
            "palisade-sidecar",
            ctx.sidecar.as_ref().map_or("not used".into(), |s| {
                format!("{} ({})", s.version, s.path.display())
            }),
        ),
        ("haproxy", command_line(Path::new("haproxy"), &["-v"])),
        ("nginx", command_line(Path::new("nginx"), &["-v"])),
        ("stunnel", stunnel),
        ("openssl", command_line(Path::new("openssl"), &["version"])),
        ("rustc", command_line(Path::new("rustc"), &["--version"])),
        (
            "net.ipv4.tcp_tw_reuse",
            fs::read_to_string("/proc/sys/net/ipv4/tcp_tw_reuse")
                .map(|v| v.trim().to_owned())
                .unwrap_or_default(),
        ),
        (
            "open-file limit",
            rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .map_or("unlimited".into(), |n| n.to_string()),
        ),
    ]
}

// === report ===

#[derive(Debug)]
struct Report<'a> {
    s: &'a Settings,
    ctx: &'a Ctx,
    results: &'a Results,
    facts: &'a [(&'static str, String)],
    started_at: SystemTime,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `v` with `decimals`, thousands grouped.
fn num(v: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, v.abs());
    let (int, frac) = text
        .split_once('.')
        .map_or((text.as_str(), ""), |(i, f)| (i, f));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if v < 0.0 && text.chars().any(|c| c.is_ascii_digit() && c != '0') {
        "−"
    } else {
        ""
    };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("—".into(), |v| num(v, decimals))
}

/// A goal's row.
#[derive(Debug)]
struct Goal {
    goal: &'static str,
    target: String,
    system: System,
    value: Option<f64>,
    reference: Option<(String, f64)>,
    ratio: Option<f64>,
    met: Option<bool>,
    decimals: usize,
}

impl Report<'_> {
    /// Median over rounds of `key` for `sys`.
    fn med(&self, sys: System, key: &str) -> Option<f64> {
        let rounds = self.results.rounds.get(&sys)?;
        median(rounds.iter().filter_map(|f| f.get(key).copied()).collect())
    }

    fn crypto(&self, hybrid: bool) -> Option<f64> {
        median(
            self.results
                .crypto
                .iter()
                .map(|c| c.handshake_us(hybrid))
                .collect(),
        )
    }

    fn crypto_op(&self, op: fn(&CryptoCost) -> f64) -> Option<f64> {
        median(self.results.crypto.iter().map(op).collect())
    }

    /// The latency key used for comparisons: added when the direct path ran.
    fn latency_key(&self, p: &str) -> String {
        if self.results.rounds.contains_key(&System::Direct) {
            format!("added_{p}_us")
        } else {
            format!("{p}_us")
        }
    }

    fn steps(&self) -> Vec<usize> {
        if self.s.args.skip_memory {
            Vec::new()
        } else {
            self.s.connection_steps()
        }
    }

    /// The memory cell: KiB per connection, or how far it got.
    fn memory_cell(&self, sys: System, step: usize) -> String {
        if let Some(v) = self.med(sys, &format!("kib_per_conn_{step}")) {
            return match self.med(sys, &format!("conns_{step}")) {
                Some(n) if n < step as f64 => format!("{} (at {})", num(v, 1), num(n, 0)),
                _ => num(v, 1),
            };
        }
        match self.med(sys, &format!("failed_at_{step}")) {
            Some(n) => format!("failed at {}", num(n, 0)),
            None => "—".into(),
        }
    }

    /// The best peer for a figure: highest when `higher`, else lowest.
    fn best_peer(&self, key: &str, higher: bool) -> Option<(String, f64)> {
        PEERS
            .iter()
            .filter_map(|p| Some((*p, self.med(*p, key)?)))
            .reduce(|a, b| {
                let better = if higher { b.1 > a.1 } else { b.1 < a.1 };
                if better { b } else { a }
            })
            .map(|(p, v)| (p.label().to_owned(), v))
    }

    fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        let palisades: Vec<System> = [System::Palisade, System::PalisadePq]
            .into_iter()
            .filter(|s| self.results.rounds.contains_key(s))
            .collect();
        let p99 = self.latency_key("p99");
        for &sys in &palisades {
            let hybrid = sys == System::PalisadePq;
            let ratio = |v: Option<f64>, r: &Option<(String, f64)>| match (v, r) {
                (Some(v), Some((_, r))) if *r > 0.0 => Some(v / r),
                _ => None,
            };
            // throughput
            let value = self.med(sys, "gbps");
            let reference = self.best_peer("gbps", true);
            let r = ratio(value, &reference);
            goals.push(Goal {
                goal: "bulk throughput",
                target: "≥ 1.2 × best peer".into(),
                system: sys,
                value,
                ratio: r,
                met: r.map(|r| r >= 1.2),
                reference,
                decimals: 2,
            });
            // CPU per GB
            let value = self.med(sys, "cpu_s_per_gb");
            let reference = self.best_peer("cpu_s_per_gb", false);
            let r = ratio(value, &reference);
            goals.push(Goal {
                goal: "CPU-s per GB",
                target: "lower than every peer".into(),
                system: sys,
                value,
                ratio: r,
                met: r.map(|r| r < 1.0),
                reference,
                decimals: 2,
            });
            // connection rate
            let value = self.med(sys, "conn_per_s");
            let reference = self.best_peer("conn_per_s", true);
            let r = ratio(value, &reference);
            goals.push(Goal {
                goal: "new connections/s",
                target: "≥ 2 × best peer".into(),
                system: sys,
                value,
                ratio: r,
                met: r.map(|r| r >= 2.0),
                reference,
                decimals: 0,
            });
            // CPU per connection against the crypto
            let value = self.med(sys, "cpu_us_per_conn");
            let reference = self
                .crypto(hybrid)
                .map(|c| ("crypto of one mutual handshake".to_owned(), c));
            let r = ratio(value, &reference);
            goals.push(Goal {
                goal: "CPU-µs per connection",
                target: "≤ 1.5 × crypto cost".into(),
                system: sys,
                value,
                ratio: r,
                met: r.map(|r| r <= 1.5),
                reference,
                decimals: 0,
            });
            // latency
            let value = self.med(sys, &p99);
            let reference = self.best_peer(&p99, false);
            let r = ratio(value, &reference);
            goals.push(Goal {
                goal: if p99.starts_with("added") {
                    "added p99 latency µs"
                } else {
                    "p99 latency µs (no direct path)"
                },
                target: "≤ best peer".into(),
                system: sys,
                met: match (value, &reference) {
                    (Some(v), Some((_, r))) => Some(v <= *r),
                    _ => None,
                },
                value,
                ratio: r,
                reference,
                decimals: 1,
            });
            // memory per idle connection
            for step in self.steps() {
                let key = format!("kib_per_conn_{step}");
                let value = self.med(sys, &key);
                let reference = self
                    .med(System::Haproxy, &key)
                    .map(|v| (System::Haproxy.label().to_owned(), v));
                let r = ratio(value, &reference);
                goals.push(Goal {
                    goal: if step == 1000 {
                        "KiB per idle connection @1k"
                    } else if step == 10_000 {
                        "KiB per idle connection @10k"
                    } else {
                        "KiB per idle connection"
                    },
                    target: "≤ 0.5 × haproxy".into(),
                    system: sys,
                    value,
                    ratio: r,
                    met: r.map(|r| r <= 0.5),
                    reference,
                    decimals: 1,
                });
            }
            // idle RSS
            if !self.s.args.skip_memory {
                let value = match (
                    self.med(sys, "idle_rss_client_kib"),
                    self.med(sys, "idle_rss_server_kib"),
                ) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
                let reference = Some(("10 MiB".to_owned(), 10_240.0));
                let r = ratio(value, &reference);
                goals.push(Goal {
                    goal: "idle sidecar RSS KiB (larger of the two)",
                    target: "≤ 10 MiB".into(),
                    system: sys,
                    value,
                    ratio: r,
                    met: r.map(|r| r <= 1.0),
                    reference,
                    decimals: 0,
                });
            }
        }
        goals
    }

    fn markdown(&self) -> String {
        let s = self.s;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n## Proxy benchmark: Palisade, haproxy, nginx, stunnel\n"
        );
        let _ = writeln!(
            out,
            "- date: {}",
            humantime::format_rfc3339_seconds(self.started_at)
        );
        let _ = writeln!(
            out,
            "- command: `{}`",
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        for (k, v) in self.facts {
            let _ = writeln!(out, "- {k}: {v}");
        }
        let _ = writeln!(
            out,
            "- method: {} round(s), systems alternating within each round; bulk and connection \
             windows {:.1} s after {:.1} s warm-up; {} connecting clients; {} latency round trips \
             of 1 KiB (after {LATENCY_WARMUP}); idle connections: {}; load generator \
             on {} tokio thread(s) and backend on 1 thread, both in this process; medians of the rounds",
            s.rounds,
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
            s.args.clients,
            s.latency_requests,
            if s.args.skip_memory {
                "skipped".to_owned()
            } else {
                format!(
                    "{} (cumulative), {:.1} s idle before reading RSS",
                    s.connection_steps()
                        .iter()
                        .map(|n| num(*n as f64, 0))
                        .collect::<Vec<_>>()
                        .join(" then "),
                    s.args.idle_settle.as_secs_f64()
                )
            },
            s.args.client_threads,
        );
        let _ = writeln!(out);

        // The main table.
        let steps = self.steps();
        let _ = write!(
            out,
            "| system | Gbit/s | CPU-s/GB | conn/s | CPU-µs/conn | added p50 µs | added p99 µs |"
        );
        for step in &steps {
            let _ = write!(out, " KiB/idle conn @{} |", short(*step));
        }
        let _ = writeln!(out, " idle RSS KiB (client + server) |");
        let _ = write!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for _ in &steps {
            let _ = write!(out, "---:|");
        }
        let _ = writeln!(out, "---:|");
        for &sys in &s.systems {
            if !self.results.rounds.contains_key(&sys) {
                continue;
            }
            let (p50, p99) = if sys == System::Direct {
                (
                    format!("({} abs.)", opt(self.med(sys, "p50_us"), 1)),
                    format!("({} abs.)", opt(self.med(sys, "p99_us"), 1)),
                )
            } else {
                (
                    opt(self.med(sys, &self.latency_key("p50")), 1),
                    opt(self.med(sys, &self.latency_key("p99")), 1),
                )
            };
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} | {p50} | {p99} |",
                sys.label(),
                opt(self.med(sys, "gbps"), 2),
                opt(self.med(sys, "cpu_s_per_gb"), 2),
                opt(self.med(sys, "conn_per_s"), 0),
                opt(self.med(sys, "cpu_us_per_conn"), 0),
            );
            for step in &steps {
                let cell = if sys == System::Direct {
                    "—".to_owned()
                } else {
                    self.memory_cell(sys, *step)
                };
                let _ = write!(out, " {cell} |");
            }
            let idle = match (
                self.med(sys, "idle_rss_client_kib"),
                self.med(sys, "idle_rss_server_kib"),
            ) {
                (Some(a), Some(b)) => format!("{} + {}", num(a, 0), num(b, 0)),
                _ => "—".into(),
            };
            let _ = writeln!(out, " {idle} |");
        }
        let errors: f64 = self
            .results
            .rounds
            .values()
            .flatten()
            .filter_map(|f| f.get("conn_errors"))
            .sum();
        let _ = writeln!(
            out,
            "\nCPU figures are both proxies of the pair together (utime + stime from /proc; nginx: \
             master + worker); KiB per idle connection is the growth of both proxies' RSS over \
             their idle RSS, divided by the connections open; added latency is the system's \
             percentile minus the direct path's in the same round{}. Connection errors in all \
             windows: {}.",
            if self.results.rounds.contains_key(&System::Direct) {
                ""
            } else {
                " (the direct path did not run: absolute latencies)"
            },
            num(errors, 0)
        );

        // Goals.
        let goals = self.goals();
        if !goals.is_empty() {
            let _ = writeln!(
                out,
                "\n### Goals\n\n| goal | target | Palisade | value | reference | ratio | met |\n|---|---|---|---:|---|---:|---|"
            );
            for g in goals {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    g.goal,
                    g.target,
                    g.system.label().trim_start_matches("palisade "),
                    opt(g.value, g.decimals),
                    g.reference.as_ref().map_or("—".into(), |(name, v)| format!(
                        "{name}: {}",
                        num(*v, g.decimals)
                    )),
                    opt(g.ratio, 2),
                    match g.met {
                        Some(true) => "met",
                        Some(false) => "**not met**",
                        None => "—",
                    }
                );
            }
        }

        // Crypto reference.
        if !self.results.crypto.is_empty() {
            let _ = writeln!(
                out,
                "\n### Crypto reference (this run, one thread, thread CPU, aws-lc-rs; medians)\n\n\
                 | operation | µs |\n|---|---:|\n\
                 | ECDSA P-256 sign | {} |\n| ECDSA P-256 verify | {} |\n\
                 | X25519 key generation + agreement (one side) | {} |\n\
                 | ML-KEM-768 key generation + encapsulation + decapsulation | {} |\n\
                 | **one mutual handshake, X25519** (2 sign + 4 verify + 2 X25519) | **{}** |\n\
                 | **one mutual handshake, X25519MLKEM768** (+ ML-KEM-768) | **{}** |",
                opt(self.crypto_op(|c| c.sign_us), 1),
                opt(self.crypto_op(|c| c.verify_us), 1),
                opt(self.crypto_op(|c| c.x25519_us), 1),
                opt(self.crypto_op(|c| c.mlkem_us), 1),
                opt(self.crypto(false), 1),
                opt(self.crypto(true), 1),
            );
        }

        // Issuance.
        if let Some(v) = &self.results.issuance {
            let m = &v["median"];
            let f = |k: &str, d: usize| opt(m[k].as_f64(), d);
            let _ = writeln!(
                out,
                "\n### Control plane issuance (`palisade-bench-issuance --rounds 1`, same run)\n\n\
                 | figure | value |\n|---|---:|\n\
                 | certificates issued/s | {} |\n\
                 | crypto ceiling, two cores (ECDSA sign + verify per issuance) | {}/s |\n\
                 | ratio to the two-core ceiling | {} |\n\
                 | control plane CPU µs per certificate (crypto µs) | {} ({}) |\n\
                 | crypto share of control plane CPU | {} |\n\
                 | other processes, cores | {} |\n\
                 | failures | {} |",
                f("certificates_per_s", 0),
                f("ceiling_two_cores_per_s", 0),
                f("ratio_to_two_core_ceiling", 3),
                f("control_plane_cpu_us_per_cert", 1),
                f("crypto_us_per_cert", 1),
                f("crypto_share_of_control_plane_cpu", 3),
                f("other_processes_cores", 2),
                v["failures_total"],
            );
        }

        // TLS check.
        if !self.results.tls.is_empty() {
            let _ = writeln!(
                out,
                "\n### TLS check: what each side negotiated, and resumption\n\n\
                 Client side: {PROBE_CONNECTIONS} connections through the client-side proxy to a \
                 rustls server that issues tickets and resumes any session offered. Server side: a \
                 rustls client that keeps tickets connects {PROBE_CONNECTIONS} times to the \
                 server-side proxy (offering X25519MLKEM768, X25519, P-256 and all three TLS 1.3 suites).\n\n\
                 | system | client side: version, suite, group | client cert | ALPN | resumed | server side: version, suite, group | tickets sent | resumed |\n\
                 |---|---|---|---|---:|---|---:|---:|"
            );
            for (sys, check) in &self.results.tls {
                match check {
                    Ok(c) => {
                        let _ = writeln!(
                            out,
                            "| {} | {} | {} | {} | {}/{} | {} | {} | {}/{} |",
                            sys.label(),
                            summary(&c.client, |h| format!(
                                "{} {} {}",
                                h.version, h.suite, h.group
                            )),
                            summary(&c.client, |h| if h.peer_cert {
                                "yes".into()
                            } else {
                                "no".into()
                            }),
                            summary(&c.client, |h| h.alpn.clone()),
                            c.client.iter().filter(|h| h.resumed).count(),
                            c.client.len(),
                            summary(&c.server, |h| format!(
                                "{} {} {}",
                                h.version, h.suite, h.group
                            )),
                            c.tickets,
                            c.server.iter().filter(|h| h.resumed).count(),
                            c.server.len(),
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(
                            out,
                            "| {} | failed: {} | | | | | | |",
                            sys.label(),
                            e.replace('\n', " ")
                        );
                    }
                }
            }
        }

        // Notes.
        let ran = |x: System| self.results.rounds.contains_key(&x);
        let mut notes = Vec::new();
        if ran(System::Stunnel) {
            notes.push(
                "stunnel runs a thread per connection and cannot be limited to one worker \
                 thread; haproxy runs `nbthread 1`, nginx `worker_processes 1`, Palisade \
                 `--worker-threads 1` (each sidecar also has its runtime's helper threads)."
                    .to_owned(),
            );
        }
        if ran(System::Haproxy) {
            notes.push(
                "haproxy 2.6 has no `curves` keyword for server lines: its client side offers \
                 OpenSSL's default groups (X25519 first, so X25519 is negotiated with one key \
                 share); the server side allows X25519 only. It sends 2 TLS 1.3 tickets per \
                 handshake that cannot be redeemed (session cache off; 2.6 cannot set NumTickets)."
                    .to_owned(),
            );
        }
        notes.push(
            "The load generator and the backend share the machine with the proxies; on a 2-core \
             machine every figure is contended, which is why systems alternate and ratios matter \
             more than absolute figures."
                .to_owned(),
        );
        if let Some(other) = median(
            self.results
                .rounds
                .values()
                .flatten()
                .filter_map(|f| f.get("conn_other_cores").copied())
                .collect(),
        ) {
            notes.push(format!(
                "Other processes on the machine used {other:.2} cores (median over the connection-rate windows)."
            ));
        }
        notes.extend(self.results.notes.iter().cloned());
        let _ = writeln!(out, "\n### Notes\n");
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }

    fn json(&self) -> Value {
        let s = self.s;
        let mut systems = Map::new();
        for (sys, rounds) in &self.results.rounds {
            let mut keys: Vec<&String> = rounds.iter().flat_map(|f| f.keys()).collect();
            keys.sort();
            keys.dedup();
            let medians: Map<String, Value> = keys
                .iter()
                .map(|k| ((*k).clone(), json!(self.med(*sys, k))))
                .collect();
            systems.insert(
                sys.key().into(),
                json!({
                    "label": sys.label(),
                    "rounds": rounds,
                    "median": medians,
                }),
            );
        }
        let tls: Map<String, Value> = self
            .results
            .tls
            .iter()
            .map(|(sys, c)| {
                let v = match c {
                    Ok(c) => {
                        let hs = |v: &[Handshake]| -> Value {
                            v.iter()
                                .map(|h| {
                                    json!({
                                        "version": h.version, "suite": h.suite, "group": h.group,
                                        "resumed": h.resumed, "alpn": h.alpn, "peer_cert": h.peer_cert,
                                    })
                                })
                                .collect()
                        };
                        json!({"client_side": hs(&c.client), "server_side": hs(&c.server), "server_side_tickets": c.tickets})
                    }
                    Err(e) => json!({"error": e}),
                };
                (sys.key().to_owned(), v)
            })
            .collect();
        let goals: Vec<Value> = self
            .goals()
            .into_iter()
            .map(|g| {
                json!({
                    "goal": g.goal, "target": g.target, "system": g.system.key(), "value": g.value,
                    "reference": g.reference.as_ref().map(|r| json!({"name": r.0, "value": r.1})),
                    "ratio": g.ratio, "met": g.met,
                })
            })
            .collect();
        json!({
            "benchmark": "palisade-bench-proxy",
            "date": humantime::format_rfc3339_seconds(self.started_at).to_string(),
            "command": std::env::args().collect::<Vec<_>>(),
            "machine": self.facts.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<Map<_, _>>(),
            "config": {
                "rounds": s.rounds,
                "duration_s": s.duration.as_secs_f64(),
                "warmup_s": s.warmup.as_secs_f64(),
                "clients": s.args.clients,
                "latency_requests": s.latency_requests,
                "connections": self.steps(),
                "idle_settle_s": s.args.idle_settle.as_secs_f64(),
                "crypto_duration_s": s.crypto_duration.as_secs_f64(),
                "client_threads": s.args.client_threads,
                "systems": s.systems.iter().map(|x| x.key()).collect::<Vec<_>>(),
                "clk_tck": self.ctx.clk_tck,
            },
            "crypto_per_round": self.results.crypto.iter().map(CryptoCost::json).collect::<Vec<_>>(),
            "crypto_median": {
                "handshake_x25519_us": self.crypto(false),
                "handshake_hybrid_us": self.crypto(true),
            },
            "systems": systems,
            "goals": goals,
            "tls_check": tls,
            "issuance": self.results.issuance,
            "notes": self.results.notes,
        })
    }
}

/// The distinct values of `f` over `hs`, joined.
fn summary(hs: &[Handshake], f: impl Fn(&Handshake) -> String) -> String {
    let mut v: Vec<String> = hs.iter().map(f).collect();
    v.dedup();
    v.join(" / ")
}

fn short(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}
