//! Issuer validation and the signing matrix, below the gRPC layer.

use std::time::{Duration, SystemTime};

use palisade_proto::SpiffeId;
use palisade_runtime::metrics::LabelValue;
use rcgen::{IsCa, SanType};
use x509_parser::{extensions::GeneralName, prelude::*};

use super::{CaFiles, Issuer, IssuerError, LifetimePolicy, SignError, csr, signer::sign};
use crate::testing::{TestCa, csr, uri};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn web() -> SpiffeId {
    SpiffeId::parse(WEB).expect("valid")
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after epoch")
        .as_secs() as i64
}

#[test]
fn issued_leaf_has_exactly_what_the_design_lists() {
    let root = TestCa::fresh_root("root");
    let issuer = root.issuer();
    let policy = LifetimePolicy::default();
    let now = SystemTime::now();
    let issued = sign(
        &issuer,
        &policy,
        &web(),
        &csr(vec![], IsCa::NoCa),
        None,
        now,
    )
    .expect("signs");

    let (_, cert) = X509Certificate::from_der(&issued.certificate).expect("parses");
    // Exactly one URI SAN, the identity, critical because the subject is empty.
    let san = cert
        .subject_alternative_name()
        .expect("parses")
        .expect("has SAN");
    assert!(san.critical, "SAN must be critical with an empty subject");
    assert_eq!(san.value.general_names, vec![GeneralName::URI(WEB)]);
    assert!(cert.subject().iter().next().is_none(), "subject is empty");
    // A leaf.
    let bc = cert.basic_constraints().expect("parses").expect("present");
    assert!(!bc.value.ca);
    let ku = cert.key_usage().expect("parses").expect("present");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    let eku = cert.extended_key_usage().expect("parses").expect("present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!eku.value.any);
    // Authority key id = the issuer's subject key id.
    let (_, root_cert) = X509Certificate::from_der(issuer.certificate()).expect("parses");
    let ski = root_cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("root has SKI");
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("leaf has AKI");
    assert_eq!(aki, ski);
    // A random, positive 16-byte serial.
    assert_eq!(cert.raw_serial().len(), 16);
    assert_eq!(cert.raw_serial()[0] & 0x80, 0);
    let other = sign(
        &issuer,
        &policy,
        &web(),
        &csr(vec![], IsCa::NoCa),
        None,
        now,
    )
    .expect("signs");
    assert_ne!(issued.serial, other.serial);
    // Backdated notBefore, default lifetime.
    assert_eq!(
        cert.validity().not_before.timestamp(),
        unix(now - policy.backdate)
    );
    assert_eq!(
        cert.validity().not_after.timestamp(),
        unix(now + policy.default)
    );
    assert_eq!(unix(issued.not_after), unix(now + policy.default));
    // Signed by the issuer.
    cert.verify_signature(Some(root_cert.public_key()))
        .expect("signature verifies with the issuer key");
}

#[test]
fn csr_naming_exactly_the_identity_is_accepted() {
    let issuer = TestCa::fresh_root("root").issuer();
    sign(
        &issuer,
        &LifetimePolicy::default(),
        &web(),
        &csr(vec![uri(WEB)], IsCa::ExplicitNoCa),
        None,
        SystemTime::now(),
    )
    .expect("a CSR naming the claimed identity is fine");
}

#[test]
fn csr_refusals_carry_their_reason() {
    let issuer = TestCa::fresh_root("root").issuer();
    let policy = LifetimePolicy::default();
    let mut bad_sig = csr(vec![], IsCa::NoCa);
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 0x01;
    let mut trailing = csr(vec![], IsCa::NoCa);
    trailing.push(0);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "malformed_csr"),
        ("garbage", b"not a csr at all".to_vec(), "malformed_csr"),
        ("trailing bytes", trailing, "malformed_csr"),
        ("oversized", vec![0x30; 16 * 1024 + 1], "csr_too_large"),
        ("wrong signature", bad_sig, "bad_csr_signature"),
        (
            "DNS SAN",
            csr(
                vec![SanType::DnsName("evil.example".try_into().expect("ia5"))],
                IsCa::NoCa,
            ),
            "foreign_san",
        ),
        (
            "IP SAN",
            csr(
                vec![SanType::IpAddress("198.18.0.1".parse().expect("ip"))],
                IsCa::NoCa,
            ),
            "foreign_san",
        ),
        (
            "e-mail SAN",
            csr(
                vec![SanType::Rfc822Name(
                    "a@example.org".try_into().expect("ia5"),
                )],
                IsCa::NoCa,
            ),
            "foreign_san",
        ),
        (
            "identity plus DNS",
            csr(
                vec![
                    uri(WEB),
                    SanType::DnsName("evil.example".try_into().expect("ia5")),
                ],
                IsCa::NoCa,
            ),
            "foreign_san",
        ),
        (
            "second URI",
            csr(vec![uri(WEB), uri(WEB)], IsCa::NoCa),
            "foreign_san",
        ),
        (
            "other identity",
            csr(
                vec![uri("spiffe://cluster.local/ns/kube-system/sa/admin")],
                IsCa::NoCa,
            ),
            "foreign_san",
        ),
        (
            "asks for CA",
            csr(vec![], IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
            "csr_requests_ca",
        ),
    ];
    for (name, der, reason) in cases {
        let err = sign(&issuer, &policy, &web(), &der, None, SystemTime::now()).expect_err(name);
        assert_eq!(err.reason().as_str(), reason, "{name}: {err}");
    }
}

#[test]
fn lifetimes_are_clamped_and_too_short_ones_refused() {
    let issuer = TestCa::fresh_root("root").issuer();
    let policy = LifetimePolicy::default();
    let now = SystemTime::now();
    let lifetime = |requested| {
        sign(
            &issuer,
            &policy,
            &web(),
            &csr(vec![], IsCa::NoCa),
            requested,
            now,
        )
        .map(|i| {
            i.not_after
                .duration_since(now - Duration::from_secs(1))
                .expect("future")
        })
    };
    let granted = |d: Duration| (d.as_secs() + 1) / 60 * 60;
    assert_eq!(granted(lifetime(None).expect("default")), 3600);
    assert_eq!(
        granted(lifetime(Some(Duration::from_secs(600))).expect("shorter")),
        600
    );
    assert_eq!(
        granted(lifetime(Some(Duration::from_secs(48 * 3600))).expect("clamped")),
        24 * 3600
    );
    let err = lifetime(Some(Duration::from_secs(30))).expect_err("too short");
    assert!(matches!(err, SignError::LifetimeTooShort { .. }));
    assert_eq!(err.reason().as_str(), "lifetime_too_short");
}

#[test]
fn not_after_never_outlives_the_issuer() {
    let now = SystemTime::now();
    let root = TestCa::fresh_root("root");
    let short = root.intermediate("short-lived issuer", now + Duration::from_secs(1800));
    let issuer = Issuer::from_files(&short.files(&[], &[&root]), now).expect("valid");
    let issued = sign(
        &issuer,
        &LifetimePolicy::default(),
        &web(),
        &csr(vec![], IsCa::NoCa),
        Some(Duration::from_secs(3 * 3600)),
        now,
    )
    .expect("signs");
    assert_eq!(
        unix(issued.not_after),
        unix(now + Duration::from_secs(1800))
    );
    // The chain handed out is the intermediate (the root is in the bundle).
    assert_eq!(issuer.chain().len(), 1);
    assert_eq!(issuer.bundle().len(), 1);
}

#[test]
fn broken_issuers_are_refused_with_a_clear_reason() {
    let now = SystemTime::now();
    let root = TestCa::fresh_root("root");
    let other_root = TestCa::fresh_root("other root");
    let expired = TestCa::root(
        "expired",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    let future = TestCa::root(
        "future",
        now + Duration::from_secs(3600),
        now + Duration::from_secs(7200),
    );
    let intermediate = root.intermediate("intermediate", now + Duration::from_secs(86400));

    let key_mismatch = CaFiles::from_pem(
        root.pem.clone().into_bytes(),
        other_root.key.serialize_pem().into_bytes(),
        root.pem.clone().into_bytes(),
    );
    let leaf_as_issuer = {
        let issuer = root.issuer();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let issued = sign(
            &issuer,
            &LifetimePolicy::default(),
            &web(),
            &crate::testing::csr_for(&key, vec![], IsCa::NoCa),
            None,
            now,
        )
        .expect("signs");
        let pem = ::pem::encode(&::pem::Pem::new("CERTIFICATE", issued.certificate.to_vec()));
        CaFiles::from_pem(
            pem.into_bytes(),
            key.serialize_pem().into_bytes(),
            root.pem.clone().into_bytes(),
        )
    };

    type Expected = fn(&IssuerError) -> bool;
    let cases: Vec<(&str, CaFiles, Expected)> = vec![
        ("key of another CA", key_mismatch, |e| {
            matches!(e, IssuerError::KeyMismatch)
        }),
        ("expired issuer", expired.files(&[], &[&expired]), |e| {
            matches!(e, IssuerError::Expired(_))
        }),
        ("not yet valid", future.files(&[], &[&future]), |e| {
            matches!(e, IssuerError::NotYetValid(_))
        }),
        (
            "issuer not in bundle",
            intermediate.files(&[], &[&other_root]),
            |e| matches!(e, IssuerError::Untrusted(_)),
        ),
        ("leaf as issuer", leaf_as_issuer, |e| {
            matches!(e, IssuerError::NotCa)
        }),
        (
            "empty bundle",
            CaFiles::from_pem(
                root.pem.clone().into_bytes(),
                root.key.serialize_pem().into_bytes(),
                Vec::new(),
            ),
            |e| matches!(e, IssuerError::NoCertificate { file: "ca.crt" }),
        ),
        (
            "garbage key",
            CaFiles::from_pem(
                root.pem.clone().into_bytes(),
                b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec(),
                root.pem.clone().into_bytes(),
            ),
            |e| matches!(e, IssuerError::BadKey { .. }),
        ),
    ];
    for (name, files, expected) in cases {
        let err = Issuer::from_files(&files, now).expect_err(name);
        assert!(expected(&err), "{name}: unexpected error {err:?}");
        assert!(!err.to_string().contains("PRIVATE KEY"), "{name}: {err}");
    }

    // An intermediate chaining to a root of the bundle is fine, and so is a
    // bundle with several roots.
    Issuer::from_files(&intermediate.files(&[], &[&other_root, &root]), now)
        .expect("intermediate under a bundled root");
}

// --- csr::check on its own: keys, signatures, sizes, names ---
//
// Keys rcgen cannot make (weak, odd-sized or exotic ones) come as CSRs made
// once with OpenSSL 3 and kept in `testdata/`; `testdata/README.md` has the
// commands.

/// A CSR from `testdata/`.
macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("testdata/", $name, ".der")).as_slice()
    };
}

fn check(der: &[u8]) -> Result<csr::CheckedCsr, csr::CsrError> {
    csr::check(der, &web())
}

fn refusal(name: &str, der: &[u8]) -> csr::CsrError {
    match check(der) {
        Ok(checked) => panic!("{name}: accepted as {}", checked.key_type),
        Err(e) => e,
    }
}

#[test]
fn every_accepted_key_type_is_named() {
    let generated = |alg: &'static rcgen::SignatureAlgorithm| {
        let key = rcgen::KeyPair::generate_for(alg).expect("keygen");
        crate::testing::csr_for(&key, vec![uri(WEB)], IsCa::NoCa)
    };
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "P-256",
            generated(&rcgen::PKCS_ECDSA_P256_SHA256),
            "ecdsa-p256",
        ),
        (
            "P-384",
            generated(&rcgen::PKCS_ECDSA_P384_SHA384),
            "ecdsa-p384",
        ),
        ("Ed25519", generated(&rcgen::PKCS_ED25519), "ed25519"),
        (
            "RSA 2048, the smallest",
            fixture!("rsa2048").to_vec(),
            "rsa",
        ),
        ("RSA 8192, the largest", fixture!("rsa8192").to_vec(), "rsa"),
    ];
    for (name, der, key_type) in cases {
        let checked = check(&der).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(checked.key_type, key_type, "{name}");
    }
}

#[test]
fn weak_and_unsupported_keys_are_refused_by_name() {
    use csr::CsrError::{UnsupportedKey, WeakKey};
    type Expected = fn(&csr::CsrError) -> bool;
    let cases: [(&str, &[u8], Expected); 7] = [
        (
            "RSA 1024",
            fixture!("rsa1024"),
            |e| matches!(e, WeakKey(m) if m.starts_with("RSA 1024 bits")),
        ),
        (
            "RSA 2047, one bit short",
            fixture!("rsa2047"),
            |e| matches!(e, WeakKey(m) if m == "RSA 2047 bits, at least 2048 are required"),
        ),
        (
            "RSA 8200, above the largest",
            fixture!("rsa8200"),
            |e| matches!(e, UnsupportedKey(m) if m.starts_with("RSA 8200 bits")),
        ),
        (
            "P-192",
            fixture!("p192"),
            |e| matches!(e, WeakKey(m) if m.contains("1.2.840.10045.3.1.1")),
        ),
        (
            "P-224",
            fixture!("p224"),
            |e| matches!(e, WeakKey(m) if m.contains("1.3.132.0.33")),
        ),
        (
            "secp256k1",
            fixture!("k256"),
            |e| matches!(e, UnsupportedKey(m) if m.contains("1.3.132.0.10")),
        ),
        (
            "DSA",
            fixture!("dsa2048"),
            |e| matches!(e, UnsupportedKey(m) if m.starts_with("key algorithm")),
        ),
    ];
    for (name, der, expected) in cases {
        let err = refusal(name, der);
        assert!(expected(&err), "{name}: {err:?}");
    }
    assert_eq!(
        refusal("RSA 1024", fixture!("rsa1024")).reason().as_str(),
        "weak_key"
    );
    assert_eq!(
        refusal("DSA", fixture!("dsa2048")).reason().as_str(),
        "unsupported_key"
    );
}

#[test]
fn a_sha1_signature_is_refused_although_it_verifies() {
    let err = refusal("ECDSA with SHA-1", fixture!("p256sha1"));
    assert_eq!(
        err,
        csr::CsrError::UnsupportedSignature("1.2.840.10045.4.1".into())
    );
    assert_eq!(err.reason().as_str(), "unsupported_signature");
}

#[test]
fn the_size_bound_is_inclusive() {
    let at_bound = vec![0x30; csr::MAX_CSR_LEN];
    assert!(
        matches!(
            refusal("at the bound", &at_bound),
            csr::CsrError::Malformed(_)
        ),
        "{} bytes are parsed, not refused for size",
        csr::MAX_CSR_LEN
    );
    assert_eq!(
        refusal("one byte over", &vec![0x30; csr::MAX_CSR_LEN + 1]),
        csr::CsrError::TooLarge(csr::MAX_CSR_LEN + 1)
    );
    assert_eq!(csr::MAX_CSR_LEN, 16 * 1024);
}

#[test]
fn an_extension_that_does_not_parse_is_refused() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A subjectAltName whose value is an OCTET STRING, not a sequence of names.
    params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[2, 5, 29, 17],
        vec![0x04, 0x01, 0xff],
    )];
    let der = params.serialize_request(&key).expect("CSR").der().to_vec();
    let err = refusal("garbled SAN", &der);
    assert!(matches!(err, csr::CsrError::BadExtension(_)), "{err:?}");
    assert_eq!(err.reason().as_str(), "malformed_csr");
}

#[test]
fn refused_names_are_quoted_short_and_without_control_characters() {
    let dns = |name: &str| {
        csr(
            vec![SanType::DnsName(name.try_into().expect("ia5"))],
            IsCa::NoCa,
        )
    };
    assert_eq!(
        refusal("DNS", &dns("evil.example")),
        csr::CsrError::ForeignName("DNS:evil.example".into())
    );
    assert_eq!(
        refusal("control characters", &dns("evil\u{7}\u{1b}.example")),
        csr::CsrError::ForeignName("DNS:evil.example".into())
    );
    let long = "a".repeat(300);
    assert_eq!(
        refusal("long", &dns(&long)),
        csr::CsrError::ForeignName(format!("DNS:{}…", "a".repeat(128)))
    );
    assert_eq!(
        refusal("just short enough", &dns(&"b".repeat(127))),
        csr::CsrError::ForeignName(format!("DNS:{}", "b".repeat(127)))
    );
    assert_eq!(
        refusal(
            "IP",
            &csr(
                vec![SanType::IpAddress("198.18.0.1".parse().expect("ip"))],
                IsCa::NoCa,
            ),
        ),
        csr::CsrError::ForeignName("IP:c6120001".into())
    );
}
