//! The `Identity` gRPC service: authenticate, compare identities, check the CSR,
//! sign. Every answer is counted; every refusal is a status an operator can act on.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use palisade_proto::{
    SpiffeId, TrustDomain,
    identity::v1::{CertifyRequest, CertifyResponse, identity_server::Identity},
};
use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, info, warn};

use crate::{
    authn::{self, Authenticator, AuthnError},
    ca::{self, CaStore, LifetimePolicy, SignError, signer},
    metrics::{LabelValue, Metrics},
};

/// The largest token accepted, in bytes; real service-account tokens are ~1 KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The gRPC `Identity` service.
#[derive(Debug)]
pub struct IdentityService {
    ca: Arc<CaStore>,
    authenticator: Arc<Authenticator>,
    trust_domain: TrustDomain,
    lifetimes: LifetimePolicy,
    signing: Semaphore,
    queue_timeout: Duration,
    metrics: Metrics,
}

/// Why a Certify request was refused: the `reason` label of
/// `palisade_ca_certificates_issued_total{result="failure"}` and the prefix of
/// the gRPC status message. The authenticator's and the CA's reasons keep
/// their names here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Reason {
    /// No token was sent.
    MissingToken,
    /// Unknown token, not UTF-8, too large, or not authenticated by the API server.
    InvalidToken,
    /// The token has expired.
    ExpiredToken,
    /// The token was issued for another audience.
    WrongAudience,
    /// The token belongs to another identity than the one claimed.
    IdentityMismatch,
    /// The claimed identity is outside the trust domain.
    ForeignTrustDomain,
    /// The claimed identity is no SPIFFE ID, or the token's user maps to none.
    BadIdentity,
    /// Empty, not DER PKCS#10, trailing bytes, or unparsable extensions.
    MalformedCsr,
    /// The CSR is over 16 KiB.
    CsrTooLarge,
    /// The CSR was not signed by its own key.
    BadCsrSignature,
    /// SHA-1 or another signature algorithm that is not accepted.
    UnsupportedSignature,
    /// RSA below 2048 bits, P-192, P-224.
    WeakKey,
    /// Any other key type.
    UnsupportedKey,
    /// The CSR asks for a name other than the claimed identity.
    ForeignSan,
    /// The CSR asks for `cA=true`.
    CsrRequestsCa,
    /// The requested lifetime is below `--min-lifetime`.
    LifetimeTooShort,
    /// The requested lifetime is negative or out of range.
    BadLifetime,
    /// The Kubernetes API server cannot be reached or refuses our credentials.
    AuthorityUnavailable,
    /// No signing slot freed within `--signing-queue-timeout`.
    Overloaded,
    /// The issuer has expired.
    IssuerExpired,
    /// Signing failed for a reason of ours.
    Internal,
}

/// Why a Certify request was refused: a status code, a reason and a message.
#[derive(Debug)]
struct Refusal {
    code: Code,
    reason: Reason,
    message: String,
}

// === impl IdentityService ===

impl IdentityService {
    /// Creates the service. At most `max_concurrent_signings` CSRs are checked and
    /// signed at once; a request that waits longer than `queue_timeout` for a
    /// slot is answered `UNAVAILABLE`.
    pub fn new(
        ca: Arc<CaStore>,
        authenticator: Arc<Authenticator>,
        trust_domain: TrustDomain,
        lifetimes: LifetimePolicy,
        max_concurrent_signings: usize,
        queue_timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            ca,
            authenticator,
            trust_domain,
            lifetimes,
            signing: Semaphore::new(max_concurrent_signings.max(1)),
            queue_timeout,
            metrics,
        }
    }

    async fn certify_inner(&self, req: CertifyRequest) -> Result<CertifyResponse, Refusal> {
        if req.token.len() > MAX_TOKEN_LEN {
            return Err(Refusal::new(
                Code::Unauthenticated,
                Reason::InvalidToken,
                format!(
                    "the token is {} bytes; at most {MAX_TOKEN_LEN} are accepted",
                    req.token.len()
                ),
            ));
        }
        let derived = self
            .authenticator
            .authenticate(&req.token)
            .await
            .map_err(|e| {
                self.metrics
                    .authn_failed(self.authenticator.kind(), e.reason());
                Refusal::from_authn(e)
            })?;

        let claimed = SpiffeId::parse(&req.identity).map_err(|e| {
            Refusal::new(
                Code::InvalidArgument,
                Reason::BadIdentity,
                format!("the claimed identity is not a SPIFFE ID: {e}"),
            )
        })?;
        if !claimed.is_member_of(&self.trust_domain) {
            return Err(Refusal::new(
                Code::PermissionDenied,
                Reason::ForeignTrustDomain,
                format!(
                    "the claimed identity {claimed} is outside this CA's trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        if claimed != derived {
            return Err(Refusal::new(
                Code::PermissionDenied,
                Reason::IdentityMismatch,
                format!("the token belongs to {derived}, not to the claimed {claimed}"),
            ));
        }

        let requested = req
            .requested_lifetime
            .map(|d| {
                Duration::try_from(d).map_err(|_| {
                    Refusal::new(
                        Code::InvalidArgument,
                        Reason::BadLifetime,
                        "the requested lifetime is negative or out of range".to_owned(),
                    )
                })
            })
            .transpose()?;

        let _permit = tokio::time::timeout(self.queue_timeout, self.signing.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                Refusal::new(
                    Code::Unavailable,
                    Reason::Overloaded,
                    "the control plane is at its limit of concurrent signings; retry with backoff"
                        .to_owned(),
                )
            })?;
        let issuer = self.ca.issuer();
        let issued = signer::sign(
            &issuer,
            &self.lifetimes,
            &claimed,
            &req.csr,
            requested,
            SystemTime::now(),
        )
        .map_err(Refusal::from_sign)?;

        info!(
            identity = %claimed,
            serial = %issued.serial,
            not_after = %humantime::format_rfc3339_seconds(issued.not_after),
            issuer = %issuer.fingerprint(),
            "issued certificate"
        );
        Ok(CertifyResponse {
            certificate: issued.certificate.to_vec(),
            intermediates: issuer.chain().iter().map(|c| c.to_vec()).collect(),
            trust_bundle: issuer.bundle().iter().map(|c| c.to_vec()).collect(),
            valid_until: Some(issued.not_after.into()),
        })
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let start = Instant::now();
        let peer = request.remote_addr();
        let claimed = request
            .get_ref()
            .identity
            .chars()
            .take(256)
            .collect::<String>();
        let result = self.certify_inner(request.into_inner()).await;
        let elapsed = start.elapsed();
        match result {
            Ok(response) => {
                self.metrics.issue_finished(Ok(()), elapsed);
                Ok(Response::new(response))
            }
            Err(refusal) => {
                self.metrics.issue_finished(Err(refusal.reason), elapsed);
                if refusal.code == Code::Unavailable {
                    warn!(?peer, claimed, reason = refusal.reason.as_str(), error = %refusal.message, "certify failed");
                } else {
                    debug!(?peer, claimed, reason = refusal.reason.as_str(), error = %refusal.message, "certify refused");
                }
                Err(refusal.into_status())
            }
        }
    }
}

// === impl Refusal ===

impl Refusal {
    fn new(code: Code, reason: Reason, message: String) -> Self {
        Self {
            code,
            reason,
            message,
        }
    }

    fn from_authn(e: AuthnError) -> Self {
        let code = match e {
            AuthnError::Unavailable(_) => Code::Unavailable,
            AuthnError::BadIdentity(_) => Code::PermissionDenied,
            _ => Code::Unauthenticated,
        };
        Self::new(code, e.reason().into(), e.to_string())
    }

    fn from_sign(e: SignError) -> Self {
        let code = match e {
            SignError::IssuerExpiring | SignError::Internal(_) => Code::Unavailable,
            _ => Code::InvalidArgument,
        };
        Self::new(code, e.reason().into(), e.to_string())
    }

    /// The status sent to the client: the message, prefixed with the reason so
    /// scripts can match on it.
    fn into_status(self) -> Status {
        Status::new(
            self.code,
            format!("{}: {}", self.reason.as_str(), self.message),
        )
    }
}

// === impl Reason ===

impl From<authn::Reason> for Reason {
    fn from(reason: authn::Reason) -> Self {
        use authn::Reason as A;
        match reason {
            A::MissingToken => Self::MissingToken,
            A::InvalidToken => Self::InvalidToken,
            A::ExpiredToken => Self::ExpiredToken,
            A::WrongAudience => Self::WrongAudience,
            A::BadIdentity => Self::BadIdentity,
            A::AuthorityUnavailable => Self::AuthorityUnavailable,
        }
    }
}

impl From<ca::Reason> for Reason {
    fn from(reason: ca::Reason) -> Self {
        use ca::Reason as C;
        match reason {
            C::MalformedCsr => Self::MalformedCsr,
            C::CsrTooLarge => Self::CsrTooLarge,
            C::BadCsrSignature => Self::BadCsrSignature,
            C::UnsupportedSignature => Self::UnsupportedSignature,
            C::WeakKey => Self::WeakKey,
            C::UnsupportedKey => Self::UnsupportedKey,
            C::CsrRequestsCa => Self::CsrRequestsCa,
            C::ForeignSan => Self::ForeignSan,
            C::LifetimeTooShort => Self::LifetimeTooShort,
            C::BadIdentity => Self::BadIdentity,
            C::IssuerExpired => Self::IssuerExpired,
            C::Internal => Self::Internal,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
