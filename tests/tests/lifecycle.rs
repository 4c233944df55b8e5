//! The identity lifecycle in control-plane mode: sidecars obtain their
//! certificates from the real control plane, renew them on schedule with a
//! fresh key each time, and keep serving across rotations; connections opened
//! before a rotation are untouched by it.

mod support;

use std::time::{Duration, Instant};

use palisade_tests::{ControlPlane, metric};
use support::{Sidecar, echo_app};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const A: &str = "spiffe://cluster.local/ns/a/sa/client";
const B: &str = "spiffe://cluster.local/ns/b/sa/server";

async fn round_trip(stream: &mut TcpStream, line: &[u8]) {
    stream.write_all(line).await.expect("write");
    let mut back = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .expect("echo within 5 s")
        .expect("echo");
    assert_eq!(back, line);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_schedule_without_touching_open_connections() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(
        dir.path(),
        &[("token-a-0123456789", A), ("token-b-0123456789", B)],
        &["--min-lifetime", "2s"],
    )
    .expect("control plane");
    for (name, token) in [("a", "token-a-0123456789"), ("b", "token-b-0123456789")] {
        std::fs::write(dir.path().join(name), token).expect("token file");
    }
    let grpc = format!("https://{}", cp.grpc_addr);
    let bundle = cp.ca_dir.join("ca.crt").display().to_string();
    let source = |name: &str, identity: &'static str| {
        vec![
            "--control-plane".to_owned(),
            grpc.clone(),
            "--bundle".into(),
            bundle.clone(),
            "--identity".into(),
            identity.into(),
            "--token-file".into(),
            dir.path().join(name).display().to_string(),
            "--lifetime".into(),
            "4s".into(),
        ]
    };
    let app = echo_app().await;
    let b_source = source("b", B);
    let b_source: Vec<&str> = b_source.iter().map(String::as_str).collect();
    let b = Sidecar::start_with(
        &b_source,
        &["--explicit-inbound", &format!("127.0.0.1:0={app}")],
    )
    .await;
    let a_source = source("a", A);
    let a_source: Vec<&str> = a_source.iter().map(String::as_str).collect();
    let a = Sidecar::start_with(
        &a_source,
        &[
            "--explicit-outbound",
            &format!("127.0.0.1:0={},{B}", b.inbound[0]),
        ],
    )
    .await;

    let renewals = |s: &Sidecar| {
        metric(
            &s.metrics(),
            "palisade_cert_renewals_total",
            &[("result", "success")],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while renewals(&a) < 1.0 || renewals(&b) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no first certificate from the control plane"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A long-lived connection, opened under the first certificates.
    let mut long_lived = TcpStream::connect(a.outbound[0]).await.expect("connect");
    round_trip(&mut long_lived, b"before rotation\n").await;

    // 4 s certificates renew every 1.6-2.4 s: wait for at least 3 on each side,
    // opening new connections meanwhile.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut fresh_connections = 0;
    while renewals(&a) < 4.0 || renewals(&b) < 4.0 {
        assert!(
            Instant::now() < deadline,
            "renewals did not happen on schedule"
        );
        let mut conn = TcpStream::connect(a.outbound[0]).await.expect("connect");
        round_trip(&mut conn, b"during rotation\n").await;
        fresh_connections += 1;
        round_trip(&mut long_lived, b"still here\n").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    round_trip(&mut long_lived, b"after rotation\n").await;

    for (name, s, identity) in [("a", &a, A), ("b", &b, B)] {
        let m = s.metrics();
        assert_eq!(
            metric(&m, "palisade_cert_renewals_total", &[("result", "failure")]),
            0.0,
            "{name}: no failed renewal"
        );
        let expiry = metric(
            &m,
            "palisade_cert_expiration_timestamp_seconds",
            &[("identity", identity)],
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs_f64();
        assert!(
            expiry > now && expiry < now + 5.0,
            "{name}: a 4 s certificate is in use ({expiry} vs {now})"
        );
    }
    assert_eq!(
        a.failures("timeout") + b.failures("unknown_ca") + b.failures("expired"),
        0.0,
        "no handshake failed across rotations"
    );
    let failed_handshakes = metric(
        &a.metrics(),
        "palisade_tls_handshakes_total",
        &[("direction", "outbound"), ("result", "failure")],
    ) + metric(
        &b.metrics(),
        "palisade_tls_handshakes_total",
        &[("direction", "inbound"), ("result", "failure")],
    );
    assert_eq!(failed_handshakes, 0.0, "zero failed handshakes");
    eprintln!(
        "{fresh_connections} new connections across {} / {} renewals; the long-lived one survived them all",
        renewals(&a),
        renewals(&b)
    );
    let issued = metric(
        &cp.metrics().expect("cp metrics"),
        "palisade_ca_certificates_issued_total",
        &[("result", "success")],
    );
    assert!(
        issued >= 8.0,
        "every renewal was a new certificate: {issued}"
    );
}
