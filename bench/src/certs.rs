//! Certificates made for a run with rcgen, never checked in: the proxy
//! benchmark's CA and client and server leaves (written in the layout each
//! system wants), and the issuance benchmark's CSRs and its check of what the
//! control plane issued for them.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, anyhow, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType, string::Ia5String,
};
use rustls::pki_types::CertificateDer;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// The trust domain of the proxy benchmark's certificates.
pub const TRUST_DOMAIN: &str = "bench.local";
/// The client leaf's identity.
pub const CLIENT_ID: &str = "spiffe://bench.local/ns/bench/sa/client";
/// The server leaf's identity: what the client side requires of its peer.
pub const SERVER_ID: &str = "spiffe://bench.local/ns/bench/sa/server";

/// The PEM files every system of the proxy benchmark uses, in the layouts
/// they want, and the DER forms for the rustls probes of the TLS check.
#[derive(Debug)]
pub struct CertFiles {
    /// The CA certificate, PEM.
    pub ca: PathBuf,
    /// The client side's leaf.
    pub client: LeafFiles,
    /// The server side's leaf.
    pub server: LeafFiles,
    /// The CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
}

/// One leaf: one ECDSA P-256 key, one SPIFFE URI SAN, DNS SAN `localhost`,
/// serverAuth + clientAuth.
#[derive(Debug)]
pub struct LeafFiles {
    /// The sidecar's file-mode directory: `tls.crt`, `tls.key`, `ca.crt`.
    pub dir: PathBuf,
    /// The certificate, PEM (`dir/tls.crt`).
    pub cert: PathBuf,
    /// The key, PEM (`dir/tls.key`).
    pub key: PathBuf,
    /// Certificate and key in one PEM file (haproxy's `crt`).
    pub combined: PathBuf,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// The key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

/// A CSR for a fresh P-256 key with one URI SAN, as a sidecar sends on each
/// renewal.
#[derive(Debug)]
pub struct Csr {
    /// The PKCS#10 request, DER.
    pub der: Vec<u8>,
    /// The key's SubjectPublicKeyInfo, DER: what the issued certificate must carry.
    pub spki: Vec<u8>,
}

// === impl CertFiles ===

impl CertFiles {
    /// Makes the CA (valid 30 days) and both leaves (7 days), both backdated
    /// an hour, and writes them below `dir`.
    pub fn write(dir: &Path) -> Result<Self> {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "palisade bench CA");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        ca_params.not_before = (now - Duration::from_secs(3600)).into();
        ca_params.not_after = (now + Duration::from_secs(30 * 86_400)).into();
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let ca = dir.join("ca.pem");
        fs::write(&ca, &ca_pem)?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let leaf = |name: &str, id: &str| -> Result<LeafFiles> {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![
                SanType::URI(id.try_into()?),
                SanType::DnsName("localhost".try_into()?),
            ];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.use_authority_key_identifier_extension = true;
            params.not_before = (now - Duration::from_secs(3600)).into();
            params.not_after = (now + Duration::from_secs(7 * 86_400)).into();
            let cert = params.signed_by(&key, &issuer)?;
            let side_dir = dir.join(name);
            fs::create_dir_all(&side_dir)?;
            // File mode of the sidecar: tls.crt, tls.key, ca.crt.
            fs::write(side_dir.join("tls.crt"), cert.pem())?;
            fs::write(side_dir.join("tls.key"), key.serialize_pem())?;
            fs::write(side_dir.join("ca.crt"), &ca_pem)?;
            let combined = dir.join(format!("{name}.pem"));
            fs::write(&combined, format!("{}{}", cert.pem(), key.serialize_pem()))?;
            Ok(LeafFiles {
                cert: side_dir.join("tls.crt"),
                key: side_dir.join("tls.key"),
                dir: side_dir,
                combined,
                der: cert.der().clone(),
                key_der: key.serialize_der(),
            })
        };
        Ok(Self {
            client: leaf("client", CLIENT_ID)?,
            server: leaf("server", SERVER_ID)?,
            ca,
            ca_der: ca_cert.der().clone(),
        })
    }
}

// === impl Csr ===

impl Csr {
    /// A fresh P-256 key and a CSR with the one URI SAN `identity` and an
    /// empty subject.
    pub fn generate(identity: &str) -> Result<Self> {
        let san = Ia5String::try_from(identity)
            .with_context(|| format!("{identity} is not an IA5 string"))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating a P-256 key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(san)];
        let csr = params
            .serialize_request(&key)
            .context("serializing a CSR")?;
        Ok(Self {
            der: csr.der().to_vec(),
            spki: key.subject_public_key_info(),
        })
    }
}

/// Checks a certificate the control plane issued: its one URI SAN is
/// `identity`, and its key is `spki`.
pub fn check_issued(certificate: &[u8], identity: &str, spki: &[u8]) -> Result<()> {
    let (_, cert) = X509Certificate::from_der(certificate)
        .map_err(|e| anyhow!("the certificate does not parse: {e}"))?;
    ensure!(
        cert.public_key().raw == spki,
        "the certificate's public key is not the CSR's"
    );
    let san = cert
        .subject_alternative_name()
        .map_err(|e| anyhow!("the SAN extension does not parse: {e}"))?
        .context("the certificate has no SAN")?;
    let names = &san.value.general_names;
    ensure!(
        matches!(names.as_slice(), [GeneralName::URI(uri)] if *uri == identity),
        "the SAN is {names:?}, not exactly the URI {identity}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_for_the_csr_key_and_identity_passes_the_check_and_others_do_not() {
        let id = "spiffe://cluster.local/ns/bench/sa/client-0";
        let csr = Csr::generate(id).expect("a CSR");
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key");
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let request = rcgen::CertificateSigningRequestParams::from_der(&csr.der.clone().into())
            .expect("the CSR parses");
        let issued = request.signed_by(&issuer).expect("signed");
        check_issued(issued.der(), id, &csr.spki).expect("the right key and identity");
        assert!(check_issued(issued.der(), "spiffe://cluster.local/ns/x/sa/y", &csr.spki).is_err());
        let other = Csr::generate(id).expect("another CSR");
        assert!(check_issued(issued.der(), id, &other.spki).is_err());
    }

    #[test]
    fn cert_files_are_written_in_every_layout() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let files = CertFiles::write(dir.path()).expect("the certificates");
        for leaf in [&files.client, &files.server] {
            for f in [
                &leaf.cert,
                &leaf.key,
                &leaf.combined,
                &leaf.dir.join("ca.crt"),
            ] {
                assert!(f.is_file(), "{} is missing", f.display());
            }
        }
        assert!(files.ca.is_file());
    }
}
