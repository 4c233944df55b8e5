//! The issuer: the CA certificate and key that sign workload certificates, and
//! the trust bundle they chain to, loaded from a directory and validated as a
//! whole before use.
//!
//! The directory has the layout of a Kubernetes TLS Secret (and of the Secrets
//! cert-manager writes): `tls.crt` is the issuer certificate, optionally followed
//! by intermediates up to a root; `tls.key` is the issuer's private key (PKCS#8,
//! SEC1 or PKCS#1 PEM); `ca.crt` is the trust bundle, every root the mesh trusts.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, KeyPair, PublicKeyData, SanType,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, UnixTime,
    pem::{self, PemObject},
};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The issuer certificate (then its intermediates), PEM.
pub const CERT_FILE: &str = "tls.crt";
/// The issuer's private key, PEM.
pub const KEY_FILE: &str = "tls.key";
/// The trust bundle: every root the mesh trusts, PEM.
pub const BUNDLE_FILE: &str = "ca.crt";

/// A validated issuer, ready to sign.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    /// What a leaf needs besides itself to reach a root, computed once.
    chain: Vec<CertificateDer<'static>>,
    bundle: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
    fingerprint: String,
}

/// The raw contents of a CA directory, hashed so that an unchanged directory is
/// not reloaded.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFiles {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    bundle_pem: Vec<u8>,
}

/// Why a CA directory cannot be used to sign.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{file} holds no PEM certificate")]
    NoCertificate { file: &'static str },
    #[error("{file} is not valid PEM: {reason}")]
    BadPem { file: &'static str, reason: String },
    #[error("{file} holds no usable private key (PKCS#8, SEC1 or PKCS#1 PEM)")]
    BadKey { file: &'static str },
    #[error("the issuer certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the issuer certificate is not a CA (basicConstraints cA=false or absent)")]
    NotCa,
    #[error("the issuer certificate may not sign certificates (keyUsage lacks keyCertSign)")]
    NoKeyCertSign,
    #[error("the issuer key type is not supported: use ECDSA P-256/P-384, Ed25519 or RSA")]
    UnsupportedKey,
    #[error("the private key in tls.key does not belong to the certificate in tls.crt")]
    KeyMismatch,
    #[error("the issuer certificate expired at {0}")]
    Expired(humantime::Rfc3339Timestamp),
    #[error("the issuer certificate is not valid before {0}")]
    NotYetValid(humantime::Rfc3339Timestamp),
    #[error("the issuer does not chain to any root in ca.crt: {0}")]
    Untrusted(String),
    #[error("cannot sign with the issuer: {0}")]
    Sign(#[from] rcgen::Error),
}

// === impl CaFiles ===

impl CaFiles {
    /// Reads the three files of a CA directory.
    pub fn read(dir: &Path) -> Result<Self, IssuerError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read(&path).map_err(|error| IssuerError::Read { path, error })
        };
        Ok(Self {
            cert_pem: read(CERT_FILE)?,
            key_pem: read(KEY_FILE)?,
            bundle_pem: read(BUNDLE_FILE)?,
        })
    }

    /// Builds from PEM contents (tests and `ca init`).
    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>, bundle_pem: Vec<u8>) -> Self {
        Self {
            cert_pem,
            key_pem,
            bundle_pem,
        }
    }
}

impl fmt::Debug for CaFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaFiles").finish_non_exhaustive()
    }
}

// === impl Issuer ===

impl Issuer {
    /// Parses and validates an issuer at `now`: the key matches the certificate,
    /// the certificate is a CA that may sign, is valid now, and chains to a root
    /// of the bundle.
    pub fn from_files(files: &CaFiles, now: SystemTime) -> Result<Self, IssuerError> {
        let mut chain = parse_certificates(&files.cert_pem, CERT_FILE)?;
        let bundle = parse_certificates(&files.bundle_pem, BUNDLE_FILE)?;
        let certificate = chain.remove(0);
        let intermediates = chain;

        let key_der = PrivateKeyDer::from_pem_slice(&files.key_pem)
            .map_err(|_| IssuerError::BadKey { file: KEY_FILE })?;

        let (not_after, spki_der) = check_ca_certificate(&certificate, now)?;
        // rcgen picks the signing algorithm from the certificate's key; only let it
        // see key types it can sign with.
        let algorithm = rcgen::SubjectPublicKeyInfo::from_der(&spki_der)
            .map_err(|_| IssuerError::UnsupportedKey)?
            .algorithm();
        if ![
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_RSA_SHA256,
        ]
        .contains(&algorithm)
        {
            return Err(IssuerError::UnsupportedKey);
        }
        let key = KeyPair::from_der_and_sign_algo(&key_der, algorithm)
            .map_err(|_| IssuerError::BadKey { file: KEY_FILE })?;
        if key.subject_public_key_info() != spki_der {
            return Err(IssuerError::KeyMismatch);
        }

        let signer = rcgen::Issuer::from_ca_cert_der(&certificate, key)
            .map_err(|e| IssuerError::BadCertificate(e.to_string()))?;
        let chain = chain_to_bundle(&certificate, &intermediates, &bundle);
        let issuer = Self {
            signer,
            fingerprint: hex::encode(&Sha256::digest(&certificate)[..8]),
            certificate,
            intermediates,
            chain,
            bundle,
            not_after,
        };
        issuer.check_chains_to_bundle(now)?;
        Ok(issuer)
    }

    /// Signs `params` for `public_key`.
    pub fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<CertificateDer<'static>, rcgen::Error> {
        Ok(params.signed_by(public_key, &self.signer)?.der().clone())
    }

    /// The issuer certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// What a leaf needs besides itself to reach a root: the issuer and the
    /// intermediates above it, unless the issuer is itself a root of the bundle.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Every root the mesh trusts.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The issuer's notAfter: no leaf outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// A short SHA-256 fingerprint of the issuer certificate, for logs.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Signs a short-lived probe leaf and verifies it against the bundle, as a
    /// sidecar would: this proves the key, the issuer and the bundle fit together.
    fn check_chains_to_bundle(&self, now: SystemTime) -> Result<(), IssuerError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://palisade.invalid/probe"
                .try_into()
                .expect("a constant ASCII URI is a valid IA5String"),
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(60)).min(self.not_after).into();
        let probe = self.sign(&params, self.signer.key())?;

        let anchors = self
            .bundle
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IssuerError::Untrusted(format!("a root in ca.crt is unusable: {e}")))?;
        let mut intermediates = vec![self.certificate.clone()];
        intermediates.extend(self.intermediates.iter().cloned());
        let leaf = webpki::EndEntityCert::try_from(&probe)
            .map_err(|e| IssuerError::Untrusted(e.to_string()))?;
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| IssuerError::Untrusted(format!("{e:?}")))?;
        Ok(())
    }
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("fingerprint", &self.fingerprint)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .field("intermediates", &self.intermediates.len())
            .field("bundle_roots", &self.bundle.len())
            .field("key", &"...")
            .finish()
    }
}

/// The issuer and its intermediates, minus whatever the bundle already holds.
fn chain_to_bundle(
    certificate: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    bundle: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    if bundle.contains(certificate) {
        return Vec::new();
    }
    std::iter::once(certificate)
        .chain(intermediates.iter().filter(|c| !bundle.contains(c)))
        .cloned()
        .collect()
}

/// Parses every certificate of a PEM file; at least one.
pub fn parse_certificates(
    pem_bytes: &[u8],
    file: &'static str,
) -> Result<Vec<CertificateDer<'static>>, IssuerError> {
    let certs = CertificateDer::pem_slice_iter(pem_bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| IssuerError::BadPem {
            file,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IssuerError::NoCertificate { file });
    }
    for cert in &certs {
        X509Certificate::from_der(cert).map_err(|e| IssuerError::BadPem {
            file,
            reason: format!("a certificate does not parse: {e}"),
        })?;
    }
    Ok(certs)
}

/// Checks that `der` is a CA certificate valid at `now`; returns its notAfter and
/// its SubjectPublicKeyInfo.
fn check_ca_certificate(
    der: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<(SystemTime, Vec<u8>), IssuerError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IssuerError::BadCertificate(e.to_string()))?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err(IssuerError::NotCa),
        Err(e) => return Err(IssuerError::BadCertificate(e.to_string())),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => return Err(IssuerError::NoKeyCertSign),
        Ok(_) => {}
        Err(e) => return Err(IssuerError::BadCertificate(e.to_string())),
    }
    let not_before = to_system_time(cert.validity().not_before.timestamp());
    let not_after = to_system_time(cert.validity().not_after.timestamp());
    if now < not_before {
        return Err(IssuerError::NotYetValid(humantime::format_rfc3339_seconds(
            not_before,
        )));
    }
    if now >= not_after {
        return Err(IssuerError::Expired(humantime::format_rfc3339_seconds(
            not_after,
        )));
    }
    Ok((not_after, cert.public_key().raw.to_vec()))
}

/// Converts a Unix timestamp (seconds, possibly negative) to a `SystemTime`.
pub fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}
