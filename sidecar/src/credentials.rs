//! Writes credentials in the layout of a Kubernetes TLS Secret: `tls.crt` (leaf
//! then intermediates), `tls.key` (PKCS#8, mode 0600) and `ca.crt` (the bundle).

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use crate::identity::Credentials;

/// Writes `creds` into `dir`, creating it if needed.
pub fn write(dir: &Path, creds: &Credentials) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let pem = |der: &[u8]| ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()));
    let mut chain = pem(&creds.certificate);
    for c in &creds.intermediates {
        chain.push_str(&pem(c));
    }
    let bundle: String = creds.trust_bundle.iter().map(|c| pem(c)).collect();

    let key_path = dir.join("tls.key");
    let mut key = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)?;
    key.set_permissions(fs::Permissions::from_mode(0o600))?;
    key.write_all(creds.key.serialize_pem().as_bytes())?;
    fs::write(dir.join("tls.crt"), chain)?;
    fs::write(dir.join("ca.crt"), bundle)?;
    Ok(())
}
