//! The `kubernetes` authenticator: a workload presents its projected
//! service-account token (audience `palisade`), the control plane asks the API
//! server to check it with a TokenReview, and derives
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` from the
//! username the API server vouches for.
//!
//! The API server echoes the reviewed token in its answer, so nothing it returns
//! is ever copied verbatim into an error, and API text that reaches a debug log
//! has the token cut out first.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use palisade_proto::{SpiffeId, TrustDomain};
use serde::Serialize;

use super::AuthnError;

/// The audience workloads' projected tokens carry by default.
pub const DEFAULT_AUDIENCE: &str = "palisade";

/// How long one TokenReview may take by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The prefix of every service-account username: `system:serviceaccount:<ns>:<sa>`.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Settings of the kubernetes authenticator (filled by config.rs from flags).
#[derive(Clone, Debug, Serialize)]
pub struct KubernetesConfig {
    /// The audience a workload's token must have been issued for.
    pub audience: String,
    /// The trust domain of the SPIFFE IDs derived from service accounts.
    pub trust_domain: TrustDomain,
    /// How long one TokenReview call may take before the API server counts as unavailable.
    pub request_timeout: Duration,
}

/// Authenticates workloads by their service-account tokens, via the TokenReview API.
pub struct KubernetesAuthenticator {
    // Boxed: the kube client is a few hundred bytes, and `Authenticator` is an enum.
    inner: Box<Inner>,
}

/// Why the kubernetes authenticator could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot load a Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    Config(kube::config::InferConfigError),
    #[error(
        "cannot build a Kubernetes client from the loaded configuration \
         (check the API server URL, CA certificate and credentials): {0}"
    )]
    Client(kube::Error),
}

/// What a [`KubernetesAuthenticator`] holds, behind one pointer.
struct Inner {
    reviews: Api<TokenReview>,
    config: KubernetesConfig,
}

// === impl KubernetesConfig ===

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            audience: DEFAULT_AUDIENCE.to_owned(),
            trust_domain: TrustDomain::parse("cluster.local")
                .expect("`cluster.local` is a valid trust domain"),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

// === impl KubernetesAuthenticator ===

impl KubernetesAuthenticator {
    /// Uses kube's inferred config: KUBECONFIG or `~/.kube/config` when there is
    /// one, else the in-cluster service account.
    pub async fn from_environment(config: KubernetesConfig) -> Result<Self, KubernetesError> {
        let kube_config = kube::Config::infer()
            .await
            .map_err(KubernetesError::Config)?;
        tracing::debug!(
            api_server = %kube_config.cluster_url,
            "loaded the Kubernetes client configuration"
        );
        let client = kube::Client::try_from(kube_config).map_err(KubernetesError::Client)?;
        Ok(Self::with_client(client, config))
    }

    /// Uses the given kube client (tests build one pointing at their loopback server).
    pub fn with_client(client: kube::Client, config: KubernetesConfig) -> Self {
        Self {
            inner: Box::new(Inner {
                reviews: Api::all(client),
                config,
            }),
        }
    }

    /// Validates `token` (non-empty, already checked by the caller) with a TokenReview
    /// (spec.token = token, spec.audiences = [audience]) and derives the identity.
    pub async fn authenticate(&self, token: &[u8]) -> Result<SpiffeId, AuthnError> {
        let token = std::str::from_utf8(token).map_err(|_| {
            AuthnError::InvalidToken(
                "it is not UTF-8 text, so it cannot be a service-account token".to_owned(),
            )
        })?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.inner.config.audience.clone()]),
            },
            ..TokenReview::default()
        };

        let timeout = self.inner.config.request_timeout;
        let created = tokio::time::timeout(
            timeout,
            self.inner.reviews.create(&PostParams::default(), &review),
        )
        .await;
        let answer = match created {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => return Err(api_failure(&error, token)),
            Err(_elapsed) => {
                tracing::debug!(?timeout, "the TokenReview timed out");
                return Err(AuthnError::Unavailable(format!(
                    "the Kubernetes API server did not answer the TokenReview within {timeout:?}"
                )));
            }
        };
        self.identity_of(answer.status.unwrap_or_default(), token)
    }

    /// Turns the API server's verdict into the workload's identity.
    fn identity_of(&self, status: TokenReviewStatus, token: &str) -> Result<SpiffeId, AuthnError> {
        let audience = &self.inner.config.audience;
        if status.authenticated != Some(true) {
            // Classified without the token, should the API server have echoed it.
            let error = redact(&status.error.unwrap_or_default(), token);
            tracing::debug!(%error, "the Kubernetes API server did not authenticate the token");
            let error = error.to_ascii_lowercase();
            return Err(if error.contains("expired") {
                AuthnError::ExpiredToken
            } else if error.contains("audience") {
                AuthnError::WrongAudience(audience.clone())
            } else {
                AuthnError::InvalidToken("the Kubernetes API server did not authenticate it".into())
            });
        }

        // An empty `status.audiences` means the token is valid for the API server's
        // own audience only (an audience-unaware authenticator): not for us.
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.iter().any(|a| a == audience) {
            tracing::debug!(
                ?audiences,
                expected = %audience,
                "the token is authenticated, but not for our audience"
            );
            return Err(AuthnError::WrongAudience(audience.clone()));
        }

        let username = status
            .user
            .and_then(|user| user.username)
            .unwrap_or_default();
        let id = service_account_identity(&self.inner.config.trust_domain, &username)?;
        tracing::debug!(identity = %id, "the Kubernetes API server authenticated the token");
        Ok(id)
    }
}

impl std::fmt::Debug for KubernetesAuthenticator {
    // The client holds the control plane's own API credentials: leave it out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesAuthenticator")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// `system:serviceaccount:<ns>:<sa>` → `spiffe://<td>/ns/<ns>/sa/<sa>`; any other
/// username (a user, a node, a malformed one) is refused.
fn service_account_identity(
    trust_domain: &TrustDomain,
    username: &str,
) -> Result<SpiffeId, AuthnError> {
    let bad = || AuthnError::BadIdentity(username.to_owned());
    let (namespace, service_account) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(bad)?;
    SpiffeId::from_kubernetes(trust_domain, namespace, service_account).map_err(|error| {
        tracing::debug!(%username, %error, "the service account maps to no SPIFFE ID");
        bad()
    })
}

/// Classifies a failed TokenReview call. The control plane could not get a
/// verdict, so almost everything is `Unavailable`; only a request the API server
/// refused for its content blames the token.
fn api_failure(error: &kube::Error, token: &str) -> AuthnError {
    let kube::Error::Api(status) = error else {
        let cause = causes(error, token);
        tracing::debug!(error = %cause, "the TokenReview call failed");
        return AuthnError::Unavailable(match error {
            kube::Error::Auth(_) => {
                format!("cannot obtain the control plane's own Kubernetes credentials: {cause}")
            }
            kube::Error::SerdeError(_) => {
                "the Kubernetes API server's answer is not a TokenReview".to_owned()
            }
            _ => format!("cannot reach the Kubernetes API server: {cause}"),
        });
    };
    let code = status.code;
    tracing::debug!(
        code,
        reason = %status.reason,
        message = %redact(&status.message, token),
        "the Kubernetes API server refused the TokenReview"
    );
    match code {
        401 => AuthnError::Unavailable(
            "the Kubernetes API server does not accept the control plane's own credentials \
             (HTTP 401): is the control plane's ServiceAccount token mounted and current?"
                .to_owned(),
        ),
        403 => AuthnError::Unavailable(
            "the Kubernetes API server refused the control plane's own credentials (HTTP 403): \
             its ServiceAccount needs permission to create tokenreviews.authentication.k8s.io \
             (bind it to the ClusterRole system:auth-delegator)"
                .to_owned(),
        ),
        // The request's only content is the token (too large, say): no retry can
        // help, so the workload hears that its token was refused.
        400 | 413 | 422 => AuthnError::InvalidToken(format!(
            "the Kubernetes API server rejected a TokenReview carrying it (HTTP {code})"
        )),
        404 => AuthnError::Unavailable(
            "the Kubernetes API server does not serve the authentication.k8s.io/v1 \
             TokenReview API (HTTP 404)"
                .to_owned(),
        ),
        _ => AuthnError::Unavailable(format!(
            "the Kubernetes API server failed the TokenReview (HTTP {code})"
        )),
    }
}

/// The chain of causes under kube's own error (its prefixes add nothing), one
/// `: ` apart, with the token cut out should any layer have echoed it.
fn causes(error: &kube::Error, token: &str) -> String {
    let mut text = String::new();
    let mut next = std::error::Error::source(error);
    while let Some(cause) = next {
        let part = cause.to_string();
        // Some layers repeat their source's text in their own.
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        next = cause.source();
    }
    if text.is_empty() {
        text = error.to_string();
    }
    redact(&text, token)
}

/// `text` with every occurrence of `token` replaced, for text the API server sent.
fn redact(text: &str, token: &str) -> String {
    if token.is_empty() {
        return text.to_owned();
    }
    text.replace(token, "<token>")
}

#[cfg(test)]
pub(crate) mod tests;
