//! Palisade's control plane: the mesh certificate authority.
//!
//! Sidecars call `Certify` with a token and a CSR; the control plane
//! authenticates the token, derives the caller's SPIFFE ID, checks that it is
//! the identity claimed, and signs a short-lived leaf for the CSR's key.
//!
//! - [`config`]: flags and environment, the only place that reads them.
//! - [`app`]: wires the parts together and runs them until shutdown.
//! - [`ca`]: the issuer, CSR checks and certificate signing.
//! - [`authn`]: the `static` and `kubernetes` token authenticators.
//! - [`service`]: the `Identity` gRPC service.
//! - [`grpc`]: the TLS gRPC server and its self-issued serving certificate.
//! - [`admin`]: `/metrics`, `/ready`, `/live`, `/config`.
//! - [`metrics`]: the Prometheus metrics.
//! - [`watch`]: file change notification for hot reloads.
//! - [`telemetry`]: logging setup.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authn;
pub mod ca;
pub mod config;
pub mod grpc;
pub mod metrics;
pub mod service;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testing;
pub mod watch;
