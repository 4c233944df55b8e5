//! Discovery: the control plane tells each sidecar who must answer at an
//! address.
//!
//! - [`model`]: which live pod claims which address, and what the address
//!   answers with (`Meshed` with the exact identity, `Unmeshed`, or failing
//!   closed on a conflict). Built from Pods as the API server reports them.
//! - [`services`]: which cluster address leads to which ready endpoints,
//!   each answered from the pod directory (never from the EndpointSlice).
//! - [`file`]: the same model in YAML (the `file` source).
//! - [`kubernetes`]: the `kubernetes` source, kube-rs watchers on Pods,
//!   Services and EndpointSlices.
//! - [`state`]: the state the sources write and the streams read: one
//!   directory, a broadcast of changes, and whether the sources have synced.
//! - [`stream`]: the `Watch` stream: the caller's certificate and address,
//!   the pod it is bound to, a snapshot and then the changes.

pub mod file;
pub mod kubernetes;
pub mod model;
pub mod services;
pub mod state;
pub mod stream;

pub use self::{
    model::{Claim, Directory, Resolution, Workload},
    services::{EndpointDef, PortDef, ServiceDef, Services, SliceDef},
    state::{BindError, Change, Discovery, Snapshot},
    stream::{Caller, DiscoveryService},
};

#[cfg(test)]
mod tests;
