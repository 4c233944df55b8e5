//! Mesh TLS: TLS 1.3 only, ALPN `palisade/1`, client certificates required,
//! peers named by SPIFFE ID.
//!
//! - [`store`]: the validated, atomically swapped TLS configurations.
//! - [`verifier`]: chain + SPIFFE ID verifiers for both sides (shared with
//!   the control plane, in `palisade-runtime`).
//! - [`files`]: credentials from a watched directory (file mode).

pub mod files;
pub mod store;

pub use palisade_runtime::verifier;

pub use self::{
    store::{CertStore, KxGroup, Material, StoreError, Suite, TlsConfigs, TlsSettings},
    verifier::{IdentityError, Verification, spiffe_id},
};

#[cfg(test)]
mod tests;
