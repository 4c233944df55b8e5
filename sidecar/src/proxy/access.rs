//! The opt-in access log (`--access-log json`): one JSON line per inbound
//! connection the authorization policy judged, on stdout, beside the logs.
//!
//! ```json
//! {"time":"2026-12-02T21:46:14Z","direction":"inbound","peer":"spiffe://cluster.local/ns/shop/sa/a","port":8080,"decision":"allow","policy":"shop/b-inbound","bytes_in":18,"bytes_out":52,"duration_ms":3}
//! ```
//!
//! `peer` is the verified identity (`null` for plaintext); a refused
//! connection has no bytes. The line is written whole in one call, so lines
//! of concurrent connections never interleave.

use std::{
    io::Write,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::policy::Decision;

/// Whether and how connections are logged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// No access log.
    #[default]
    Off,
    /// One JSON object per line on stdout.
    Json,
}

/// One connection, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub direction: &'static str,
    pub peer: Option<&'a str>,
    pub port: u16,
    pub decision: &'static str,
    pub policy: &'a str,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
}

// === impl AccessLog ===

impl AccessLog {
    /// Writes `entry` (nothing when off).
    pub fn write(self, entry: &Entry<'_>) {
        if self == Self::Off {
            return;
        }
        let line = line(entry, SystemTime::now());
        // Failing to write a log line must not fail the connection.
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

/// The JSON line of `entry` at `now`.
fn line(entry: &Entry<'_>, now: SystemTime) -> String {
    #[derive(Serialize)]
    struct Line<'a> {
        time: String,
        #[serde(flatten)]
        entry: &'a Entry<'a>,
    }
    let mut text = serde_json::to_string(&Line {
        time: humantime::format_rfc3339_seconds(now).to_string(),
        entry,
    })
    // A struct of strings and numbers always serializes.
    .unwrap_or_default();
    text.push('\n');
    text
}

impl<'a> Entry<'a> {
    /// An inbound connection judged by `decision`.
    pub fn inbound(peer: Option<&'a str>, port: u16, decision: &'a Decision) -> Self {
        Self {
            direction: "inbound",
            peer,
            port,
            decision: decision.verdict.into(),
            policy: &decision.policy,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0,
        }
    }

    /// The same, with what the relay moved.
    #[must_use]
    pub fn relayed(mut self, bytes_in: u64, bytes_out: u64, took: Duration) -> Self {
        self.bytes_in = bytes_in;
        self.bytes_out = bytes_out;
        self.duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::policy::Verdict;

    #[test]
    fn a_line_is_one_json_object_with_every_field() {
        let decision = Decision {
            verdict: Verdict::AuditDeny,
            policy: Arc::from("shop/b-inbound"),
        };
        let entry = Entry::inbound(Some("spiffe://cluster.local/ns/shop/sa/c"), 8080, &decision)
            .relayed(18, 52, Duration::from_millis(3));
        let text = line(
            &entry,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        );
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(
            value,
            serde_json::json!({
                "time": "2027-01-15T08:00:00Z", "direction": "inbound",
                "peer": "spiffe://cluster.local/ns/shop/sa/c", "port": 8080,
                "decision": "audit_deny", "policy": "shop/b-inbound",
                "bytes_in": 18, "bytes_out": 52, "duration_ms": 3,
            })
        );
        let plain = Decision {
            verdict: Verdict::Deny,
            policy: Arc::from("mesh-default"),
        };
        let value: serde_json::Value = serde_json::from_str(&line(
            &Entry::inbound(None, 80, &plain),
            SystemTime::UNIX_EPOCH,
        ))
        .expect("JSON");
        assert_eq!(value["peer"], serde_json::Value::Null);
        assert_eq!(value["bytes_in"], 0);
    }
}
