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
//! - [`grpc`]: the gRPC server of the `Identity` service.
//! - [`tls`]: TLS for the gRPC and webhook servers: one configuration, one
//!   bounded accept loop.
//! - [`inject`]: the sidecar-injection webhook (HTTPS, 15017).
//! - [`discovery`]: which pod answers at which address, for the sidecars.
//! - [`policy`]: the policy resources (CRDs) and what each pod is sent of them.
//! - [`publish`]: writes the trust bundle into the cluster (webhook `caBundle`,
//!   per-namespace ConfigMaps).
//! - [`metrics`]: the Prometheus metrics.

#![forbid(unsafe_code)]

pub mod app;
pub mod authn;
pub mod ca;
pub mod config;
pub mod discovery;
pub mod grpc;
pub mod inject;
pub mod metrics;
pub mod policy;
pub mod publish;
pub mod service;
#[cfg(test)]
pub(crate) mod testing;
pub mod tls;
