//! The mesh-wide deny list: identities refused as callers,
//! whatever their certificates say, and whose open connections are closed.

use std::collections::HashSet;

use palisade_proto::{SpiffeId, TrustDomain, discovery::v1 as wire};

use super::namespace_of;

/// Identities refused by every sidecar.
#[derive(Debug, Default)]
pub struct DenyList {
    version: String,
    exact: HashSet<SpiffeId>,
    namespaces: HashSet<String>,
    trust_domain: Option<TrustDomain>,
}

/// Why a delivered deny list was refused.
#[derive(Debug, thiserror::Error)]
pub enum DenyListError {
    #[error("deny list entry {entry} is not a SPIFFE ID of the trust domain")]
    Identity { entry: usize },
    #[error("deny list namespace {entry} is empty or holds a `/`")]
    Namespace { entry: usize },
}

// === impl DenyList ===

impl DenyList {
    /// Denies nobody.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The list the control plane sent, checked whole.
    pub fn from_wire(
        list: &wire::DenyList,
        trust_domain: &TrustDomain,
    ) -> Result<Self, DenyListError> {
        let mut exact = HashSet::with_capacity(list.identities.len());
        for (i, value) in list.identities.iter().enumerate() {
            match SpiffeId::parse(value) {
                Ok(id) if id.is_member_of(trust_domain) => exact.insert(id),
                _ => return Err(DenyListError::Identity { entry: i + 1 }),
            };
        }
        let mut namespaces = HashSet::with_capacity(list.namespaces.len());
        for (i, ns) in list.namespaces.iter().enumerate() {
            if ns.is_empty() || ns.contains('/') {
                return Err(DenyListError::Namespace { entry: i + 1 });
            }
            namespaces.insert(ns.clone());
        }
        Ok(Self {
            version: list.version.clone(),
            exact,
            namespaces,
            trust_domain: Some(trust_domain.clone()),
        })
    }

    /// Whether `peer` is refused: named exactly, or an identity of a denied
    /// namespace of the trust domain.
    pub fn denies(&self, peer: &SpiffeId) -> bool {
        if self.exact.contains(peer) {
            return true;
        }
        !self.namespaces.is_empty()
            && self
                .trust_domain
                .as_ref()
                .is_some_and(|td| peer.is_member_of(td))
            && namespace_of(peer).is_some_and(|ns| self.namespaces.contains(ns))
    }

    /// Its version (a digest), empty for the empty list.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// How many identities and namespaces it names.
    pub fn len(&self) -> usize {
        self.exact.len() + self.namespaces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
