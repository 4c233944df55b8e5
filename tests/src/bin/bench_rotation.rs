//! `palisade-bench-rotation`: what certificate rotation costs a sidecar.
//!
//! In one run, on this machine, with release binaries:
//! - the CPU a sidecar spends per renewal (fresh P-256 key, CSR, `Certify`
//!   over TLS, validation, building the new TLS configurations), measured on
//!   an otherwise idle sidecar renewing 5-second certificates, minus an idle
//!   sidecar with 1-hour certificates over the same window;
//! - the rate of full mTLS handshakes through a pair of sidecars (client →
//!   sidecar A → mesh TLS → sidecar B → echo app) while both rotate every
//!   2-3 s, next to a pair that does not rotate, measured alternately.
//!
//! ```text
//! cargo build --release -p palisade-control-plane -p palisade-sidecar -p palisade-tests
//! ./target/release/palisade-bench-rotation --rounds 3
//! ```

#![forbid(unsafe_code)]

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use palisade_tests::{http_get, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Flags.
#[derive(Debug, Parser)]
#[command(name = "palisade-bench-rotation", about)]
struct Args {
    /// Alternating measurement rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per handshake-rate window.
    #[arg(long, default_value_t = 8)]
    window: u64,
    /// Seconds of the renewal-cost window.
    #[arg(long, default_value_t = 30)]
    renewal_window: u64,
    /// Concurrent connecting clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// user + system CPU seconds so far.
    fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id()))?;
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("stat")?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields.get(11).context("utime")?.parse::<f64>()?
            + fields.get(12).context("stime")?.parse::<f64>()?;
        Ok(ticks / 100.0)
    }
}

fn free_port() -> Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("exe dir")?.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it with --release first",
            path.display()
        );
    }
    Ok(path)
}

fn wait_ready(admin: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if matches!(http_get(admin, "/ready"), Ok((200, _))) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not become ready")
}

struct Sidecar {
    proc: Proc,
    admin: SocketAddr,
    listen: SocketAddr,
}

#[allow(clippy::too_many_arguments)]
fn sidecar(
    dir: &Path,
    grpc: SocketAddr,
    identity: &str,
    token: &str,
    lifetime: &str,
    explicit: &str,
    target: String,
) -> Result<Sidecar> {
    let admin = free_port()?;
    let listen = free_port()?;
    let token_file = dir.join(format!("{}.token", identity.replace('/', "_")));
    std::fs::write(&token_file, token)?;
    let child = Command::new(sibling("palisade-sidecar")?)
        .args([
            "--log-level",
            "warn",
            "run",
            "--transparent=false",
            "--control-plane",
        ])
        .arg(format!("https://{grpc}"))
        .arg("--bundle")
        .arg(dir.join("ca/ca.crt"))
        .args([
            "--identity",
            identity,
            "--lifetime",
            lifetime,
            "--token-file",
        ])
        .arg(&token_file)
        .args([
            "--admin-addr",
            &admin.to_string(),
            explicit,
            &format!("{listen}={target}"),
        ])
        .stdout(Stdio::null())
        .spawn()?;
    let proc = Proc(child);
    wait_ready(admin, identity)?;
    Ok(Sidecar {
        proc,
        admin,
        listen,
    })
}

fn renewals(s: &Sidecar) -> f64 {
    http_get(s.admin, "/metrics")
        .map(|(_, m)| metric(&m, "palisade_cert_renewals_total", &[("result", "success")]))
        .unwrap_or_default()
}

async fn echo_app() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Full handshakes per second through `addr` with `clients` closed-loop clients.
async fn handshake_rate(addr: SocketAddr, clients: usize, window: Duration) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = async {
                    let mut c = tokio::net::TcpStream::connect(addr).await?;
                    c.write_all(b"x\n").await?;
                    let mut b = [0u8; 2];
                    c.read_exact(&mut b).await?;
                    Ok::<_, std::io::Error>(())
                }
                .await
                .is_ok();
                if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let n = done.swap(0, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    (n as f64 / elapsed, failed.load(Ordering::Relaxed))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    palisade_runtime::exit_code(run(Args::parse()).await)
}

async fn run(args: Args) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let status = Command::new(sibling("palisade-control-plane")?)
        .args(["ca", "init", "--out"])
        .arg(dir.path().join("ca"))
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("ca init failed");
    }
    let ids: Vec<(String, String)> = [
        "rot-a",
        "rot-b",
        "still-a",
        "still-b",
        "idle-rot",
        "idle-still",
    ]
    .iter()
    .map(|n| {
        (
            format!("spiffe://cluster.local/ns/bench/sa/{n}"),
            format!("token-{n}-0123456789"),
        )
    })
    .collect();
    let mut tokens = String::from("tokens:\n");
    for (id, token) in &ids {
        tokens.push_str(&format!("  - token: {token}\n    identity: {id}\n"));
    }
    std::fs::create_dir(dir.path().join("tokens"))?;
    std::fs::write(dir.path().join("tokens/tokens.yaml"), tokens)?;
    let grpc = free_port()?;
    let cp_admin = free_port()?;
    let _cp = Proc(
        Command::new(sibling("palisade-control-plane")?)
            .args(["serve", "--ca-dir"])
            .arg(dir.path().join("ca"))
            .args(["--authenticator", "static", "--static-tokens"])
            .arg(dir.path().join("tokens/tokens.yaml"))
            .args(["--min-lifetime", "5s", "--log-level", "warn"])
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--admin-addr",
                &cp_admin.to_string(),
            ])
            .spawn()?,
    );
    wait_ready(cp_admin, "the control plane")?;

    let app = echo_app().await?;
    let id = |i: usize| ids[i].0.as_str();
    let tok = |i: usize| ids[i].1.as_str();
    let d = dir.path();
    let rot_b = sidecar(
        d,
        grpc,
        id(1),
        tok(1),
        "5s",
        "--explicit-inbound",
        app.to_string(),
    )?;
    let rot_a = sidecar(
        d,
        grpc,
        id(0),
        tok(0),
        "5s",
        "--explicit-outbound",
        format!("{},{}", rot_b.listen, id(1)),
    )?;
    let still_b = sidecar(
        d,
        grpc,
        id(3),
        tok(3),
        "1h",
        "--explicit-inbound",
        app.to_string(),
    )?;
    let still_a = sidecar(
        d,
        grpc,
        id(2),
        tok(2),
        "1h",
        "--explicit-outbound",
        format!("{},{}", still_b.listen, id(3)),
    )?;

    println!(
        "handshake rate: {} closed-loop clients, {} s windows, alternating, {} rounds",
        args.clients, args.window, args.rounds
    );
    let window = Duration::from_secs(args.window);
    let (mut with, mut without, mut failures) = (Vec::new(), Vec::new(), 0);
    for round in 1..=args.rounds {
        let r0 = renewals(&rot_a) + renewals(&rot_b);
        let (rate_rot, f1) = handshake_rate(rot_a.listen, args.clients, window).await;
        let rotations = renewals(&rot_a) + renewals(&rot_b) - r0;
        let (rate_still, f2) = handshake_rate(still_a.listen, args.clients, window).await;
        failures += f1 + f2;
        println!(
            "  round {round}: rotating pair {rate_rot:>7.0}/s ({rotations} renewals in the window) | steady pair {rate_still:>7.0}/s"
        );
        with.push(rate_rot);
        without.push(rate_still);
    }
    let (mw, mo) = (median(with), median(without));
    println!(
        "  median: rotating {mw:.0}/s, steady {mo:.0}/s, ratio {:.3}; failed connections: {failures}",
        mw / mo
    );

    // Renewal cost: two idle sidecars, one renewing 5 s certificates.
    drop((rot_a, rot_b, still_a, still_b));
    let idle_rot = sidecar(
        d,
        grpc,
        id(4),
        tok(4),
        "5s",
        "--explicit-inbound",
        app.to_string(),
    )?;
    let idle_still = sidecar(
        d,
        grpc,
        id(5),
        tok(5),
        "1h",
        "--explicit-inbound",
        app.to_string(),
    )?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c0, s0, n0) = (
        idle_rot.proc.cpu_seconds()?,
        idle_still.proc.cpu_seconds()?,
        renewals(&idle_rot),
    );
    tokio::time::sleep(Duration::from_secs(args.renewal_window)).await;
    let (c1, s1, n1) = (
        idle_rot.proc.cpu_seconds()?,
        idle_still.proc.cpu_seconds()?,
        renewals(&idle_rot),
    );
    let n = n1 - n0;
    let per_renewal_ms = if n > 0.0 {
        ((c1 - c0) - (s1 - s0)) / n * 1000.0
    } else {
        f64::NAN
    };
    println!(
        "renewal cost: {n} renewals in {} s; rotating sidecar {:.3} CPU-s, idle sidecar {:.3} CPU-s => {per_renewal_ms:.2} CPU-ms per renewal (10 ms ticks: ±{:.2} ms)",
        args.renewal_window,
        c1 - c0,
        s1 - s0,
        20.0 / n.max(1.0)
    );
    if failures > 0 {
        bail!("{failures} connections failed");
    }
    Ok(())
}
