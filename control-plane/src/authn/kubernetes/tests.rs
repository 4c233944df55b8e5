//! The kubernetes authenticator against a real HTTPS server on loopback that
//! answers TokenReview like an API server.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::UserInfo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::*;

/// The control plane's own credential, as the test API server must see it.
const CONTROL_PLANE_TOKEN: &str = "control-plane-sa-token";

/// A workload token: the test server picks its answer by the part before the
/// first `.` (as in a JWT); the random-looking rest makes "the token never
/// shows up in an error" a meaningful check.
pub(crate) fn token(kind: &str) -> String {
    format!("{kind}.eyJzdWIiOiJzZWNyZXQtcGF5bG9hZCJ9.c2lnbmF0dXJlLXNlY3JldA")
}

pub(crate) fn install_crypto_provider() {
    // Another test may have installed it already: either way aws-lc-rs is in place.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// How the test API server behaves.
#[derive(Clone, Copy)]
pub(crate) enum Behaviour {
    /// Answers TokenReviews by the token's kind.
    Review,
    /// Answers every request with this status and a `metav1.Status` body.
    Fail(StatusCode),
    /// Answers every request with `200 OK` and a page that is no TokenReview,
    /// like a proxy or a wrong URL would.
    NotAReview,
}

/// What the test API server saw.
#[derive(Default)]
struct Seen {
    authorization: Vec<String>,
    audiences: Vec<Vec<String>>,
}

/// A loopback HTTPS server playing the Kubernetes API server.
pub(crate) struct ApiServer {
    url: http::Uri,
    ca_der: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
}

/// A CA and a server certificate for 127.0.0.1 / localhost it signed.
fn server_tls() -> (Vec<u8>, rustls::ServerConfig) {
    let ca_key = KeyPair::generate().expect("generate CA key");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().expect("generate server key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("sign server cert");

    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], private_key_der(&key))
        .expect("server TLS config");
    (ca_cert.der().to_vec(), config)
}

fn private_key_der(key: &KeyPair) -> rustls::pki_types::PrivateKeyDer<'static> {
    rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into())
}

// === impl ApiServer ===

impl ApiServer {
    pub(crate) async fn start(behaviour: Behaviour) -> Self {
        let (ca_der, tls) = server_tls();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task_seen = seen.clone();
        // The runtime drops the task when the test ends.
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let seen = task_seen.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| answer(req, behaviour, seen.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            url: url(addr),
            ca_der,
            seen,
        }
    }

    pub(crate) fn authenticator(&self) -> KubernetesAuthenticator {
        authenticator(
            self.url.clone(),
            self.ca_der.clone(),
            DEFAULT_REQUEST_TIMEOUT,
        )
    }

    fn requests(&self) -> usize {
        self.seen.lock().expect("lock").authorization.len()
    }
}

fn url(addr: SocketAddr) -> http::Uri {
    format!("https://{addr}").parse().expect("valid URL")
}

fn authenticator(url: http::Uri, ca_der: Vec<u8>, timeout: Duration) -> KubernetesAuthenticator {
    let mut config = kube::Config::new(url);
    config.root_cert = Some(vec![ca_der]);
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

async fn answer(
    req: Request<Incoming>,
    behaviour: Behaviour,
    seen: Arc<Mutex<Seen>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let body = req.into_body().collect().await?.to_bytes();
    seen.lock().expect("lock").authorization.push(authorization);

    if let Behaviour::Fail(code) = behaviour {
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code.as_u16(),
            "reason": code.canonical_reason().unwrap_or("Failure").replace(' ', ""),
            "message": "tokenreviews.authentication.k8s.io is forbidden: User \
                \"system:serviceaccount:palisade:control-plane\" cannot create resource \
                \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
        });
        return Ok(json(code, &status));
    }
    if let Behaviour::NotAReview = behaviour {
        let mut page = Response::new(Full::new(Bytes::from_static(b"<html>hello</html>")));
        page.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/html"),
        );
        return Ok(page);
    }
    if method != http::Method::POST || path != "/apis/authentication.k8s.io/v1/tokenreviews" {
        return Ok(json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"kind": "Status"}),
        ));
    }
    let Ok(mut review) = serde_json::from_slice::<TokenReview>(&body) else {
        return Ok(json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"kind": "Status"}),
        ));
    };
    seen.lock()
        .expect("lock")
        .audiences
        .push(review.spec.audiences.clone().unwrap_or_default());
    let token = review.spec.token.clone().unwrap_or_default();
    review.status = Some(verdict(&token));
    // Like the real API server, the answer echoes the spec, token included.
    Ok(json(StatusCode::CREATED, &review))
}

fn verdict(token: &str) -> TokenReviewStatus {
    let authenticated = |username: &str, audiences: &[&str]| TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
        user: Some(UserInfo {
            username: Some(username.to_owned()),
            uid: Some("0b5d6e1c".to_owned()),
            ..UserInfo::default()
        }),
        error: None,
    };
    let refused = |error: &str| TokenReviewStatus {
        authenticated: Some(false),
        error: Some(error.to_owned()),
        ..TokenReviewStatus::default()
    };
    match token.split('.').next().unwrap_or_default() {
        "good-token" => authenticated("system:serviceaccount:prod:api", &["palisade"]),
        "wrong-aud" => refused(
            "[invalid bearer token, token audiences [\"other\"] is invalid for the target \
             audiences [\"palisade\"]]",
        ),
        "expired" => refused("[invalid bearer token, service account token has expired]"),
        "user-token" => authenticated("alice", &["palisade"]),
        "other-aud-ok" => authenticated("system:serviceaccount:prod:api", &["other"]),
        "no-aud" => authenticated("system:serviceaccount:prod:api", &[]),
        // A careless authenticator that echoes the token in its error.
        _ => refused(&format!(
            "[invalid bearer token, token lookup failed for {token}]"
        )),
    }
}

fn json(code: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).expect("serialize JSON");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
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
    install_crypto_provider();
    let server = ApiServer::start(Behaviour::Review).await;
    let id = check(&server.authenticator(), &token("good-token"))
        .await
        .expect("authenticated");
    assert_eq!(id.as_str(), "spiffe://cluster.local/ns/prod/sa/api");

    let seen = server.seen.lock().expect("lock");
    assert_eq!(
        seen.authorization,
        [format!("Bearer {CONTROL_PLANE_TOKEN}")],
        "the API server sees the control plane's own credential"
    );
    assert_eq!(seen.audiences, [vec!["palisade".to_owned()]]);
}

#[tokio::test]
async fn verdicts_of_the_api_server_map_to_reasons() {
    install_crypto_provider();
    let server = ApiServer::start(Behaviour::Review).await;
    let authn = server.authenticator();
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
    assert_eq!(server.requests(), 6);
}

#[tokio::test]
async fn a_non_utf8_token_is_refused_without_asking_the_api_server() {
    install_crypto_provider();
    let server = ApiServer::start(Behaviour::Review).await;
    let got = server
        .authenticator()
        .authenticate(&[0x67, 0xff, 0xfe, 0x00])
        .await;
    assert!(matches!(got, Err(AuthnError::InvalidToken(_))), "{got:?}");
    assert_eq!(server.requests(), 0);
}

#[tokio::test]
async fn an_api_server_that_is_down_is_unavailable() {
    install_crypto_provider();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    let (ca_der, _) = server_tls();
    let authn = authenticator(url(addr), ca_der, DEFAULT_REQUEST_TIMEOUT);
    let got = check(&authn, &token("good-token")).await;
    assert!(matches!(got, Err(AuthnError::Unavailable(_))), "{got:?}");
}

#[tokio::test]
async fn an_api_server_that_never_answers_is_unavailable_within_the_timeout() {
    install_crypto_provider();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    // Accept connections and hold them, silent.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let (ca_der, _) = server_tls();
    let authn = authenticator(url(addr), ca_der, Duration::from_millis(500));
    let started = Instant::now();
    let got = check(&authn, &token("good-token")).await;
    assert!(matches!(got, Err(AuthnError::Unavailable(_))), "{got:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_api_server_with_an_untrusted_certificate_is_unavailable() {
    install_crypto_provider();
    let server = ApiServer::start(Behaviour::Review).await;
    let (other_ca, _) = server_tls();
    let authn = authenticator(server.url.clone(), other_ca, DEFAULT_REQUEST_TIMEOUT);
    let got = check(&authn, &token("good-token")).await;
    assert!(matches!(got, Err(AuthnError::Unavailable(_))), "{got:?}");
    assert_eq!(
        server.requests(),
        0,
        "no request goes to an unverified server"
    );
}

#[tokio::test]
async fn refused_control_plane_credentials_are_unavailable_and_say_so() {
    install_crypto_provider();
    for (code, hint) in [
        (StatusCode::FORBIDDEN, "create tokenreviews"),
        (StatusCode::UNAUTHORIZED, "ServiceAccount token"),
    ] {
        let server = ApiServer::start(Behaviour::Fail(code)).await;
        let got = check(&server.authenticator(), &token("good-token"))
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
    install_crypto_provider();
    for behaviour in [
        Behaviour::Fail(StatusCode::INTERNAL_SERVER_ERROR),
        Behaviour::NotAReview,
    ] {
        let server = ApiServer::start(behaviour).await;
        let got = check(&server.authenticator(), &token("good-token")).await;
        assert!(matches!(got, Err(AuthnError::Unavailable(_))), "{got:?}");
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
    install_crypto_provider();
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    // The test runtime polls everything on this thread, kube's own logs included.
    let _default = tracing::subscriber::set_default(subscriber);

    let server = ApiServer::start(Behaviour::Review).await;
    let authn = server.authenticator();
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
    let refusing = ApiServer::start(Behaviour::Fail(StatusCode::FORBIDDEN)).await;
    let _ = check(&refusing.authenticator(), &tokens[0]).await;

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
    install_crypto_provider();
    let (ca_der, _) = server_tls();
    let authn = authenticator(
        "https://127.0.0.1:6443".parse().expect("valid URL"),
        ca_der,
        DEFAULT_REQUEST_TIMEOUT,
    );
    let text = format!("{authn:?}");
    assert!(!text.contains(CONTROL_PLANE_TOKEN), "{text}");
    assert!(text.contains("palisade"), "{text}");
}
