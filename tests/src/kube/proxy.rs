//! The pod proxy: `/api/v1/namespaces/N/pods/P:PORT/proxy/REST` forwarded
//! over plain HTTP/1.1 to the address a test registered for that pod and
//! port, as the API server forwards to the pod's IP. The caller's
//! `Authorization` stays with the stand-in, as with the real server.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{serve::Body, store::Status};

/// How long reaching the registered address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `P`, `P:PORT` or `http:P:PORT` of a proxy path: the pod and the port.
pub(crate) fn pod_and_port(segment: &str) -> Result<(String, u16), Status> {
    let segment = segment.strip_prefix("http:").unwrap_or(segment);
    if segment.starts_with("https:") {
        return Err(Status::bad_request(
            "the stand-in's pod proxy speaks plain HTTP only".to_owned(),
        ));
    }
    match segment.split_once(':') {
        None => Err(Status::bad_request(format!(
            "name the pod's port: pods/{segment}:PORT/proxy/..."
        ))),
        Some((pod, port)) => port
            .parse()
            .map(|port| (pod.to_owned(), port))
            .map_err(|_| Status::bad_request(format!("invalid port {port:?}"))),
    }
}

/// Sends `method rest?query` with `headers` and `body` to `to`; a failure
/// to reach it is `503`, as the real server answers.
pub(crate) async fn forward(
    to: SocketAddr,
    method: http::Method,
    rest: &str,
    query: &str,
    headers: &http::HeaderMap,
    body: Bytes,
) -> Result<Response<Body>, Status> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Status::of_code(503, format!("error trying to reach service: {e}"))
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .map_err(|_| unreachable(&format!("dial tcp {to}: i/o timeout")))?
        .map_err(|e| unreachable(&format!("dial tcp {to}: {e}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(connection);

    let target = if query.is_empty() {
        rest.to_owned()
    } else {
        format!("{rest}?{query}")
    };
    let mut request = Request::builder()
        .method(method)
        .uri(target)
        .body(Full::new(body))
        .map_err(|e| Status::bad_request(format!("cannot forward the request: {e}")))?;
    for (name, value) in headers {
        if !matches!(
            name.as_str(),
            "authorization" | "host" | "connection" | "content-length" | "transfer-encoding"
        ) {
            request.headers_mut().append(name, value.clone());
        }
    }
    if let Ok(host) = HeaderValue::from_str(&to.to_string()) {
        request.headers_mut().insert(http::header::HOST, host);
    }
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(&e))?;
    Ok(response.map(|incoming| incoming.map_err(super::serve::BodyError::from).boxed()))
}
