//! Two sidecars in explicit mode on loopback, in process, with certificates
//! the test makes: bulk data both ways arrives intact, every kind of bad client
//! is refused with its own `reason`, and good clients are served throughout.

use std::{
    net::SocketAddr,
    process::Command,
    sync::Arc,
    time::{Duration, SystemTime},
};

use palisade_tests::{eventually_async, http_get, metric, require_tool};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

mod support;

use support::{Ca, Leaf, Sidecar, ca, echo_app, fresh, leaf, write_dir};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/a/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/b/sa/server";

/// `a -> sidecar A (explicit outbound) -> mTLS -> sidecar B (explicit inbound) -> echo app`.
struct Mesh {
    _dir: tempfile::TempDir,
    ca: Ca,
    a: Sidecar,
    b: Sidecar,
}

async fn mesh() -> Mesh {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca("mesh root");
    write_dir(&dir.path().join("a"), &fresh(&ca, CLIENT_ID), &ca.pem);
    write_dir(&dir.path().join("b"), &fresh(&ca, SERVER_ID), &ca.pem);
    let app = echo_app().await;
    let b = Sidecar::start(
        &dir.path().join("b"),
        &["--explicit-inbound", &format!("127.0.0.1:0={app}")],
    )
    .await;
    let a = Sidecar::start(
        &dir.path().join("a"),
        &[
            "--explicit-outbound",
            &format!("127.0.0.1:0={},{SERVER_ID}", b.inbound[0]),
        ],
    )
    .await;
    Mesh {
        _dir: dir,
        ca,
        a,
        b,
    }
}

/// Sends `len` deterministic bytes through `addr` and reads the echo;
/// returns (sent digest, received digest, received length).
async fn echo_through(addr: SocketAddr, len: usize) -> ([u8; 32], [u8; 32], usize) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            for b in chunk.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await.expect("write");
            hash.update(&chunk[..n]);
            left -= n;
        }
        w.shutdown().await.expect("half-close");
        <[u8; 32]>::from(hash.finalize())
    });
    let mut hash = Sha256::new();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        got += n;
    }
    let sent = writer.await.expect("writer");
    (sent, hash.finalize().into(), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabytes_each_way_arrive_byte_identical() {
    let mesh = mesh().await;
    const LEN: usize = 100 * 1024 * 1024;
    let started = std::time::Instant::now();
    let (sent, received, len) = echo_through(mesh.a.outbound[0], LEN).await;
    let elapsed = started.elapsed();
    assert_eq!(len, LEN, "every byte came back");
    assert_eq!(sent, received, "the bytes are identical");
    eprintln!(
        "100 MiB each way through two sidecars in {elapsed:?} ({:.0} MiB/s each way)",
        100.0 / elapsed.as_secs_f64()
    );

    let metrics = mesh.b.metrics();
    assert_eq!(
        metric(
            &metrics,
            "palisade_connections_opened_total",
            &[
                ("direction", "inbound"),
                ("security", "mtls"),
                ("peer_identity", CLIENT_ID)
            ]
        ),
        1.0
    );
    assert!(
        metric(
            &metrics,
            "palisade_bytes_total",
            &[("direction", "inbound"), ("flow", "request")]
        ) >= LEN as f64
    );
    let a_metrics = mesh.a.metrics();
    assert_eq!(
        metric(
            &a_metrics,
            "palisade_connections_opened_total",
            &[
                ("direction", "outbound"),
                ("security", "mtls"),
                ("peer_identity", SERVER_ID)
            ]
        ),
        1.0
    );
}

/// A client that accepts any server certificate: these tests are about what
/// the server side refuses.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config(leaf: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match leaf {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("pem")],
                PrivateKeyDer::Pkcs8(leaf.key.serialize_der().into()),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"palisade/1".to_vec()];
    Arc::new(config)
}

use rustls::pki_types::pem::PemObject;

/// Connects with `config`, sends a line and expects it echoed: whether the
/// sidecar let this client through to the app.
async fn served(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> bool {
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::IpAddress(addr.ip().into());
    let Ok(Ok(mut tls)) =
        tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await
    else {
        return false;
    };
    // TLS 1.3: a refused client certificate shows up at the first read.
    if tls.write_all(b"ping\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_are_refused_with_their_reason_and_good_ones_still_served() {
    require_tool("openssl");
    let mesh = mesh().await;
    let b = mesh.b.inbound[0];
    let now = SystemTime::now();
    let good = fresh(&mesh.ca, CLIENT_ID);
    assert!(
        served(b, client_config(Some(&good))).await,
        "a good client is served"
    );

    let other_ca = ca("someone else's root");
    let expired = leaf(
        &mesh.ca,
        CLIENT_ID,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    let foreign = fresh(&mesh.ca, "spiffe://evil.example/ns/a/sa/client");
    let stranger = fresh(&other_ca, CLIENT_ID);

    let tls_cases: [(&str, Option<&Leaf>, &str); 4] = [
        ("no client certificate", None, "no_client_cert"),
        ("certificate from another CA", Some(&stranger), "unknown_ca"),
        ("expired certificate", Some(&expired), "expired"),
        ("wrong trust domain", Some(&foreign), "wrong_trust_domain"),
    ];
    for (name, leaf, reason) in tls_cases {
        let before = mesh.b.failures(reason);
        assert!(
            !served(b, client_config(leaf)).await,
            "{name}: must be refused"
        );
        assert_eq!(
            mesh.b.failures(reason) - before,
            1.0,
            "{name}: counted as {reason}"
        );
        assert!(
            served(b, client_config(Some(&good))).await,
            "still serving after {name}"
        );
    }

    // Garbage bytes.
    let before = mesh.b.failures("plaintext");
    let mut tcp = TcpStream::connect(b).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    assert!(sink.is_empty(), "nothing reaches the app or comes back");
    assert_eq!(
        mesh.b.failures("plaintext") - before,
        1.0,
        "garbage counted as plaintext"
    );

    // A ClientHello cut in half, then the client leaves.
    let hello = {
        let mut conn = rustls::ClientConnection::new(
            client_config(Some(&good)),
            ServerName::IpAddress(b.ip().into()),
        )
        .expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    };
    let before = mesh.b.failures("protocol");
    let mut tcp = TcpStream::connect(b).await.expect("connect");
    tcp.write_all(&hello[..hello.len() / 2])
        .await
        .expect("write");
    tcp.shutdown().await.expect("close");
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut Vec::new())).await;
    // The sidecar counts a refusal before it closes: seeing the close is
    // enough, no wait.
    assert_eq!(
        mesh.b.failures("protocol") - before,
        1.0,
        "truncated ClientHello counted"
    );

    // A client that never speaks.
    let before = mesh.b.failures("timeout");
    let mut silent = TcpStream::connect(b).await.expect("connect");
    let closed =
        tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut Vec::new())).await;
    assert!(closed.is_ok(), "the sidecar hangs up on a silent client");
    assert_eq!(
        mesh.b.failures("timeout") - before,
        1.0,
        "silent client counted as timeout"
    );

    // A TLS 1.2-only client, from an independent implementation.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("c.pem"), &good.cert_pem).expect("write");
    std::fs::write(dir.path().join("k.pem"), good.key.serialize_pem()).expect("write");
    let before = mesh.b.failures("incompatible");
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &b.to_string(),
            "-tls1_2",
            "-alpn",
            "palisade/1",
        ])
        .arg("-cert")
        .arg(dir.path().join("c.pem"))
        .arg("-key")
        .arg(dir.path().join("k.pem"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    assert!(!out.status.success(), "a TLS 1.2 handshake must fail");
    assert_eq!(
        mesh.b.failures("incompatible") - before,
        1.0,
        "TLS 1.2 counted as incompatible"
    );

    assert!(
        served(b, client_config(Some(&good))).await,
        "still serving at the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_peer_with_another_identity_is_refused() {
    let mesh = mesh().await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_dir(dir.path(), &fresh(&mesh.ca, CLIENT_ID), &mesh.ca.pem);
    let wrong = Sidecar::start(
        dir.path(),
        &[
            "--explicit-outbound",
            &format!(
                "127.0.0.1:0={},spiffe://cluster.local/ns/b/sa/someone-else",
                mesh.b.inbound[0]
            ),
        ],
    )
    .await;
    let mut tcp = TcpStream::connect(wrong.outbound[0])
        .await
        .expect("connect");
    tcp.write_all(b"secret\n").await.expect("write");
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut back)).await;
    assert!(back.is_empty(), "nothing is relayed to the wrong peer");
    assert_eq!(
        metric(
            &wrong.metrics(),
            "palisade_tls_handshakes_total",
            &[
                ("direction", "outbound"),
                ("result", "failure"),
                ("reason", "unexpected_identity")
            ]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_handshakes_fail_closed_until_one_arrives() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca("root");
    let app = echo_app().await;
    std::fs::create_dir_all(dir.path().join("b")).expect("mkdir");
    let b = Sidecar::start(
        &dir.path().join("b"),
        &["--explicit-inbound", &format!("127.0.0.1:0={app}")],
    )
    .await;
    assert_eq!(
        http_get(b.admin, "/ready").expect("ready").0,
        503,
        "not ready without a certificate"
    );
    assert_eq!(http_get(b.admin, "/live").expect("live").0, 200);

    let good = fresh(&ca, CLIENT_ID);
    assert!(!served(b.inbound[0], client_config(Some(&good))).await);
    assert_eq!(b.failures("no_certificate"), 1.0);

    write_dir(&dir.path().join("b"), &fresh(&ca, SERVER_ID), &ca.pem);
    eventually_async(
        Duration::from_secs(10),
        "the certificate to be picked up",
        || async { (http_get(b.admin, "/ready").expect("ready").0 == 200).then_some(()) },
    )
    .await;
    assert!(
        served(b.inbound[0], client_config(Some(&good))).await,
        "served once a certificate is in place"
    );
}
