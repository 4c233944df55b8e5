//! The HTTPS server: TLS and HTTP/1.1 per connection, the request record,
//! faults, client authentication, and the routes of the API (discovery, the
//! verbs on every served kind, TokenReview, the pod proxy).

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::{
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    Action, Recorded, Shared, control,
    fault::{self, Seen},
    lock, proxy,
    record::{decode, query_pairs},
    resources::ResourceId,
    selector::{FieldSelector, LabelSelector},
    store::{ListQuery, PatchKind, Status, WriteOptions},
    watch_stream::{self, Start, WatchQuery},
};

/// What a response body may fail with (only a proxied one can).
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body: a whole one, a watch stream, a proxied one.
pub(crate) type Body = BoxBody<Bytes, BodyError>;

/// Larger request bodies are refused (`413`).
const MAX_BODY: usize = 16 << 20;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The Kubernetes version the stand-in claims (`/version`).
const VERSION: (&str, &str) = ("1", "33");

/// A fault closed the connection: hyper drops it without an answer.
#[derive(Debug, thiserror::Error)]
#[error("the connection was closed by a fault")]
pub(crate) struct Closed;

/// A watch stream: the events a watch task sends.
struct ChannelBody(mpsc::Receiver<Bytes>);

/// The parts of a request the routes read.
struct Call<'a> {
    method: &'a Method,
    raw_path: &'a str,
    raw_query: &'a str,
    query: HashMap<String, String>,
    headers: &'a http::HeaderMap,
    body: Bytes,
}

/// Accepts connections until `cancel`; each one is served on `tracker`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let tcp = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    // Out of file descriptors, say: let it pass rather than spin.
                    tracing::debug!(%error, "the stand-in could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let (acceptor, shared, cancel, tasks) = (
            acceptor.clone(),
            shared.clone(),
            cancel.clone(),
            tracker.clone(),
        );
        tracker.spawn(async move {
            let tls = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match tls {
                    Ok(Ok(tls)) => tls,
                    _ => return,
                },
            };
            let service = {
                let cancel = cancel.clone();
                service_fn(move |request| {
                    handle(shared.clone(), request, cancel.clone(), tasks.clone())
                })
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service);
            // Biased: once stopped, no further request on a kept-alive
            // connection is served.
            tokio::select! {
                biased;
                () = cancel.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> Result<Response<Body>, Closed> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(status_response(&Status::of_code(
                413,
                "the request body is too large, or was cut off".to_owned(),
            )));
        }
    };
    let path = parts.uri.path().to_owned();
    let raw_query = parts.uri.query().unwrap_or_default().to_owned();
    let header_text = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header_text(header::AUTHORIZATION);
    let authorized = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|token| lock(&shared.tokens).iter().any(|t| t == token));

    if path.starts_with("/stand-in/") {
        if !authorized {
            return Ok(status_response(&unauthorized()));
        }
        return Ok(control::handle(&shared, &parts.method, &path, &body));
    }

    let index = {
        let mut requests = lock(&shared.requests);
        requests.push(Recorded {
            method: parts.method.to_string(),
            path: path.clone(),
            query: raw_query.clone(),
            content_type: header_text(header::CONTENT_TYPE),
            authorization,
            user_agent: header_text(header::USER_AGENT),
            body: String::from_utf8_lossy(&body).into_owned(),
            status: None,
        });
        requests.len() - 1
    };
    let query: HashMap<String, String> = query_pairs(&raw_query).into_iter().collect();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));

    let action = fault::take(
        &mut lock(&shared.faults),
        &Seen {
            method: parts.method.as_str(),
            path: &path,
            watch,
        },
    );
    let response = match action {
        Some(Action::Status { code, message }) => {
            let message = message.unwrap_or_else(|| format!("the stand-in injected HTTP {code}"));
            Some(status_response(&Status::of_code(code, message)))
        }
        Some(Action::Raw {
            code,
            content_type,
            body,
        }) => Some(respond(code, &content_type, Bytes::from(body))),
        Some(Action::Close) => return Err(Closed),
        Some(Action::Hang) => {
            cancel.cancelled().await;
            return Err(Closed);
        }
        Some(Action::Delay(by)) => {
            tokio::select! {
                () = cancel.cancelled() => return Err(Closed),
                () = tokio::time::sleep(by) => None,
            }
        }
        None => None,
    };
    let response = match response {
        Some(response) => response,
        None if !authorized => status_response(&unauthorized()),
        None => {
            let _in_flight = (!watch).then(|| shared.in_flight.enter());
            let call = Call {
                method: &parts.method,
                raw_path: &path,
                raw_query: &raw_query,
                query,
                headers: &parts.headers,
                body,
            };
            route(&shared, call, watch, &cancel, &tracker).await
        }
    };
    if let Some(recorded) = lock(&shared.requests).get_mut(index) {
        recorded.status = Some(response.status().as_u16());
    }
    Ok(response)
}

async fn route(
    shared: &Arc<Shared>,
    call: Call<'_>,
    watch: bool,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Response<Body> {
    let mut segments: Vec<String> = call
        .raw_path
        .trim_start_matches('/')
        .split('/')
        .map(|s| decode(s, false))
        .collect();
    if segments.len() > 1 && segments.last().is_some_and(String::is_empty) {
        segments.pop();
    }
    let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
    let discovery = |document: Option<Value>| match document {
        Some(document) => json_response(200, &document),
        None => status_response(&no_such_path()),
    };
    match parts.as_slice() {
        ["api"] if call.method == Method::GET => {
            let server = call
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            json_response(200, &lock(&shared.state).registry.core_versions(&server))
        }
        ["apis"] if call.method == Method::GET => {
            json_response(200, &lock(&shared.state).registry.group_list())
        }
        ["api", "v1"] if call.method == Method::GET => {
            discovery(lock(&shared.state).registry.resource_list("", "v1"))
        }
        ["apis", group, version] if call.method == Method::GET => {
            discovery(lock(&shared.state).registry.resource_list(group, version))
        }
        ["version"] => json_response(
            200,
            &json!({
                "major": VERSION.0, "minor": VERSION.1,
                "gitVersion": format!("v{}.{}.0-palisade-stand-in", VERSION.0, VERSION.1),
                "platform": "linux/amd64",
            }),
        ),
        ["healthz" | "readyz" | "livez"] => respond(200, "text/plain", Bytes::from_static(b"ok")),
        ["api", "v1", rest @ ..] => {
            resource(shared, &call, "", "v1", rest, 2, watch, cancel, tracker).await
        }
        ["apis", group, version, rest @ ..] => {
            resource(
                shared, &call, group, version, rest, 3, watch, cancel, tracker,
            )
            .await
        }
        _ => status_response(&no_such_path()),
    }
}

/// A request under `/api/v1/` or `/apis/G/V/`; `rest` is the path after
/// the version, `offset` its index among the path's segments.
#[allow(clippy::too_many_arguments)]
async fn resource(
    shared: &Arc<Shared>,
    call: &Call<'_>,
    group: &str,
    version: &str,
    rest: &[&str],
    offset: usize,
    watch: bool,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Response<Body> {
    let target = {
        let state = lock(&shared.state);
        let namespaced_plural = |plural: &str| {
            state
                .registry
                .by_path(group, version, plural)
                .is_some_and(|id| state.registry.def(id).namespaced)
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, plural, ..] if namespaced_plural(plural) => {
                (Some((*ns).to_owned()), &rest[2..])
            }
            _ => (None, rest),
        };
        let Some((plural, tail)) = rest.split_first() else {
            return status_response(&no_such_path());
        };
        let Some(id) = state.registry.by_path(group, version, plural) else {
            return status_response(&no_such_path());
        };
        let def = state.registry.def(id).clone();
        if def.namespaced != namespace.is_some() && !(def.namespaced && tail.is_empty()) {
            return status_response(&no_such_path());
        }
        (
            id,
            def,
            namespace,
            tail.first().map(|n| (*n).to_owned()),
            tail.get(1..)
                .unwrap_or_default()
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>(),
        )
    };
    let (id, def, namespace, name, sub) = target;
    let ns = namespace.clone().unwrap_or_default();
    let params = &call.query;
    let write = WriteOptions {
        dry_run: params.get("dryRun").is_some_and(|d| d == "All"),
        field_manager: params.get("fieldManager").cloned(),
        check_namespace: true,
    };
    let method = call.method;

    let status_only = match sub.first().map(String::as_str) {
        None => false,
        Some("status") if def.has_status && sub.len() == 1 => true,
        Some("proxy") if def.plural == "pods" && def.group.is_empty() => {
            let Some(name) = &name else {
                return status_response(&no_such_path());
            };
            // The raw path after `.../pods/P:PORT/proxy`, slashes as sent.
            let skip = offset + 2 + if namespace.is_some() { 2 } else { 0 } + 1;
            let raw: Vec<&str> = call.raw_path.trim_start_matches('/').split('/').collect();
            let forwarded = format!("/{}", raw.get(skip..).unwrap_or_default().join("/"));
            return pod_proxy(shared, call, &ns, name, &forwarded).await;
        }
        Some(_) => return status_response(&no_such_path()),
    };

    let result: Result<(u16, Value), Status> = match (method, &name) {
        (&Method::POST, None) if def.virtual_only => {
            return token_review(shared, &call.body, cancel).await;
        }
        (_, _) if def.virtual_only => Err(Status::of_code(
            405,
            format!(
                "the server does not allow this method on {}",
                def.qualified()
            ),
        )),
        (&Method::GET, None) if watch => {
            return start_watch(shared, id, namespace, params, cancel, tracker);
        }
        (&Method::GET, None) => list_query(params)
            .and_then(|query| lock(&shared.state).list(id, namespace.as_deref(), &query))
            .map(|list| (200, list)),
        (&Method::GET, Some(name)) => lock(&shared.state).get(id, &ns, name).map(|o| (200, o)),
        (&Method::POST, None) => parse_json(&call.body).and_then(|object| {
            shared
                .with_state(|state| state.create(id, namespace.as_deref(), object, &write))
                .map(|o| (201, o))
        }),
        (&Method::PUT, Some(name)) => parse_json(&call.body).and_then(|object| {
            shared
                .with_state(|state| state.update(id, &ns, name, object, status_only, &write))
                .map(|o| (200, o))
        }),
        (&Method::PATCH, Some(name)) => patch_kind(call.headers).and_then(|kind| {
            let created_before = lock(&shared.state).store.get(id, &ns, name).is_some();
            shared
                .with_state(|state| {
                    state.patch(id, &ns, name, kind, &call.body, status_only, &write)
                })
                .map(|o| (if created_before { 200 } else { 201 }, o))
        }),
        (&Method::DELETE, Some(name)) => {
            let options = parse_json(&call.body).unwrap_or(Value::Null);
            shared
                .with_state(|state| {
                    state.delete(id, &ns, name, &options["preconditions"], write.dry_run)
                })
                .map(|o| (200, o))
        }
        (&Method::DELETE, None) => list_query(params).and_then(|query| {
            shared
                .with_state(|state| state.delete_collection(id, namespace.as_deref(), &query))
                .map(|o| (200, o))
        }),
        _ => Err(Status::of_code(
            405,
            format!(
                "the server does not allow this method on {}",
                def.qualified()
            ),
        )),
    };
    match result {
        Ok((code, object)) => json_response(code, &object),
        Err(status) => status_response(&status),
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    id: ResourceId,
    namespace: Option<String>,
    params: &HashMap<String, String>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Response<Body> {
    let flag = |name: &str| matches!(params.get(name).map(String::as_str), Some("true" | "1"));
    let query = match (
        LabelSelector::parse(params.get("labelSelector").map_or("", String::as_str)),
        FieldSelector::parse(params.get("fieldSelector").map_or("", String::as_str)),
    ) {
        (Ok(labels), Ok(fields)) => WatchQuery {
            id,
            namespace,
            labels,
            fields,
            resource_version: params.get("resourceVersion").cloned(),
            bookmarks: flag("allowWatchBookmarks"),
            send_initial_events: flag("sendInitialEvents"),
            timeout: params
                .get("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .map(Duration::from_secs),
        },
        (Err(e), _) | (_, Err(e)) => return status_response(&Status::bad_request(e)),
    };
    let (tx, rx) = mpsc::channel(64);
    let start = match watch_stream::start(shared, &query) {
        Err(status) => return status_response(&status),
        Ok(Start::Gone(gone)) if shared.gone == super::GoneForm::Http => {
            return status_response(&Status::gone(format!(
                "too old resource version: {} ({})",
                gone.asked, gone.oldest
            )));
        }
        Ok(Start::Gone(gone)) => {
            return respond(200, "application/json", watch_stream::gone_event(&gone));
        }
        Ok(Start::Events {
            initial,
            cursor,
            control,
        }) => (initial, cursor, control),
    };
    tracker.spawn(watch_stream::run(
        shared.clone(),
        query,
        start,
        tx,
        cancel.clone(),
    ));
    let mut response = Response::new(ChannelBody(rx).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn token_review(
    shared: &Arc<Shared>,
    body: &[u8],
    cancel: &CancellationToken,
) -> Response<Body> {
    let _in_flight = shared.reviews_in_flight.enter();
    let (delay, answer) = lock(&shared.reviews).review(body);
    if let Some(delay) = delay {
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
    match answer {
        Ok(review) => json_response(201, &review),
        Err(status) => status_response(&status),
    }
}

async fn pod_proxy(
    shared: &Arc<Shared>,
    call: &Call<'_>,
    namespace: &str,
    segment: &str,
    forwarded: &str,
) -> Response<Body> {
    let (pod, port) = match proxy::pod_and_port(segment) {
        Ok(found) => found,
        Err(status) => return status_response(&status),
    };
    let exists = {
        let state = lock(&shared.state);
        let id = state.registry.by_path("", "v1", "pods");
        id.and_then(|id| state.store.get(id, namespace, &pod))
            .is_some()
    };
    if !exists {
        return status_response(&Status {
            code: 404,
            reason: "NotFound",
            message: format!("pods {pod:?} not found"),
            details: Some(json!({"name": pod, "kind": "pods"})),
        });
    }
    let target = lock(&shared.proxies)
        .get(&(namespace.to_owned(), pod.clone(), port))
        .copied();
    let Some(target) = target else {
        return status_response(&Status::of_code(
            503,
            format!(
                "error trying to reach service: no address registered for pod {namespace}/{pod} port {port} (ApiServer::proxy_pod)"
            ),
        ));
    };
    match proxy::forward(
        target,
        call.method.clone(),
        forwarded,
        call.raw_query,
        call.headers,
        call.body.clone(),
    )
    .await
    {
        Ok(response) => response,
        Err(status) => status_response(&status),
    }
}

fn list_query(params: &HashMap<String, String>) -> Result<ListQuery, Status> {
    let text = |name: &str| params.get(name).map_or("", String::as_str);
    Ok(ListQuery {
        labels: LabelSelector::parse(text("labelSelector")).map_err(Status::bad_request)?,
        fields: FieldSelector::parse(text("fieldSelector")).map_err(Status::bad_request)?,
        resource_version: params.get("resourceVersion").cloned(),
        version_match: params.get("resourceVersionMatch").cloned(),
        limit: params.get("limit").and_then(|l| l.parse().ok()),
        continue_token: params.get("continue").cloned().filter(|c| !c.is_empty()),
    })
}

fn patch_kind(headers: &http::HeaderMap) -> Result<PatchKind, Status> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match content_type.split(';').next().unwrap_or_default().trim() {
        "application/json-patch+json" => Ok(PatchKind::Json),
        "application/merge-patch+json" => Ok(PatchKind::Merge),
        "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchKind::Apply),
        other => Err(Status::of_code(
            415,
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/apply-patch+yaml (the stand-in has no strategic merge patch; got {other:?})"
            ),
        )),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, Status> {
    serde_json::from_slice(body)
        .map_err(|e| Status::bad_request(format!("the body of the request is not JSON: {e}")))
}

fn unauthorized() -> Status {
    Status::of_code(401, "Unauthorized".to_owned())
}

fn no_such_path() -> Status {
    Status::of_code(
        404,
        "the server could not find the requested resource".to_owned(),
    )
}

pub(crate) fn json_response(code: u16, body: &Value) -> Response<Body> {
    respond(code, "application/json", Bytes::from(body.to_string()))
}

pub(crate) fn status_response(status: &Status) -> Response<Body> {
    json_response(status.code, &status.to_json())
}

pub(crate) fn respond(code: u16, content_type: &str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

// === impl ChannelBody ===

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|b| Ok(Frame::data(b))))
    }
}
