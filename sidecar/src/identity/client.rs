//! One `Certify` round trip: generate a fresh ECDSA P-256 key in memory, build a
//! CSR naming our SPIFFE ID, and ask the control plane to sign it over TLS that
//! is verified against the trust bundle alone.
//!
//! The private key never leaves this process: only the CSR is sent.

use std::{
    fmt,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use palisade_proto::{
    SpiffeId,
    identity::v1::{CertifyRequest, identity_client::IdentityClient as GrpcClient},
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Where the control plane is and how to prove who we are.
#[derive(Clone, Debug, Serialize)]
pub struct IdentityClientConfig {
    /// `https://host:port` of the control plane's gRPC API.
    pub control_plane: String,
    /// The DNS name in the control plane's serving certificate.
    pub server_name: String,
    /// PEM file with the roots that may sign the control plane's certificate.
    pub bundle_file: PathBuf,
    /// The identity we claim.
    pub identity: SpiffeId,
    /// File holding the token; read on every request (kubelet rotates it).
    pub token_file: PathBuf,
    /// Lifetime to ask for; the control plane's default when absent.
    pub lifetime: Option<Duration>,
    /// Deadline of one Certify call, connection included.
    pub timeout: Duration,
}

/// A certificate, its chain, the trust bundle and the private key.
pub struct Credentials {
    /// Our leaf certificate.
    pub certificate: CertificateDer<'static>,
    /// Intermediates from our issuer up to a root.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// Every root the mesh trusts.
    pub trust_bundle: Vec<CertificateDer<'static>>,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// Our private key (PKCS#8).
    pub key: KeyPair,
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("cannot read the trust bundle {path}: {error}")]
    Bundle {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read the token file {path}: {error}")]
    Token {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot reach the control plane at {addr}: {error}")]
    Connect {
        addr: String,
        error: tonic::transport::Error,
    },
    #[error("the control plane at {addr} refused the request ({code:?}): {message}")]
    Refused {
        addr: String,
        code: tonic::Code,
        message: String,
    },
    #[error("the control plane sent an unusable certificate: {0}")]
    BadResponse(String),
    #[error("cannot make a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
}

/// A client of the control plane's identity API.
#[derive(Debug)]
pub struct IdentityClient {
    config: IdentityClientConfig,
}

// === impl IdentityClient ===

impl IdentityClient {
    /// The identity this client claims.
    pub fn identity(&self) -> &SpiffeId {
        &self.config.identity
    }

    /// The initial bundle file.
    pub fn bundle_file(&self) -> &std::path::Path {
        &self.config.bundle_file
    }

    /// A client for `config`; nothing is read or connected yet.
    pub fn new(config: IdentityClientConfig) -> Self {
        Self { config }
    }

    /// Generates a fresh key and has the control plane certify it.
    pub async fn certify(&self) -> Result<Credentials, CertifyError> {
        self.certify_trusting(&[]).await
    }

    /// Like [`certify`](Self::certify), also trusting `extra_roots` (the bundle
    /// of the last response) for the control plane's certificate, so a root
    /// rotation reaches the sidecar before its bundle file is updated.
    pub async fn certify_trusting(
        &self,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<Credentials, CertifyError> {
        let c = &self.config;
        let mut bundle = std::fs::read(&c.bundle_file).map_err(|error| CertifyError::Bundle {
            path: c.bundle_file.clone(),
            error,
        })?;
        for root in extra_roots {
            bundle.push(b'\n');
            bundle.extend_from_slice(
                ::pem::encode(&::pem::Pem::new("CERTIFICATE", root.to_vec())).as_bytes(),
            );
        }
        let token = std::fs::read(&c.token_file).map_err(|error| CertifyError::Token {
            path: c.token_file.clone(),
            error,
        })?;
        let token = trim_ascii_whitespace(&token).to_vec();

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            c.identity
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CertifyError::Key(e))?,
        )];
        let csr = params.serialize_request(&key)?.der().to_vec();

        let channel = self.connect(&bundle).await?;
        let request = CertifyRequest {
            identity: c.identity.to_string(),
            token,
            csr,
            requested_lifetime: c
                .lifetime
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        };
        let response = GrpcClient::new(channel)
            .certify(request)
            .await
            .map_err(|status| CertifyError::Refused {
                addr: c.control_plane.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            })?
            .into_inner();

        let certificate = CertificateDer::from(response.certificate);
        let (not_after, serial) = leaf_facts(&certificate, &c.identity)?;
        Ok(Credentials {
            certificate,
            intermediates: response
                .intermediates
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            trust_bundle: response
                .trust_bundle
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            not_after,
            serial,
            key,
        })
    }

    async fn connect(&self, bundle_pem: &[u8]) -> Result<Channel, CertifyError> {
        let c = &self.config;
        let connect_err = |error| CertifyError::Connect {
            addr: c.control_plane.clone(),
            error,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(bundle_pem))
            .domain_name(c.server_name.clone());
        Endpoint::from_shared(c.control_plane.clone())
            .map_err(connect_err)?
            .tls_config(tls)
            .map_err(connect_err)?
            .connect_timeout(c.timeout)
            .timeout(c.timeout)
            .connect()
            .await
            .map_err(connect_err)
    }
}

/// Checks that the leaf names exactly our identity; returns notAfter and serial.
fn leaf_facts(
    der: &CertificateDer<'_>,
    identity: &SpiffeId,
) -> Result<(SystemTime, String), CertifyError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| CertifyError::BadResponse(format!("the leaf does not parse: {e}")))?;
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [identity.as_str()] {
        return Err(CertifyError::BadResponse(format!(
            "the leaf names {uris:?}, not {identity}"
        )));
    }
    let secs = cert.validity().not_after.timestamp();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((not_after, hex_serial(cert.raw_serial())))
}

fn hex_serial(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn trim_ascii_whitespace(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("serial", &self.serial)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .field("intermediates", &self.intermediates.len())
            .field("trust_bundle", &self.trust_bundle.len())
            .field("key", &"...")
            .finish()
    }
}
