//! Mesh TLS: TLS 1.3 only, ALPN `palisade/1`, client certificates required,
//! peers named by SPIFFE ID.
//!
//! - [`store`]: the validated, atomically swapped TLS configurations.
//! - [`verifier`]: chain + SPIFFE ID verifiers for both sides.
//! - [`files`]: credentials from a watched directory (file mode).

pub mod files;
pub mod store;
pub mod verifier;

use std::io;

use rustls::{CertificateError, Error};

pub use self::{
    store::{CertStore, KxGroup, Material, StoreError, Suite, TlsConfigs, TlsSettings},
    verifier::{IdentityError, Verification, spiffe_id},
};

/// The `reason` label of a failed handshake: a small closed set an operator
/// can act on, never free text.
pub fn failure_reason(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    match error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(e) => tls_reason(e),
        None => match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "closed",
            _ => "protocol",
        },
    }
}

/// The `reason` label of a rustls error.
pub fn tls_reason(error: &Error) -> &'static str {
    match error {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Other(other) => match other.0.downcast_ref::<IdentityError>() {
                Some(IdentityError::ForeignTrustDomain { .. }) => "wrong_trust_domain",
                Some(IdentityError::Unexpected { .. }) => "unexpected_identity",
                Some(_) => "bad_identity",
                None => "bad_certificate",
            },
            _ => "bad_certificate",
        },
        Error::NoCertificatesPresented => "no_client_cert",
        Error::PeerIncompatible(_) => "incompatible",
        Error::NoApplicationProtocol => "no_alpn",
        Error::AlertReceived(_) => "rejected_by_peer",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests;
