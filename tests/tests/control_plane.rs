//! The control plane as a user meets it: the real binary on loopback, a real
//! tonic client over TLS, CSRs from `openssl req`, chains checked with
//! `openssl verify`, and the issuer rotated under load.

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use palisade_proto::identity::v1::{CertifyRequest, CertifyResponse};
use palisade_tests::{ControlPlane, eventually, http_get, metric, require_tool};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use tonic::Code;
use x509_parser::{extensions::GeneralName, prelude::*};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const WEB_TOKEN: &str = "web-token-0123456789";

fn csr(identity: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().expect("ia5"))];
    params.serialize_request(&key).expect("CSR").der().to_vec()
}

fn request(csr: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        identity: WEB.into(),
        token: WEB_TOKEN.as_bytes().to_vec(),
        csr,
        requested_lifetime: None,
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(label, der.to_vec()))
}

fn issuer_cn(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).expect("parses");
    cert.issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_over_grpc_verify_with_openssl_and_carry_one_uri_san() {
    require_tool("openssl");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cp = ControlPlane::start(dir.path(), &[(WEB_TOKEN, WEB)], &[]).expect("starts");

    assert_eq!(http_get(cp.admin_addr, "/ready").expect("ready").0, 200);
    assert_eq!(http_get(cp.admin_addr, "/live").expect("live").0, 200);

    let mut client = cp
        .client()
        .await
        .expect("TLS to the control plane with the bundle");
    let response: CertifyResponse = client
        .certify(request(csr(WEB)))
        .await
        .expect("issued")
        .into_inner();

    let (_, leaf) = X509Certificate::from_der(&response.certificate).expect("leaf parses");
    let san = leaf
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("SAN present");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(WEB)],
        "exactly one URI SAN"
    );
    assert!(!leaf.is_ca());
    assert_eq!(
        response.valid_until.expect("valid_until").seconds,
        leaf.validity().not_after.timestamp()
    );

    let work = dir.path();
    std::fs::write(
        work.join("leaf.pem"),
        pem("CERTIFICATE", &response.certificate),
    )
    .expect("write");
    let chain: String = response
        .intermediates
        .iter()
        .map(|c| pem("CERTIFICATE", c))
        .collect();
    std::fs::write(work.join("chain.pem"), chain).expect("write");
    let bundle: String = response
        .trust_bundle
        .iter()
        .map(|c| pem("CERTIFICATE", c))
        .collect();
    std::fs::write(work.join("bundle.pem"), bundle).expect("write");
    let mut verify = Command::new("openssl");
    verify
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(work.join("bundle.pem"));
    if !response.intermediates.is_empty() {
        verify.arg("-untrusted").arg(work.join("chain.pem"));
    }
    let out = verify
        .arg(work.join("leaf.pem"))
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let metrics = cp.metrics().expect("metrics");
    assert_eq!(
        metric(
            &metrics,
            "palisade_ca_certificates_issued_total",
            &[("result", "success")]
        ),
        1.0
    );
    for name in [
        "palisade_ca_issue_duration_seconds_bucket",
        "palisade_ca_issuer_expiration_timestamp_seconds",
        "palisade_ca_trust_bundle_roots",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(!metrics.contains(WEB_TOKEN));

    let status = cp
        .terminate(Duration::from_secs(20))
        .expect("stops on SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// CSRs from an independent tool: what openssl users would send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_csrs_are_accepted_or_refused_with_a_reason() {
    require_tool("openssl");
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[(WEB_TOKEN, WEB)], &[]).expect("starts");
    let mut client = cp.client().await.expect("client");
    let work = dir.path();

    let openssl_csr = |name: &str, keygen: &[&str], extra: &[&str]| -> Vec<u8> {
        let key = work.join(format!("{name}.key"));
        let out = Command::new("openssl")
            .args(["genpkey", "-quiet"])
            .args(keygen)
            .arg("-out")
            .arg(&key)
            .output()
            .expect("openssl genpkey");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let der = work.join(format!("{name}.csr"));
        let out = Command::new("openssl")
            .args([
                "req",
                "-new",
                "-subj",
                "/CN=ignored",
                "-outform",
                "DER",
                "-key",
            ])
            .arg(&key)
            .args(extra)
            .arg("-out")
            .arg(&der)
            .output()
            .expect("openssl req");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(der).expect("read CSR")
    };
    let p256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let san = format!("subjectAltName=URI:{WEB}");

    let accepted = [
        ("p256", openssl_csr("p256", p256, &[])),
        (
            "p256-san",
            openssl_csr("p256-san", p256, &["-addext", &san]),
        ),
        (
            "p384",
            openssl_csr(
                "p384",
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
                &[],
            ),
        ),
        (
            "ed25519",
            openssl_csr("ed25519", &["-algorithm", "ED25519"], &[]),
        ),
        (
            "rsa2048",
            openssl_csr(
                "rsa2048",
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                &[],
            ),
        ),
    ];
    for (name, der) in accepted {
        let response = client.certify(request(der)).await;
        assert!(response.is_ok(), "{name} refused: {:?}", response.err());
    }

    let refused = [
        (
            "rsa1024",
            openssl_csr(
                "rsa1024",
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
                &[],
            ),
            "weak_key",
        ),
        (
            "p192",
            openssl_csr(
                "p192",
                &[
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime192v1",
                ],
                &[],
            ),
            "weak_key",
        ),
        (
            "secp256k1",
            openssl_csr(
                "k256",
                &[
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:secp256k1",
                ],
                &[],
            ),
            "unsupported_key",
        ),
        (
            "sha1",
            openssl_csr("sha1", p256, &["-sha1"]),
            "unsupported_signature",
        ),
        (
            "dns-san",
            openssl_csr("dns", p256, &["-addext", "subjectAltName=DNS:evil.example"]),
            "foreign_san",
        ),
        (
            "ip-san",
            openssl_csr("ip", p256, &["-addext", "subjectAltName=IP:198.18.0.1"]),
            "foreign_san",
        ),
        (
            "email-san",
            openssl_csr(
                "email",
                p256,
                &["-addext", "subjectAltName=email:a@example.org"],
            ),
            "foreign_san",
        ),
        (
            "second-uri",
            openssl_csr(
                "uri2",
                p256,
                &[
                    "-addext",
                    &format!("subjectAltName=URI:{WEB},URI:spiffe://cluster.local/ns/x/sa/y"),
                ],
            ),
            "foreign_san",
        ),
        (
            "ca-true",
            openssl_csr(
                "ca",
                p256,
                &["-addext", "basicConstraints=critical,CA:TRUE"],
            ),
            "csr_requests_ca",
        ),
    ];
    for (name, der, reason) in refused {
        let status = client.certify(request(der)).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().starts_with(reason),
            "{name}: expected {reason}, got {:?}",
            status.message()
        );
    }
    let metrics = cp.metrics().expect("metrics");
    assert_eq!(
        metric(
            &metrics,
            "palisade_ca_certificates_issued_total",
            &[("result", "failure"), ("reason", "weak_key")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "palisade_ca_certificates_issued_total",
            &[("result", "failure"), ("reason", "foreign_san")]
        ),
        4.0
    );
}

/// A CA directory laid out like a mounted Kubernetes Secret: the files are
/// symlinks through `..data`, which is swapped atomically on update.
struct SecretDir<'a> {
    dir: &'a Path,
    generation: u32,
}

impl<'a> SecretDir<'a> {
    fn new(dir: &'a Path) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        Self { dir, generation: 0 }
    }

    fn publish(&mut self, cert_pem: &str, key_pem: &str, bundle_pem: &str) {
        self.generation += 1;
        let version = format!("..gen_{}", self.generation);
        let data = self.dir.join(&version);
        std::fs::create_dir(&data).expect("mkdir version");
        std::fs::write(data.join("tls.crt"), cert_pem).expect("write");
        std::fs::write(data.join("tls.key"), key_pem).expect("write");
        std::fs::write(data.join("ca.crt"), bundle_pem).expect("write");
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&version, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            let link = self.dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(name), &link).expect("symlink");
            }
        }
    }
}

struct Ca {
    key: KeyPair,
    params: CertificateParams,
    pem: String,
}

fn ca(name: &str, parent: Option<&Ca>) -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(30 * 86400)).into();
    let cert = match parent {
        Some(p) => {
            params.use_authority_key_identifier_extension = true;
            let issuer = rcgen::Issuer::from_params(&p.params, &p.key);
            params.signed_by(&key, &issuer).expect("sign")
        }
        None => params.self_signed(&key).expect("self-sign"),
    };
    Ca {
        pem: cert.pem(),
        key,
        params,
    }
}

/// Issuer rotation through the watched directory while clients issue without
/// pause: no request fails, a broken replacement is refused, and new
/// certificates chain to the new issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_rotates_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let mut secret = SecretDir::new(&ca_dir);
    let root_a = ca("root A", None);
    secret.publish(&root_a.pem, &root_a.key.serialize_pem(), &root_a.pem);
    let tokens = dir.path().join("tokens.yaml");
    palisade_tests::write_tokens(&tokens, &[(WEB_TOKEN, WEB)]).expect("tokens");
    let cp = ControlPlane::serve(&ca_dir, &tokens, &[]).expect("starts");

    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut client = cp.client().await.expect("client");
        let stop = stop.clone();
        let issued = issued.clone();
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut last_issuer = String::new();
            let mut last_bundle = 0;
            while !stop.load(Ordering::Relaxed) {
                match client.certify(request(csr(WEB))).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        last_issuer = issuer_cn(&r.certificate);
                        last_bundle = r.trust_bundle.len();
                        issued.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => failures.push(status.to_string()),
                }
            }
            (failures, last_issuer, last_bundle)
        }));
    }
    let wait_for = |what: &str, cond: &dyn Fn(&str) -> bool| {
        eventually(Duration::from_secs(20), what, || {
            cond(&cp.metrics().expect("metrics")).then_some(())
        })
    };
    // Issuance keeps going after each step: at least `n` more certificates.
    let issues_more = |what: &str, n: u64| {
        let from = issued.load(Ordering::Relaxed);
        eventually(Duration::from_secs(20), what, || {
            (issued.load(Ordering::Relaxed) >= from + n).then_some(())
        })
    };
    issues_more("the workers to get certificates", 20);

    // 1. A broken replacement (the key of another CA) is refused; A keeps signing.
    let stranger = ca("stranger", None);
    secret.publish(&root_a.pem, &stranger.key.serialize_pem(), &root_a.pem);
    wait_for("the broken issuer to be refused", &|m| {
        metric(
            m,
            "palisade_ca_reloads_total",
            &[("source", "issuer"), ("result", "failure")],
        ) >= 1.0
    });

    // 2. Add root B to the bundle and switch to an intermediate under B.
    let root_b = ca("root B", None);
    let issuer_b = ca("issuer B1", Some(&root_b));
    let both = format!("{}{}", root_a.pem, root_b.pem);
    secret.publish(
        &format!("{}{}", issuer_b.pem, root_b.pem),
        &issuer_b.key.serialize_pem(),
        &both,
    );
    wait_for("the new issuer", &|m| {
        metric(
            m,
            "palisade_ca_reloads_total",
            &[("source", "issuer"), ("result", "success")],
        ) >= 1.0
            && metric(m, "palisade_ca_trust_bundle_roots", &[]) == 2.0
    });
    issues_more("issuance to continue after the switch", 20);

    // 3. Remove root A.
    secret.publish(
        &format!("{}{}", issuer_b.pem, root_b.pem),
        &issuer_b.key.serialize_pem(),
        &root_b.pem,
    );
    wait_for("root A to be removed", &|m| {
        metric(m, "palisade_ca_trust_bundle_roots", &[]) == 1.0
    });
    // 40 across 4 sequential workers: every worker's last certificate comes
    // after the change.
    issues_more("issuance to continue after root A is gone", 40);

    stop.store(true, Ordering::Relaxed);
    let total = issued.load(Ordering::Relaxed);
    for worker in workers {
        let (failures, last_issuer, last_bundle) = worker.await.expect("worker");
        assert!(
            failures.is_empty(),
            "requests failed during rotation: {failures:?}"
        );
        assert_eq!(
            last_issuer, "issuer B1",
            "new certificates chain to the new issuer"
        );
        assert_eq!(
            last_bundle, 1,
            "the bundle handed out no longer holds root A"
        );
    }
    eprintln!("issued {total} certificates during the rotation, none failed");
    assert!(total > 20, "the load was real: {total} certificates");

    // A client that trusts only root B can connect to the re-issued serving certificate.
    palisade_tests::identity_client(cp.grpc_addr, root_b.pem.as_bytes())
        .await
        .expect("the serving certificate follows the new issuer")
        .certify(request(csr(WEB)))
        .await
        .expect("issued under B");
}

/// `palisade-sidecar certify`: a fresh key, a certificate for the claimed
/// identity, files a TLS Secret would hold, the key readable by its owner only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_certify_writes_verifiable_credentials() {
    require_tool("openssl");
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[(WEB_TOKEN, WEB)], &[]).expect("starts");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{WEB_TOKEN}\n")).expect("write token");
    let out = dir.path().join("certs");
    let certify = |identity: &str| {
        Command::new(palisade_tests::bin("palisade-sidecar"))
            .args([
                "certify",
                "--control-plane",
                &format!("https://{}", cp.grpc_addr),
            ])
            .arg("--bundle")
            .arg(cp.ca_dir.join("ca.crt"))
            .args(["--identity", identity, "--lifetime", "10m"])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("runs")
    };
    let ok = certify(WEB);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains(WEB));

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("tls.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is private");
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.join("ca.crt"))
        .arg(out.join("tls.crt"))
        .output()
        .expect("openssl");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // The key in tls.key belongs to the certificate in tls.crt.
    let pubkey = |args: &[&str], file: &str| {
        Command::new("openssl")
            .args(args)
            .arg(out.join(file))
            .output()
            .expect("openssl")
            .stdout
    };
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in"], "tls.crt"),
        pubkey(&["pkey", "-pubout", "-in"], "tls.key")
    );

    let refused = certify("spiffe://cluster.local/ns/default/sa/someone-else");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("identity_mismatch"), "{stderr}");
    assert!(!stderr.contains(WEB_TOKEN), "{stderr}");
}
