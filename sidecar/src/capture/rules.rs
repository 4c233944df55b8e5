//! The capture rules as text: what to capture ([`CaptureConfig`]), the
//! `iptables-restore` batches that install and remove them, and the nat table
//! read back from `iptables-save`. Pure functions: nothing here runs a tool.

use std::{collections::BTreeSet, fmt};

use serde::Serialize;

use super::CaptureError;

/// The chain `nat OUTPUT` jumps to: TCP the pod sends.
pub const OUTPUT_CHAIN: &str = "PALISADE_OUTPUT";
/// The chain `nat PREROUTING` jumps to: TCP arriving for the pod.
pub const INBOUND_CHAIN: &str = "PALISADE_INBOUND";

/// Each builtin chain we hook and the chain of ours it jumps to.
const HOOKS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)];

/// What to capture and what to let through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CaptureConfig {
    /// Port the sidecar's outbound listener accepts redirected app traffic on.
    pub outbound_port: u16,
    /// Port the sidecar's inbound listener accepts redirected peer traffic on.
    pub inbound_port: u16,
    /// Uid the sidecar runs as; its own connections are never captured.
    pub proxy_uid: u32,
    /// Destination ports the app connects to without the sidecar.
    pub exclude_outbound_ports: Vec<u16>,
    /// Pod ports peers reach without the sidecar.
    pub exclude_inbound_ports: Vec<u16>,
    /// Also capture IPv6 with `ip6tables`.
    pub ipv6: bool,
}

/// An IP family, with the tools that manage its tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Family {
    /// IPv4, managed with `iptables`.
    V4,
    /// IPv6, managed with `ip6tables`.
    V6,
}

/// The nat table as `iptables-save -t nat` shows it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct NatTable {
    pub(crate) chains: BTreeSet<String>,
    pub(crate) rules: Vec<Rule>,
}

/// One `-A CHAIN SPEC` line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) chain: String,
    pub(crate) spec: String,
}

/// An `iptables-restore` batch and what it changes, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    pub(crate) script: String,
    pub(crate) jumps_added: usize,
    pub(crate) jumps_removed: usize,
    pub(crate) chains_removed: usize,
}

/// Checks `config`, then returns the `iptables-restore --noflush` input that
/// [`install`](super::install) applies for `family` in a namespace without our
/// rules.
pub fn rules(config: &CaptureConfig, family: Family) -> Result<String, CaptureError> {
    Ok(install_batch(config, family, &NatTable::default())?.script)
}

// === impl CaptureConfig ===

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_uid: 1337,
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            ipv6: true,
        }
    }
}

impl CaptureConfig {
    /// Checks the ports.
    pub fn validate(&self) -> Result<(), CaptureError> {
        let lists = [
            ("exclude_outbound_ports", &self.exclude_outbound_ports),
            ("exclude_inbound_ports", &self.exclude_inbound_ports),
        ];
        let capture = [
            ("outbound_port", self.outbound_port),
            ("inbound_port", self.inbound_port),
        ];
        for (field, port) in capture {
            if port == 0 {
                return Err(CaptureError::PortZero { field });
            }
        }
        for (list, ports) in lists {
            if ports.contains(&0) {
                return Err(CaptureError::PortZero { field: list });
            }
            for (field, port) in capture {
                if ports.contains(&port) {
                    return Err(CaptureError::CapturePortExcluded { field, port, list });
                }
            }
        }
        if self.outbound_port == self.inbound_port {
            return Err(CaptureError::SameCapturePorts {
                port: self.outbound_port,
            });
        }
        Ok(())
    }

    /// The families this config captures, IPv4 first.
    pub(crate) fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
}

// === impl Family ===

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The rule tool: `iptables` or `ip6tables`.
    pub fn iptables(&self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    /// The tool that prints a table: `iptables-save` or `ip6tables-save`.
    pub fn save(&self) -> &'static str {
        match self {
            Self::V4 => "iptables-save",
            Self::V6 => "ip6tables-save",
        }
    }

    /// The tool that applies a batch: `iptables-restore` or `ip6tables-restore`.
    pub fn restore(&self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        })
    }
}

// === planning batches ===

/// The batch that brings `table` to exactly one copy of our rules.
pub(crate) fn install_batch(
    config: &CaptureConfig,
    family: Family,
    table: &NatTable,
) -> Result<Batch, CaptureError> {
    config.validate()?;
    let mut batch = Batch::default();
    let mut lines = vec![
        format!(
            "# palisade traffic capture ({family}): {} --noflush",
            family.restore()
        ),
        "*nat".to_owned(),
    ];
    // Declaring a chain in a --noflush batch creates it, or empties it if it
    // exists, so the rules below replace whatever an earlier install left.
    for (_, chain) in HOOKS {
        lines.push(format!(":{chain} - [0:0]"));
    }

    let outbound_excluded: BTreeSet<u16> = config.exclude_outbound_ports.iter().copied().collect();
    let inbound_excluded: BTreeSet<u16> = config.exclude_inbound_ports.iter().copied().collect();
    for port in inbound_excluded {
        lines.push(format!(
            "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    // Only what is addressed to the pod itself: a connection routed through
    // the pod for another host is left to the kernel, which does not forward
    // it, instead of reaching the sidecar and being relayed.
    lines.push(format!(
        "-A {INBOUND_CHAIN} -p tcp -m addrtype --dst-type LOCAL -j REDIRECT --to-ports {}",
        config.inbound_port
    ));
    lines.push(format!(
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        config.proxy_uid
    ));
    lines.push(format!("-A {OUTPUT_CHAIN} -o lo -j RETURN"));
    for port in outbound_excluded {
        lines.push(format!(
            "-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    lines.push(format!(
        "-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        config.outbound_port
    ));

    // Rules are written the way iptables-save prints them, so an existing jump
    // is recognised by plain string comparison.
    for (builtin, chain) in HOOKS {
        let wanted = jump_spec(chain);
        let existing: Vec<&Rule> = table
            .rules
            .iter()
            .filter(|r| r.chain == builtin && target(&r.spec) == Some(chain))
            .collect();
        let keep = existing.iter().position(|r| r.spec == wanted);
        for (i, rule) in existing.iter().enumerate() {
            if Some(i) != keep {
                // -D removes the first match; with duplicates of `wanted` the
                // last copy is the one that stays.
                lines.push(format!("-D {builtin} {}", rule.spec));
                batch.jumps_removed += 1;
            }
        }
        if keep.is_none() {
            lines.push(format!("-A {builtin} {wanted}"));
            batch.jumps_added += 1;
        }
    }
    lines.push("COMMIT".to_owned());
    batch.script = lines.join("\n") + "\n";
    Ok(batch)
}

/// The batch that deletes our jumps and chains from `table`, or `None` when it
/// holds neither.
pub(crate) fn remove_batch(table: &NatTable) -> Option<Batch> {
    let mut batch = Batch::default();
    let mut lines = vec!["*nat".to_owned()];
    for rule in &table.rules {
        let hooked = HOOKS.iter().any(|(builtin, _)| rule.chain == *builtin);
        let ours = target(&rule.spec).is_some_and(|t| HOOKS.iter().any(|(_, chain)| t == *chain));
        if hooked && ours {
            lines.push(format!("-D {} {}", rule.chain, rule.spec));
            batch.jumps_removed += 1;
        }
    }
    for (_, chain) in HOOKS {
        if table.chains.contains(chain) {
            lines.push(format!("-F {chain}"));
            lines.push(format!("-X {chain}"));
            batch.chains_removed += 1;
        }
    }
    if batch.jumps_removed == 0 && batch.chains_removed == 0 {
        return None;
    }
    lines.push("COMMIT".to_owned());
    batch.script = lines.join("\n") + "\n";
    Some(batch)
}

/// The jump from a builtin chain into `chain`, as iptables-save prints it.
fn jump_spec(chain: &str) -> String {
    format!("-p tcp -j {chain}")
}

/// The chain a rule jumps or goes to, if any.
fn target(spec: &str) -> Option<&str> {
    let tokens: Vec<&str> = spec.split_whitespace().collect();
    tokens
        .windows(2)
        .rev()
        .find(|w| w[0] == "-j" || w[0] == "-g")
        .map(|w| w[1])
}

// === reading iptables-save ===

/// Parses the nat table out of `iptables-save` output.
pub(crate) fn parse_save(text: &str) -> NatTable {
    let mut table = NatTable::default();
    let mut in_nat = false;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            in_nat = name == "nat";
        } else if line == "COMMIT" {
            in_nat = false;
        } else if !in_nat {
            continue;
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next() {
                table.chains.insert(chain.to_owned());
            }
        } else if let Some((chain, spec)) = line.strip_prefix("-A ").and_then(|r| r.split_once(' '))
        {
            table.rules.push(Rule {
                chain: chain.to_owned(),
                spec: spec.trim().to_owned(),
            });
        }
    }
    table
}

#[cfg(test)]
mod tests;
