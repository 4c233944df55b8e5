//! File mode: the certificate, key and bundle come from a directory managed
//! elsewhere (cert-manager, `palisade-sidecar certify`, a test), laid out like
//! a Kubernetes TLS Secret: `tls.crt` (leaf, then intermediates), `tls.key`,
//! `ca.crt` (the bundle). The directory is watched; every change is validated
//! by the [`CertStore`] before it is used, and a bad one keeps the old
//! credentials.

use std::{fs, path::Path, time::SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{CertStore, Material, StoreError, TlsConfigs};

/// Why a credentials directory was not used.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{file} holds no usable PEM {what}")]
    Pem {
        file: &'static str,
        what: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads `dir` and, when it differs from what is published, validates and
/// publishes it. Returns the new configurations, or `None` when unchanged.
pub fn load(
    dir: &Path,
    store: &CertStore,
    now: SystemTime,
) -> Result<Option<std::sync::Arc<TlsConfigs>>, FilesError> {
    let read = |name: &'static str| {
        let path = dir.join(name);
        fs::read(&path).map_err(|error| FilesError::Read {
            path: path.display().to_string(),
            error,
        })
    };
    let (cert_pem, key_pem, bundle_pem) = (read("tls.crt")?, read("tls.key")?, read("ca.crt")?);
    let chain = certificates(&cert_pem, "tls.crt")?;
    let roots = certificates(&bundle_pem, "ca.crt")?;
    if let Some(current) = store.current()
        && current.same_material(&chain, &roots)
    {
        return Ok(None);
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| FilesError::Pem {
        file: "tls.key",
        what: "private key",
    })?;
    Ok(Some(store.publish(Material { chain, key, roots }, now)?))
}

fn certificates(
    pem: &[u8],
    file: &'static str,
) -> Result<Vec<CertificateDer<'static>>, FilesError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| FilesError::Pem {
            file,
            what: "certificates",
        })?;
    if certs.is_empty() {
        return Err(FilesError::Pem {
            file,
            what: "certificates",
        });
    }
    Ok(certs)
}
