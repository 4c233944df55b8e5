//! The discovery benchmark's report: the figures measured once, one column
//! per round with the median and the worst, the goals, as Markdown and JSON.

use std::{fmt::Write as _, process::ExitCode, process::ExitStatus, time::Duration};

use serde_json::{Value, json};

use super::{
    Args,
    cluster::ChangeKind,
    memory::SidecarMemory,
    phases::{Changes, Failures, Resident, Snapshots},
};
use crate::stats::{self, Better};

const MIB: f64 = 1024.0;

/// One round: the changes, the storm, the memory after.
#[derive(Debug)]
pub struct Round {
    pub changes: Changes,
    pub storm: Snapshots,
    pub after: Resident,
}

/// Everything the run measured.
#[derive(Debug)]
pub struct Report<'a> {
    pub command: Vec<String>,
    pub args: &'a Args,
    pub sync: Duration,
    pub synced: Resident,
    pub sidecar: SidecarMemory,
    pub connect: Snapshots,
    pub steady: Resident,
    pub rounds: Vec<Round>,
    pub open_files: Option<u64>,
    pub control_plane_status: ExitStatus,
}

/// A per-round figure: a row of the table and a key of the JSON.
struct Figure {
    key: &'static str,
    label: &'static str,
    better: Better,
    decimals: usize,
    value: Box<dyn Fn(&Round) -> f64>,
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let ns: Vec<u64> = sorted
        .iter()
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .collect();
    stats::percentile(&ns, p).map_or(f64::NAN, |v| v as f64 / 1e6)
}

// === impl Round ===

impl Round {
    /// Per change, when the last stream had it (changes a stream missed are left out).
    fn all_streams(&self, kind: Option<ChangeKind>) -> Vec<Duration> {
        let mut v: Vec<Duration> = self
            .changes
            .delivered
            .iter()
            .filter(|d| kind.is_none_or(|k| d.kind == k))
            .filter_map(|d| d.all())
            .collect();
        v.sort_unstable();
        v
    }

    /// Every (change, stream) delivery.
    fn deliveries(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self
            .changes
            .delivered
            .iter()
            .flat_map(|d| d.latencies.iter().copied())
            .collect();
        v.sort_unstable();
        v
    }

    fn missed(&self) -> usize {
        self.changes
            .delivered
            .iter()
            .filter(|d| d.missed > 0)
            .count()
    }

    /// One line for the terminal.
    pub fn summary(&self) -> String {
        let all = self.all_streams(None);
        format!(
            "  changes: all streams p50 {:.1} ms, p99 {:.1} ms, {} missed; storm: {:.2}s, VmHWM {:.1} MiB, {} failures",
            percentile_ms(&all, 50.0),
            percentile_ms(&all, 99.0),
            self.missed(),
            self.storm.all.as_secs_f64(),
            self.storm.hwm_kib as f64 / MIB,
            self.storm.failures.total,
        )
    }
}

fn figures() -> Vec<Figure> {
    let lower = Better::Lower;
    let mut figures = vec![
        Figure {
            key: "change_all_p50_ms",
            label: "change → every stream, p50 ms",
            better: lower,
            decimals: 1,
            value: Box::new(|r| percentile_ms(&r.all_streams(None), 50.0)),
        },
        Figure {
            key: "change_all_p99_ms",
            label: "change → every stream, p99 ms",
            better: lower,
            decimals: 1,
            value: Box::new(|r| percentile_ms(&r.all_streams(None), 99.0)),
        },
        Figure {
            key: "change_all_max_ms",
            label: "change → every stream, max ms",
            better: lower,
            decimals: 1,
            value: Box::new(|r| percentile_ms(&r.all_streams(None), 100.0)),
        },
    ];
    for kind in ChangeKind::ALL {
        let (key, label) = match kind {
            ChangeKind::PodAdded => ("change_all_p99_ms_pod_added", "… p99 ms, pod added"),
            ChangeKind::AddressMoved => ("change_all_p99_ms_moved", "… p99 ms, address moved"),
            ChangeKind::EndpointRemoved => (
                "change_all_p99_ms_endpoint_removed",
                "… p99 ms, endpoint removed",
            ),
        };
        figures.push(Figure {
            key,
            label,
            better: lower,
            decimals: 1,
            value: Box::new(move |r| percentile_ms(&r.all_streams(Some(kind)), 99.0)),
        });
    }
    figures.extend([
        Figure {
            key: "change_first_stream_p50_ms",
            label: "change → first stream, p50 ms",
            better: lower,
            decimals: 1,
            value: Box::new(|r| {
                let mut v: Vec<Duration> = r
                    .changes
                    .delivered
                    .iter()
                    .filter_map(|d| d.latencies.iter().min().copied())
                    .collect();
                v.sort_unstable();
                percentile_ms(&v, 50.0)
            }),
        },
        Figure {
            key: "delivery_p50_ms",
            label: "per stream and change, p50 ms",
            better: lower,
            decimals: 1,
            value: Box::new(|r| percentile_ms(&r.deliveries(), 50.0)),
        },
        Figure {
            key: "delivery_p99_ms",
            label: "per stream and change, p99 ms",
            better: lower,
            decimals: 1,
            value: Box::new(|r| percentile_ms(&r.deliveries(), 99.0)),
        },
        Figure {
            key: "changes_missed",
            label: "changes a stream missed",
            better: lower,
            decimals: 0,
            value: Box::new(|r| r.missed() as f64),
        },
        Figure {
            key: "change_cp_cpu_ms",
            label: "control-plane CPU per change, ms (whole phase / changes)",
            better: lower,
            decimals: 2,
            value: Box::new(|r| {
                r.changes.server_cpu * 1000.0 / r.changes.delivered.len().max(1) as f64
            }),
        },
        Figure {
            key: "storm_all_s",
            label: "storm: every stream holds a fresh snapshot, s",
            better: lower,
            decimals: 2,
            value: Box::new(|r| r.storm.all.as_secs_f64()),
        },
        Figure {
            key: "storm_stream_p50_s",
            label: "storm: per stream, p50 s",
            better: lower,
            decimals: 2,
            value: Box::new(|r| percentile_ms(&r.storm.per_stream, 50.0) / 1000.0),
        },
        Figure {
            key: "storm_stream_p99_s",
            label: "storm: per stream, p99 s",
            better: lower,
            decimals: 2,
            value: Box::new(|r| percentile_ms(&r.storm.per_stream, 99.0) / 1000.0),
        },
        Figure {
            key: "storm_failures",
            label: "storm: failed connects or streams (retried)",
            better: lower,
            decimals: 0,
            value: Box::new(|r| r.storm.failures.total as f64),
        },
        Figure {
            key: "storm_hwm_mib",
            label: "storm: control-plane peak RSS (VmHWM), MiB",
            better: lower,
            decimals: 1,
            value: Box::new(|r| r.storm.hwm_kib as f64 / MIB),
        },
        Figure {
            key: "storm_rss_sampled_peak_mib",
            label: "storm: control-plane RSS, highest 20 ms sample, MiB",
            better: lower,
            decimals: 1,
            value: Box::new(|r| r.storm.peak_sampled_kib as f64 / MIB),
        },
        Figure {
            key: "storm_cp_cpu_s",
            label: "storm: control-plane CPU s",
            better: lower,
            decimals: 2,
            value: Box::new(|r| r.storm.server_cpu),
        },
        Figure {
            key: "storm_clients_cpu_s",
            label: "storm: this process's CPU s (clients, stand-in)",
            better: lower,
            decimals: 2,
            value: Box::new(|r| r.storm.client_cpu),
        },
        Figure {
            key: "rss_after_mib",
            label: "control-plane RSS after the round settled, MiB",
            better: lower,
            decimals: 1,
            value: Box::new(|r| r.after.rss_kib as f64 / MIB),
        },
    ]);
    figures
}

fn fmt(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "—".to_owned()
    }
}

fn failures_json(f: &Failures) -> Value {
    json!({"total": f.total, "examples": f.examples})
}

// === impl Report ===

impl Report<'_> {
    fn round_values(&self, figure: &Figure) -> Vec<f64> {
        self.rounds.iter().map(|r| (figure.value)(r)).collect()
    }

    fn median_and_worst(&self, figure: &Figure) -> (f64, f64) {
        let values = self.round_values(figure);
        let median = stats::median(values.iter().copied()).unwrap_or(f64::NAN);
        let worst = stats::spread(values).map_or(f64::NAN, |s| s.worst(figure.better));
        (median, worst)
    }

    /// Changes missed, and streams that failed and were retried.
    fn failures(&self) -> u64 {
        let mut all = self.connect.failures.clone();
        for round in &self.rounds {
            all.merge(&round.changes.failures);
            all.merge(&round.storm.failures);
        }
        all.total + self.rounds.iter().map(|r| r.missed() as u64).sum::<u64>()
    }

    /// `FAILURE` if a change missed a stream or a stream failed.
    pub fn exit_code(&self) -> ExitCode {
        if self.failures() == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    fn worst_change_p99(&self) -> f64 {
        let figures = figures();
        self.median_and_worst(&figures[1]).1
    }

    pub fn markdown(&self) -> String {
        let a = self.args;
        let s = &self.sidecar;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### Discovery: {} pods, {} Services, {} streams",
            a.pods, a.services, a.streams
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "- command: `{}`", self.command.join(" "));
        let _ = writeln!(
            out,
            "- cores: {}; open-file limit: {}",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            self.open_files.map_or("?".to_owned(), |n| n.to_string())
        );
        let _ = writeln!(
            out,
            "- method: {} round(s) of {} changes (one at a time, {:?} apart) and a reconnect storm; clients, stand-in API server and control plane on the same machine",
            a.rounds, a.changes, a.pause
        );
        let _ = writeln!(out, "- control plane exit: {}", self.control_plane_status);
        let _ = writeln!(out);
        let _ = writeln!(out, "| measured once | value |");
        let _ = writeln!(out, "| --- | ---: |");
        let rows: Vec<(String, String)> = vec![
            ("control plane synced (start → first snapshot), s".into(), fmt(self.sync.as_secs_f64(), 2)),
            ("control-plane RSS synced, no stream, MiB".into(), fmt(self.synced.rss_kib as f64 / MIB, 1)),
            (format!("control-plane RSS steady, {} streams, MiB", a.streams), fmt(self.steady.rss_kib as f64 / MIB, 1)),
            ("control-plane PSS steady, MiB".into(), fmt(self.steady.pss_kib as f64 / MIB, 1)),
            ("control-plane threads steady".into(), self.steady.threads.to_string()),
            (
                "control-plane RSS per stream (steady − synced), KiB".into(),
                fmt((self.steady.rss_kib as f64 - self.synced.rss_kib as f64) / a.streams as f64, 1),
            ),
            ("first connect: every stream holds a snapshot, s".into(), fmt(self.connect.all.as_secs_f64(), 2)),
            ("first connect: control-plane VmHWM, MiB".into(), fmt(self.connect.hwm_kib as f64 / MIB, 1)),
            (
                "snapshot: addresses / Services / endpoints".into(),
                format!("{} / {} / {}", s.addresses, s.services, s.endpoints),
            ),
            (
                "snapshot: parts, encoded KiB".into(),
                format!("{}, {}", s.parts, fmt(s.encoded_bytes as f64 / 1024.0, 1)),
            ),
            (
                "sidecar `Destinations` with the snapshot applied (addresses and Services): heap MiB (live allocations)".into(),
                format!("{} ({})", fmt(s.destinations.bytes as f64 / 1_048_576.0, 2), s.destinations.allocations),
            ),
        ];
        for (label, value) in rows {
            let _ = writeln!(out, "| {label} | {value} |");
        }
        let _ = writeln!(out);
        let mut header = String::from("| per round |");
        let mut rule = String::from("| --- |");
        for n in 1..=self.rounds.len() {
            let _ = write!(header, " {n} |");
            rule.push_str(" ---: |");
        }
        header.push_str(" median | worst |");
        rule.push_str(" ---: | ---: |");
        let _ = writeln!(out, "{header}\n{rule}");
        for figure in figures() {
            let mut line = format!("| {} |", figure.label);
            for v in self.round_values(&figure) {
                let _ = write!(line, " {} |", fmt(v, figure.decimals));
            }
            let (median, worst) = self.median_and_worst(&figure);
            let _ = write!(
                line,
                " {} | {} |",
                fmt(median, figure.decimals),
                fmt(worst, figure.decimals)
            );
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out);
        let steady_max = self
            .rounds
            .iter()
            .map(|r| r.after.rss_kib)
            .chain([self.steady.rss_kib])
            .max()
            .unwrap_or(0) as f64
            / MIB;
        let sidecar_mib = s.destinations.bytes as f64 / 1_048_576.0;
        let met = |ok: bool| if ok { "met" } else { "**not met**" };
        let change = self.worst_change_p99();
        let _ = writeln!(out, "| goal | target | measured | met |");
        let _ = writeln!(out, "| --- | --- | ---: | --- |");
        let _ = writeln!(
            out,
            "| change → every stream, p99 (worst round) | ≤ 500 ms | {} ms | {} |",
            fmt(change, 1),
            met(change <= 500.0)
        );
        let _ = writeln!(
            out,
            "| control-plane RSS, steady (highest reading) | ≤ 150 MiB | {} MiB | {} |",
            fmt(steady_max, 1),
            met(steady_max <= 150.0)
        );
        let _ = writeln!(
            out,
            "| sidecar discovery state (`Destinations`) | ≤ 4 MiB | {} MiB | {} |",
            fmt(sidecar_mib, 2),
            met(sidecar_mib <= 4.0)
        );
        let _ = writeln!(out);
        let mut failures = self.connect.failures.clone();
        for r in &self.rounds {
            failures.merge(&r.changes.failures);
            failures.merge(&r.storm.failures);
        }
        let _ = writeln!(
            out,
            "Failed connects or streams (each retried): {}{}",
            failures.total,
            if failures.examples.is_empty() {
                String::new()
            } else {
                format!("; e.g. {}", failures.examples.join("; "))
            }
        );
        if !self.connect.hwm_reset {
            let _ = writeln!(
                out,
                "\nVmHWM could not be reset (`/proc/PID/clear_refs`): the peaks are since the control plane started."
            );
        }
        out
    }

    pub fn json(&self) -> Value {
        let rounds: Vec<Value> = self
            .rounds
            .iter()
            .map(|r| {
                let mut m = serde_json::Map::new();
                for f in figures() {
                    m.insert(f.key.into(), json!((f.value)(r)));
                }
                m.insert(
                    "changes_failures".into(),
                    failures_json(&r.changes.failures),
                );
                m.insert(
                    "storm_failures_detail".into(),
                    failures_json(&r.storm.failures),
                );
                Value::Object(m)
            })
            .collect();
        let s = &self.sidecar;
        json!({
            "command": self.command,
            "pods": self.args.pods,
            "services": self.args.services,
            "streams": self.args.streams,
            "changes": self.args.changes,
            "sync_s": self.sync.as_secs_f64(),
            "rss_synced_kib": self.synced.rss_kib,
            "rss_steady_kib": self.steady.rss_kib,
            "pss_steady_kib": self.steady.pss_kib,
            "first_connect_s": self.connect.all.as_secs_f64(),
            "first_connect_hwm_kib": self.connect.hwm_kib,
            "snapshot_parts": s.parts,
            "snapshot_encoded_bytes": s.encoded_bytes,
            "snapshot_addresses": s.addresses,
            "snapshot_services": s.services,
            "snapshot_endpoints": s.endpoints,
            "sidecar_destinations_bytes": s.destinations.bytes,
            "sidecar_destinations_allocations": s.destinations.allocations,
            "rounds": rounds,
        })
    }
}
