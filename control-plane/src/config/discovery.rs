//! Flags of discovery: where the control plane learns which workload is at
//! which address.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::ConfigError;
use crate::policy::{
    MeshDefault,
    resources::{Action, Mode},
};

/// Flags of `serve` for discovery.
#[derive(Debug, Args)]
pub struct DiscoveryArgs {
    /// Where discovery comes from: off (no Discovery service), kubernetes (watch Pods), or file (--discovery-file).
    #[arg(
        long,
        env = "PALISADE_DISCOVERY_SOURCE",
        value_enum,
        default_value = "off"
    )]
    pub discovery_source: SourceKind,
    /// The discovery file (YAML workloads) of the file source; watched for changes.
    #[arg(long, env = "PALISADE_DISCOVERY_FILE", value_name = "FILE")]
    pub discovery_file: Option<PathBuf>,
    /// The mesh-wide inbound mode, for pods no InboundPolicy selects and policies that set none.
    #[arg(
        long,
        env = "PALISADE_POLICY_DEFAULT_MODE",
        value_enum,
        default_value = "permissive"
    )]
    pub policy_default_mode: Mode,
    /// The mesh-wide action on ports no rule covers, for pods no InboundPolicy selects and policies that set none.
    #[arg(
        long,
        env = "PALISADE_POLICY_DEFAULT_ACTION",
        value_enum,
        default_value = "allow"
    )]
    pub policy_default_action: Action,
}

/// Which source discovery follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// No discovery: `Watch` answers UNIMPLEMENTED.
    Off,
    /// Pods of the cluster, through a kube-rs watcher (RBAC: list, watch pods).
    Kubernetes,
    /// A YAML file of workloads, for the local demo, VMs and tests.
    File,
}

/// The validated discovery source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum DiscoverySource {
    Kubernetes,
    File { path: PathBuf },
}

// === impl DiscoveryArgs ===

impl DiscoveryArgs {
    /// The mesh-wide policy default.
    pub fn mesh_default(&self) -> MeshDefault {
        MeshDefault {
            mode: self.policy_default_mode,
            action: self.policy_default_action,
        }
    }

    /// The source, if any; `--discovery-file` belongs to the file source only.
    pub fn source(self) -> Result<Option<DiscoverySource>, ConfigError> {
        match (self.discovery_source, self.discovery_file) {
            (SourceKind::Off, None) => Ok(None),
            (SourceKind::Kubernetes, None) => Ok(Some(DiscoverySource::Kubernetes)),
            (SourceKind::File, Some(path)) => Ok(Some(DiscoverySource::File { path })),
            (SourceKind::File, None) => Err(ConfigError::new(
                "--discovery-source",
                "file",
                "needs --discovery-file",
            )),
            (kind, Some(path)) => Err(ConfigError::new(
                "--discovery-file",
                path.display().to_string(),
                format!(
                    "only the file source reads it, and --discovery-source is {}",
                    match kind {
                        SourceKind::Kubernetes => "kubernetes",
                        _ => "off",
                    }
                ),
            )),
        }
    }
}
