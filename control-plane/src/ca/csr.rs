//! Checks a PKCS#10 certificate signing request before anything is signed.
//!
//! The CA trusts nothing in a CSR but its public key and the proof that the
//! caller holds the private key. Requests that ask for more than the caller's
//! identity (other names, a CA certificate) are refused outright rather than
//! quietly trimmed, so a misconfigured or hostile client hears about it.

use palisade_proto::SpiffeId;
use x509_parser::{
    certification_request::X509CertificationRequest,
    der_parser::oid::Oid,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
        OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ED25519,
    },
    prelude::FromDer,
    public_key::PublicKey,
};

use super::Reason;

/// The largest CSR accepted, in bytes.
pub const MAX_CSR_LEN: usize = 16 * 1024;
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

/// A CSR whose signature verified and whose contents are acceptable.
#[derive(Debug)]
pub struct CheckedCsr {
    /// The subject public key, ready for rcgen.
    pub public_key: rcgen::SubjectPublicKeyInfo,
    /// A short description of the key type, for logs (`ecdsa-p256`, ...).
    pub key_type: &'static str,
}

/// Why a CSR was refused. Each variant maps to one `reason` label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is empty")]
    Empty,
    #[error("the CSR is {0} bytes; at most {MAX_CSR_LEN} are accepted")]
    TooLarge(usize),
    #[error("the CSR is not a DER-encoded PKCS#10 request: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify: the CSR was not signed by its own key")]
    BadSignature,
    #[error(
        "the CSR is signed with {0}, which is not accepted (use ECDSA with SHA-256/384, Ed25519, or RSA with SHA-256 or better)"
    )]
    UnsupportedSignature(String),
    #[error("the CSR's key is too weak: {0}")]
    WeakKey(String),
    #[error(
        "the CSR's key type is not supported: {0} (use ECDSA P-256/P-384, Ed25519 or RSA 2048-8192)"
    )]
    UnsupportedKey(String),
    #[error(
        "the CSR asks for a CA certificate (basicConstraints cA=true); workloads get leaf certificates only"
    )]
    RequestsCa,
    #[error(
        "the CSR asks for the name {0}, which is not the claimed identity; leave the SAN empty or put exactly the claimed SPIFFE ID"
    )]
    ForeignName(String),
    #[error("the CSR's extensions do not parse: {0}")]
    BadExtension(String),
}

// === impl CsrError ===

impl CsrError {
    /// The `reason` label for this refusal.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Empty | Self::Malformed(_) | Self::BadExtension(_) => Reason::MalformedCsr,
            Self::TooLarge(_) => Reason::CsrTooLarge,
            Self::BadSignature => Reason::BadCsrSignature,
            Self::UnsupportedSignature(_) => Reason::UnsupportedSignature,
            Self::WeakKey(_) => Reason::WeakKey,
            Self::UnsupportedKey(_) => Reason::UnsupportedKey,
            Self::RequestsCa => Reason::CsrRequestsCa,
            Self::ForeignName(_) => Reason::ForeignSan,
        }
    }
}

/// Parses `der`, verifies its signature, and checks that it asks for nothing
/// beyond `identity`.
pub fn check(der: &[u8], identity: &SpiffeId) -> Result<CheckedCsr, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge(der.len()));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes follow the request",
            rest.len()
        )));
    }

    let key_type = check_key(&csr)?;
    check_signature_algorithm(&csr.signature_algorithm.algorithm)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    check_extensions(&csr, identity)?;

    let spki = csr.certification_request_info.subject_pki.raw;
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|_| CsrError::UnsupportedKey(key_type.to_owned()))?;
    Ok(CheckedCsr {
        public_key,
        key_type,
    })
}

fn check_key(csr: &X509CertificationRequest<'_>) -> Result<&'static str, CsrError> {
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::Malformed("an EC key without a named curve".into()))?;
        return if curve == OID_EC_P256 {
            Ok("ecdsa-p256")
        } else if curve == OID_NIST_EC_P384 {
            Ok("ecdsa-p384")
        } else if is_weak_curve(&curve) {
            Err(CsrError::WeakKey(format!(
                "elliptic curve {curve} is below 256 bits"
            )))
        } else {
            Err(CsrError::UnsupportedKey(format!("elliptic curve {curve}")))
        };
    }
    if *alg == OID_SIG_ED25519 {
        return Ok("ed25519");
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa_bits(rsa.modulus)?,
            _ => return Err(CsrError::Malformed("an RSA key that does not parse".into())),
        };
        return if bits < MIN_RSA_BITS {
            Err(CsrError::WeakKey(format!(
                "RSA {bits} bits, at least {MIN_RSA_BITS} are required"
            )))
        } else if bits > MAX_RSA_BITS {
            Err(CsrError::UnsupportedKey(format!(
                "RSA {bits} bits, at most {MAX_RSA_BITS} are accepted"
            )))
        } else {
            Ok("rsa")
        };
    }
    Err(CsrError::UnsupportedKey(format!("key algorithm {alg}")))
}

/// The exact size of an RSA modulus in bits, from its DER INTEGER contents.
///
/// x509-parser's `key_size` counts whole bytes after dropping the first
/// one, which makes a 2047-bit key 2040 bits and an 8199-bit key 8192;
/// the bounds are checked on the real length.
fn rsa_bits(modulus: &[u8]) -> Result<usize, CsrError> {
    if modulus.first().is_some_and(|b| b & 0x80 != 0) {
        return Err(CsrError::Malformed(
            "an RSA modulus that is negative".into(),
        ));
    }
    let start = modulus
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(modulus.len());
    let significant = &modulus[start..];
    let top_bits = significant
        .first()
        .map_or(0, |b| 8 - b.leading_zeros() as usize);
    Ok(significant.len().saturating_sub(1) * 8 + top_bits)
}

/// secp192r1 and secp224r1: below the 128-bit security level.
fn is_weak_curve(curve: &Oid<'_>) -> bool {
    let s = curve.to_id_string();
    s == "1.2.840.10045.3.1.1" || s == "1.3.132.0.33"
}

fn check_signature_algorithm(alg: &Oid<'_>) -> Result<(), CsrError> {
    let accepted = [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ED25519,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
    ];
    if accepted.contains(alg) {
        Ok(())
    } else {
        Err(CsrError::UnsupportedSignature(alg.to_id_string()))
    }
}

fn check_extensions(
    csr: &X509CertificationRequest<'_>,
    identity: &SpiffeId,
) -> Result<(), CsrError> {
    let Some(extensions) = csr.requested_extensions() else {
        return Ok(());
    };
    for ext in extensions {
        match ext {
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::RequestsCa),
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) if *uri == identity.as_str() => {}
                        other => return Err(CsrError::ForeignName(describe(other))),
                    }
                }
                let uris = san
                    .general_names
                    .iter()
                    .filter(|n| matches!(n, GeneralName::URI(_)))
                    .count();
                if uris > 1 {
                    return Err(CsrError::ForeignName(
                        "a second copy of the URI SAN".to_owned(),
                    ));
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::BadExtension(error.to_string()));
            }
            // Everything else (key usages, subject key id, ...) is ignored: the CA
            // writes its own extensions.
            _ => {}
        }
    }
    Ok(())
}

/// Describes a requested name for an error message. Names are the caller's own
/// request, not secrets, but are truncated to keep messages short.
fn describe(name: &GeneralName<'_>) -> String {
    let (kind, value) = match name {
        GeneralName::DNSName(s) => ("DNS", s.to_string()),
        GeneralName::RFC822Name(s) => ("e-mail", s.to_string()),
        GeneralName::URI(s) => ("URI", s.to_string()),
        GeneralName::IPAddress(b) => ("IP", hex::encode(b)),
        other => ("other", format!("{other:?}")),
    };
    let mut value: String = value
        .chars()
        .filter(|c| !c.is_control())
        .take(128)
        .collect();
    if value.len() >= 128 {
        value.push('…');
    }
    format!("{kind}:{value}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_moduli_are_measured_to_the_bit() {
        for (modulus, bits) in [
            (&[0x00, 0xff, 0x00][..], 16),
            (&[0x7f, 0x00], 15),
            (&[0x01], 1),
            (&[0x00, 0x00, 0x01, 0x00], 9),
            (&[0x40, 0x00, 0x00], 23),
            (&[0x00], 0),
            (&[], 0),
        ] {
            assert_eq!(rsa_bits(modulus), Ok(bits), "{modulus:02x?}");
        }
        assert!(matches!(
            rsa_bits(&[0x80, 0x00]),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(rsa_bits(&[0xff]), Err(CsrError::Malformed(_))));
    }
}
