//! The record of every request, so a test can assert what a client wrote
//! and how it asked.

use serde::Serialize;
use serde_json::Value;

/// One request as the stand-in received it, and the status it answered.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recorded {
    pub method: String,
    /// The path, percent-encoded as sent.
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub user_agent: Option<String>,
    /// The body as text (lossy for binary bodies).
    pub body: String,
    /// The status answered; `None` while in progress (a watch, a hang), or
    /// when the connection was closed without an answer.
    pub status: Option<u16>,
}

// === impl Recorded ===

impl Recorded {
    /// The decoded value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<String> {
        query_pairs(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The body parsed as JSON, or YAML (server-side apply).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body)
            .ok()
            .or_else(|| serde_saphyr::from_str(&self.body).ok())
    }

    /// Whether this is `method` on exactly `path`.
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }

    /// Whether it was a watch.
    pub fn is_watch(&self) -> bool {
        self.method == "GET" && matches!(self.param("watch").as_deref(), Some("true" | "1"))
    }
}

/// `a=b&c=d` decoded (`+` is a space, `%XX` a byte).
pub(crate) fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k, true), decode(v, true))
        })
        .collect()
}

/// Percent-decodes `text`; `plus` turns `+` into a space (query strings).
pub(crate) fn decode(text: &str, plus: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match text
                    .get(i + 1..i + 3)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
