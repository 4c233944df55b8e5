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
//!
//! The modules: [`config`] (flags), [`systems`] (each system and how its pair
//! is started), [`measure`] (the tests of a round), [`tls_check`] (what each
//! side negotiates, and resumption), [`report`] (Markdown and JSON). The
//! crypto reference is [`crate::crypto::HandshakeCost`].

use std::{
    collections::BTreeMap, ffi::OsString, fs, process::ExitCode, sync::Arc, time::SystemTime,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{
    certs::CertFiles,
    crypto::HandshakeCost,
    harness,
    load::Backend,
    process::{Groups, Watchdog, find_binary},
};

pub mod config;
pub mod measure;
pub mod report;
pub mod systems;
pub mod tls_check;

pub use config::Args;

use config::Settings;
use measure::Figures;
use report::Report;
use systems::{Ctx, System};
use tls_check::TlsCheck;

/// What the run collected.
#[derive(Debug, Default)]
pub struct Results {
    /// Per system, one `Figures` per round (perf and memory merged).
    pub rounds: BTreeMap<System, Vec<Figures>>,
    /// Crypto reference per round.
    pub crypto: Vec<HandshakeCost>,
    /// The TLS check of each system, or why it failed.
    pub tls: BTreeMap<System, Result<TlsCheck, String>>,
    /// The issuance benchmark's JSON, with its exit status.
    pub issuance: Option<Value>,
    /// Things that went wrong or need saying, in order.
    pub notes: Vec<String>,
}

/// Runs the benchmark on a runtime with `--client-threads` workers until
/// done, an error, or a signal; dropping the benchmark's future stops every
/// process it started.
pub fn run(args: Args) -> Result<ExitCode> {
    let settings = Settings::new(args)?;
    harness::block_on(settings.args.client_threads, bench(&settings))
}

async fn bench(s: &Settings) -> Result<ExitCode> {
    let started_at = SystemTime::now();
    let mut results = Results::default();
    systems::raise_nofile(&mut results.notes);

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
                ctx.nginx_worker_connections()
            ),
        );
    }
    let facts = report::machine_facts(&ctx);
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
        let missing = info.missing_flags();
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
        let check = tls_check::tls_check(&ctx, sys, &backend)
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
        let crypto = HandshakeCost::measure(s.crypto_duration)?;
        eprintln!(
            "  one mutual handshake: {:.0} µs (X25519), {:.0} µs (X25519MLKEM768)",
            crypto.handshake_us(false),
            crypto.handshake_us(true)
        );
        results.crypto.push(crypto);
        for sys in rotated(&s.systems, round) {
            eprintln!("round {n}/{}: {}", s.rounds, sys.label());
            let figures = match measure::perf(&ctx, sys, &backend, s).await {
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
                let figures = measure::memory(&ctx, sys, &backend, s, &mut results.notes, n).await;
                if let Some(last) = results.rounds.entry(sys).or_default().last_mut() {
                    last.extend(figures);
                }
            }
        }
        add_latency_over_direct(&mut results, round);
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

/// Prints a note and keeps it for the report.
fn note(notes: &mut Vec<String>, text: String) {
    eprintln!("  note: {text}");
    notes.push(text);
}

/// `systems` starting at index `round` (mod len).
fn rotated(systems: &[System], round: usize) -> Vec<System> {
    let n = systems.len();
    (0..n).map(|i| systems[(i + round) % n]).collect()
}

/// Added latency: each system's p50 and p99 minus the direct path's of the
/// same round.
fn add_latency_over_direct(results: &mut Results, round: usize) {
    let direct = results
        .rounds
        .get(&System::Direct)
        .and_then(|r| r.get(round))
        .cloned();
    let Some(direct) = direct else {
        return;
    };
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

/// Runs `palisade-bench-issuance --rounds 1 --json FILE` and returns its JSON.
async fn issuance(s: &Settings, ctx: &Ctx) -> Result<Value> {
    let path = find_binary(
        s.args.issuance_bench.as_deref(),
        "palisade-bench-issuance",
        "palisade-bench -p palisade-control-plane",
        Some("--issuance-bench"),
    )?;
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
    let mut proc = ctx.spawn("issuance", &path, &args)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_round_starts_one_system_further() {
        let all = [System::Direct, System::Palisade, System::Haproxy];
        assert_eq!(rotated(&all, 0), all.to_vec());
        assert_eq!(
            rotated(&all, 1),
            vec![System::Palisade, System::Haproxy, System::Direct]
        );
        assert_eq!(rotated(&all, 3), all.to_vec());
    }
}
