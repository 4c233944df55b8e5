//! What both Palisade binaries run on.
//!
//! - [`watch`]: file change notification for hot reloads.
//! - [`admin`]: the admin server: `/metrics`, `/ready`, `/live`, and
//!   `/config` on loopback only; bounded in connections and time.
//! - [`telemetry`]: the logging flags both binaries share, and logging setup.
//! - [`process`]: the crypto provider, the shutdown signal, the exit code.
//! - [`metrics`]: closed label sets as types, and the catalogue of registered
//!   metric families that `docs/metrics.md` is checked against.
//! - [`verifier`]: mesh certificate verification: the chain, then exactly
//!   one SPIFFE ID of the trust domain (the sidecar's handshakes, and the
//!   control plane's discovery callers).

#![forbid(unsafe_code)]

pub mod admin;
pub mod metrics;
pub mod process;
pub mod telemetry;
pub mod verifier;
pub mod watch;

pub use process::exit_code;
