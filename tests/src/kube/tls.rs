//! The stand-in's own CA (made at start, never written into the repository),
//! its serving certificate, and the kubeconfig that trusts it.

use std::sync::Arc;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio_rustls::TlsAcceptor;

use super::Error;

/// The CA and the server's TLS configuration.
pub(crate) struct Certs {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    server: Arc<rustls::ServerConfig>,
}

// === impl Certs ===

impl Certs {
    pub fn generate() -> Result<Self, Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "palisade kube stand-in CA");
        ca.distinguished_name = dn;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "localhost".to_owned(),
        ])?;
        // Strict verifiers (OpenSSL's X509_STRICT, Python 3.13) want it.
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            server: Arc::new(server),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }
}

/// A kubeconfig for `url` trusting `ca_pem`, authenticating with `token`.
/// JSON: every kubeconfig reader takes it as YAML.
pub(crate) fn kubeconfig(url: &str, ca_pem: &str, token: &str, namespace: Option<&str>) -> String {
    let mut context = json!({"cluster": "stand-in", "user": "stand-in"});
    if let Some(namespace) = namespace {
        context["namespace"] = json!(namespace);
    }
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {
            "server": url,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca_pem),
        }}],
        "users": [{"name": "stand-in", "user": {"token": token}}],
        "contexts": [{"name": "stand-in", "context": context}],
    });
    serde_json::to_string_pretty(&config).expect("a JSON value serializes")
}
