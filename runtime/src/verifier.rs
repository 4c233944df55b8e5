//! Certificate verifiers for mesh TLS, on both sides of a connection.
//!
//! rustls' stock verifiers check DNS names and IP addresses; mesh peers are
//! named by SPIFFE IDs in a URI SAN. Both verifiers here check the chain
//! against the trust bundle with webpki, then require exactly one URI SAN that
//! parses as a [`SpiffeId`] of our trust domain, and, when the caller knows
//! whom it dials, that exact identity. The TLS server name is not used: a
//! connection without SNI is normal here.
//!
//! The sidecar uses [`SpiffeServerVerifier`] and [`SpiffeClientVerifier`],
//! rebuilt with every certificate it installs. The control plane's gRPC port
//! uses [`Verification::optional_client_verifier`]: `Certify` callers have
//! no certificate yet, discovery callers must present one, and the roots
//! follow the CA's bundle without a new TLS configuration.

use std::sync::Arc;

use arc_swap::ArcSwap;

use palisade_proto::{SpiffeId, TrustDomain};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use x509_parser::{extensions::GeneralName, prelude::*};

/// Why a peer's certificate names no acceptable identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the peer certificate has no URI SAN")]
    NoUriSan,
    #[error("the peer certificate has {0} URI SANs; exactly one is allowed")]
    SeveralUriSans(usize),
    #[error("the peer certificate's URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(String),
    #[error("the peer {peer} is outside our trust domain {trust_domain}")]
    ForeignTrustDomain { peer: String, trust_domain: String },
    #[error("the peer is {peer}, not the expected {expected}")]
    Unexpected { peer: String, expected: String },
    #[error("the peer certificate does not parse")]
    Unparsable,
}

/// Checks chains and SPIFFE IDs; shared by both verifiers.
#[derive(Debug)]
struct Checker {
    anchors: Vec<TrustAnchor<'static>>,
    trust_domain: TrustDomain,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Verifies a mesh server (outbound side).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    checker: Arc<Checker>,
    expected: Option<SpiffeId>,
}

/// Verifies a mesh client. The sidecar's inbound side requires a client
/// certificate; the control plane's gRPC port also admits callers without
/// one (a certificate that is presented must verify; only its absence is
/// allowed), and replaces the anchors while the verifier is in use.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    checker: ArcSwap<Checker>,
    mandatory: bool,
}

/// The trust anchors and rules both verifiers share.
#[derive(Clone, Debug)]
pub struct Verification(Arc<Checker>);

// === impl Verification ===

impl Verification {
    /// Anchors from the bundle's roots. A root webpki cannot use is an error.
    pub fn new(
        bundle: &[CertificateDer<'static>],
        trust_domain: TrustDomain,
    ) -> Result<Self, webpki::Error> {
        let anchors = bundle
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(Arc::new(Checker {
            anchors,
            trust_domain,
            algorithms: rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms,
        })))
    }

    /// A verifier for servers; `expected` pins the peer's identity.
    pub fn server_verifier(&self, expected: Option<SpiffeId>) -> Arc<SpiffeServerVerifier> {
        Arc::new(SpiffeServerVerifier {
            checker: self.0.clone(),
            expected,
        })
    }

    /// A verifier for clients, which must present a certificate.
    pub fn client_verifier(&self) -> Arc<SpiffeClientVerifier> {
        self.clients(true)
    }

    /// A verifier for clients that may come without a certificate, whose
    /// anchors [`SpiffeClientVerifier::replace`] changes.
    pub fn optional_client_verifier(&self) -> Arc<SpiffeClientVerifier> {
        self.clients(false)
    }

    fn clients(&self, mandatory: bool) -> Arc<SpiffeClientVerifier> {
        Arc::new(SpiffeClientVerifier {
            checker: ArcSwap::new(self.0.clone()),
            mandatory,
        })
    }

    /// Checks a chain for a usage and returns the identity it carries.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        client: bool,
    ) -> Result<SpiffeId, Error> {
        self.0.verify(end_entity, intermediates, now, client, None)
    }
}

// === impl Checker ===

impl Checker {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        client: bool,
        expected: Option<&SpiffeId>,
    ) -> Result<SpiffeId, Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let usage = if client {
            webpki::KeyUsage::client_auth()
        } else {
            webpki::KeyUsage::server_auth()
        };
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        let id = spiffe_id(end_entity).map_err(identity_error)?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(identity_error(IdentityError::ForeignTrustDomain {
                peer: id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            }));
        }
        if let Some(expected) = expected
            && *expected != id
        {
            return Err(identity_error(IdentityError::Unexpected {
                peer: id.to_string(),
                expected: expected.to_string(),
            }));
        }
        Ok(id)
    }
}

/// The single SPIFFE ID in a certificate's URI SANs.
pub fn spiffe_id(der: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?
        .ok_or(IdentityError::NoUriSan)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next().ok_or(IdentityError::NoUriSan)?;
    let more = uris.count();
    if more > 0 {
        return Err(IdentityError::SeveralUriSans(more + 1));
    }
    SpiffeId::parse(first).map_err(|e| IdentityError::NotSpiffe(e.to_string()))
}

fn identity_error(e: IdentityError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Maps webpki's verdicts onto rustls' certificate errors, so the alert sent
/// and the reason counted say what went wrong.
fn pki_error(e: webpki::Error) -> Error {
    use webpki::Error as E;
    Error::InvalidCertificate(match e {
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::InvalidSignatureForPublicKey
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

/// The handshake-signature methods every verifier trait requires, checked
/// with the provider's algorithms (`$algorithms` reaches them from `self`).
macro_rules! handshake_signatures {
    ($this:ident => $algorithms:expr) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            let $this = self;
            verify_tls12_signature(message, cert, dss, &$algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            let $this = self;
            verify_tls13_signature(message, cert, dss, &$algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            let $this = self;
            $algorithms.supported_schemes()
        }
    };
}

// === impl SpiffeServerVerifier ===

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.checker.verify(
            end_entity,
            intermediates,
            now,
            false,
            self.expected.as_ref(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!(this => this.checker.algorithms);
}

// === impl SpiffeClientVerifier ===

impl SpiffeClientVerifier {
    /// Verifies with `verification`'s anchors from the next handshake on.
    pub fn replace(&self, verification: &Verification) {
        self.checker.store(verification.0.clone());
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.checker
            .load()
            .verify(end_entity, intermediates, now, true, None)?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    handshake_signatures!(this => this.checker.load().algorithms);
}
