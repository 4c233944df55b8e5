//! Failure injection: a [`Fault`] answers the requests it [`Match`]es with an
//! [`Action`] (a status, a page that is no API answer, a closed connection,
//! a hang, a delay), for a number of times or until cleared.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which requests a fault applies to; every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// HTTP method, as `PATCH`.
    #[serde(default)]
    pub method: Option<String>,
    /// Path prefix, as `/api/v1/namespaces/shop/configmaps`.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Only writes (POST, PUT, PATCH, DELETE).
    #[serde(default)]
    pub writes: bool,
    /// Only watches (`true`) or only other requests (`false`).
    #[serde(default)]
    pub watch: Option<bool>,
}

/// What a fault does to a request it matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    /// Answer `code` with a `metav1.Status` (the code's usual reason).
    Status {
        code: u16,
        #[serde(default)]
        message: Option<String>,
    },
    /// Answer `code` with this body, as a proxy or wrong URL would.
    Raw {
        code: u16,
        content_type: String,
        body: String,
    },
    /// Close the connection without an answer.
    Close,
    /// Never answer (until the client gives up or the server stops).
    Hang,
    /// Answer normally, this late.
    Delay(
        #[serde(
            serialize_with = "serialize_delay",
            deserialize_with = "deserialize_delay"
        )]
        Duration,
    ),
}

/// A fault: `action` for requests matching `on`, `times` times (or always).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default)]
    pub on: Match,
    pub action: Action,
    /// How many requests it answers before it is spent (`None`: all).
    #[serde(default)]
    pub times: Option<usize>,
}

/// What a request looks like to a fault.
pub(crate) struct Seen<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub watch: bool,
}

// === impl Fault ===

impl Fault {
    /// Answers `code` with a Status saying `message`.
    pub fn status(code: u16, message: &str) -> Self {
        Self::of(Action::Status {
            code,
            message: Some(message.to_owned()),
        })
    }

    /// Answers `code` with a body that is no API answer.
    pub fn raw(code: u16, content_type: &str, body: &str) -> Self {
        Self::of(Action::Raw {
            code,
            content_type: content_type.to_owned(),
            body: body.to_owned(),
        })
    }

    /// Closes the connection without an answer.
    pub fn close() -> Self {
        Self::of(Action::Close)
    }

    /// Never answers.
    pub fn hang() -> Self {
        Self::of(Action::Hang)
    }

    /// Answers `by` late.
    pub fn delay(by: Duration) -> Self {
        Self::of(Action::Delay(by))
    }

    /// Only for writes.
    pub fn on_writes(mut self) -> Self {
        self.on.writes = true;
        self
    }

    /// Only for `method`.
    pub fn on_method(mut self, method: &str) -> Self {
        self.on.method = Some(method.to_owned());
        self
    }

    /// Only for paths starting with `prefix`.
    pub fn on_path(mut self, prefix: &str) -> Self {
        self.on.path_prefix = Some(prefix.to_owned());
        self
    }

    /// Only for watches (`true`) or only for other requests (`false`).
    pub fn on_watch(mut self, watch: bool) -> Self {
        self.on.watch = Some(watch);
        self
    }

    /// Spent after `n` requests.
    pub fn times(mut self, n: usize) -> Self {
        self.times = Some(n);
        self
    }

    fn of(action: Action) -> Self {
        Self {
            on: Match::default(),
            action,
            times: None,
        }
    }

    pub(crate) fn matches(&self, request: &Seen<'_>) -> bool {
        let on = &self.on;
        self.times != Some(0)
            && on
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(request.method))
            && on
                .path_prefix
                .as_deref()
                .is_none_or(|p| request.path.starts_with(p))
            && (!on.writes || matches!(request.method, "POST" | "PUT" | "PATCH" | "DELETE"))
            && on.watch.is_none_or(|w| w == request.watch)
    }
}

/// The first fault in force matching `request`, spending one of its times.
pub(crate) fn take(faults: &mut Vec<Fault>, request: &Seen<'_>) -> Option<Action> {
    let fault = faults.iter_mut().find(|f| f.matches(request))?;
    if let Some(n) = &mut fault.times {
        *n -= 1;
    }
    let action = fault.action.clone();
    faults.retain(|f| f.times != Some(0));
    Some(action)
}

fn serialize_delay<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    super::review::serialize_duration(&Some(*d), s)
}

fn deserialize_delay<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    super::review::deserialize_duration(d)?
        .ok_or_else(|| serde::de::Error::custom("a delay needs a duration, as \"2s\""))
}
