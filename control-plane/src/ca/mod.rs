//! The mesh certificate authority.
//!
//! - [`issuer`]: loads and validates the issuer certificate, key and trust bundle.
//! - [`csr`]: checks a CSR (size, key, signature, requested names).
//! - [`signer`]: builds and signs workload certificates.
//! - [`init`]: `ca init`, a fresh root for local use.
//! - [`serving`]: the control plane's own serving certificate, issued by the CA.
//!
//! [`CaStore`] holds the current issuer behind an [`ArcSwap`]: signing never
//! locks, and a reload swaps in a validated replacement or keeps the old one.

pub mod csr;
pub mod init;
pub mod issuer;
pub mod serving;
pub mod signer;
#[cfg(test)]
mod tests;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

pub use self::{
    issuer::{CaFiles, Issuer, IssuerError},
    signer::{Issued, LifetimePolicy, SignError},
};

/// Why the CA refused to sign: the CA's part of the `reason` label of
/// `palisade_ca_certificates_issued_total` (see [`crate::service::Reason`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Reason {
    /// Empty, not DER PKCS#10, trailing bytes, or unparsable extensions.
    MalformedCsr,
    /// Over the CSR size limit.
    CsrTooLarge,
    /// The CSR was not signed by its own key.
    BadCsrSignature,
    /// SHA-1 or another signature algorithm that is not accepted.
    UnsupportedSignature,
    /// RSA below 2048 bits, P-192, P-224.
    WeakKey,
    /// Any other key type.
    UnsupportedKey,
    /// The CSR asks for `cA=true`.
    CsrRequestsCa,
    /// The CSR asks for a name other than the claimed identity.
    ForeignSan,
    /// The requested lifetime is below the minimum.
    LifetimeTooShort,
    /// The identity cannot be written into a certificate.
    BadIdentity,
    /// The issuer has expired.
    IssuerExpired,
    /// Signing failed for a reason of ours.
    Internal,
}

/// The current issuer, and the directory it is reloaded from.
#[derive(Debug)]
pub struct CaStore {
    dir: PathBuf,
    current: ArcSwap<Loaded>,
    changed: watch::Sender<u64>,
}

/// What changed on a reload.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were.
    Unchanged,
    /// A new, validated issuer or bundle is in use.
    Replaced,
}

#[derive(Debug)]
struct Loaded {
    files: CaFiles,
    issuer: Arc<Issuer>,
}

// === impl CaStore ===

impl CaStore {
    /// Loads and validates the CA directory.
    pub fn load(dir: &Path) -> Result<Self, IssuerError> {
        let files = CaFiles::read(dir)?;
        let issuer = Arc::new(Issuer::from_files(&files, SystemTime::now())?);
        Ok(Self {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(Loaded { files, issuer }),
            changed: watch::Sender::new(0),
        })
    }

    /// The issuer to sign with now.
    pub fn issuer(&self) -> Arc<Issuer> {
        self.current.load().issuer.clone()
    }

    /// The directory the CA is loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the directory; a valid change replaces the issuer, an invalid one
    /// is refused and the current issuer keeps signing.
    pub fn reload(&self) -> Result<Reload, IssuerError> {
        let files = CaFiles::read(&self.dir)?;
        if files == self.current.load().files {
            return Ok(Reload::Unchanged);
        }
        let issuer = Arc::new(Issuer::from_files(&files, SystemTime::now())?);
        self.current.store(Arc::new(Loaded { files, issuer }));
        self.changed.send_modify(|generation| *generation += 1);
        Ok(Reload::Replaced)
    }

    /// Fires each time a new issuer is in use.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
