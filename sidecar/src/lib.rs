//! Palisade's sidecar: carries a pod's TCP traffic inside mutually
//! authenticated TLS to the peer pod's sidecar.
//!
//! This release holds the identity client; the data plane (capture, proxying,
//! policy) follows.
//!
//! - [`config`]: flags and environment, the only place that reads them.
//! - [`identity`]: fresh keys certified by the control plane.
//! - [`credentials`]: writing a certificate, key and bundle to a directory.

#![forbid(unsafe_code)]

pub mod config;
pub mod credentials;
pub mod identity;
