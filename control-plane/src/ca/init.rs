//! `palisade-control-plane ca init`: a fresh ECDSA P-256 root for local use.
//!
//! Production clusters bring their own issuer (a Secret, often managed by
//! cert-manager); this is for laptops, demos and tests.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    time::{Duration, SystemTime},
};

use palisade_proto::TrustDomain;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use super::issuer::{BUNDLE_FILE, CERT_FILE, KEY_FILE};

/// Why `ca init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0} already holds a CA; pass --force to replace it")]
    Exists(String),
    #[error("cannot write {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error("cannot generate the root: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Writes `tls.crt`, `tls.key` (mode 0600) and `ca.crt` for a new self-signed
/// root into `dir`. Returns the root certificate's PEM.
pub fn write_root(
    dir: &Path,
    trust_domain: &TrustDomain,
    validity: Duration,
    force: bool,
) -> Result<String, InitError> {
    let write_err = |path: &Path| {
        let path = path.display().to_string();
        move |error| InitError::Write { path, error }
    };
    fs::create_dir_all(dir).map_err(write_err(dir))?;
    if !force && dir.join(KEY_FILE).exists() {
        return Err(InitError::Exists(dir.display().to_string()));
    }

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain.as_str());
    params
        .distinguished_name
        .push(DnType::CommonName, "Palisade root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60 * 60)).into();
    params.not_after = (now + validity).into();
    let cert_pem = params.self_signed(&key)?.pem();

    let key_path = dir.join(KEY_FILE);
    // Create with 0600 from the start; never widen, even briefly.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(write_err(&key_path))?;
    // `mode` only applies to a new file; an existing one (--force) is narrowed too.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(write_err(&key_path))?;
    file.write_all(key.serialize_pem().as_bytes())
        .map_err(write_err(&key_path))?;
    for name in [CERT_FILE, BUNDLE_FILE] {
        let path = dir.join(name);
        fs::write(&path, &cert_pem).map_err(write_err(&path))?;
    }
    Ok(cert_pem)
}
