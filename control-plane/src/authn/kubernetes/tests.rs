//! The kubernetes authenticator against the stand-in API server
//! (`palisade_tests::kube`): real HTTPS, the real `kube` client, and
//! TokenReview answers scripted per token.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use palisade_tests::kube::{ApiServer, Fault, TokenAnswer};
use serde_json::json;

use super::*;

/// The control plane's own credential, as the test API server must see it.
const CONTROL_PLANE_TOKEN: &str = "control-plane-sa-token";

/// What the API server says when RBAC refuses the control plane.
const FORBIDDEN: &str = "tokenreviews.authentication.k8s.io is forbidden: User \
    \"system:serviceaccount:palisade:control-plane\" cannot create resource \
    \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope";

/// A workload token: the stand-in is scripted by the part before the first
/// `.` (as in a JWT); the random-looking rest makes "the token never shows
/// up in an error" a meaningful check.
pub(crate) fn token(kind: &str) -> String {
    format!("{kind}.eyJzdWIiOiJzZWNyZXQtcGF5bG9hZCJ9.c2lnbmF0dXJlLXNlY3JldA")
}

fn install_crypto_provider() {
    // Another test may have installed it already: either way aws-lc-rs is in place.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The stand-in API server, accepting only the control plane's credential,
/// with an answer for each kind of token.
pub(crate) async fn api_server() -> ApiServer {
    install_crypto_provider();
    let status = |audiences: &[&str]| {
        TokenAnswer::literal(json!({
            "authenticated": true, "audiences": audiences,
            "user": {"username": "system:serviceaccount:prod:api", "uid": "0b5d6e1c"},
        }))
    };
    ApiServer::builder()
        .client_token(CONTROL_PLANE_TOKEN)
        .token_review(
            token("good-token"),
            TokenAnswer::service_account("prod", "api", &["palisade"]),
        )
        // A token for another audience: the stand-in answers as the real
        // server does ("token audiences [\"other\"] is invalid for ...").
        .token_review(
            token("wrong-aud"),
            TokenAnswer::service_account("prod", "api", &["other"]),
        )
        .token_review(token("expired"), TokenAnswer::expired())
        .token_review(
            token("user-token"),
            TokenAnswer::valid("alice", &["palisade"]),
        )
        // Servers that vouch for a token without our audience.
        .token_review(token("other-aud-ok"), status(&["other"]))
        .token_review(token("no-aud"), status(&[]))
        // A careless authenticator that echoes the token in its error.
        .token_review(
            token("unknown"),
            TokenAnswer::invalid(&format!(
                "[invalid bearer token, token lookup failed for {}]",
                token("unknown")
            )),
        )
        .start()
        .await
        .expect("the stand-in API server starts")
}

/// The authenticator, reaching `api` with the control plane's credential.
pub(crate) fn authenticator(api: &ApiServer) -> KubernetesAuthenticator {
    authenticator_with(api.kube_config(), DEFAULT_REQUEST_TIMEOUT)
}

fn authenticator_with(mut config: kube::Config, timeout: Duration) -> KubernetesAuthenticator {
    config.auth_info.token = Some(CONTROL_PLANE_TOKEN.to_owned().into());
    let client = kube::Client::try_from(config).expect("build kube client");
    KubernetesAuthenticator::with_client(
        client,
        KubernetesConfig {
            request_timeout: timeout,
            ..KubernetesConfig::default()
        },
    )
}

/// Authenticates `token` and checks that the error, if any, does not carry it.
async fn check(authn: &KubernetesAuthenticator, token: &str) -> Result<SpiffeId, AuthnError> {
    let result = authn.authenticate(token.as_bytes()).await;
    if let Err(error) = &result {
        let text = format!("{error} / {error:?}");
        assert!(!text.contains(token), "the error leaks the token: {text}");
    }
    result
}

#[tokio::test]
async fn a_service_account_token_yields_its_spiffe_id() {
    let server = api_server().await;
    let id = check(&authenticator(&server), &token("good-token"))
        .await
        .expect("authenticated");
    assert_eq!(id.as_str(), "spiffe://cluster.local/ns/prod/sa/api");

    let authorization: Vec<Option<String>> = server
        .requests()
        .into_iter()
        .map(|r| r.authorization)
        .collect();
    assert_eq!(
        authorization,
        [Some(format!("Bearer {CONTROL_PLANE_TOKEN}"))],
        "the API server sees the control plane's own credential"
    );
    let audiences: Vec<Vec<String>> = server
        .token_reviews()
        .into_iter()
        .map(|r| r.audiences)
        .collect();
    assert_eq!(audiences, [vec!["palisade".to_owned()]]);
}

#[tokio::test]
async fn verdicts_of_the_api_server_map_to_reasons() {
    let server = api_server().await;
    let authn = authenticator(&server);
    let audience = AuthnError::WrongAudience("palisade".to_owned());
    let cases = [
        ("unknown", AuthnError::InvalidToken(String::new())),
        ("wrong-aud", audience.clone()),
        ("other-aud-ok", audience.clone()),
        ("no-aud", audience),
        ("expired", AuthnError::ExpiredToken),
        ("user-token", AuthnError::BadIdentity("alice".to_owned())),
    ];
    for (kind, want) in cases {
        let got = check(&authn, &token(kind)).await.expect_err(kind);
        match (&got, &want) {
            (AuthnError::InvalidToken(_), AuthnError::InvalidToken(_)) => {}
            _ => assert_eq!(got, want, "{kind}"),
        }
    }
    assert_eq!(server.requests().len(), 6);
}

#[tokio::test]
async fn a_non_utf8_token_is_refused_without_asking_the_api_server() {
    let server = api_server().await;
    let got = authenticator(&server)
        .authenticate(&[0x67, 0xff, 0xfe, 0x00])
        .await;
    assert!(matches!(got, Err(AuthnError::InvalidToken(_))), "{got:?}");
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn an_api_server_that_is_down_is_unavailable() {
    let server = api_server().await;
    let authn = authenticator(&server);
    server.shutdown().await;
    let got = check(&authn, &token("good-token")).await;
    assert!(matches!(got, Err(AuthnError::Unavailable(_))), "{got:?}");
}

#[tokio::test]
async fn an_api_server_that_never_answers_is_unavailable_within_the_timeout() {
    let server = api_server().await;
    server.inject(Fault::hang());
    let authn = authenticator_with(server.kube_config(), Duration::from_millis(500));
    let started = Instant::now();
    let got = check(&authn, &token("good-token")).await;
    assert!(matches!(got, Err(AuthnError::Unavailable(_))), "{got:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(server.requests().len(), 1, "the request reached the server");
}

#[tokio::test]
async fn an_api_server_with_an_untrusted_certificate_is_unavailable() {
    let server = api_server().await;
    let other = ApiServer::start().await.expect("another stand-in");
    let mut config = server.kube_config();
    config.root_cert = Some(vec![other.ca_der().to_vec()]);
    let got = check(
        &authenticator_with(config, DEFAULT_REQUEST_TIMEOUT),
        &token("good-token"),
    )
    .await;
    assert!(matches!(got, Err(AuthnError::Unavailable(_))), "{got:?}");
    assert!(
        server.requests().is_empty(),
        "no request goes to an unverified server"
    );
}

#[tokio::test]
async fn refused_control_plane_credentials_are_unavailable_and_say_so() {
    for (code, hint) in [(403, "create tokenreviews"), (401, "ServiceAccount token")] {
        let server = api_server().await;
        server.inject(Fault::status(code, FORBIDDEN));
        let got = check(&authenticator(&server), &token("good-token"))
            .await
            .expect_err("refused");
        let AuthnError::Unavailable(why) = &got else {
            panic!("{code}: {got:?}");
        };
        assert!(why.contains(hint), "{code}: {why}");
    }
}

#[tokio::test]
async fn a_failing_api_server_is_unavailable() {
    for fault in [
        Fault::status(500, "etcdserver: request timed out"),
        // A page that is no TokenReview, as a proxy or a wrong URL gives.
        Fault::raw(200, "text/html", "<html>hello</html>"),
    ] {
        let server = api_server().await;
        server.inject(fault.clone());
        let got = check(&authenticator(&server), &token("good-token")).await;
        assert!(
            matches!(got, Err(AuthnError::Unavailable(_))),
            "{fault:?}: {got:?}"
        );
    }
}

/// A `MakeWriter` that keeps every log line.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_log_line_carries_the_token() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    // The test runtime polls everything on this thread, kube's own logs included.
    let _default = tracing::subscriber::set_default(subscriber);

    let server = api_server().await;
    let authn = authenticator(&server);
    let mut tokens = Vec::new();
    for kind in [
        "good-token",
        "unknown",
        "wrong-aud",
        "other-aud-ok",
        "expired",
        "user-token",
    ] {
        let token = token(kind);
        let _ = check(&authn, &token).await;
        tokens.push(token);
    }
    server.inject(Fault::status(403, FORBIDDEN));
    let _ = check(&authn, &tokens[0]).await;

    let logs = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("UTF-8 logs");
    assert!(
        logs.contains("did not authenticate the token") && logs.contains("<token>"),
        "the logs were captured, with the echoed token cut out: {logs}"
    );
    for token in &tokens {
        assert!(
            !logs.contains(token.as_str()),
            "a log line leaks the token: {logs}"
        );
    }
}

#[test]
fn only_service_account_usernames_map_to_spiffe_ids() {
    let td = TrustDomain::parse("cluster.local").expect("valid");
    let id = service_account_identity(&td, "system:serviceaccount:kube-system:coredns")
        .expect("a service account");
    assert_eq!(
        id.as_str(),
        "spiffe://cluster.local/ns/kube-system/sa/coredns"
    );

    for username in [
        "",
        "alice",
        "system:node:worker-1",
        "system:anonymous",
        "system:serviceaccount:prod",
        "system:serviceaccount:prod:",
        "system:serviceaccount::api",
        "system:serviceaccount:prod:api:extra",
        "system:serviceaccount:prod:a/b",
        "system:serviceaccount:..:api",
        "System:ServiceAccount:prod:api",
    ] {
        assert_eq!(
            service_account_identity(&td, username),
            Err(AuthnError::BadIdentity(username.to_owned())),
            "{username:?}"
        );
    }
}

#[tokio::test]
async fn debug_shows_no_credentials() {
    let server = api_server().await;
    let text = format!("{:?}", authenticator(&server));
    assert!(!text.contains(CONTROL_PLANE_TOKEN), "{text}");
    assert!(text.contains("palisade"), "{text}");
}
