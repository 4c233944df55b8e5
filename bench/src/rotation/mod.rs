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
//! The control plane (static tokens, `--min-lifetime 5s`) logs into the run's
//! temporary directory; the sidecars log warnings to this terminal.
//!
//! ```text
//! cargo build --release -p palisade-control-plane -p palisade-sidecar -p palisade-bench
//! ./target/release/palisade-bench-rotation --rounds 3
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use palisade_tests::{http_get, metric};

use crate::{
    control_plane::{self, ControlPlane},
    harness,
    load::{Backend, ClosedLoop},
    process::{Group, Output, Proc, find_binary, free_port, procfs},
    stats,
};

pub mod config;

pub use config::Args;

/// How long a sidecar gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// After SIGTERM, how long a sidecar gets before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Worker threads of the runtime the clients and the echo app share.
const WORKER_THREADS: usize = 2;

/// A sidecar in control-plane mode with one explicit listener.
#[derive(Debug)]
struct Sidecar {
    proc: Proc,
    admin: SocketAddr,
    listen: SocketAddr,
}

/// What every sidecar of the run is started with.
#[derive(Debug)]
struct SidecarSetup<'a> {
    binary: PathBuf,
    dir: &'a Path,
    grpc: SocketAddr,
}

/// Runs the benchmark on a runtime of its own until done or a signal.
pub fn run(args: Args) -> Result<ExitCode> {
    harness::block_on(WORKER_THREADS, bench(args))
}

async fn bench(args: Args) -> Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let cp_binary = find_binary(
        None,
        "palisade-control-plane",
        "palisade-control-plane",
        None,
    )?;
    control_plane::ca_init(&cp_binary, &dir.path().join("ca"))?;
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
    std::fs::create_dir(dir.path().join("tokens"))?;
    std::fs::write(
        dir.path().join("tokens/tokens.yaml"),
        control_plane::token_file(ids.iter().map(|(id, token)| (token, id))),
    )?;
    let cp = ControlPlane::start(
        &cp_binary,
        &dir.path().join("ca"),
        &dir.path().join("tokens/tokens.yaml"),
        &dir.path().join("control-plane.log"),
        "info",
        &["--min-lifetime".to_owned(), "5s".to_owned()],
    )?;

    let app = Backend::spawn()?.addr;
    let setup = SidecarSetup {
        binary: find_binary(None, "palisade-sidecar", "palisade-sidecar", None)?,
        dir: dir.path(),
        grpc: cp.grpc,
    };
    let id = |i: usize| ids[i].0.as_str();
    let tok = |i: usize| ids[i].1.as_str();
    let inbound = |i: usize, lifetime: &str| {
        setup.start(
            id(i),
            tok(i),
            lifetime,
            "--explicit-inbound",
            app.to_string(),
        )
    };
    let outbound = |i: usize, lifetime: &str, peer: &Sidecar, peer_id: &str| {
        let target = format!("{},{peer_id}", peer.listen);
        setup.start(id(i), tok(i), lifetime, "--explicit-outbound", target)
    };
    let rot_b = inbound(1, "5s")?;
    let rot_a = outbound(0, "5s", &rot_b, id(1))?;
    let still_b = inbound(3, "1h")?;
    let still_a = outbound(2, "1h", &still_b, id(3))?;

    println!(
        "handshake rate: {} closed-loop clients, {} s windows, alternating, {} rounds",
        args.clients, args.window, args.rounds
    );
    let window = Duration::from_secs(args.window);
    let (mut with, mut without, mut failures) = (Vec::new(), Vec::new(), 0);
    for round in 1..=args.rounds {
        let r0 = rot_a.renewals() + rot_b.renewals();
        let (rate_rot, f1) = handshake_rate(rot_a.listen, args.clients, window).await;
        let rotations = rot_a.renewals() + rot_b.renewals() - r0;
        let (rate_still, f2) = handshake_rate(still_a.listen, args.clients, window).await;
        failures += f1 + f2;
        println!(
            "  round {round}: rotating pair {rate_rot:>7.0}/s ({rotations} renewals in the window) | steady pair {rate_still:>7.0}/s"
        );
        with.push(rate_rot);
        without.push(rate_still);
    }
    let (mw, mo) = (
        stats::median(with).unwrap_or_default(),
        stats::median(without).unwrap_or_default(),
    );
    println!(
        "  median: rotating {mw:.0}/s, steady {mo:.0}/s, ratio {:.3}; failed connections: {failures}",
        stats::ratio(mw, mo).unwrap_or(f64::NAN)
    );

    // Renewal cost: two idle sidecars, one renewing 5 s certificates.
    drop((rot_a, rot_b, still_a, still_b));
    let idle_rot = inbound(4, "5s")?;
    let idle_still = inbound(5, "1h")?;
    let clk_tck = procfs::clock_ticks_per_second();
    let cpu_seconds = |s: &Sidecar| -> Result<f64> { Ok(s.proc.cpu_ticks()? as f64 / clk_tck) };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c0, s0, n0) = (
        cpu_seconds(&idle_rot)?,
        cpu_seconds(&idle_still)?,
        idle_rot.renewals(),
    );
    tokio::time::sleep(Duration::from_secs(args.renewal_window)).await;
    let (c1, s1, n1) = (
        cpu_seconds(&idle_rot)?,
        cpu_seconds(&idle_still)?,
        idle_rot.renewals(),
    );
    let n = n1 - n0;
    let per_renewal_ms = if n > 0.0 {
        ((c1 - c0) - (s1 - s0)) / n * 1000.0
    } else {
        f64::NAN
    };
    // Each of the two CPU differences is off by up to a tick.
    let tick_ms = 1000.0 / clk_tck;
    println!(
        "renewal cost: {n} renewals in {} s; rotating sidecar {:.3} CPU-s, idle sidecar {:.3} CPU-s => {per_renewal_ms:.2} CPU-ms per renewal ({tick_ms:.0} ms ticks: ±{:.2} ms)",
        args.renewal_window,
        c1 - c0,
        s1 - s0,
        2.0 * tick_ms / n.max(1.0)
    );
    if failures > 0 {
        bail!("{failures} connections failed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Full handshakes per second through `addr` with `clients` closed-loop
/// clients over `window`, and the connections that failed.
async fn handshake_rate(addr: SocketAddr, clients: usize, window: Duration) -> (f64, u64) {
    let load = ClosedLoop::start(addr, clients);
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let n = load.done();
    let elapsed = start.elapsed().as_secs_f64();
    let errors = load.stop().await;
    (n as f64 / elapsed, errors.count)
}

// === impl SidecarSetup ===

impl SidecarSetup<'_> {
    /// Starts a sidecar for `identity` with certificates of `lifetime` and
    /// one explicit listener (`explicit` is the flag, `target` its upstream),
    /// and waits until it is ready.
    fn start(
        &self,
        identity: &str,
        token: &str,
        lifetime: &str,
        explicit: &str,
        target: String,
    ) -> Result<Sidecar> {
        let admin = free_port()?;
        let listen = free_port()?;
        let token_file = self
            .dir
            .join(format!("{}.token", identity.replace('/', "_")));
        std::fs::write(&token_file, token)?;
        let mut command = Command::new(&self.binary);
        command
            .args([
                "--log-level",
                "warn",
                "run",
                "--transparent=false",
                "--control-plane",
            ])
            .arg(format!("https://{}", self.grpc))
            .arg("--bundle")
            .arg(self.dir.join("ca/ca.crt"))
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
            ]);
        let proc = Proc::spawn(
            identity,
            command,
            Output::Inherit,
            Group::Ours,
            STOP_TIMEOUT,
        )?;
        proc.wait_ready(READY_TIMEOUT, "(/ready did not answer 200)", || {
            Ok(matches!(http_get(admin, "/ready"), Ok((200, _))).then_some(()))
        })?;
        Ok(Sidecar {
            proc,
            admin,
            listen,
        })
    }
}

// === impl Sidecar ===

impl Sidecar {
    /// Its successful renewals so far (0 when `/metrics` does not answer).
    fn renewals(&self) -> f64 {
        http_get(self.admin, "/metrics")
            .map(|(_, m)| metric(&m, "palisade_cert_renewals_total", &[("result", "success")]))
            .unwrap_or_default()
    }
}
