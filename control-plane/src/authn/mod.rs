//! Authenticators: turn the token a workload presents into the identity it is
//! entitled to.
//!
//! - [`static_tokens`]: a hot-reloaded file mapping tokens to SPIFFE IDs (VMs,
//!   local runs, tests).
//! - [`kubernetes`]: projected service-account tokens checked by the API server's
//!   TokenReview.

pub mod kubernetes;
pub mod static_tokens;

use palisade_proto::SpiffeId;

pub use self::{kubernetes::KubernetesAuthenticator, static_tokens::StaticTokens};

/// The authenticator the control plane was configured with.
#[derive(Debug)]
pub enum Authenticator {
    /// Tokens from a watched file.
    Static(StaticTokens),
    /// Kubernetes service-account tokens via TokenReview.
    Kubernetes(KubernetesAuthenticator),
}

/// Why a token did not authenticate anyone. Never carries the token itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    #[error("no token was presented: send the workload's token in the `token` field")]
    MissingToken,
    #[error("the token is not valid: {0}")]
    InvalidToken(String),
    #[error("the token has expired: the workload must present a fresh one")]
    ExpiredToken,
    #[error("the token was issued for another audience: it must carry the audience `{0}`")]
    WrongAudience(String),
    #[error("the token authenticates {0:?}, which maps to no valid SPIFFE ID")]
    BadIdentity(String),
    #[error("the token authority cannot be reached: {0}")]
    Unavailable(String),
}

// === impl Authenticator ===

impl Authenticator {
    /// Authenticates `token` and returns the identity it belongs to.
    pub async fn authenticate(&self, token: &[u8]) -> Result<SpiffeId, AuthnError> {
        if token.is_empty() {
            return Err(AuthnError::MissingToken);
        }
        match self {
            Self::Static(s) => s.authenticate(token),
            Self::Kubernetes(k) => k.authenticate(token).await,
        }
    }

    /// The `authenticator` label of this authenticator's metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Static(_) => "static",
            Self::Kubernetes(_) => "kubernetes",
        }
    }
}

// === impl AuthnError ===

impl AuthnError {
    /// Every value of [`AuthnError::reason`], for metrics that start at zero.
    pub const REASONS: [&'static str; 6] = [
        "missing_token",
        "invalid_token",
        "expired_token",
        "wrong_audience",
        "bad_identity",
        "authority_unavailable",
    ];
}

impl AuthnError {
    /// The closed set of `reason` label values.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken(_) => "invalid_token",
            Self::ExpiredToken => "expired_token",
            Self::WrongAudience(_) => "wrong_audience",
            Self::BadIdentity(_) => "bad_identity",
            Self::Unavailable(_) => "authority_unavailable",
        }
    }
}
