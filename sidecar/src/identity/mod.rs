//! The sidecar's identity: a fresh key per certificate, certified by the
//! control plane.
//!
//! - [`client`]: one `Certify` call: key generation, CSR, TLS to the control plane.
//! - [`refresh`]: when to renew, and how to back off after a failure.

pub mod client;
pub mod refresh;

pub use self::client::{CertifyError, Credentials, IdentityClient, IdentityClientConfig};

#[cfg(test)]
mod tests;
