//! TEMPORARY STUB until the policy module lands.
use palisade_proto::{SpiffeId, TrustDomain};
use std::{path::Path, sync::Arc};
#[derive(Debug)]
pub struct Policy;
impl Policy {
    pub fn allow_all() -> Self {
        Policy
    }
    pub fn allows(&self, _p: u16, _peer: Option<&SpiffeId>) -> bool {
        true
    }
}
#[derive(Debug)]
pub struct PolicyStore(arc_swap::ArcSwap<Policy>);
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct PolicyError;
impl PolicyStore {
    pub fn load(_p: &Path, _t: TrustDomain) -> Result<Self, PolicyError> {
        Err(PolicyError)
    }
    pub fn fixed(p: Policy) -> Self {
        Self(arc_swap::ArcSwap::from_pointee(p))
    }
    pub fn current(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.0.load()
    }
    pub fn reload(&self) -> Result<bool, PolicyError> {
        Ok(false)
    }
}
