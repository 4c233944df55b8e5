//! Palisade's sidecar: carries a pod's TCP traffic inside mutually
//! authenticated TLS to the peer pod's sidecar.
//!
//! - [`config`]: flags and environment, the only place that reads them.
//! - [`app`]: wires the parts together and runs them until shutdown.
//! - [`admin`]: the sidecar's routes on the admin port: `/identity` and the
//!   app's rewritten probes.
//! - [`tls`]: the certificate store, SPIFFE verifiers, file-mode credentials.
//! - [`proxy`]: inbound and outbound listeners, detection, relay.
//! - [`discovery`]: what the control plane says must answer at an address,
//!   and the outbound decision it drives.
//! - [`policy`]: the inbound authorization policy.
//! - [`capture`]: `palisade-sidecar init`, the iptables capture rules.
//! - [`identity`]: fresh keys certified by the control plane.
//! - [`credentials`]: writing a certificate, key and bundle to a directory.
//! - [`metrics`]: the Prometheus metrics.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod capture;
pub mod config;
pub mod credentials;
pub mod discovery;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod proxy;
pub mod tls;
