//! The identity lifecycle in control-plane mode: sidecars obtain their
//! certificates from the real control plane, renew them on schedule with a
//! fresh key each time, and keep serving across rotations, root rotations and
//! control-plane outages; connections opened before a rotation are untouched
//! by it.

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use palisade_tests::{ControlPlane, eventually_async, http_get, metric};
use support::{Sidecar, echo_app};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const A: &str = "spiffe://cluster.local/ns/a/sa/client";
const B: &str = "spiffe://cluster.local/ns/b/sa/server";
const TOKEN_A: &str = "token-a-0123456789";
const TOKEN_B: &str = "token-b-0123456789";

/// A control plane and two sidecars in control-plane mode: `a` (explicit
/// outbound) -> `b` (explicit inbound) -> an echo app.
struct Mesh {
    cp: ControlPlane,
    a: Sidecar,
    b: Sidecar,
}

async fn mesh(dir: &Path, cp: ControlPlane, lifetime: &str, extra: &[&str]) -> Mesh {
    let bundle = cp.ca_dir.join("ca.crt");
    mesh_with_bundle(dir, cp, &bundle, lifetime, extra).await
}

/// Like [`mesh`], with the sidecars' bundle file at `bundle`.
async fn mesh_with_bundle(
    dir: &Path,
    cp: ControlPlane,
    bundle: &Path,
    lifetime: &str,
    extra: &[&str],
) -> Mesh {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    for (name, token) in [("a.token", TOKEN_A), ("b.token", TOKEN_B)] {
        std::fs::write(dir.join(name), token).expect("token file");
    }
    let source = |name: &str, identity: &str| -> Vec<String> {
        let mut args: Vec<String> = [
            "--control-plane",
            &format!("https://{}", cp.grpc_addr),
            "--bundle",
            &bundle.display().to_string(),
            "--identity",
            identity,
            "--token-file",
            &dir.join(name).display().to_string(),
            "--lifetime",
            lifetime,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let app = echo_app().await;
    let b_source = source("b.token", B);
    let b_source: Vec<&str> = b_source.iter().map(String::as_str).collect();
    let b = Sidecar::start_with(
        &b_source,
        &["--explicit-inbound", &format!("127.0.0.1:0={app}")],
    )
    .await;
    let a_source = source("a.token", A);
    let a_source: Vec<&str> = a_source.iter().map(String::as_str).collect();
    let a = Sidecar::start_with(
        &a_source,
        &[
            "--explicit-outbound",
            &format!("127.0.0.1:0={},{B}", b.inbound[0]),
        ],
    )
    .await;
    let mesh = Mesh { cp, a, b };
    mesh.wait_for(Duration::from_secs(10), "the first certificates", |m| {
        m.renewals(&m.a) >= 1.0 && m.renewals(&m.b) >= 1.0
    })
    .await;
    mesh
}

impl Mesh {
    fn renewals(&self, s: &Sidecar) -> f64 {
        metric(
            &s.metrics(),
            "palisade_cert_renewals_total",
            &[("result", "success")],
        )
    }

    fn renewal_failures(&self, s: &Sidecar) -> f64 {
        metric(
            &s.metrics(),
            "palisade_cert_renewals_total",
            &[("result", "failure")],
        )
    }

    /// When the sidecar's certificate in use expires.
    fn expiry(&self, s: &Sidecar) -> SystemTime {
        let secs = metric(
            &s.metrics(),
            "palisade_cert_expiration_timestamp_seconds",
            &[],
        );
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs)
    }

    fn failed_handshakes(&self) -> f64 {
        metric(
            &self.a.metrics(),
            "palisade_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "failure")],
        ) + metric(
            &self.b.metrics(),
            "palisade_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "failure")],
        )
    }

    async fn wait_for(&self, timeout: Duration, what: &str, cond: impl Fn(&Self) -> bool) {
        eventually_async(timeout, what, || async { cond(self).then_some(()) }).await
    }
}

/// One connection through `addr` gets its line echoed within 5 s.
async fn assert_echoes(addr: SocketAddr, what: &str) {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"hello\n").await.expect("write");
    let mut back = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut back))
        .await
        .unwrap_or_else(|_| panic!("{what}: no echo within 5 s"))
        .expect("echo");
    assert_eq!(&back, b"hello\n", "{what}");
}

/// Traffic through the mesh while a test changes things underneath: new
/// connections at a fixed rate and long-lived streams checking every byte.
struct Load {
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    connection_failures: Arc<AtomicU64>,
    stream_bytes: Arc<AtomicU64>,
    stream_failures: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, per_second: u64, streams: usize) -> Self {
        let load = Self {
            stop: Arc::new(AtomicBool::new(false)),
            connections: Arc::new(AtomicU64::new(0)),
            connection_failures: Arc::new(AtomicU64::new(0)),
            stream_bytes: Arc::new(AtomicU64::new(0)),
            stream_failures: Arc::new(AtomicU64::new(0)),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        {
            let (stop, ok, failed) = (
                load.stop.clone(),
                load.connections.clone(),
                load.connection_failures.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
                let mut inflight = tokio::task::JoinSet::new();
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let (ok, failed) = (ok.clone(), failed.clone());
                    inflight.spawn(async move {
                        let result = tokio::time::timeout(Duration::from_secs(10), async {
                            let mut c = TcpStream::connect(addr).await?;
                            c.write_all(b"hello\n").await?;
                            let mut back = [0u8; 6];
                            c.read_exact(&mut back).await?;
                            anyhow::ensure!(&back == b"hello\n", "wrong echo");
                            Ok::<_, anyhow::Error>(())
                        })
                        .await;
                        match result {
                            Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    });
                    while inflight.try_join_next().is_some() {}
                }
                while inflight.join_next().await.is_some() {}
            }));
        }
        for i in 0..streams {
            let (stop, bytes, failed) = (
                load.stop.clone(),
                load.stream_bytes.clone(),
                load.stream_failures.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let result = async {
                    let mut c = TcpStream::connect(addr).await?;
                    let mut chunk = vec![0u8; 4096];
                    let mut back = vec![0u8; 4096];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for (j, b) in chunk.iter_mut().enumerate() {
                            *b = (n as usize * 31 + j * 7 + i) as u8;
                        }
                        c.write_all(&chunk).await?;
                        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut back))
                            .await??;
                        anyhow::ensure!(back == chunk, "stream {i} got different bytes back");
                        bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                if let Err(error) = result {
                    eprintln!("stream {i} broke: {error:#}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        Self { tasks, ..load }
    }

    /// Waits until `n` more connections have been echoed.
    async fn more_connections(&self, n: u64, what: &str) {
        let from = self.connections.load(Ordering::Relaxed);
        eventually_async(Duration::from_secs(20), what, || async {
            (self.connections.load(Ordering::Relaxed) >= from + n).then_some(())
        })
        .await
    }

    async fn finish(self) -> (u64, u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        (
            self.connections.load(Ordering::Relaxed),
            self.connection_failures.load(Ordering::Relaxed),
            self.stream_bytes.load(Ordering::Relaxed),
            self.stream_failures.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_rotations_under_load_fail_no_handshake_and_break_no_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(
        dir.path(),
        &[(TOKEN_A, A), (TOKEN_B, B)],
        &["--min-lifetime", "5s"],
    )
    .expect("control plane");
    let mesh = mesh(dir.path(), cp, "6s", &[]).await;

    let started = Instant::now();
    let load = Load::start(mesh.a.outbound[0], 220, 50);
    let (a0, b0) = (mesh.renewals(&mesh.a), mesh.renewals(&mesh.b));
    mesh.wait_for(Duration::from_secs(90), "ten rotations on each side", |m| {
        m.renewals(&m.a) >= a0 + 10.0 && m.renewals(&m.b) >= b0 + 10.0
    })
    .await;
    let (connections, connection_failures, stream_bytes, stream_failures) = load.finish().await;
    let elapsed = started.elapsed().as_secs_f64();
    let rate = connections as f64 / elapsed;
    eprintln!(
        "{:.0} s: {} / {} rotations (a / b), {connections} new connections ({rate:.0}/s), \
         50 streams carried {stream_bytes} bytes each way",
        elapsed,
        mesh.renewals(&mesh.a) - a0,
        mesh.renewals(&mesh.b) - b0,
    );
    assert_eq!(connection_failures, 0, "every new connection got its echo");
    assert_eq!(
        stream_failures, 0,
        "no long-lived stream broke or corrupted a byte"
    );
    assert_eq!(mesh.failed_handshakes(), 0.0, "zero failed handshakes");
    assert_eq!(
        mesh.renewal_failures(&mesh.a) + mesh.renewal_failures(&mesh.b),
        0.0
    );
    assert!(
        rate >= 200.0,
        "the load was at least 200 new connections/s: {rate:.0}"
    );
    assert!(stream_bytes > 0);
}

fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_under_traffic_without_a_restart() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(
        dir.path(),
        &[(TOKEN_A, A), (TOKEN_B, B)],
        &["--min-lifetime", "5s"],
    )
    .expect("control plane");
    let ca_dir = cp.ca_dir.clone();
    let mesh = mesh(dir.path(), cp, "6s", &[]).await;
    let roots = |s: &Sidecar| metric(&s.metrics(), "palisade_trust_bundle_roots", &[]);
    let load = Load::start(mesh.a.outbound[0], 50, 10);

    // A new root B and an issuer under it.
    let root_b_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut root_b = CertificateParams::default();
    root_b.distinguished_name.push(DnType::CommonName, "root B");
    root_b.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_b.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_b_pem = root_b.self_signed(&root_b_key).expect("self-sign").pem();
    let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut issuer = CertificateParams::default();
    issuer
        .distinguished_name
        .push(DnType::CommonName, "issuer B1");
    issuer.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    issuer.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    issuer.use_authority_key_identifier_extension = true;
    let issuer_pem = issuer
        .signed_by(&issuer_key, &Issuer::from_params(&root_b, &root_b_key))
        .expect("sign")
        .pem();
    let root_a_pem = std::fs::read_to_string(ca_dir.join("ca.crt")).expect("root A");

    // 1. Trust both roots; every sidecar picks the two-root bundle up at its next renewal.
    write_atomically(&ca_dir.join("ca.crt"), &format!("{root_a_pem}{root_b_pem}"));
    mesh.wait_for(
        Duration::from_secs(20),
        "both sidecars to trust two roots",
        |m| roots(&m.a) == 2.0 && roots(&m.b) == 2.0,
    )
    .await;
    // 2. Issue from B1 (the key first: a half-written pair is refused, A keeps signing).
    write_atomically(&ca_dir.join("tls.key"), &issuer_key.serialize_pem());
    write_atomically(
        &ca_dir.join("tls.crt"),
        &format!("{issuer_pem}{root_b_pem}"),
    );
    let (a1, b1) = (mesh.renewals(&mesh.a), mesh.renewals(&mesh.b));
    mesh.wait_for(
        Duration::from_secs(20),
        "certificates from the new issuer on both sides",
        |m| m.renewals(&m.a) >= a1 + 2.0 && m.renewals(&m.b) >= b1 + 2.0,
    )
    .await;
    // 3. Drop root A.
    write_atomically(&ca_dir.join("ca.crt"), &root_b_pem);
    mesh.wait_for(
        Duration::from_secs(20),
        "both sidecars to trust root B only",
        |m| roots(&m.a) == 1.0 && roots(&m.b) == 1.0,
    )
    .await;
    load.more_connections(100, "traffic with root B alone")
        .await;

    let (connections, connection_failures, _, stream_failures) = load.finish().await;
    eprintln!("{connections} connections across the root rotation");
    assert_eq!(
        connection_failures, 0,
        "no connection failed during the root rotation"
    );
    assert_eq!(
        stream_failures, 0,
        "no stream broke during the root rotation"
    );
    assert_eq!(mesh.failed_handshakes(), 0.0, "zero failed handshakes");
    let issued_by = metric(
        &mesh.cp.metrics().expect("cp metrics"),
        "palisade_ca_reloads_total",
        &[("source", "issuer"), ("result", "success")],
    );
    assert!(
        issued_by >= 3.0,
        "the control plane took every step without a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_ride_out_a_control_plane_outage_and_fail_closed_past_expiry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(
        dir.path(),
        &[(TOKEN_A, A), (TOKEN_B, B)],
        &["--min-lifetime", "5s"],
    )
    .expect("control plane");
    // The sidecars know the control plane by address: it comes back on the
    // port it had.
    let grpc = cp.grpc_addr.to_string();
    let cp_args = ["--min-lifetime", "5s", "--grpc-addr", &grpc];
    let (ca_dir, tokens) = (cp.ca_dir.clone(), cp.tokens.clone());
    let mut mesh = mesh(dir.path(), cp, "10s", &["--retry-cap", "1s"]).await;
    let ready = |s: &Sidecar| http_get(s.admin, "/ready").expect("ready").0;

    // 1. An outage longer than a renewal interval, starting right after a renewal.
    let (a0, b0) = (mesh.renewals(&mesh.a), mesh.renewals(&mesh.b));
    mesh.wait_for(Duration::from_secs(15), "fresh renewals", |m| {
        m.renewals(&m.a) > a0 && m.renewals(&m.b) > b0
    })
    .await;
    let load = Load::start(mesh.a.outbound[0], 20, 5);
    mesh.cp
        .terminate(Duration::from_secs(10))
        .expect("control plane stops");
    mesh.wait_for(
        Duration::from_secs(15),
        "renewals to fail, and be counted, while the control plane is away",
        |m| m.renewal_failures(&m.a) >= 1.0 && m.renewal_failures(&m.b) >= 1.0,
    )
    .await;
    assert_eq!(
        (ready(&mesh.a), ready(&mesh.b)),
        (200, 200),
        "still ready on valid certificates"
    );
    mesh.cp = ControlPlane::serve(&ca_dir, &tokens, &cp_args).expect("control plane restarts");
    let (a1, b1) = (mesh.renewals(&mesh.a), mesh.renewals(&mesh.b));
    mesh.wait_for(
        Duration::from_secs(10),
        "renewals after the control plane returned",
        |m| m.renewals(&m.a) > a1 && m.renewals(&m.b) > b1,
    )
    .await;
    let (connections, connection_failures, _, stream_failures) = load.finish().await;
    assert_eq!(
        connection_failures, 0,
        "traffic never noticed the outage ({connections} connections)"
    );
    assert_eq!(stream_failures, 0);
    assert_eq!(mesh.failed_handshakes(), 0.0);

    // 2. An outage past expiry: fail closed, then recover without a restart.
    let (a2, b2) = (mesh.renewals(&mesh.a), mesh.renewals(&mesh.b));
    mesh.wait_for(Duration::from_secs(15), "fresh renewals", |m| {
        m.renewals(&m.a) > a2 && m.renewals(&m.b) > b2
    })
    .await;
    mesh.cp
        .terminate(Duration::from_secs(10))
        .expect("control plane stops");
    let stopped = SystemTime::now();
    mesh.wait_for(
        Duration::from_secs(20),
        "both sidecars to turn unready on expired certificates",
        |m| ready(&m.a) == 503 && ready(&m.b) == 503,
    )
    .await;
    assert!(
        mesh.expiry(&mesh.a) <= SystemTime::now() && mesh.expiry(&mesh.b) <= SystemTime::now(),
        "unready only once the certificates expired ({:?} after the stop)",
        stopped.elapsed().unwrap_or_default()
    );
    let mut c = TcpStream::connect(mesh.a.outbound[0])
        .await
        .expect("connect");
    c.write_all(b"hello\n").await.expect("write");
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut back)).await;
    assert!(back.is_empty(), "nothing flows on an expired certificate");
    assert!(
        metric(
            &mesh.a.metrics(),
            "palisade_tls_handshakes_total",
            &[
                ("direction", "outbound"),
                ("result", "failure"),
                ("reason", "expired")
            ]
        ) >= 1.0,
        "the refusal is counted as expired"
    );
    mesh.cp = ControlPlane::serve(&ca_dir, &tokens, &cp_args).expect("control plane restarts");
    mesh.wait_for(Duration::from_secs(10), "readiness to return", |m| {
        ready(&m.a) == 200 && ready(&m.b) == 200
    })
    .await;
    assert_echoes(mesh.a.outbound[0], "served again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_added_to_or_removed_from_the_bundle_file_applies_without_a_renewal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp =
        ControlPlane::start(dir.path(), &[(TOKEN_A, A), (TOKEN_B, B)], &[]).expect("control plane");
    let bundle = dir.path().join("bundle.pem");
    let root_a = std::fs::read_to_string(cp.ca_dir.join("ca.crt")).expect("root");
    std::fs::write(&bundle, &root_a).expect("bundle file");
    let mesh = mesh_with_bundle(dir.path(), cp, &bundle, "1h", &[]).await;
    let roots = |s: &Sidecar| metric(&s.metrics(), "palisade_trust_bundle_roots", &[]);
    assert_eq!((roots(&mesh.a), roots(&mesh.b)), (1.0, 1.0));

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let extra_root = params.self_signed(&key).expect("self-sign").pem();
    write_atomically(&bundle, &format!("{root_a}{extra_root}"));
    mesh.wait_for(Duration::from_secs(10), "the added root to apply", |m| {
        roots(&m.a) == 2.0 && roots(&m.b) == 2.0
    })
    .await;
    write_atomically(&bundle, &root_a);
    mesh.wait_for(Duration::from_secs(10), "the removed root to go", |m| {
        roots(&m.a) == 1.0 && roots(&m.b) == 1.0
    })
    .await;
    assert_eq!(
        mesh.renewals(&mesh.a) + mesh.renewals(&mesh.b),
        2.0,
        "no renewal was needed"
    );
    assert_echoes(mesh.a.outbound[0], "served").await;
}
