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

/// Which authenticator checks tokens: the `authenticator` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Kind {
    /// Tokens from a watched file.
    Static,
    /// Kubernetes service-account tokens via TokenReview.
    Kubernetes,
}

/// Why a token did not authenticate anyone: the `reason` label of
/// `palisade_ca_authentication_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Reason {
    /// No token was sent.
    MissingToken,
    /// Unknown, malformed, or not authenticated by the API server.
    InvalidToken,
    /// The token has expired.
    ExpiredToken,
    /// The token was issued for another audience.
    WrongAudience,
    /// The token authenticates a user that maps to no SPIFFE ID.
    BadIdentity,
    /// The token authority (the API server) cannot be reached or refused us.
    AuthorityUnavailable,
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

    /// Which authenticator this is, for the `authenticator` label.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Static(_) => Kind::Static,
            Self::Kubernetes(_) => Kind::Kubernetes,
        }
    }
}

// === impl AuthnError ===

impl AuthnError {
    /// The `reason` label of this failure.
    pub fn reason(&self) -> Reason {
        match self {
            Self::MissingToken => Reason::MissingToken,
            Self::InvalidToken(_) => Reason::InvalidToken,
            Self::ExpiredToken => Reason::ExpiredToken,
            Self::WrongAudience(_) => Reason::WrongAudience,
            Self::BadIdentity(_) => Reason::BadIdentity,
            Self::Unavailable(_) => Reason::AuthorityUnavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use palisade_runtime::metrics::LabelValue;

    use super::*;

    #[test]
    fn reason_labels_are_the_documented_spellings() {
        assert_eq!(
            Reason::names(),
            [
                "missing_token",
                "invalid_token",
                "expired_token",
                "wrong_audience",
                "bad_identity",
                "authority_unavailable",
            ]
        );
        assert_eq!(Kind::names(), ["static", "kubernetes"]);
    }
}
