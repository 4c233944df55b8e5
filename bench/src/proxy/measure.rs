//! The measurements of one system in one round: bulk throughput, the
//! connection rate and latency on one pair, and idle-connection memory on a
//! fresh pair; with the CPU both proxies, this process and the whole machine
//! used in each window.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream, task::JoinSet};

use super::{
    config::Settings,
    note,
    systems::{Ctx, Pair, START_TIMEOUT, System},
};
use crate::{
    load::{BULK_BUF, Backend, CONNECT_TIMEOUT, ClosedLoop, echo_conn, wait_echo},
    process::procfs::{MachineTicks, process_ticks},
    stats,
};

/// Latency request and response size.
const LATENCY_MSG: usize = 1024;
/// Latency round trips before the measured ones.
pub const LATENCY_WARMUP: usize = 1000;
/// Idle connections being opened at once in the memory test.
const OPEN_CONCURRENCY: usize = 64;

/// One round's figures of one system (keys as in the JSON).
pub type Figures = BTreeMap<String, f64>;

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

/// The perf tests of one system: bulk, connection rate, latency, on one pair.
pub async fn perf(ctx: &Ctx, sys: System, backend: &Backend, s: &Settings) -> Result<Figures> {
    let pair = match sys {
        System::Direct => None,
        _ => Some(Pair::start(ctx, sys, backend.addr)?),
    };
    let entry = pair.as_ref().map_or(backend.addr, |p| p.entry);
    wait_echo(entry, START_TIMEOUT).await?;
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

/// One stream of 64 KiB writes into the backend's sink: Gbit/s and CPU-s/GB.
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

/// `--clients` closed-loop clients: conn/s and CPU-µs per connection.
async fn conn_rate(
    entry: SocketAddr,
    pair: Option<&Pair>,
    s: &Settings,
    ctx: &Ctx,
    f: &mut Figures,
) -> Result<()> {
    let clients = ClosedLoop::start(entry, s.args.clients);
    tokio::time::sleep(s.warmup).await;
    let (d0, s0) = (clients.done(), Sample::take(pair)?);
    tokio::time::sleep(s.duration).await;
    let (d1, s1) = (clients.done(), Sample::take(pair)?);
    let errors = clients.stop().await;
    let w = s0.until(&s1, ctx.clk_tck);
    let n = d1.saturating_sub(d0) as f64;
    f.insert("connections".into(), n);
    f.insert("conn_per_s".into(), n / w.secs);
    f.insert("conn_errors".into(), errors.count as f64);
    if let Some(e) = errors.first {
        eprintln!("  first connection error: {e}");
    }
    if pair.is_some() && n > 0.0 {
        f.insert("cpu_us_per_conn".into(), w.proxies() * 1e6 / n);
    }
    w.record("conn", f, pair.is_some());
    Ok(())
}

/// 1 KiB request, 1 KiB echo on one kept-alive connection: p50 and p99.
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
    let us = |p: f64| stats::percentile(&samples, p).map_or(f64::NAN, |ns| ns as f64 / 1e3);
    f.insert("p50_us".into(), us(50.0));
    f.insert("p99_us".into(), us(99.0));
    f.insert("latency_samples".into(), samples.len() as f64);
    Ok(())
}

/// The idle-connection memory test on a fresh pair. Never fails the run: what
/// went wrong goes to the notes and the figures say how far it got.
pub async fn memory(
    ctx: &Ctx,
    sys: System,
    backend: &Backend,
    s: &Settings,
    notes: &mut Vec<String>,
    round: usize,
) -> Figures {
    let mut f = Figures::new();
    let started = async {
        let pair = Pair::start(ctx, sys, backend.addr)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = pair.rss()?;
        Ok::<_, anyhow::Error>((pair, idle))
    };
    let (pair, idle) = match started.await {
        Ok(started) => started,
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

// === impl Sample ===

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
            machine_busy: MachineTicks::read()?.busy(),
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

// === impl Window ===

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
