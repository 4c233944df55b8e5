//! The measured phases: every stream holding a snapshot (at the start and
//! after a storm), the changes, and the control plane's memory meanwhile.

use std::{
    collections::BTreeMap,
    fs,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use palisade_tests::kube::ApiServer;

use super::{
    Args,
    cluster::{ChangeKind, Cluster},
    streams::{Clients, Event},
};
use crate::process::procfs;

/// How often the storm's RSS sampler reads `/proc/PID/status`.
const RSS_EVERY: Duration = Duration::from_millis(20);
/// Failure messages kept for the report.
const FAILURE_EXAMPLES: usize = 5;

/// Failed connects and streams by message, with a few examples.
#[derive(Clone, Debug, Default)]
pub struct Failures {
    pub total: u64,
    pub examples: Vec<String>,
}

/// Every stream getting a complete snapshot.
#[derive(Debug)]
pub struct Snapshots {
    /// From the start (the storm signal) to the last stream's snapshot.
    pub all: Duration,
    /// Each stream's time to its snapshot, sorted.
    pub per_stream: Vec<Duration>,
    /// Encoded bytes of one stream's snapshot.
    pub bytes: usize,
    pub failures: Failures,
    /// Control plane and this process: CPU seconds.
    pub server_cpu: f64,
    pub client_cpu: f64,
    /// The control plane's memory: VmHWM since the phase began (or since it
    /// started, when the peak could not be reset), and the highest RSS sampled.
    pub hwm_kib: u64,
    pub hwm_reset: bool,
    pub peak_sampled_kib: u64,
}

/// One change and when each stream received it.
#[derive(Debug)]
pub struct Delivered {
    pub kind: ChangeKind,
    /// Per stream that received it, from the upsert's return.
    pub latencies: Vec<Duration>,
    /// Streams that did not receive it within `--change-timeout`.
    pub missed: usize,
}

/// The changes of one round.
#[derive(Debug)]
pub struct Changes {
    pub delivered: Vec<Delivered>,
    pub failures: Failures,
    /// Control-plane CPU seconds over the phase, and the phase's length.
    pub server_cpu: f64,
    pub elapsed: Duration,
}

/// The control plane's resident memory now.
#[derive(Clone, Copy, Debug, Default)]
pub struct Resident {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub threads: u64,
}

/// Samples a process's RSS until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

// === impl Failures ===

impl Failures {
    fn record(&mut self, stream: usize, why: String) {
        self.total += 1;
        if self.examples.len() < FAILURE_EXAMPLES {
            self.examples.push(format!("stream {stream}: {why}"));
        }
    }

    pub fn merge(&mut self, other: &Self) {
        self.total += other.total;
        let room = FAILURE_EXAMPLES.saturating_sub(self.examples.len());
        self.examples
            .extend(other.examples.iter().take(room).cloned());
    }
}

// === impl Delivered ===

impl Delivered {
    /// When the last stream had it; `None` when a stream missed it.
    pub fn all(&self) -> Option<Duration> {
        if self.missed > 0 {
            return None;
        }
        self.latencies.iter().max().copied()
    }
}

// === impl Sampler ===

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                if let Ok(kib) = procfs::status_value(pid, "VmRSS") {
                    peak = peak.max(kib);
                }
                std::thread::sleep(RSS_EVERY);
            }
            peak
        });
        Self { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// The control plane's RSS, PSS and threads: the median of 5 readings 200 ms apart.
pub async fn resident(pid: u32) -> Result<Resident> {
    let mut readings = Vec::new();
    for _ in 0..5 {
        readings.push(Resident {
            rss_kib: procfs::status_value(pid, "VmRSS")?,
            pss_kib: procfs::pss_kib(pid).unwrap_or(0),
            threads: procfs::status_value(pid, "Threads").unwrap_or(0),
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    readings.sort_by_key(|r| r.rss_kib);
    Ok(readings[readings.len() / 2])
}

/// Resets the process's VmHWM to its RSS now (`clear_refs` 5); whether it could.
fn reset_peak(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Waits until every one of `streams` streams reports a complete snapshot
/// of storm `generation`; the CPU and memory of the control plane `pid`
/// meanwhile. Generation 0 is the clients' first connect (they were just
/// started); any other is a storm, which this starts once the clock runs.
pub async fn snapshots(
    clients: &mut Clients,
    pid: u32,
    generation: u64,
    streams: usize,
    timeout: Duration,
) -> Result<Snapshots> {
    let hwm_reset = reset_peak(pid);
    let sampler = Sampler::start(pid);
    let clk_tck = procfs::clock_ticks_per_second();
    let (server0, client0) = (
        procfs::process_ticks(&pid.to_string())?,
        procfs::process_ticks("self")?,
    );
    let began = Instant::now();
    if generation > 0 {
        clients.storm.send_replace(generation);
    }
    let deadline = began + timeout;
    let mut at: Vec<Option<Duration>> = vec![None; streams];
    let mut have = 0;
    let mut bytes = 0;
    let mut failures = Failures::default();
    while have < streams {
        let event = tokio::time::timeout_at(deadline.into(), clients.events.recv()).await;
        match event {
            Err(_) => {
                sampler.finish();
                bail!(
                    "{have} of {streams} streams held a snapshot after {timeout:?}; failures {}: {:?}",
                    failures.total,
                    failures.examples
                );
            }
            Ok(None) => bail!("every stream client stopped"),
            Ok(Some(Event::Snapshot {
                stream,
                generation: g,
                at: when,
                bytes: b,
                ..
            })) if g == generation && at[stream].is_none() => {
                at[stream] = Some(when.saturating_duration_since(began));
                bytes = bytes.max(b);
                have += 1;
            }
            Ok(Some(Event::Failed { stream, why })) => failures.record(stream, why),
            Ok(Some(_)) => {}
        }
    }
    let all = began.elapsed();
    let peak_sampled_kib = sampler.finish();
    let (server1, client1) = (
        procfs::process_ticks(&pid.to_string())?,
        procfs::process_ticks("self")?,
    );
    let mut per_stream: Vec<Duration> = at.into_iter().flatten().collect();
    per_stream.sort_unstable();
    Ok(Snapshots {
        all,
        per_stream,
        bytes,
        failures,
        server_cpu: server1.saturating_sub(server0) as f64 / clk_tck,
        client_cpu: client1.saturating_sub(client0) as f64 / clk_tck,
        hwm_kib: procfs::status_value(pid, "VmHWM")?,
        hwm_reset,
        peak_sampled_kib,
    })
}

/// Makes `--changes` changes one after another, each once the previous one
/// reached every stream (or timed out), and times each stream's receipt
/// from the moment the stand-in's upsert returned (its watch event is out).
pub async fn changes(
    clients: &mut Clients,
    api: &ApiServer,
    cluster: &mut Cluster,
    args: &Args,
    first_id: u64,
    pid: u32,
) -> Result<Changes> {
    let (count, streams, timeout) = (args.changes, args.streams, args.change_timeout);
    let clk_tck = procfs::clock_ticks_per_second();
    let server0 = procfs::process_ticks(&pid.to_string())?;
    let phase = Instant::now();
    let mut failures = Failures::default();
    let mut delivered = Vec::with_capacity(count);
    for n in 0..count {
        let id = first_id + n as u64;
        let change = cluster.next_change();
        clients.in_flight.set(Some((id, change.marker.clone())));
        api.upsert(change.object)
            .with_context(|| format!("the stand-in refused change {id}"))?;
        let made = Instant::now();
        let deadline = made + timeout;
        let mut at: BTreeMap<usize, Duration> = BTreeMap::new();
        while at.len() < streams {
            let event = match tokio::time::timeout_at(deadline.into(), clients.events.recv()).await
            {
                Err(_) => break,
                Ok(None) => bail!("every stream client stopped"),
                Ok(Some(event)) => event,
            };
            match event {
                Event::Change {
                    stream,
                    change,
                    at: when,
                }
                | Event::Snapshot {
                    stream,
                    marker: Some(change),
                    at: when,
                    ..
                } if change == id => {
                    at.entry(stream)
                        .or_insert(when.saturating_duration_since(made));
                }
                Event::Failed { stream, why } => failures.record(stream, why),
                _ => {}
            }
        }
        clients.in_flight.set(None);
        delivered.push(Delivered {
            kind: change.kind,
            missed: streams - at.len(),
            latencies: at.into_values().collect(),
        });
        tokio::time::sleep(args.pause).await;
    }
    let server1 = procfs::process_ticks(&pid.to_string())?;
    Ok(Changes {
        delivered,
        failures,
        server_cpu: server1.saturating_sub(server0) as f64 / clk_tck,
        elapsed: phase.elapsed(),
    })
}
