//! Watches: newline-delimited JSON events on a chunked response, as the
//! real API server streams them.
//!
//! A watch starts from its `resourceVersion`: unset or `0` sends every
//! current object as `ADDED` first (and, with `sendInitialEvents=true`, a
//! `BOOKMARK` marked `k8s.io/initial-events-end`); any other version sends
//! the changes after it, or `410 Expired` once it is compacted. A change
//! that makes an object match the selectors is `ADDED` for that watch; one
//! that makes it stop matching is `DELETED`.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{
    Shared, WatchControl, lock,
    resources::ResourceId,
    selector::{FieldSelector, LabelSelector},
    store::{Change, Compacted, Status},
};

/// What a watch asked for.
#[derive(Debug)]
pub(crate) struct WatchQuery {
    pub id: ResourceId,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub resource_version: Option<String>,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
}

/// How a watch begins.
pub(crate) enum Start {
    /// Stream these events first, then changes after `cursor`.
    Events {
        initial: Vec<Bytes>,
        cursor: u64,
        control: broadcast::Receiver<WatchControl>,
    },
    /// The version asked for is compacted.
    Gone(Compacted),
}

// === impl WatchQuery ===

impl WatchQuery {
    fn matches(&self, change_ns: &str, object: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == change_ns)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// The event one change makes for this watch, if any.
    fn event(&self, change: &Change) -> Option<Bytes> {
        if change.key.0 != self.id {
            return None;
        }
        let ns = &change.key.1;
        let before = change.before.as_ref().filter(|o| self.matches(ns, o));
        let after = change.after.as_ref().filter(|o| self.matches(ns, o));
        let (kind, object) = match (before, after, &change.after) {
            (None, Some(after), _) => ("ADDED", after.clone()),
            (Some(_), Some(after), _) => ("MODIFIED", after.clone()),
            // Deleted, or no longer selected: the watch sees it go.
            (Some(before), None, None) => {
                let mut gone = before.clone();
                gone["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                ("DELETED", gone)
            }
            (Some(_), None, Some(after)) => ("DELETED", after.clone()),
            (None, None, _) => return None,
        };
        Some(line(&json!({"type": kind, "object": object})))
    }
}

/// Decides where the watch starts, under the state lock so no change slips
/// between the initial events and the stream.
pub(crate) fn start(shared: &Shared, query: &WatchQuery) -> Result<Start, Status> {
    let state = lock(&shared.state);
    let control = shared.watch_control.subscribe();
    let current = state.store.resource_version();
    let from = match query.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(text) => Some(super::store::parse_rv(text)?),
    };
    let (initial, cursor) = match from {
        Some(rv) if !query.send_initial_events => {
            if let Err(gone) = state.store.changes_after(rv) {
                return Ok(Start::Gone(gone));
            }
            (Vec::new(), rv)
        }
        _ => {
            let objects = state
                .store
                .all(query.id, query.namespace.as_deref())
                .filter(|o| query.labels.matches(o) && query.fields.matches(o));
            let mut initial: Vec<Bytes> = objects
                .map(|o| line(&json!({"type": "ADDED", "object": o})))
                .collect();
            if query.send_initial_events {
                let def = state.registry.def(query.id);
                initial.push(bookmark(
                    &def.api_version(),
                    &def.kind,
                    current,
                    Some(json!({"k8s.io/initial-events-end": "true"})),
                ));
            }
            (initial, current)
        }
    };
    Ok(Start::Events {
        initial,
        cursor,
        control,
    })
}

/// The in-stream form of `410 Gone`.
pub(crate) fn gone_event(gone: &Compacted) -> Bytes {
    let status = Status::gone(format!(
        "too old resource version: {} ({})",
        gone.asked, gone.oldest
    ));
    line(&json!({"type": "ERROR", "object": status.to_json()}))
}

/// Streams `initial`, then every change after `cursor`, into `tx` until the
/// client leaves, the timeout, a close or expiry, or the server stops.
pub(crate) async fn run(
    shared: Arc<Shared>,
    query: WatchQuery,
    start: (Vec<Bytes>, u64, broadcast::Receiver<WatchControl>),
    tx: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
) {
    let (initial, mut cursor, mut control) = start;
    let (api_version, kind) = {
        let state = lock(&shared.state);
        let def = state.registry.def(query.id);
        (def.api_version(), def.kind.clone())
    };
    for event in initial {
        if tx.send(event).await.is_err() {
            return;
        }
    }
    let mut changes = shared.changes.subscribe();
    let deadline = query.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut ticker = shared
        .bookmark_interval
        .filter(|_| query.bookmarks)
        .map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    let mut want_bookmark = false;
    loop {
        // Everything after the cursor first, so a bookmark never skips a change.
        let drained = {
            let state = lock(&shared.state);
            changes.borrow_and_update();
            match state.store.changes_after(cursor) {
                Ok(list) => {
                    let events: Vec<Bytes> = list.filter_map(|c| query.event(c)).collect();
                    cursor = cursor.max(state.store.resource_version());
                    Ok(events)
                }
                Err(gone) => Err(gone),
            }
        };
        match drained {
            Ok(events) => {
                for event in events {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
            Err(gone) => {
                let _ = tx.send(gone_event(&gone)).await;
                return;
            }
        }
        if want_bookmark
            && query.bookmarks
            && tx
                .send(bookmark(&api_version, &kind, cursor, None))
                .await
                .is_err()
        {
            return;
        }
        want_bookmark = false;
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            () = tx.closed() => return,
            () = sleep_until(deadline) => return,
            message = control.recv() => match message {
                Ok(WatchControl::Bookmark) | Err(broadcast::error::RecvError::Lagged(_)) => want_bookmark = true,
                Ok(WatchControl::Close) | Err(broadcast::error::RecvError::Closed) => return,
                Ok(WatchControl::Expire) => {
                    let oldest = lock(&shared.state).store.resource_version();
                    let _ = tx.send(gone_event(&Compacted { asked: cursor, oldest })).await;
                    return;
                }
            },
            changed = changes.changed() => if changed.is_err() { return },
            _ = tick(&mut ticker) => want_bookmark = true,
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn bookmark(api_version: &str, kind: &str, rv: u64, annotations: Option<Value>) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(annotations) = annotations {
        metadata["annotations"] = annotations;
    }
    line(&json!({"type": "BOOKMARK", "object": {
        "kind": kind, "apiVersion": api_version, "metadata": metadata,
    }}))
}

fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}
