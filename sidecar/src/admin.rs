//! The sidecar's own routes on the admin port, served beside the runtime's
//! (`palisade_runtime::admin`) on every address: the app's rewritten probes
//! ([`crate::probe`]) and `GET /identity`, what certificate the sidecar
//! holds.
//!
//! `/identity` is for operators and the `palisade` command: the SPIFFE ID,
//! the leaf's serial, its validity, and SHA-256 fingerprints of each
//! certificate of the chain and of each root in force, to compare with what
//! the CA issued or what a peer presented. Fingerprints and names only: no
//! key, no certificate body, nothing a client could use to present the
//! certificate. It answers `503` before the first certificate.

use std::{sync::Arc, time::SystemTime};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{
    probe::Prober,
    tls::{CertStore, TlsConfigs},
};

/// What `GET /identity` answers while a certificate is loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityReport {
    /// The SPIFFE ID of the certificate.
    pub identity: String,
    /// The leaf's serial number, lowercase hex, as `openssl x509 -serial`
    /// prints it.
    pub serial: String,
    /// The leaf's notBefore, RFC 3339.
    pub not_before: String,
    /// The leaf's notAfter, RFC 3339.
    pub not_after: String,
    /// Seconds from now until notAfter; negative once expired.
    pub expires_in_seconds: i64,
    /// The leaf, then the intermediates it was served with.
    pub chain: Vec<CertSummary>,
    /// Every root peers are verified against.
    pub trust_roots: Vec<CertSummary>,
}

/// One certificate, by name and fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertSummary {
    /// The subject's distinguished name (empty for mesh leaves, which are
    /// named by their URI SAN).
    pub subject: String,
    /// SHA-256 of the DER, lowercase hex without separators.
    pub sha256: String,
}

/// Why a loaded certificate cannot be described; the store checked it, so
/// this is not expected.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the loaded certificate cannot be parsed: {0}")]
    Parse(String),
}

/// The sidecar's admin routes: `/identity` and the prober's.
pub fn routes(store: Arc<CertStore>, prober: Arc<Prober>) -> Router {
    Router::new()
        .route("/identity", get(identity))
        .with_state(store)
        .merge(prober.routes())
}

async fn identity(
    State(store): State<Arc<CertStore>>,
) -> Result<Json<IdentityReport>, (StatusCode, Json<serde_json::Value>)> {
    let error = |status, message: String| (status, Json(serde_json::json!({ "error": message })));
    let Some(configs) = store.current() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no certificate is loaded yet".to_owned(),
        ));
    };
    IdentityReport::of(&configs, SystemTime::now())
        .map(Json)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

// === impl IdentityReport ===

impl IdentityReport {
    /// Describes `configs` as seen at `now`.
    pub fn of(configs: &TlsConfigs, now: SystemTime) -> Result<Self, ReportError> {
        let key = configs.certified_key();
        let leaf = key
            .cert
            .first()
            .ok_or_else(|| ReportError::Parse("the chain is empty".to_owned()))?;
        let (_, parsed) =
            X509Certificate::from_der(leaf).map_err(|e| ReportError::Parse(e.to_string()))?;
        let expires_in_seconds = match configs.not_after().duration_since(now) {
            Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            Err(past) => i64::try_from(past.duration().as_secs()).map_or(i64::MIN, |s| -s),
        };
        Ok(Self {
            identity: configs.identity().to_string(),
            serial: serial_hex(parsed.raw_serial()),
            not_before: humantime::format_rfc3339_seconds(configs.not_before()).to_string(),
            not_after: humantime::format_rfc3339_seconds(configs.not_after()).to_string(),
            expires_in_seconds,
            chain: key.cert.iter().map(CertSummary::of).collect(),
            trust_roots: configs.bundle().iter().map(CertSummary::of).collect(),
        })
    }
}

// === impl CertSummary ===

impl CertSummary {
    fn of(der: &CertificateDer<'_>) -> Self {
        let subject = X509Certificate::from_der(der)
            .map(|(_, cert)| cert.subject().to_string())
            .unwrap_or_default();
        Self {
            subject,
            sha256: hex::encode(Sha256::digest(der.as_ref())),
        }
    }
}

/// The serial's magnitude in hex: DER pads a serial whose top bit is set
/// with a zero byte, which is not part of the number.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[start..])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use palisade_proto::TrustDomain;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;
    use crate::tls::Material;

    const ID: &str = "spiffe://cluster.local/ns/a/sa/app";

    fn ca(name: &str) -> (CertificateParams, KeyPair, CertificateDer<'static>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let der = params.self_signed(&key).expect("self-sign").der().clone();
        (params, key, der)
    }

    #[test]
    fn the_serial_is_the_number_without_the_sign_byte() {
        assert_eq!(serial_hex(&[0x00, 0x8a, 0x01]), "8a01");
        assert_eq!(serial_hex(&[0x0a, 0x00]), "0a00");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[]), "");
    }

    #[tokio::test]
    async fn identity_describes_the_loaded_certificate_and_nothing_secret() {
        let store = Arc::new(CertStore::new(
            TrustDomain::parse("cluster.local").expect("a trust domain"),
            vec![],
        ));
        let prober = Arc::new(Prober::new(Default::default(), None).expect("a prober"));
        let app = routes(store.clone(), prober);
        let (status, body) = get_identity(&app).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));

        let (root_params, root_key, root) = ca("mesh root");
        let (_, _, other_root) = ca("next root");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(ID.try_into().expect("ia5"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&[0x9c, 0x00, 0x17]));
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(3600)).into();
        let leaf = params
            .signed_by(&key, &Issuer::from_params(&root_params, &root_key))
            .expect("sign")
            .der()
            .clone();
        let key_der = key.serialize_der();
        store
            .publish(
                Material {
                    chain: vec![leaf.clone()],
                    key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.clone())),
                    roots: vec![root.clone(), other_root.clone()],
                },
                now,
            )
            .expect("valid material");

        let (status, body) = get_identity(&app).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(report["identity"], ID);
        assert_eq!(report["serial"], "9c0017");
        let left = report["expires_in_seconds"].as_i64().expect("a number");
        assert!((3500..=3600).contains(&left), "{left}");
        let sha = |der: &CertificateDer<'_>| hex::encode(Sha256::digest(der.as_ref()));
        assert_eq!(report["chain"][0]["sha256"], sha(&leaf));
        assert_eq!(report["chain"].as_array().map(Vec::len), Some(1));
        assert_eq!(report["trust_roots"][0]["sha256"], sha(&root));
        assert_eq!(report["trust_roots"][0]["subject"], "CN=mesh root");
        assert_eq!(report["trust_roots"][1]["sha256"], sha(&other_root));
        assert!(
            report["not_after"]
                .as_str()
                .is_some_and(|t| humantime::parse_rfc3339(t).is_ok()),
            "{report}"
        );

        // Neither the key nor a certificate body, in any encoding.
        for secret in [key_der.as_slice(), leaf.as_ref(), root.as_ref()] {
            let armoured = pem::encode(&pem::Pem::new("X", secret));
            let b64 = armoured.lines().nth(1).expect("a base64 line");
            assert!(!body.contains(b64), "{body}");
            assert!(!body.contains(&hex::encode(secret)), "{body}");
        }
        assert!(!body.contains("PRIVATE KEY") && !body.contains("BEGIN"));
    }

    async fn get_identity(app: &Router) -> (StatusCode, String) {
        use tower::ServiceExt;
        let request = axum::http::Request::get("/identity")
            .body(axum::body::Body::empty())
            .expect("a request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}
