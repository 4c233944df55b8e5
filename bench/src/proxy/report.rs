//! The proxy benchmark's report: the Markdown tables (systems, goals, crypto
//! reference, issuance, TLS check, notes) and the JSON with every figure of
//! every round, both from the medians of the rounds.

use std::{fmt::Write as _, fs, path::Path, time::SystemTime};

use serde_json::{Map, Value, json};

use super::{
    Results,
    config::Settings,
    measure::LATENCY_WARMUP,
    systems::{Ctx, PEERS, System},
    tls_check::{Handshake, PROBE_CONNECTIONS},
};
use crate::{
    crypto::HandshakeCost,
    process::first_line,
    stats::{self, Better},
};

/// What the report is made from.
#[derive(Debug)]
pub struct Report<'a> {
    pub s: &'a Settings,
    pub ctx: &'a Ctx,
    pub results: &'a Results,
    pub facts: &'a [(&'static str, String)],
    pub started_at: SystemTime,
}

/// A goal judged against the best peer's median of the same figure.
#[derive(Debug)]
struct PeerGoal {
    name: &'static str,
    target: &'static str,
    key: &'static str,
    better: Better,
    decimals: usize,
    /// Whether the ratio to the best peer meets the goal.
    met: fn(f64) -> bool,
}

/// The goals against the best peer, in the report's order.
const PEER_GOALS: [PeerGoal; 3] = [
    PeerGoal {
        name: "bulk throughput",
        target: "≥ 1.2 × best peer",
        key: "gbps",
        better: Better::Higher,
        decimals: 2,
        met: |r| r >= 1.2,
    },
    PeerGoal {
        name: "CPU-s per GB",
        target: "lower than every peer",
        key: "cpu_s_per_gb",
        better: Better::Lower,
        decimals: 2,
        met: |r| r < 1.0,
    },
    PeerGoal {
        name: "new connections/s",
        target: "≥ 2 × best peer",
        key: "conn_per_s",
        better: Better::Higher,
        decimals: 0,
        met: |r| r >= 2.0,
    },
];

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

// === impl Report ===

impl Report<'_> {
    /// Median over rounds of `key` for `sys`.
    fn med(&self, sys: System, key: &str) -> Option<f64> {
        let rounds = self.results.rounds.get(&sys)?;
        stats::median(rounds.iter().filter_map(|f| f.get(key).copied()))
    }

    fn crypto(&self, hybrid: bool) -> Option<f64> {
        stats::median(self.results.crypto.iter().map(|c| c.handshake_us(hybrid)))
    }

    fn crypto_op(&self, op: fn(&HandshakeCost) -> f64) -> Option<f64> {
        stats::median(self.results.crypto.iter().map(op))
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

    /// The best peer for a figure: the first of the best medians.
    fn best_peer(&self, key: &str, better: Better) -> Option<(String, f64)> {
        PEERS
            .iter()
            .filter_map(|p| Some((*p, self.med(*p, key)?)))
            .reduce(|a, b| if better.is_better(b.1, a.1) { b } else { a })
            .map(|(p, v)| (p.label().to_owned(), v))
    }

    /// Palisade's goals, for each Palisade system that ran.
    fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        let palisades: Vec<System> = [System::Palisade, System::PalisadePq]
            .into_iter()
            .filter(|s| self.results.rounds.contains_key(s))
            .collect();
        let p99 = self.latency_key("p99");
        for &sys in &palisades {
            let hybrid = sys == System::PalisadePq;
            let goal = |goal, target: &str, value: Option<f64>, reference, decimals| {
                Goal::new(goal, target, sys, value, reference, decimals)
            };
            for g in PEER_GOALS {
                let best = self.best_peer(g.key, g.better);
                let value = self.med(sys, g.key);
                goals.push(goal(g.name, g.target, value, best, g.decimals).met_if(g.met));
            }
            // CPU per connection against the crypto
            let crypto = self
                .crypto(hybrid)
                .map(|c| ("crypto of one mutual handshake".to_owned(), c));
            goals.push(
                goal(
                    "CPU-µs per connection",
                    "≤ 1.5 × crypto cost",
                    self.med(sys, "cpu_us_per_conn"),
                    crypto,
                    0,
                )
                .met_if(|r| r <= 1.5),
            );
            // Latency: compared as values, since added latency can be 0 or below.
            let mut latency = goal(
                if p99.starts_with("added") {
                    "added p99 latency µs"
                } else {
                    "p99 latency µs (no direct path)"
                },
                "≤ best peer",
                self.med(sys, &p99),
                self.best_peer(&p99, Better::Lower),
                1,
            );
            latency.met = match (latency.value, &latency.reference) {
                (Some(v), Some((_, r))) => Some(v <= *r),
                _ => None,
            };
            goals.push(latency);
            // memory per idle connection
            for step in self.steps() {
                let key = format!("kib_per_conn_{step}");
                let haproxy = self
                    .med(System::Haproxy, &key)
                    .map(|v| (System::Haproxy.label().to_owned(), v));
                let name = match step {
                    1000 => "KiB per idle connection @1k",
                    10_000 => "KiB per idle connection @10k",
                    _ => "KiB per idle connection",
                };
                goals.push(
                    goal(name, "≤ 0.5 × haproxy", self.med(sys, &key), haproxy, 1)
                        .met_if(|r| r <= 0.5),
                );
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
                goals.push(
                    goal(
                        "idle sidecar RSS KiB (larger of the two)",
                        "≤ 10 MiB",
                        value,
                        Some(("10 MiB".to_owned(), 10_240.0)),
                        0,
                    )
                    .met_if(|r| r <= 1.0),
                );
            }
        }
        goals
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
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
        let _ = writeln!(out, "- command: `{}`", self.s.command.join(" "));
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
        if let Some(other) = stats::median(
            self.results
                .rounds
                .values()
                .flatten()
                .filter_map(|f| f.get("conn_other_cores").copied()),
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

    /// The JSON report.
    pub fn json(&self) -> Value {
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
            "command": self.s.command,
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
            "crypto_per_round": self.results.crypto.iter().map(HandshakeCost::json).collect::<Vec<_>>(),
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

// === impl Goal ===

impl Goal {
    /// A goal row with its ratio to the reference; not judged yet.
    fn new(
        goal: &'static str,
        target: &str,
        system: System,
        value: Option<f64>,
        reference: Option<(String, f64)>,
        decimals: usize,
    ) -> Self {
        let ratio = value
            .zip(reference.as_ref())
            .and_then(|(v, (_, r))| stats::ratio(v, *r));
        Self {
            goal,
            target: target.to_owned(),
            system,
            value,
            reference,
            ratio,
            met: None,
            decimals,
        }
    }

    /// Judged on the ratio: met when `test` holds for it.
    fn met_if(mut self, test: fn(f64) -> bool) -> Self {
        self.met = self.ratio.map(test);
        self
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

/// `num`, or a dash for a figure that is missing.
fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("—".into(), |v| num(v, decimals))
}

/// The distinct values of `f` over `hs`, joined.
fn summary(hs: &[Handshake], f: impl Fn(&Handshake) -> String) -> String {
    let mut v: Vec<String> = hs.iter().map(f).collect();
    v.dedup();
    v.join(" / ")
}

/// `n` as `1k` for whole thousands.
fn short(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

// === machine facts ===

/// The machine, the versions of every system and the limits, for the report.
pub fn machine_facts(ctx: &Ctx) -> Vec<(&'static str, String)> {
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
    let stunnel = std::process::Command::new("stunnel4")
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
        ("haproxy", first_line(Path::new("haproxy"), &["-v"])),
        ("nginx", first_line(Path::new("nginx"), &["-v"])),
        ("stunnel", stunnel),
        ("openssl", first_line(Path::new("openssl"), &["version"])),
        ("rustc", first_line(Path::new("rustc"), &["--version"])),
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
