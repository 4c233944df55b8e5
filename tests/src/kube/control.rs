//! The `/stand-in/` endpoints: what a test in another process (the Python
//! chart tests) uses instead of the [`ApiServer`](super::ApiServer) methods.
//! They take the client token like the API, are never recorded and never
//! hit by faults.
//!
//! | request | does |
//! | --- | --- |
//! | `GET /stand-in/requests` | every request recorded, as JSON |
//! | `DELETE /stand-in/requests` | forgets them |
//! | `POST /stand-in/objects` | stores an object, or each of `{"items": [...]}` |
//! | `POST /stand-in/token-reviews` | scripts answers: `{"TOKEN": TokenAnswer}` |
//! | `GET /stand-in/token-reviews` | `{"seen": [...], "maxInFlight": N}` |
//! | `POST /stand-in/faults` | adds a fault (`Fault` as JSON) |
//! | `DELETE /stand-in/faults` | removes every fault |
//! | `POST /stand-in/compact` | compacts history |
//! | `POST /stand-in/close-watches` | ends every watch cleanly |
//! | `POST /stand-in/expire-watches` | compacts and ends every watch with 410 |
//! | `POST /stand-in/bookmark` | a bookmark on every watch |
//! | `POST /stand-in/pod-proxies` | `{"namespace", "pod", "port", "address"}` |

use std::{collections::HashMap, net::SocketAddr};

use http::{Method, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Fault, Shared, TokenAnswer, WatchControl, lock,
    serve::{Body, json_response, status_response},
    store::Status,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PodProxy {
    namespace: String,
    pod: String,
    port: u16,
    address: SocketAddr,
}

pub(crate) fn handle(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Response<Body> {
    let parse = |what: &str| -> Result<Value, Status> {
        serde_json::from_slice(body)
            .map_err(|e| Status::bad_request(format!("{what}: the body is not JSON: {e}")))
    };
    let done = || json_response(200, &json!({"ok": true}));
    let result: Result<Response<Body>, Status> = match (method, path.trim_end_matches('/')) {
        (&Method::GET, "/stand-in/requests") => {
            let requests = lock(&shared.requests).clone();
            Ok(json_response(200, &json!(requests)))
        }
        (&Method::DELETE, "/stand-in/requests") => {
            lock(&shared.requests).clear();
            Ok(done())
        }
        (&Method::POST, "/stand-in/objects") => parse("objects").and_then(|value| {
            let objects = match value.get("items").and_then(Value::as_array) {
                Some(items) => items.clone(),
                None => vec![value],
            };
            let mut stored = Vec::new();
            for object in objects {
                match shared.upsert(object) {
                    Ok(object) => stored.push(object),
                    Err(error) => return Err(Status::bad_request(error.to_string())),
                }
            }
            Ok(json_response(200, &json!({"items": stored})))
        }),
        (&Method::POST, "/stand-in/token-reviews") => parse("token reviews").and_then(|value| {
            let answers: HashMap<String, TokenAnswer> = serde_json::from_value(value)
                .map_err(|e| Status::bad_request(format!("token reviews: {e}")))?;
            let mut reviews = lock(&shared.reviews);
            for (token, answer) in answers {
                reviews.script(token, answer);
            }
            Ok(done())
        }),
        (&Method::GET, "/stand-in/token-reviews") => Ok(json_response(
            200,
            &json!({
                "seen": lock(&shared.reviews).seen,
                "maxInFlight": shared.reviews_in_flight.max(),
            }),
        )),
        (&Method::POST, "/stand-in/faults") => parse("fault").and_then(|value| {
            let fault: Fault = serde_json::from_value(value)
                .map_err(|e| Status::bad_request(format!("fault: {e}")))?;
            lock(&shared.faults).push(fault);
            Ok(done())
        }),
        (&Method::DELETE, "/stand-in/faults") => {
            lock(&shared.faults).clear();
            Ok(done())
        }
        (&Method::POST, "/stand-in/compact") => {
            shared.with_state(|state| state.store.compact());
            Ok(done())
        }
        (&Method::POST, "/stand-in/close-watches") => {
            let _ = shared.watch_control.send(WatchControl::Close);
            Ok(done())
        }
        (&Method::POST, "/stand-in/expire-watches") => {
            shared.with_state(|state| state.store.compact());
            let _ = shared.watch_control.send(WatchControl::Expire);
            Ok(done())
        }
        (&Method::POST, "/stand-in/bookmark") => {
            let _ = shared.watch_control.send(WatchControl::Bookmark);
            Ok(done())
        }
        (&Method::POST, "/stand-in/pod-proxies") => parse("pod proxy").and_then(|value| {
            let proxy: PodProxy = serde_json::from_value(value)
                .map_err(|e| Status::bad_request(format!("pod proxy: {e}")))?;
            lock(&shared.proxies).insert((proxy.namespace, proxy.pod, proxy.port), proxy.address);
            Ok(done())
        }),
        _ => Err(Status::of_code(
            404,
            format!("no stand-in control endpoint {method} {path}"),
        )),
    };
    result.unwrap_or_else(|status| status_response(&status))
}
