//! Flags of `init`: the iptables capture rules.

use clap::{ArgAction, Args};

use crate::capture::CaptureConfig;

/// Flags of `init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Remove the rules instead of installing them.
    #[arg(long)]
    pub remove: bool,
    /// Print the rules instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// Port of the captured outbound listener.
    #[arg(long, env = "PALISADE_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port of the captured inbound listener.
    #[arg(long, env = "PALISADE_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// The uid the sidecar runs as; its own traffic is never captured.
    #[arg(long, env = "PALISADE_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Outbound destination ports left alone (comma-separated).
    #[arg(long, env = "PALISADE_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound ports left alone (comma-separated).
    #[arg(long, env = "PALISADE_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// The sidecar's admin port: always left alone inbound, so probes and
    /// Prometheus reach it even in strict mode.
    #[arg(long, env = "PALISADE_ADMIN_PORT", default_value_t = 15020)]
    pub admin_port: u16,
    /// Also install the rules with ip6tables.
    #[arg(long, env = "PALISADE_IPV6", default_value_t = true, action = ArgAction::Set)]
    pub ipv6: bool,
}

// === impl InitArgs ===

impl InitArgs {
    /// The capture rules' configuration.
    pub fn capture_config(&self) -> CaptureConfig {
        CaptureConfig {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_uid: self.proxy_uid,
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_inbound_ports: self
                .exclude_inbound_ports
                .iter()
                .copied()
                .chain([self.admin_port])
                .collect(),
            ipv6: self.ipv6,
        }
    }
}
