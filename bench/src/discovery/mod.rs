//! `palisade-bench-discovery`: one control plane following a large cluster,
//! with a sidecar discovery stream per meshed pod on this machine.
//!
//! The setup: the stand-in Kubernetes API server of the whole-system tests
//! (`palisade_tests::kube::ApiServer`, in this process) holds `--pods` pods,
//! `--services` Services and one EndpointSlice per Service (see
//! [`cluster`]). `palisade-control-plane serve --discovery-source kubernetes`
//! follows it (list + watch through kube-rs, as in a cluster), with a fresh
//! root from `ca init` and the static authenticator. `--streams` of the pods
//! sit on loopback addresses; each gets a certificate for its identity from
//! the real `Certify` and opens a `Watch` stream over mTLS from its pod's
//! address, as the control plane requires (see [`streams`]).
//!
//! What is measured, in this order:
//!
//! 1. **Sync and one sidecar's memory.** A probe stream takes the first
//!    snapshot (the time from starting the control plane is the sync time);
//!    the control plane's RSS with no stream open. Then the heap that
//!    `palisade_sidecar::discovery::Destinations` holds with that snapshot
//!    applied part by part (addresses and Services), counted by the
//!    allocator (see [`memory`]).
//! 2. **All streams connect at once**, and every one holds a complete
//!    snapshot (its last part, `partial = false`): the time, then the
//!    control plane's steady RSS after `--settle`.
//! 3. **Each round:** `--changes` changes (pod added, pod address moved,
//!    endpoint removed, in turn), made one at a time in the stand-in. A
//!    change is timed per stream from the moment the stand-in's upsert
//!    returns (its watch event is then out) to the moment the stream
//!    receives the message naming the change's address; the figure is the
//!    time until the last stream has it, p50/p99 over the changes. The next
//!    change is made `--pause` after the last stream had the previous one.
//!    Then a **reconnect storm**: every stream drops its connection and
//!    reconnects at once (TCP, mTLS, a new `Watch`, a whole snapshot). The
//!    time until every stream holds its fresh snapshot; the control plane's
//!    peak memory over the storm (VmHWM, reset through `/proc/PID/clear_refs`
//!    when the storm begins, and RSS sampled every 20 ms); its CPU.
//!    The control plane's RSS after `--settle` closes the round.
//!
//! What to know when reading the figures:
//!
//! - Everything runs on this machine: the stream clients, the stand-in API
//!   server and the control plane share its cores. A stream client decodes
//!   every message it receives (as a sidecar does) but keeps no state, so
//!   1,000 clients do not hold 1,000 copies of the cluster; their CPU is
//!   reported beside the control plane's.
//! - The changes are made one at a time: the latency is that of the path
//!   (stand-in watch → kube-rs → model → broadcast → encode → TLS → decode),
//!   not of a queue under a change rate.
//! - Memory per sidecar is heap bytes requested and not freed, not RSS;
//!   the allocator's overhead per allocation is not in it.
//!
//! Run it from release builds; the control plane is found next to this binary:
//!
//! ```text
//! cargo build --release -p palisade-control-plane -p palisade-bench --bin palisade-control-plane --bin palisade-bench-discovery
//! ./target/release/palisade-bench-discovery --rounds 3
//! ./target/release/palisade-bench-discovery --pods 500 --services 50 --streams 20 --changes 30 --rounds 1
//! ```
//!
//! The exit code is non-zero if a change missed a stream or a stream
//! failed. The modules: [`config`] (flags), [`cluster`] (the synthetic
//! cluster and its changes), [`streams`] (certificates and stream clients),
//! [`phases`] (the measured phases), [`memory`] (one sidecar's state),
//! [`report`] (table and JSON).

use std::{alloc::System, fs, process::ExitCode, time::Instant};

use anyhow::{Context, Result};
use palisade_tests::kube::ApiServer;
use stats_alloc::StatsAlloc;

use crate::{
    control_plane::{self, ControlPlane},
    harness,
};

pub mod cluster;
pub mod config;
pub mod memory;
pub mod phases;
pub mod report;
pub mod streams;

pub use config::Args;

use cluster::Cluster;
use report::{Report, Round};
use streams::Clients;

/// Runs the benchmark on a runtime with `--client-threads` workers until
/// done or a signal. `alloc` is the binary's global allocator, counting.
pub fn run(args: Args, alloc: &'static StatsAlloc<System>) -> Result<ExitCode> {
    args.check()?;
    let limit = raise_open_file_limit();
    harness::block_on(args.client_threads, bench(&args, alloc, limit))
}

/// Raises the soft open-file limit to the hard one; returns the limit now.
fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current
}

fn token(index: usize) -> String {
    format!("discovery-bench-{index:06}")
}

async fn bench(
    args: &Args,
    alloc: &'static StatsAlloc<System>,
    open_files: Option<u64>,
) -> Result<ExitCode> {
    let binary = args.control_plane_binary()?;
    if let Some(limit) = open_files {
        // This process holds a socket per stream; the control plane as many.
        anyhow::ensure!(
            limit as usize > args.streams + 256,
            "the open-file limit is {limit}: too low for --streams {} (raise `ulimit -n`)",
            args.streams
        );
    }
    // Declared before the control plane, so it is removed after the process stopped.
    let dir = tempfile::Builder::new()
        .prefix("palisade-bench-discovery-")
        .tempdir()
        .context("creating a temporary directory")?;
    let ca_dir = dir.path().join("ca");
    control_plane::ca_init(&binary, &ca_dir)?;
    let ca_pem = fs::read(ca_dir.join("ca.crt")).context("reading the new root ca.crt")?;

    let mut cluster = Cluster::new(args.pods, args.services, args.streams);
    let stream_pods = cluster.stream_pods();
    let tokens_dir = dir.path().join("tokens");
    fs::create_dir(&tokens_dir).context("creating the token directory")?;
    let tokens = tokens_dir.join("tokens.yaml");
    fs::write(
        &tokens,
        control_plane::token_file(
            stream_pods
                .iter()
                .enumerate()
                .map(|(i, p)| (token(i), p.identity.clone())),
        ),
    )
    .context("writing the static token file")?;

    eprintln!(
        "stand-in API server: {} pods, {} Services, {} EndpointSlices",
        args.pods, args.services, args.services
    );
    let mut builder = ApiServer::builder();
    for object in cluster.objects() {
        builder = builder.object(object);
    }
    let api = builder
        .start()
        .await
        .context("starting the stand-in API server")?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, None)
        .context("writing the kubeconfig")?;

    let started = Instant::now();
    let mut cp = ControlPlane::start_with_env(
        &binary,
        &ca_dir,
        &tokens,
        &dir.path().join("control-plane.log"),
        &args.log_level,
        &["--discovery-source".into(), "kubernetes".into()],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )?;
    let pid = cp.pid();
    eprintln!(
        "control plane {} (pid {pid}) serving gRPC on {}",
        binary.display(),
        cp.grpc
    );

    eprintln!("certifying {} stream identities", args.streams);
    let credentials = streams::certify_all(&stream_pods, cp.grpc, &ca_pem, token).await?;

    eprintln!("probe stream: waiting for the control plane to sync");
    let parts = streams::probe(&credentials[0], cp.grpc, started + args.snapshot_timeout).await?;
    let sync = started.elapsed();
    tokio::time::sleep(args.settle).await;
    let synced = phases::resident(pid).await?;
    let sidecar = memory::measure(&parts, alloc)?;
    drop(parts);
    eprintln!(
        "synced in {:.1}s; one sidecar's Destinations: {} addresses, {:.2} MiB",
        sync.as_secs_f64(),
        sidecar.addresses,
        sidecar.destinations.bytes as f64 / 1_048_576.0
    );

    eprintln!("{} streams connecting at once", args.streams);
    let mut clients = Clients::start(credentials, cp.grpc);
    let connect =
        phases::snapshots(&mut clients, pid, 0, args.streams, args.snapshot_timeout).await?;
    eprintln!(
        "all streams hold a snapshot after {:.2}s",
        connect.all.as_secs_f64()
    );
    tokio::time::sleep(args.settle).await;
    let steady = phases::resident(pid).await?;

    let mut rounds = Vec::with_capacity(args.rounds);
    let mut next_id = 1;
    for n in 1..=args.rounds {
        eprintln!("round {n}/{}: {} changes", args.rounds, args.changes);
        let changes = phases::changes(&mut clients, &api, &mut cluster, args, next_id, pid).await?;
        next_id += args.changes as u64;
        eprintln!("round {n}/{}: reconnect storm", args.rounds);
        let generation = n as u64;
        let storm = phases::snapshots(
            &mut clients,
            pid,
            generation,
            args.streams,
            args.snapshot_timeout,
        )
        .await?;
        tokio::time::sleep(args.settle).await;
        let after = phases::resident(pid).await?;
        let round = Round {
            changes,
            storm,
            after,
        };
        eprintln!("{}", round.summary());
        rounds.push(round);
    }

    clients.stop().await;
    let status = cp.stop()?;
    api.shutdown().await;
    let report = Report {
        command: std::env::args().collect(),
        args,
        sync,
        synced,
        sidecar,
        connect,
        steady,
        rounds,
        open_files,
        control_plane_status: status,
    };
    println!("{}", report.markdown());
    if let Some(path) = &args.json {
        fs::write(path, report.json().to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.exit_code())
}
