use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use axum::body::Body;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
    task::JoinHandle,
};
use tower::ServiceExt;

use super::*;

fn state(limits: AdminLimits) -> AdminState {
    let registry = Registry::new();
    let counter = prometheus::IntCounter::new("palisade_test_total", "a test counter")
        .expect("a valid counter");
    registry
        .register(Box::new(counter))
        .expect("registered once");
    AdminState {
        registry,
        ready: Arc::new(|| true),
        config: Arc::new(serde_json::json!({"trust_domain": "cluster.local"})),
        routes: Router::new()
            .route("/extra", get(|| async { "extra\n" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow\n"
                }),
            ),
        limits,
    }
}

async fn call(app: &Router, path: &str) -> (StatusCode, String) {
    let request = axum::http::Request::get(path)
        .body(Body::empty())
        .expect("a valid request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("a body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A server on 127.0.0.1 with `limits`, its address, the shutdown trigger
/// and the task.
async fn start(limits: AdminLimits) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound");
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state(limits), async {
        let _ = rx.await;
    }));
    (addr, tx, server)
}

/// Reads one response of a keep-alive connection: (status, body).
async fn read_response(tcp: &mut TcpStream) -> Option<(u16, String)> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if tcp.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })?
        .parse()
        .ok()?;
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body).await.ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn get_over(tcp: &mut TcpStream, path: &str) -> Option<(u16, String)> {
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes())
        .await
        .ok()?;
    read_response(tcp).await
}

/// Waits for the server to close `tcp`; returns what it sent first and how
/// long after `since` the close came.
async fn closed(tcp: &mut TcpStream, since: Instant) -> (Vec<u8>, Duration) {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got))
        .await
        .expect("the server closes the connection within 10 s");
    (got, since.elapsed())
}

fn limits() -> AdminLimits {
    AdminLimits {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(10),
        max_connection_age: Duration::from_secs(60),
        drain: Duration::from_secs(2),
    }
}

#[test]
fn the_dialled_address_decides_the_scope() {
    let at = |ip: IpAddr| Scope::of(SocketAddr::new(ip, 15020));
    for loopback in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        IpAddr::V4(Ipv4Addr::new(127, 255, 1, 9)),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        IpAddr::V6(Ipv4Addr::new(127, 3, 2, 1).to_ipv6_mapped()),
    ] {
        assert_eq!(at(loopback), Scope::Loopback, "{loopback}");
    }
    for network in [
        IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7)),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6("fd00::2".parse().expect("an address")),
        IpAddr::V6("fe80::1".parse().expect("an address")),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped()),
        // IPv4-compatible (deprecated), not mapped: not loopback.
        IpAddr::V6("::127.0.0.1".parse().expect("an address")),
    ] {
        assert_eq!(at(network), Scope::Network, "{network}");
    }
}

#[tokio::test]
async fn the_network_gets_health_metrics_and_the_binarys_routes_but_no_config() {
    let app = router(&state(limits()), Scope::Network);
    assert_eq!(call(&app, "/live").await, (StatusCode::OK, "live\n".into()));
    assert_eq!(
        call(&app, "/ready").await,
        (StatusCode::OK, "ready\n".into())
    );
    let (status, metrics) = call(&app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.contains("palisade_test_total 0"), "{metrics}");
    assert_eq!(
        call(&app, "/extra").await,
        (StatusCode::OK, "extra\n".into())
    );
    // `/config` is indistinguishable from a path that does not exist.
    let config = call(&app, "/config").await;
    assert_eq!(config.0, StatusCode::NOT_FOUND);
    assert_eq!(config, call(&app, "/no-such-path").await);
    assert_eq!(call(&app, "/config/").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn loopback_gets_config_as_well() {
    let app = router(&state(limits()), Scope::Loopback);
    let (status, body) = call(&app, "/config").await;
    assert_eq!(status, StatusCode::OK);
    let config: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(config["trust_domain"], "cluster.local");
    assert_eq!(call(&app, "/live").await.0, StatusCode::OK);
    assert_eq!(call(&app, "/metrics").await.0, StatusCode::OK);
    assert_eq!(call(&app, "/extra").await.0, StatusCode::OK);
    assert_eq!(call(&app, "/no-such-path").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_connection_dialled_on_loopback_is_served_config() {
    let (addr, _stop, _server) = start(limits()).await;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let (status, body) = get_over(&mut tcp, "/config").await.expect("a response");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("cluster.local"), "{body}");
    // Keep-alive: a second request on the same connection.
    assert_eq!(
        get_over(&mut tcp, "/live").await,
        Some((200, "live\n".into()))
    );
}

#[tokio::test]
async fn a_request_head_past_the_limit_is_refused() {
    let (addr, _stop, _server) = start(limits()).await;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let big = "a".repeat(MAX_REQUEST_HEAD);
    let request = format!("GET /live HTTP/1.1\r\nHost: admin\r\nX-Big: {big}\r\n\r\n");
    // The server may stop reading once it has refused.
    let _ = tcp.write_all(request.as_bytes()).await;
    let (got, _) = closed(&mut tcp, Instant::now()).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    // A head just under the limit is served.
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let fits = "a".repeat(MAX_REQUEST_HEAD / 2);
    let request = format!("GET /live HTTP/1.1\r\nHost: admin\r\nX-Big: {fits}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("write");
    assert_eq!(read_response(&mut tcp).await, Some((200, "live\n".into())));
}

#[tokio::test]
async fn a_client_that_does_not_finish_its_headers_is_cut_after_the_timeout() {
    let timeout = Duration::from_millis(400);
    let (addr, _stop, _server) = start(AdminLimits {
        header_read_timeout: timeout,
        ..limits()
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    // A trickling client: a byte of its head every 50 ms, never the end.
    let mut trickling = TcpStream::connect(addr).await.expect("connect");
    let trickle = tokio::spawn(async move {
        let head = b"GET /live HTTP/1.1\r\nHost: admin\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in head {
            if trickling.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        closed(&mut trickling, started).await
    });
    let (got, after) = closed(&mut silent, started).await;
    assert!(got.is_empty(), "nothing was answered: {got:?}");
    assert!(
        after >= timeout && after < timeout * 5,
        "cut after {after:?}, the timeout is {timeout:?}"
    );
    let (got, after) = trickle.await.expect("the trickling client");
    assert!(got.is_empty(), "nothing was answered: {got:?}");
    assert!(
        after >= timeout && after < timeout * 5,
        "cut after {after:?}, the timeout is {timeout:?}"
    );

    // An idle keep-alive connection is cut the same way after its response.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(
        get_over(&mut idle, "/live").await,
        Some((200, "live\n".into()))
    );
    let answered = Instant::now();
    let (_, after) = closed(&mut idle, answered).await;
    assert!(
        after >= timeout && after < timeout * 5,
        "idle for {after:?}"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_served_only_when_a_slot_frees() {
    let (addr, _stop, _server) = start(AdminLimits {
        max_connections: 2,
        ..limits()
    })
    .await;
    // Two silent clients hold both slots (the header timeout is 10 s).
    let first = TcpStream::connect(addr).await.expect("connect");
    let _second = TcpStream::connect(addr).await.expect("connect");
    // The third is queued by the kernel, not served.
    let mut third = TcpStream::connect(addr)
        .await
        .expect("the backlog takes it");
    third
        .write_all(b"GET /live HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .expect("write");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), read_response(&mut third))
            .await
            .is_err(),
        "a third connection was served while two held every slot"
    );
    // One slot frees: the third is served.
    drop(first);
    let response = tokio::time::timeout(Duration::from_secs(5), read_response(&mut third))
        .await
        .expect("served once a slot is free");
    assert_eq!(response, Some((200, "live\n".into())));
}

#[tokio::test]
async fn a_connection_past_its_maximum_age_is_closed_after_its_response() {
    let age = Duration::from_millis(400);
    let (addr, _stop, _server) = start(AdminLimits {
        max_connection_age: age,
        ..limits()
    })
    .await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let mut answered = 0;
    // A keep-alive client that asks without pause is still let go.
    while let Some((status, _)) = get_over(&mut tcp, "/live").await {
        assert_eq!(status, 200);
        answered += 1;
        assert!(
            started.elapsed() < age * 5,
            "still open after {:?}",
            started.elapsed()
        );
    }
    assert!(answered > 1, "{answered} answers before the close");
    assert!(
        started.elapsed() >= age,
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish_and_closes_idle_connections() {
    let (addr, stop, server) = start(limits()).await;
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    let mut busy = TcpStream::connect(addr).await.expect("connect");
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .expect("write");
    // Let the request reach its handler before the shutdown.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    stop.send(()).expect("the server listens");
    assert_eq!(read_response(&mut busy).await, Some((200, "slow\n".into())));
    let (got, _) = closed(&mut idle, started).await;
    assert!(got.is_empty());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server returns once its connections ended")
        .expect("no panic");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn shutdown_does_not_wait_past_the_drain_for_a_stuck_response() {
    let drain = Duration::from_millis(300);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound");
    let mut state = state(AdminLimits { drain, ..limits() });
    state.routes = Router::new().route("/stuck", get(std::future::pending::<&'static str>));
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = rx.await;
    }));
    let mut stuck = TcpStream::connect(addr).await.expect("connect");
    stuck
        .write_all(b"GET /stuck HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    tx.send(()).expect("the server listens");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server returns")
        .expect("no panic");
    let waited = started.elapsed();
    assert!(waited >= drain && waited < drain * 5, "waited {waited:?}");
    let (got, _) = closed(&mut stuck, started).await;
    assert!(got.is_empty(), "nothing answered: {got:?}");
}
