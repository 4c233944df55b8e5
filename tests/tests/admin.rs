//! The admin port as the network meets it: the real `palisade-sidecar` and
//! `palisade-control-plane` binaries with their admin servers bound to
//! `0.0.0.0`, asked once on loopback and once on this host's own
//! non-loopback address. A connection to that address has a non-loopback
//! local address, exactly what a client on the pod network produces, so the
//! restriction is the one a pod has (the route goes over `lo`, which the
//! server does not look at). Then `/identity` against `openssl`'s reading of
//! the certificates the test wrote, and the bounds: a silent client is cut
//! after the header timeout, and the 65th connection waits for a slot.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use palisade_tests::{ControlPlane, bin, eventually, follow_stderr, http_get, require_tool};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::Value;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";

/// The runtime's defaults (`runtime/src/admin.rs`), which the docs promise.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;

/// An address of this host that is not loopback: what the pod's own address
/// is to its sidecar. Fails loudly without one (every CI machine has one).
fn host_address() -> IpAddr {
    if_addrs::get_if_addrs()
        .expect("the host's interfaces can be listed")
        .into_iter()
        .map(|i| i.ip())
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .expect(
            "this test needs an IPv4 address on a non-loopback interface (eth0 or the \
             like) to show what the admin port serves to the network",
        )
}

/// A `palisade-sidecar run` whose admin server listens on `0.0.0.0`.
struct Sidecar {
    child: Child,
    port: u16,
    log: mpsc::Receiver<String>,
}

impl Sidecar {
    fn start(cert_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(bin("palisade-sidecar"))
            .arg("run")
            .arg("--cert-dir")
            .arg(cert_dir)
            .args(["--admin-addr", "0.0.0.0:0"])
            .args(["--inbound-addr", "127.0.0.1:0"])
            .args(["--outbound-addr", "127.0.0.1:0"])
            .args(["--log-level", "info"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("palisade-sidecar starts");
        let log = follow_stderr(&mut child, "sidecar").expect("stderr is piped");
        let mut sidecar = Self {
            child,
            port: 0,
            log,
        };
        let serving = eventually(Duration::from_secs(20), "the sidecar to serve", || {
            std::iter::from_fn(|| sidecar.log.try_recv().ok())
                .find(|line| line.contains(" serving "))
        });
        let admin: SocketAddr = word_after(&serving, "admin=")
            .parse()
            .expect("the serving line names the admin address");
        assert!(admin.ip().is_unspecified(), "{serving}");
        sidecar.port = admin.port();
        sidecar
    }

    fn loopback(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn network(&self) -> SocketAddr {
        SocketAddr::new(host_address(), self.port)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while self.log.try_recv().is_ok() {}
    }
}

fn word_after<'l>(line: &'l str, key: &str) -> &'l str {
    let start = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
    line[start..].split_whitespace().next().unwrap_or_default()
}

// === certificates ===

struct Authority {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn authority(name: &str, parent: Option<&Authority>) -> Authority {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let cert = match parent {
        None => params.self_signed(&key),
        Some(parent) => params.signed_by(&key, &Issuer::from_params(&parent.params, &parent.key)),
    };
    let pem = cert.expect("sign").pem();
    Authority { params, key, pem }
}

/// What the test wrote into the sidecar's credentials directory, each
/// certificate also on its own for `openssl`.
struct Credentials {
    leaf_pem: String,
    key_pem: String,
    not_after: SystemTime,
    /// (file, PEM) of leaf, intermediate, first root, second root.
    files: Vec<(std::path::PathBuf, String)>,
}

/// A leaf for [`WEB`] under an intermediate under "mesh root", and a bundle
/// of that root and a second one (a rotation in progress).
fn credentials(dir: &Path, pem_dir: &Path) -> Credentials {
    let root = authority("mesh root", None);
    let next_root = authority("next mesh root", None);
    let intermediate = authority("mesh intermediate", Some(&root));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(WEB.try_into().expect("ia5"))];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = SystemTime::now();
    let not_after = now + Duration::from_secs(3600);
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = not_after.into();
    let leaf_pem = params
        .signed_by(
            &key,
            &Issuer::from_params(&intermediate.params, &intermediate.key),
        )
        .expect("sign")
        .pem();
    let key_pem = key.serialize_pem();

    std::fs::create_dir_all(pem_dir).expect("mkdir");
    let files: Vec<_> = [
        ("leaf", &leaf_pem),
        ("intermediate", &intermediate.pem),
        ("root", &root.pem),
        ("next-root", &next_root.pem),
    ]
    .into_iter()
    .map(|(name, pem)| (pem_dir.join(format!("{name}.pem")), pem.clone()))
    .collect();
    for (path, pem) in &files {
        std::fs::write(path, pem).expect("write");
    }
    // The key last: the directory is complete once it appears.
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("tls.crt"),
        format!("{leaf_pem}{}", intermediate.pem),
    )
    .expect("write");
    std::fs::write(dir.join("ca.crt"), format!("{}{}", root.pem, next_root.pem)).expect("write");
    std::fs::write(dir.join("tls.key"), &key_pem).expect("write");
    Credentials {
        leaf_pem,
        key_pem,
        not_after,
        files,
    }
}

/// `openssl x509 -noout <args> -in file`, the value after `=`, lowercase,
/// without colons: the test's own reading of a certificate.
fn openssl(file: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout"])
        .args(args)
        .arg("-in")
        .arg(file)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let (_, value) = text.trim().split_once('=').expect("name=value");
    value.replace(':', "").to_ascii_lowercase()
}

fn json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http_get(addr, path).expect("the admin port answers");
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, value)
}

// === tests ===

#[test]
fn config_is_served_on_loopback_only_and_health_metrics_probes_and_identity_everywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    credentials(&dir.path().join("certs"), &dir.path().join("pem"));
    // Something for a rewritten TCP probe to reach.
    let app = TcpListener::bind("127.0.0.1:0").expect("bind");
    let probes = format!(
        r#"{{"web/readiness": {{"tcpSocket": {{"port": {}}}}}}}"#,
        app.local_addr().expect("bound").port()
    );
    let sidecar = Sidecar::start(
        &dir.path().join("certs"),
        &["--pod-ip", "127.0.0.1", "--app-probes", &probes],
    );
    let (loopback, network) = (sidecar.loopback(), sidecar.network());
    eventually(Duration::from_secs(20), "the sidecar to turn ready", || {
        matches!(http_get(loopback, "/ready"), Ok((200, _))).then_some(())
    });

    // Loopback: the running configuration.
    let (status, config) = json(loopback, "/config");
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["trust_domain"], "cluster.local", "{config}");

    // The pod's address: no configuration, and no sign that there is one.
    let (status, body) = http_get(network, "/config").expect("answers");
    assert_eq!(status, 404, "/config on {network}: {body}");
    assert_eq!(
        (status, body),
        http_get(network, "/no-such-path").expect("answers"),
        "/config looks like any unknown path"
    );
    for path in ["/config/", "/config?x=1", "/CONFIG"] {
        assert_eq!(http_get(network, path).expect("answers").0, 404, "{path}");
    }
    // What kubelet, Prometheus and an operator need is there.
    for addr in [loopback, network] {
        assert_eq!(
            http_get(addr, "/ready").expect("answers"),
            (200, "ready\n".into())
        );
        assert_eq!(
            http_get(addr, "/live").expect("answers"),
            (200, "live\n".into())
        );
        let (status, metrics) = http_get(addr, "/metrics").expect("answers");
        assert_eq!(status, 200);
        let expiry = palisade_tests::metric(
            &metrics,
            "palisade_cert_expiration_timestamp_seconds",
            &[("identity", WEB)],
        );
        assert!(expiry > 0.0, "{metrics}");
        let (status, probe) = http_get(addr, "/app-health/web/readiness").expect("answers");
        assert_eq!(
            (status, probe.as_str()),
            (200, "ok\n"),
            "the probe on {addr}"
        );
        let (status, identity) = json(addr, "/identity");
        assert_eq!(status, 200, "{identity}");
        assert_eq!(identity["identity"], WEB);
    }
}

#[test]
fn the_control_plane_hides_config_from_the_network_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(
        dir.path(),
        &[("tok-web-0123456789abcdef", WEB)],
        &["--admin-addr", "0.0.0.0:0"],
    )
    .expect("the control plane starts");
    assert!(cp.admin_addr.ip().is_unspecified(), "{}", cp.admin_addr);
    let port = cp.admin_addr.port();
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    let network = SocketAddr::new(host_address(), port);
    let (status, config) = json(loopback, "/config");
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["trust_domain"], "cluster.local", "{config}");
    assert_eq!(http_get(network, "/config").expect("answers").0, 404);
    for path in ["/ready", "/live", "/metrics"] {
        assert_eq!(http_get(network, path).expect("answers").0, 200, "{path}");
    }
}

#[test]
fn identity_shows_the_identity_serial_and_fingerprints_and_nothing_secret() {
    require_tool("openssl");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let sidecar = Sidecar::start(&certs, &[]);
    let network = sidecar.network();

    // Before any certificate: 503 and why, as JSON.
    let (status, body) = json(network, "/identity");
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );

    // Credentials appear; the file watcher installs them.
    let written = credentials(&certs, &dir.path().join("pem"));
    let (report, raw) = eventually(Duration::from_secs(20), "the certificate to load", || {
        let (status, body) = http_get(network, "/identity").ok()?;
        (status == 200).then(|| (serde_json::from_str::<Value>(&body).expect("JSON"), body))
    });
    let sha256 = |i: usize| openssl(&written.files[i].0, &["-fingerprint", "-sha256"]);
    let fingerprints = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {report}"))
            .iter()
            .map(|c| c["sha256"].as_str().expect("a fingerprint").to_owned())
            .collect()
    };
    assert_eq!(report["identity"], WEB, "{report}");
    assert_eq!(report["serial"], openssl(&written.files[0].0, &["-serial"]));
    assert_eq!(
        fingerprints("chain"),
        [sha256(0), sha256(1)],
        "leaf, then intermediate"
    );
    assert_eq!(
        fingerprints("trust_roots"),
        [sha256(2), sha256(3)],
        "both roots in force"
    );
    assert_eq!(report["trust_roots"][1]["subject"], "CN=next mesh root");
    let not_after =
        humantime::parse_rfc3339(report["not_after"].as_str().expect("a time")).expect("RFC 3339");
    let skew = match not_after.duration_since(written.not_after) {
        Ok(later) => later,
        Err(earlier) => earlier.duration(),
    };
    assert!(skew < Duration::from_secs(2), "not_after {not_after:?}");
    assert!(humantime::parse_rfc3339(report["not_before"].as_str().expect("a time")).is_ok());
    let left = report["expires_in_seconds"].as_i64().expect("seconds");
    assert!((3000..=3600).contains(&left), "expires in {left} s");

    // No key, no certificate body.
    for needle in ["PRIVATE KEY", "BEGIN CERTIFICATE", "BEGIN"] {
        assert!(!raw.contains(needle), "{needle} in {raw}");
    }
    for pem in [&written.key_pem, &written.leaf_pem] {
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!raw.contains(line), "a line of a PEM body in {raw}");
        }
    }
}

#[test]
fn a_client_that_does_not_send_its_headers_is_cut_after_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sidecar = Sidecar::start(dir.path(), &[]);
    let started = Instant::now();
    let mut silent = TcpStream::connect(sidecar.network()).expect("connect");
    let mut partial = TcpStream::connect(sidecar.loopback()).expect("connect");
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n")
        .expect("write");
    // Others are served meanwhile.
    assert_eq!(
        http_get(sidecar.loopback(), "/live").expect("answers").0,
        200
    );
    for (what, stream) in [("silent", &mut silent), ("partial", &mut partial)] {
        stream
            .set_read_timeout(Some(HEADER_READ_TIMEOUT * 3))
            .expect("timeout");
        let mut got = Vec::new();
        let closed = match stream.read_to_end(&mut got) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        let after = started.elapsed();
        assert!(closed, "the {what} client was not cut within {after:?}");
        assert!(got.is_empty(), "the {what} client was answered: {got:?}");
        assert!(
            after >= HEADER_READ_TIMEOUT - Duration::from_millis(200)
                && after < HEADER_READ_TIMEOUT * 2,
            "the {what} client was cut after {after:?}, the timeout is {HEADER_READ_TIMEOUT:?}"
        );
    }
}

#[test]
fn connections_past_the_limit_wait_for_a_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sidecar = Sidecar::start(dir.path(), &[]);
    let addr = sidecar.network();
    let started = Instant::now();
    // Every slot held by a client that sends nothing.
    let mut held: Vec<TcpStream> = (0..MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let mut next = TcpStream::connect(addr).expect("the backlog takes it");
    next.write_all(b"GET /live HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .expect("write");
    next.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let early = next.read(&mut byte);
    assert!(
        early.is_err(),
        "connection {} was served while {MAX_CONNECTIONS} held every slot: {early:?}",
        MAX_CONNECTIONS + 1
    );
    // One lets go: the waiting one is served, well before the held ones
    // would have been cut by the header timeout.
    drop(held.pop());
    next.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut response = String::new();
    next.read_to_string(&mut response).expect("served");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        started.elapsed() < HEADER_READ_TIMEOUT - Duration::from_millis(500),
        "too slow to tell a freed slot from the header timeout: {:?}",
        started.elapsed()
    );
}
