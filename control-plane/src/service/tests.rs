//! The Certify matrix at the service boundary: each refusal's gRPC code and the
//! `reason` label it is counted under.

use std::{sync::Arc, time::Duration};

use palisade_proto::{
    TrustDomain,
    identity::v1::{CertifyRequest, identity_server::Identity},
};
use prometheus::Registry;
use rcgen::{IsCa, SanType};
use tonic::{Code, Request};

use super::{IdentityService, Reason};
use crate::{
    authn::{self, Authenticator, StaticTokens},
    ca::{self, CaStore, LifetimePolicy},
    metrics::{LabelValue, Metrics},
    testing::{TestCa, csr, uri},
};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const WEB_TOKEN: &[u8] = b"web-token-0123456789";

struct Harness {
    service: IdentityService,
    registry: Registry,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "tokens:\n  - token: web-token-0123456789\n    identity: {WEB}\n  \
             - token: old-token-0123456789\n    identity: spiffe://cluster.local/ns/default/sa/old\n    expires: 2020-01-01T00:00:00Z\n"
        ),
    )
    .expect("write tokens");
    let td = TrustDomain::parse("cluster.local").expect("valid");
    let authenticator =
        Authenticator::Static(StaticTokens::load(&tokens, td).expect("tokens load"));
    harness_with(dir, authenticator)
}

fn harness_with(dir: tempfile::TempDir, authenticator: Authenticator) -> Harness {
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir(&ca_dir).expect("mkdir");
    let root = TestCa::fresh_root("root");
    root.write(&ca_dir, &[], &[&root]);
    let td = TrustDomain::parse("cluster.local").expect("valid");
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).expect("register");
    let service = IdentityService::new(
        Arc::new(CaStore::load(&ca_dir).expect("CA loads")),
        Arc::new(authenticator),
        td,
        LifetimePolicy::default(),
        4,
        Duration::from_secs(1),
        metrics,
    );
    Harness {
        service,
        registry,
        _dir: dir,
    }
}

fn request(identity: &str, token: &[u8], csr_der: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        identity: identity.to_owned(),
        token: token.to_vec(),
        csr: csr_der,
        requested_lifetime: None,
    }
}

/// The value of a counter with the given labels, 0 when absent.
pub(crate) fn counter(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

#[tokio::test]
async fn a_valid_request_is_signed_and_counted() {
    let h = harness();
    let response = h
        .service
        .certify(Request::new(request(
            WEB,
            WEB_TOKEN,
            csr(vec![], IsCa::NoCa),
        )))
        .await
        .expect("issued")
        .into_inner();
    assert!(!response.certificate.is_empty());
    assert!(
        response.intermediates.is_empty(),
        "a root issuer needs no chain"
    );
    assert_eq!(response.trust_bundle.len(), 1);
    assert!(response.valid_until.is_some());
    assert_eq!(
        counter(
            &h.registry,
            "palisade_ca_certificates_issued_total",
            &[("result", "success"), ("reason", "ok")]
        ),
        1.0
    );
}

#[tokio::test]
async fn every_refusal_has_its_code_and_reason() {
    let h = harness();
    let good_csr = || csr(vec![], IsCa::NoCa);
    let mut bad_sig = good_csr();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    let with_lifetime = |seconds: i64| CertifyRequest {
        requested_lifetime: Some(prost_types_duration(seconds)),
        ..request(WEB, WEB_TOKEN, good_csr())
    };

    let cases: Vec<(&str, CertifyRequest, Code, &str)> = vec![
        (
            "no token",
            request(WEB, b"", good_csr()),
            Code::Unauthenticated,
            "missing_token",
        ),
        (
            "unknown token",
            request(WEB, b"guessed-token-000000", good_csr()),
            Code::Unauthenticated,
            "invalid_token",
        ),
        (
            "expired token",
            request(
                "spiffe://cluster.local/ns/default/sa/old",
                b"old-token-0123456789",
                good_csr(),
            ),
            Code::Unauthenticated,
            "expired_token",
        ),
        (
            "oversized token",
            request(WEB, &vec![b'a'; 16 * 1024 + 1], good_csr()),
            Code::Unauthenticated,
            "invalid_token",
        ),
        (
            "identity mismatch",
            request(
                "spiffe://cluster.local/ns/kube-system/sa/admin",
                WEB_TOKEN,
                good_csr(),
            ),
            Code::PermissionDenied,
            "identity_mismatch",
        ),
        (
            "other trust domain",
            request(
                "spiffe://evil.example/ns/default/sa/web",
                WEB_TOKEN,
                good_csr(),
            ),
            Code::PermissionDenied,
            "foreign_trust_domain",
        ),
        (
            "claim is not a SPIFFE ID",
            request("https://cluster.local/web", WEB_TOKEN, good_csr()),
            Code::InvalidArgument,
            "bad_identity",
        ),
        (
            "wrong CSR signature",
            request(WEB, WEB_TOKEN, bad_sig),
            Code::InvalidArgument,
            "bad_csr_signature",
        ),
        (
            "DNS SAN",
            request(
                WEB,
                WEB_TOKEN,
                csr(
                    vec![SanType::DnsName("evil.example".try_into().expect("ia5"))],
                    IsCa::NoCa,
                ),
            ),
            Code::InvalidArgument,
            "foreign_san",
        ),
        (
            "second URI SAN",
            request(
                WEB,
                WEB_TOKEN,
                csr(
                    vec![uri(WEB), uri("spiffe://cluster.local/ns/a/sa/b")],
                    IsCa::NoCa,
                ),
            ),
            Code::InvalidArgument,
            "foreign_san",
        ),
        (
            "CA:true",
            request(
                WEB,
                WEB_TOKEN,
                csr(vec![], IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
            ),
            Code::InvalidArgument,
            "csr_requests_ca",
        ),
        (
            "oversized CSR",
            request(WEB, WEB_TOKEN, vec![0x30; 16 * 1024 + 1]),
            Code::InvalidArgument,
            "csr_too_large",
        ),
        (
            "garbage CSR",
            request(WEB, WEB_TOKEN, b"garbage".to_vec()),
            Code::InvalidArgument,
            "malformed_csr",
        ),
        (
            "lifetime below minimum",
            with_lifetime(30),
            Code::InvalidArgument,
            "lifetime_too_short",
        ),
        (
            "negative lifetime",
            with_lifetime(-5),
            Code::InvalidArgument,
            "bad_lifetime",
        ),
    ];
    for (name, req, code, reason) in cases {
        let labels = [("result", "failure"), ("reason", reason)];
        let before = counter(
            &h.registry,
            "palisade_ca_certificates_issued_total",
            &labels,
        );
        let status = h.service.certify(Request::new(req)).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{reason}: ")),
            "{name}: message {:?} should start with the reason",
            status.message()
        );
        assert!(
            !status.message().contains("0123456789"),
            "{name}: the token leaks into {:?}",
            status.message()
        );
        let after = counter(
            &h.registry,
            "palisade_ca_certificates_issued_total",
            &labels,
        );
        assert_eq!(after - before, 1.0, "{name}: counted under reason {reason}");
    }
    assert_eq!(
        counter(
            &h.registry,
            "palisade_ca_authentication_failures_total",
            &[("authenticator", "static"), ("reason", "expired_token")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            &h.registry,
            "palisade_ca_certificates_issued_total",
            &[("result", "success")]
        ),
        0.0
    );
}

#[tokio::test]
async fn long_lifetimes_are_clamped_not_refused() {
    let h = harness();
    let req = CertifyRequest {
        requested_lifetime: Some(prost_types_duration(7 * 86400)),
        ..request(WEB, WEB_TOKEN, csr(vec![], IsCa::NoCa))
    };
    let response = h
        .service
        .certify(Request::new(req))
        .await
        .expect("issued")
        .into_inner();
    let valid_until = response.valid_until.expect("set").seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after epoch")
        .as_secs() as i64;
    assert!((valid_until - now - 86400).abs() <= 2, "clamped to 24h");
}

fn prost_types_duration(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

#[tokio::test]
async fn kubernetes_tokens_map_to_codes_and_reasons() {
    use crate::authn::kubernetes::tests::{api_server, authenticator, token};
    let api = api_server().await;
    let h = harness_with(
        tempfile::tempdir().expect("tempdir"),
        Authenticator::Kubernetes(authenticator(&api)),
    );
    const API: &str = "spiffe://cluster.local/ns/prod/sa/api";

    let ok = h
        .service
        .certify(Request::new(request(
            API,
            token("good-token").as_bytes(),
            csr(vec![], IsCa::NoCa),
        )))
        .await;
    assert!(ok.is_ok(), "{ok:?}");

    for (kind, claim, code, reason) in [
        ("wrong-aud", API, Code::Unauthenticated, "wrong_audience"),
        ("other-aud-ok", API, Code::Unauthenticated, "wrong_audience"),
        ("expired", API, Code::Unauthenticated, "expired_token"),
        ("unknown", API, Code::Unauthenticated, "invalid_token"),
        ("user-token", API, Code::PermissionDenied, "bad_identity"),
        (
            "good-token",
            WEB,
            Code::PermissionDenied,
            "identity_mismatch",
        ),
    ] {
        let status = h
            .service
            .certify(Request::new(request(
                claim,
                token(kind).as_bytes(),
                csr(vec![], IsCa::NoCa),
            )))
            .await
            .expect_err(kind);
        assert_eq!(status.code(), code, "{kind}: {status:?}");
        assert!(
            status.message().starts_with(reason),
            "{kind}: {:?}",
            status.message()
        );
        assert!(
            !status.message().contains(&token(kind)),
            "{kind}: token leaked"
        );
    }
    assert_eq!(
        counter(
            &h.registry,
            "palisade_ca_authentication_failures_total",
            &[
                ("authenticator", "kubernetes"),
                ("reason", "wrong_audience")
            ]
        ),
        2.0
    );

    // The API server failing: UNAVAILABLE, so the sidecar retries.
    api.inject(palisade_tests::kube::Fault::status(
        500,
        "etcdserver: request timed out",
    ));
    let h = harness_with(
        tempfile::tempdir().expect("tempdir"),
        Authenticator::Kubernetes(authenticator(&api)),
    );
    let status = h
        .service
        .certify(Request::new(request(
            API,
            token("good-token").as_bytes(),
            csr(vec![], IsCa::NoCa),
        )))
        .await
        .expect_err("API server failing");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("authority_unavailable"),
        "{:?}",
        status.message()
    );
}

#[test]
fn the_authenticators_and_the_cas_reasons_keep_their_names() {
    // One label, three sources: a reason must read the same in
    // palisade_ca_authentication_failures_total and in the Certify status.
    for reason in authn::Reason::ALL {
        assert_eq!(Reason::from(*reason).as_str(), reason.as_str());
    }
    for reason in ca::Reason::ALL {
        assert_eq!(Reason::from(*reason).as_str(), reason.as_str());
    }
    assert_eq!(
        Reason::names(),
        [
            "missing_token",
            "invalid_token",
            "expired_token",
            "wrong_audience",
            "identity_mismatch",
            "foreign_trust_domain",
            "bad_identity",
            "malformed_csr",
            "csr_too_large",
            "bad_csr_signature",
            "unsupported_signature",
            "weak_key",
            "unsupported_key",
            "foreign_san",
            "csr_requests_ca",
            "lifetime_too_short",
            "bad_lifetime",
            "authority_unavailable",
            "overloaded",
            "issuer_expired",
            "internal",
        ]
    );
}
