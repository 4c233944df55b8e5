use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use axum::{extract::State, http::HeaderMap};
use tokio::net::TcpListener;

use super::*;

fn probes(json: &str) -> AppProbes {
    json.parse().expect("valid probes")
}

/// An HTTP app on loopback: `/ok` 204, `/moved` 302, `/sick` 500, `/echo`
/// 200 when the probe's header and kubelet's user agent came; counts calls.
async fn app() -> (SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route("/ok", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/moved",
            get(|| async { (StatusCode::FOUND, [("location", "/elsewhere")]) }),
        )
        .route("/sick", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
        .route(
            "/echo",
            get(|headers: HeaderMap| async move {
                let ok = headers.get("x-probe").is_some_and(|v| v == "kubelet")
                    && headers
                        .get("user-agent")
                        .is_some_and(|v| v.to_str().is_ok_and(|v| v.starts_with("kube-probe/")));
                if ok {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_REQUEST
                }
            }),
        )
        .route(
            "/slow",
            get(|State(calls): State<Arc<AtomicUsize>>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                StatusCode::OK
            }),
        )
        .with_state(calls.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, calls)
}

fn http(port: u16, path: &str) -> String {
    format!(
        r#"{{"web/readiness": {{"httpGet": {{"port": {port}, "path": "{path}", "scheme": "HTTP",
             "httpHeaders": [{{"name": "X-Probe", "value": "kubelet"}}]}}, "timeoutSeconds": 1}}}}"#
    )
}

#[test]
fn what_the_webhook_writes_parses_and_nothing_else_does() {
    let parsed = probes(
        r#"{"web/liveness": {"httpGet": {"port": 8080, "path": "/healthz", "scheme": "HTTPS"}, "timeoutSeconds": 2},
            "web/readiness": {"tcpSocket": {"port": 8080}},
            "web/startup": {"grpc": {"port": 9090, "service": "web.v1"}}}"#,
    );
    assert_eq!(parsed.0.len(), 3);
    assert_eq!(
        parsed.0["web/readiness"].timeout_seconds, 1,
        "kubelet's default"
    );
    for (bad, needle) in [
        (
            r#"{"web/liveness": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}}"#,
            "exactly one",
        ),
        (r#"{"web/liveness": {}}"#, "exactly one"),
        (r#"{"web/liveness": {"tcpSocket": {"port": 0}}}"#, "port 0"),
        (
            r#"{"web/healthiness": {"tcpSocket": {"port": 1}}}"#,
            "not <container>/",
        ),
        (
            r#"{"web/liveness": {"tcpSocket": {"port": 70000}}}"#,
            "not the JSON",
        ),
        (
            r#"{"web/liveness": {"exec": {"command": ["secret-token"]}}}"#,
            "not the JSON",
        ),
        (r#"not json secret-token"#, "not the JSON"),
    ] {
        let error = bad.parse::<AppProbes>().expect_err(bad).to_string();
        assert!(error.contains(needle), "{bad}: {error}");
        assert!(
            !error.contains("secret-token"),
            "the text is not quoted: {error}"
        );
    }
}

#[tokio::test]
async fn http_probes_pass_on_2xx_and_3xx_and_carry_the_probe_s_headers() {
    let (addr, _) = app().await;
    for (path, passes) in [
        ("/ok", true),
        ("/moved", true),
        ("/echo", true),
        ("/sick", false),
        ("/missing", false),
    ] {
        let prober =
            Prober::new(probes(&http(addr.port(), path)), Some(addr.ip())).expect("prober");
        let result = prober.run("web/readiness").await.expect("a probe");
        assert_eq!(result.is_ok(), passes, "{path}: {result:?}");
    }
    let prober = Prober::new(probes(&http(addr.port(), "/sick")), Some(addr.ip())).expect("prober");
    assert_eq!(
        prober.run("web/readiness").await,
        Some(Err("HTTP 500 Internal Server Error".to_owned()))
    );
    assert_eq!(prober.run("web/liveness").await, None, "no such probe");
}

#[tokio::test]
async fn tcp_probes_reach_the_app_itself_and_fail_when_it_is_gone() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let json = format!(r#"{{"db/liveness": {{"tcpSocket": {{"port": {port}}}}}}}"#);
    let prober = Prober::new(probes(&json), None).expect("prober");
    assert_eq!(prober.run("db/liveness").await, Some(Ok(())));
    drop(listener);
    tokio::time::sleep(REUSE).await;
    let result = prober.run("db/liveness").await.expect("a probe");
    let error = result.expect_err("the app is gone");
    assert!(error.contains("refused"), "{error}");
}

#[tokio::test]
async fn grpc_probes_ask_the_health_service() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("web.v1", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("web.v2", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let json = format!(
        r#"{{"web/liveness": {{"grpc": {{"port": {0}, "service": "web.v1"}}}},
            "web/readiness": {{"grpc": {{"port": {0}, "service": "web.v2"}}}},
            "web/startup": {{"grpc": {{"port": {0}, "service": "nobody"}}}}}}"#,
        addr.port()
    );
    let prober = Prober::new(probes(&json), None).expect("prober");
    assert_eq!(prober.run("web/liveness").await, Some(Ok(())));
    assert_eq!(
        prober.run("web/readiness").await,
        Some(Err("gRPC health: NOT_SERVING".to_owned()))
    );
    assert!(prober.run("web/startup").await.expect("probe").is_err());
}

#[tokio::test]
async fn a_flood_of_probe_requests_costs_the_app_one_probe_at_a_time() {
    let (addr, calls) = app().await;
    let prober = Arc::new(
        Prober::new(probes(&http(addr.port(), "/slow")), Some(addr.ip())).expect("prober"),
    );
    let flood: Vec<_> = (0..50)
        .map(|_| {
            let prober = prober.clone();
            tokio::spawn(async move { prober.run("web/readiness").await })
        })
        .collect();
    for request in flood {
        assert_eq!(request.await.expect("task"), Some(Ok(())));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "50 requests, one probe");
    tokio::time::sleep(REUSE).await;
    prober.run("web/readiness").await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a stale result is not reused"
    );
}
