//! `authentication.k8s.io/v1` TokenReview: each token's answer is scripted
//! by the test ([`TokenAnswer`]); the reviews are recorded and the most in
//! flight at once counted.

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::store::Status;

/// The audience the API server's own tokens carry; a review that names
/// none is checked against it, as the real server does.
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// How the stand-in answers a TokenReview of one token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenAnswer {
    /// The verdict.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Answer only after this long (`"2s"` in a seed file).
    #[serde(
        default,
        with = "duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay: Option<Duration>,
}

/// What a TokenReview of a token says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// A valid token of `username`, issued for `audiences`. Like the real
    /// server: authenticated when the review asks for one of them (or names
    /// none and the token is the API server's own), and `status.audiences`
    /// is the audiences both share; otherwise not authenticated, with the
    /// real server's audience error.
    Valid {
        username: String,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        groups: Vec<String>,
        audiences: Vec<String>,
    },
    /// Not authenticated, with this `status.error`.
    Invalid { error: String },
    /// Exactly this `status`, whatever the review asked (a misbehaving or
    /// audience-unaware server).
    Status(Value),
    /// The call fails with this HTTP status and a `metav1.Status` (RBAC
    /// refusing the caller, the server failing).
    Fail {
        code: u16,
        #[serde(default)]
        message: Option<String>,
    },
}

/// A TokenReview the stand-in received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewSeen {
    pub token: String,
    pub audiences: Vec<String>,
}

/// Scripted answers and the reviews seen.
#[derive(Debug, Default)]
pub(crate) struct Reviews {
    answers: HashMap<String, TokenAnswer>,
    pub seen: Vec<ReviewSeen>,
}

// === impl TokenAnswer ===

impl TokenAnswer {
    /// The projected token of service account `namespace/name`, for `audiences`.
    pub fn service_account(namespace: &str, name: &str, audiences: &[&str]) -> Self {
        Self::valid(
            &format!("system:serviceaccount:{namespace}:{name}"),
            audiences,
        )
        .with_groups(&[
            "system:serviceaccounts",
            &format!("system:serviceaccounts:{namespace}"),
            "system:authenticated",
        ])
    }

    /// A valid token of `username` for `audiences` (see [`Verdict::Valid`]).
    pub fn valid(username: &str, audiences: &[&str]) -> Self {
        Verdict::Valid {
            username: username.to_owned(),
            uid: Some("0b5d6e1c-7f3a-4e1d-9c55-6d2b8a4f0e11".to_owned()),
            groups: Vec::new(),
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
        }
        .into()
    }

    /// Not authenticated, with `error`.
    pub fn invalid(error: &str) -> Self {
        Verdict::Invalid {
            error: error.to_owned(),
        }
        .into()
    }

    /// An expired token, as the real server words it.
    pub fn expired() -> Self {
        Self::invalid("[invalid bearer token, service account token has expired]")
    }

    /// Exactly `status` as the review's status.
    pub fn literal(status: Value) -> Self {
        Verdict::Status(status).into()
    }

    /// The review call fails with `code`.
    pub fn fail(code: u16) -> Self {
        Verdict::Fail {
            code,
            message: None,
        }
        .into()
    }

    /// The same answer, `delay` late.
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    fn with_groups(mut self, with: &[&str]) -> Self {
        if let Verdict::Valid { groups, .. } = &mut self.verdict {
            *groups = with.iter().map(|g| (*g).to_owned()).collect();
        }
        self
    }
}

impl From<Verdict> for TokenAnswer {
    fn from(verdict: Verdict) -> Self {
        Self {
            verdict,
            delay: None,
        }
    }
}

// === impl Reviews ===

impl Reviews {
    pub fn script(&mut self, token: String, answer: TokenAnswer) {
        self.answers.insert(token, answer);
    }

    /// Records the review in `body` and picks its answer: the delay, then
    /// the review with its status, or the status to fail with.
    pub fn review(&mut self, body: &[u8]) -> (Option<Duration>, Result<Value, Status>) {
        let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
            return (
                None,
                Err(Status::bad_request(
                    "the body of the request was in an unknown format".to_owned(),
                )),
            );
        };
        if review["kind"] != "TokenReview" {
            return (
                None,
                Err(Status::bad_request(
                    "the body is not a TokenReview".to_owned(),
                )),
            );
        }
        let token = review["spec"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let asked: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        self.seen.push(ReviewSeen {
            token: token.clone(),
            audiences: asked.clone(),
        });
        let answer = self
            .answers
            .get(&token)
            .cloned()
            .unwrap_or_else(|| TokenAnswer::invalid("invalid bearer token"));
        let status = match answer.verdict {
            Verdict::Fail { code, message } => {
                let message = message.unwrap_or_else(|| {
                    format!(
                        "tokenreviews.authentication.k8s.io is refused by the stand-in (HTTP {code})"
                    )
                });
                return (answer.delay, Err(Status::of_code(code, message)));
            }
            Verdict::Status(status) => status,
            Verdict::Invalid { error } => json!({"authenticated": false, "error": error}),
            Verdict::Valid {
                username,
                uid,
                groups,
                audiences,
            } => {
                let wanted = if asked.is_empty() {
                    vec![API_SERVER_AUDIENCE.to_owned()]
                } else {
                    asked.clone()
                };
                let shared: Vec<&String> =
                    wanted.iter().filter(|a| audiences.contains(a)).collect();
                if shared.is_empty() {
                    json!({
                        "authenticated": false,
                        "error": format!(
                            "[invalid bearer token, token audiences {audiences:?} is invalid for the target audiences {wanted:?}]"
                        ),
                    })
                } else {
                    let mut user = json!({"username": username, "groups": groups});
                    if let Some(uid) = uid {
                        user["uid"] = json!(uid);
                    }
                    json!({"authenticated": true, "user": user, "audiences": shared})
                }
            }
        };
        // Like the real server, the answer echoes the spec, token included.
        review["status"] = status;
        if !review["metadata"].is_object() {
            review["metadata"] = json!({});
        }
        (answer.delay, Ok(review))
    }
}

/// `Option<Duration>` as humantime text (`"250ms"`, `"2s"`).
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

pub(crate) use duration_text::deserialize as deserialize_duration;
pub(crate) use duration_text::serialize as serialize_duration;
