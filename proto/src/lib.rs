//! The wire contract between Palisade's control plane and its sidecars.
//!
//! - [`identity::v1`]: the `Identity` gRPC service (`Certify`), generated from
//!   `proto/identity.proto`.
//! - [`discovery`]: the `Discovery` gRPC service (`Watch`), generated from
//!   `proto/discovery.proto`, and [`discovery::Resolution`], what an address
//!   must answer with, with its checked wire form.
//! - [`spiffe`]: [`SpiffeId`], the workload identity both sides parse once and pass around.

#![forbid(unsafe_code)]

pub mod discovery;
pub mod spiffe;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// The identity API, package `palisade.identity.v1`.
pub mod identity {
    /// Version 1 of the identity API.
    #[allow(missing_debug_implementations, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("palisade.identity.v1");

        // The token is a bearer credential: never print it.
        impl std::fmt::Debug for CertifyRequest {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("CertifyRequest")
                    .field("identity", &self.identity)
                    .field("token", &"...")
                    .field("csr_len", &self.csr.len())
                    .field("requested_lifetime", &self.requested_lifetime)
                    .finish()
            }
        }
    }
}

/// The ALPN protocol id that marks Palisade's mesh TLS.
pub const MESH_ALPN: &[u8] = b"palisade/1";
