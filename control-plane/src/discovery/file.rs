//! The `file` source: the discovery model in YAML, for the local demo, VMs
//! and tests without an API server.
//!
//! ```yaml
//! workloads:
//!   - name: shop/b                                  # for logs and errors
//!     addresses: [198.18.0.2]
//!     identity: spiffe://cluster.local/ns/shop/sa/b   # meshed: exactly this must answer
//!   - name: data/db
//!     addresses: [198.18.0.8, "2001:db8::8"]
//!     unmeshed: true                                # plain TCP
//! ```
//!
//! Each workload has exactly one of `identity` (in the control plane's trust
//! domain) and `unmeshed: true`. Two workloads on one address make it fail
//! closed, as two live pods do. Unknown fields are errors; errors name the
//! workload by position, counting from 1. A file that does not parse is
//! refused as a whole, and the caller keeps the state it had.

use std::net::IpAddr;

use palisade_proto::{SpiffeId, SpiffeIdError, TrustDomain};
use serde::Deserialize;

use super::model::{Claim, Workload};

/// Why a discovery file was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// Not YAML, or not this file's shape; the message names the field and line.
    #[error("{0}")]
    Syntax(String),
    #[error("workload {workload}: `{value}` is not an IP address")]
    BadAddress { workload: usize, value: String },
    #[error("workload {workload}: no addresses")]
    NoAddress { workload: usize },
    #[error("workload {workload}: give exactly one of `identity` and `unmeshed: true`")]
    IdentityOrUnmeshed { workload: usize },
    #[error("workload {workload}: the identity is not a SPIFFE ID: {error}")]
    BadIdentity {
        workload: usize,
        error: SpiffeIdError,
    },
    #[error("workload {workload}: {identity} is outside the trust domain {trust_domain}")]
    ForeignTrustDomain {
        workload: usize,
        identity: String,
        trust_domain: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    workloads: Vec<FileWorkload>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWorkload {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    unmeshed: bool,
}

/// The workloads of a discovery file, each with the key it is tracked by.
pub fn parse(yaml: &str, trust_domain: &TrustDomain) -> Result<Vec<(String, Workload)>, FileError> {
    let file: File = if yaml.trim().is_empty() {
        File {
            workloads: Vec::new(),
        }
    } else {
        serde_saphyr::from_str(yaml)
            .map_err(|e| FileError::Syntax(e.without_snippet().to_string()))?
    };
    file.workloads
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let workload = i + 1;
            let addresses = w
                .addresses
                .iter()
                .map(|a| {
                    a.parse::<IpAddr>()
                        .map(|ip| ip.to_canonical())
                        .map_err(|_| FileError::BadAddress {
                            workload,
                            value: a.chars().take(64).collect(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if addresses.is_empty() {
                return Err(FileError::NoAddress { workload });
            }
            let claim = match (&w.identity, w.unmeshed) {
                (Some(id), false) => {
                    let id = SpiffeId::parse(id)
                        .map_err(|error| FileError::BadIdentity { workload, error })?;
                    if !id.is_member_of(trust_domain) {
                        return Err(FileError::ForeignTrustDomain {
                            workload,
                            identity: id.to_string(),
                            trust_domain: trust_domain.to_string(),
                        });
                    }
                    Claim::Meshed(id)
                }
                (None, true) => Claim::Unmeshed,
                _ => return Err(FileError::IdentityOrUnmeshed { workload }),
            };
            let name = w.name.unwrap_or_else(|| format!("workload {workload}"));
            Ok((
                format!("file/{workload}"),
                Workload {
                    name,
                    addresses,
                    claim,
                },
            ))
        })
        .collect()
}
