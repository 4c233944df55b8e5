//! The control plane binary with `--authenticator kubernetes`, finding its API
//! server through KUBECONFIG like `kubectl` does, against the stand-in API
//! server (`palisade_tests::kube`) answering TokenReview over HTTPS.

use std::process::{Command, Stdio};

use palisade_proto::identity::v1::CertifyRequest;
use palisade_tests::{
    ControlPlane, bin,
    kube::{ApiServer, TokenAnswer},
    metric,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tonic::Code;

const IDENTITY: &str = "spiffe://cluster.local/ns/prod/sa/api";

/// The control plane's own credential: the stand-in answers nothing else.
const CONTROL_PLANE_TOKEN: &str = "control-plane-token";

fn request(token: &str, identity: &str) -> CertifyRequest {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().expect("ia5"))];
    CertifyRequest {
        identity: identity.into(),
        token: token.as_bytes().to_vec(),
        csr: params.serialize_request(&key).expect("csr").der().to_vec(),
        requested_lifetime: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_validates_service_account_tokens_through_kubeconfig() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();

    // Authenticated only for the audience `palisade`, as the real server
    // answers: the control plane must ask for it.
    let api = ApiServer::builder()
        .client_token(CONTROL_PLANE_TOKEN)
        .token_review(
            "good-sa-token",
            TokenAnswer::service_account("prod", "api", &["palisade"]),
        )
        .token_review(
            "other-audience-token",
            TokenAnswer::service_account("prod", "api", &["vault"]),
        )
        .start()
        .await
        .expect("the stand-in API server starts");
    let kubeconfig = d.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, None).expect("kubeconfig");

    let status = Command::new(bin("palisade-control-plane"))
        .args(["ca", "init", "--out"])
        .arg(d.join("ca"))
        .stdout(Stdio::null())
        .status()
        .expect("ca init");
    assert!(status.success());
    let cp = ControlPlane::spawn(
        &d.join("ca"),
        &["--authenticator", "kubernetes", "--kube-timeout", "2s"],
        &[("KUBECONFIG", kubeconfig.as_path())],
        &[],
    )
    .expect("the control plane starts with the kubernetes authenticator");
    let mut client = cp.client().await.expect("client");

    let issued = client
        .certify(request("good-sa-token", IDENTITY))
        .await
        .expect("a valid service-account token is certified");
    assert!(!issued.into_inner().certificate.is_empty());

    for (token, identity, code, reason) in [
        (
            "stolen-or-garbage",
            IDENTITY,
            Code::Unauthenticated,
            "invalid_token",
        ),
        (
            "other-audience-token",
            IDENTITY,
            Code::Unauthenticated,
            "wrong_audience",
        ),
        (
            "good-sa-token",
            "spiffe://cluster.local/ns/prod/sa/admin",
            Code::PermissionDenied,
            "identity_mismatch",
        ),
    ] {
        let status = client
            .certify(request(token, identity))
            .await
            .expect_err(token);
        assert_eq!(status.code(), code, "{token}: {status:?}");
        assert!(
            status.message().starts_with(reason),
            "{token}: {:?}",
            status.message()
        );
        assert!(
            !status.message().contains(token),
            "the token leaks: {:?}",
            status.message()
        );
    }

    // Every review asked for the audience `palisade`, with the control
    // plane's own credential.
    let reviews = api.token_reviews();
    assert_eq!(reviews.len(), 4, "{reviews:?}");
    assert!(
        reviews.iter().all(|r| r.audiences == ["palisade"]),
        "{reviews:?}"
    );
    assert!(
        api.requests()
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer control-plane-token")),
        "the control plane presents its kubeconfig credential"
    );

    // The API server gone: UNAVAILABLE, so sidecars retry.
    api.shutdown().await;
    let status = client
        .certify(request("good-sa-token", IDENTITY))
        .await
        .expect_err("API server down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("authority_unavailable"),
        "{:?}",
        status.message()
    );
    assert_eq!(
        metric(
            &cp.metrics().expect("metrics"),
            "palisade_ca_authentication_failures_total",
            &[
                ("authenticator", "kubernetes"),
                ("reason", "authority_unavailable")
            ]
        ),
        1.0
    );
}
