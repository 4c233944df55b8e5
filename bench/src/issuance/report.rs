//! The issuance benchmark's report: one row per figure, a column per round
//! and their median, as a table and as JSON.

use std::{fmt::Write as _, process::ExitStatus, time::Duration};

use serde_json::{Map, Value, json};

use super::{
    config::Args,
    load::{ClientStats, CpuSample, Failures},
};
use crate::{crypto::IssuanceCeiling, process::procfs::MachineTicks, stats};

/// The outcome of one round.
#[derive(Debug)]
pub struct Round {
    /// The crypto ceiling before the load, and after it.
    pub before: IssuanceCeiling,
    pub after: IssuanceCeiling,
    pub stats: ClientStats,
    /// CPU samples at the start and the end of the measured window.
    pub window: (CpuSample, CpuSample),
    pub duration: Duration,
    pub clk_tck: f64,
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

// === impl Round ===

impl Round {
    /// The round's ceiling: the median of the measurements before and after the load.
    fn ceiling(&self) -> IssuanceCeiling {
        IssuanceCeiling::median_of(self.before, self.after)
    }

    fn certs(&self) -> u64 {
        self.stats.latencies_ns.len() as u64
    }

    /// Certificates per second of the measured window.
    pub fn certs_per_second(&self) -> f64 {
        self.certs() as f64 / self.duration.as_secs_f64()
    }

    /// Failed calls, warmup and window.
    pub fn failures(&self) -> u64 {
        self.stats.failures.total()
    }

    /// Latency percentile `p` (nearest rank) in ms; 0 without samples.
    fn latency_ms(&self, p: f64) -> f64 {
        let mut sorted = self.stats.latencies_ns.clone();
        sorted.sort_unstable();
        stats::percentile(&sorted, p).map_or(0.0, |ns| ns as f64 / 1e6)
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
        stats::ratio(cores, self.certs_per_second()).map_or(0.0, |r| r * 1e6)
    }

    /// Cores of the whole machine spent on `part` over the window.
    fn machine_cores(&self, part: impl Fn(&MachineTicks) -> u64) -> f64 {
        self.cores(|s| part(&s.machine))
    }
}

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
                stats::ratio(r.ceiling().crypto_us(), total).unwrap_or(0.0)
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

/// The median of a figure over the rounds, 0 without one.
fn median(rounds: &[Round], value: fn(&Round) -> f64) -> f64 {
    stats::median(rounds.iter().map(value)).unwrap_or(0.0)
}

/// The human-readable report.
pub fn table(
    args: &Args,
    command: &[String],
    rounds: &[Round],
    channels: usize,
    cpus: usize,
    exit: &ExitStatus,
) -> String {
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
    let _ = writeln!(out, "command: {}\n", command.join(" "));
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
                let _ = write!(out, "{:LABEL$}", f.label);
                for r in rounds {
                    let _ = write!(out, "{:>COLUMN$.*}", f.decimals, (f.value)(r));
                }
                let _ = writeln!(out, "{:>COLUMN$.*}", f.decimals, median(rounds, f.value));
            }
        }
    }
    let mut failures = Failures::default();
    for r in rounds {
        failures.merge(r.stats.failures.clone());
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
pub fn json_report(
    command: &[String],
    config: &Value,
    rounds: &[Round],
    exit: &ExitStatus,
) -> Value {
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
        .map(|f| (f.key.to_owned(), json!(median(rounds, f.value))))
        .collect();
    json!({
        "benchmark": "palisade-bench-issuance",
        "command": command,
        "config": config,
        "rounds": per_round,
        "median": medians,
        "failures_total": rounds.iter().map(Round::failures).sum::<u64>(),
        "control_plane_exit": exit.to_string(),
    })
}
