//! The sidecar's identity: a fresh key per certificate, certified by the
//! control plane.
//!
//! - [`client`]: one `Certify` call: key generation, CSR, TLS to the control plane.

pub mod client;

pub use self::client::{CertifyError, Credentials, IdentityClient, IdentityClientConfig};
