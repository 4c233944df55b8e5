//! Builds and signs workload certificates: one URI SAN (the identity), a leaf
//! (cA=false), digitalSignature, serverAuth + clientAuth, the authority key id,
//! a random serial, a backdated notBefore and a notAfter within bounds.

use std::time::{Duration, SystemTime};

use palisade_proto::SpiffeId;
use rand::RngCore;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use serde::Serialize;

use super::{
    Reason,
    csr::{self, CsrError},
    issuer::Issuer,
};

/// How long issued certificates live.
#[derive(Clone, Debug, Serialize)]
pub struct LifetimePolicy {
    /// Used when the request names no lifetime.
    #[serde(with = "humantime_serde")]
    pub default: Duration,
    /// Shorter requests are refused.
    #[serde(with = "humantime_serde")]
    pub min: Duration,
    /// Longer requests are clamped to this.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// How far notBefore is set in the past, for clock skew between nodes.
    #[serde(with = "humantime_serde")]
    pub backdate: Duration,
}

/// A signed workload certificate.
#[derive(Debug)]
pub struct Issued {
    /// The leaf certificate.
    pub certificate: CertificateDer<'static>,
    /// Its notAfter.
    pub not_after: SystemTime,
    /// Its serial number, hex, for logs.
    pub serial: String,
}

/// Why a certificate was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("the requested lifetime {requested:?} is below the minimum of {min:?}")]
    LifetimeTooShort { requested: Duration, min: Duration },
    #[error("the identity {0} cannot be written into a certificate")]
    BadIdentity(String),
    #[error("the issuer expires now; no certificate can be issued until a new issuer is installed")]
    IssuerExpiring,
    #[error("signing failed: {0}")]
    Internal(String),
}

// === impl LifetimePolicy ===

impl LifetimePolicy {
    /// The lifetime to grant for a request, or why it is refused.
    pub fn grant(&self, requested: Option<Duration>) -> Result<Duration, SignError> {
        match requested {
            None => Ok(self.default.clamp(self.min, self.max)),
            Some(r) if r < self.min => Err(SignError::LifetimeTooShort {
                requested: r,
                min: self.min,
            }),
            Some(r) => Ok(r.min(self.max)),
        }
    }
}

impl Default for LifetimePolicy {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(60 * 60),
            min: Duration::from_secs(60),
            max: Duration::from_secs(24 * 60 * 60),
            backdate: Duration::from_secs(5 * 60),
        }
    }
}

// === impl SignError ===

impl SignError {
    /// The `reason` label for this refusal.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Csr(e) => e.reason(),
            Self::LifetimeTooShort { .. } => Reason::LifetimeTooShort,
            Self::BadIdentity(_) => Reason::BadIdentity,
            Self::IssuerExpiring => Reason::IssuerExpired,
            Self::Internal(_) => Reason::Internal,
        }
    }
}

/// Checks `csr_der` for `identity` and signs a leaf with `issuer`.
pub fn sign(
    issuer: &Issuer,
    policy: &LifetimePolicy,
    identity: &SpiffeId,
    csr_der: &[u8],
    requested: Option<Duration>,
    now: SystemTime,
) -> Result<Issued, SignError> {
    let lifetime = policy.grant(requested)?;
    let csr = csr::check(csr_der, identity)?;

    let not_after = (now + lifetime).min(issuer.not_after());
    if not_after <= now {
        return Err(SignError::IssuerExpiring);
    }
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    // Positive and exactly 16 bytes long once DER-encoded.
    serial[0] = (serial[0] & 0x7f) | 0x40;

    let mut params = CertificateParams::default();
    // An empty subject: the identity lives in the (then critical) URI SAN alone.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .as_str()
            .try_into()
            .map_err(|_| SignError::BadIdentity(identity.to_string()))?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.not_before = (now - policy.backdate).into();
    params.not_after = not_after.into();

    let certificate = issuer
        .sign(&params, &csr.public_key)
        .map_err(|e| SignError::Internal(e.to_string()))?;
    Ok(Issued {
        certificate,
        // The encoded notAfter has whole seconds.
        not_after: truncate_to_seconds(not_after),
        serial: hex::encode(serial),
    })
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}
