//! Authorization on Kubernetes: the policy resources of group
//! `policy.palisade.io` and what each sidecar is sent of them over its
//! discovery stream.
//!
//! - [`resources`]: the CRD types (`InboundPolicy`, `IdentityDenyList`), the
//!   one source of the chart's CRDs.
//! - [`effective`]: which policies select a pod, resolved for it; the deny
//!   lists merged.

pub mod effective;
pub mod resources;

pub use self::{
    effective::{Admission, DenyDef, MeshDefault, PodFacts, PolicyDef, admission, pod_policy},
    resources::{IdentityDenyList, InboundPolicy, crds_yaml},
};

#[cfg(test)]
mod tests;
