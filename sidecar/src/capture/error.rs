//! Why capture rules could not be checked, installed or removed, in words an
//! operator can act on: a tool's stderr is read to say what to check.

use super::Family;

/// Why capture rules could not be checked, installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A port in the config is 0.
    #[error("{field} is 0: ports must be in 1..=65535")]
    PortZero { field: &'static str },

    /// A capture port is also listed as excluded.
    #[error(
        "{field} {port} is also in {list}: the sidecar's capture ports cannot be excluded from capture"
    )]
    CapturePortExcluded {
        field: &'static str,
        port: u16,
        list: &'static str,
    },

    /// The two capture ports are the same.
    #[error(
        "outbound_port and inbound_port are both {port}: the sidecar tells directions apart by port, so they must differ"
    )]
    SameCapturePorts { port: u16 },

    /// A tool is not on `PATH` (nor in `/usr/sbin`, `/sbin`).
    #[error(
        "{tool} is not installed: install the {package} package in the init image{}",
        ipv6_way_out(tool)
    )]
    NotInstalled {
        tool: &'static str,
        package: &'static str,
    },

    /// A tool was found but could not be started or fed.
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },

    /// A tool ran past its 30 s deadline and was killed.
    #[error(
        "{command} did not finish in {seconds} s and was killed: is another process holding the xtables lock?"
    )]
    Timeout { command: String, seconds: u64 },

    /// The kernel has no nat table for the family.
    #[error("the kernel offers no {family} nat table ({command}: {stderr}): {}", nat_advice(*family))]
    NatUnavailable {
        family: Family,
        command: String,
        stderr: String,
    },

    /// A tool exited with an error.
    #[error("{command} failed ({status}): {stderr}; {hint}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
        hint: &'static str,
    },
}

/// The error for a command that exited unsuccessfully, with a hint read from
/// its stderr.
pub(crate) fn failure(family: Family, command: String, status: &str, stderr: &str) -> CaptureError {
    let stderr = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ");
    let lower = stderr.to_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    if has(&[
        "table does not exist",
        "can't initialize",
        "do you need to insmod",
        "address family not supported",
        "protocol not supported",
    ]) {
        return CaptureError::NatUnavailable {
            family,
            command,
            stderr,
        };
    }
    let hint = if has(&[
        "permission denied",
        "operation not permitted",
        "you must be root",
    ]) {
        "does the container have NET_ADMIN?"
    } else if has(&["resource busy"]) {
        "a rule outside OUTPUT and PREROUTING still jumps to a palisade chain: delete it first"
    } else if has(&[
        "couldn't load",
        "no chain/target/match",
        "extension",
        "not supported",
    ]) {
        "the kernel lacks a match or target these rules use (owner, tcp, REDIRECT): load xt_owner, xt_tcpudp and xt_REDIRECT on the node"
    } else {
        "does the container have NET_ADMIN?"
    };
    CaptureError::CommandFailed {
        command,
        status: status.to_owned(),
        stderr,
        hint,
    }
}

fn ipv6_way_out(tool: &str) -> &'static str {
    if tool.starts_with("ip6") {
        ", or set --ipv6=false (PALISADE_IPV6=false)"
    } else {
        ""
    }
}

fn nat_advice(family: Family) -> &'static str {
    match family {
        Family::V4 => "load iptable_nat (legacy) or nft_chain_nat (nf_tables) on the node",
        Family::V6 => {
            "load ip6table_nat (legacy) or nft_chain_nat (nf_tables) on the node, or set --ipv6=false (PALISADE_IPV6=false)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_say_what_to_check() {
        let denied = failure(
            Family::V4,
            "iptables-save -t nat".to_owned(),
            "exit 4",
            "iptables-save v1.8.9 (nf_tables): Could not fetch rule set generation id: \
             Permission denied (you must be root)\n",
        );
        assert_eq!(
            denied.to_string(),
            "iptables-save -t nat failed (exit 4): iptables-save v1.8.9 (nf_tables): Could not fetch \
             rule set generation id: Permission denied (you must be root); \
             does the container have NET_ADMIN?"
        );

        let no_nat = failure(
            Family::V6,
            "ip6tables-save -t nat".to_owned(),
            "exit 3",
            "ip6tables-save v1.8.9 (legacy): can't initialize ip6tables table `nat': \
             Table does not exist (do you need to insmod?)\n",
        );
        assert!(matches!(
            no_nat,
            CaptureError::NatUnavailable {
                family: Family::V6,
                ..
            }
        ));
        let message = no_nat.to_string();
        assert!(
            message.starts_with("the kernel offers no ipv6 nat table (ip6tables-save -t nat: ")
        );
        assert!(message.ends_with("load ip6table_nat (legacy) or nft_chain_nat (nf_tables) on the node, or set --ipv6=false (PALISADE_IPV6=false)"));

        let busy = failure(
            Family::V4,
            "iptables-restore --noflush --wait=10".to_owned(),
            "exit 4",
            "iptables-restore v1.8.9 (nf_tables): \nline 2: CHAIN_DEL failed (Device or resource busy): chain PALISADE_OUTPUT\n",
        );
        assert!(busy.to_string().contains(
            "(exit 4): iptables-restore v1.8.9 (nf_tables): / line 2: CHAIN_DEL failed (Device or resource busy)"
        ));
        assert!(
            busy.to_string()
                .ends_with("still jumps to a palisade chain: delete it first")
        );
    }

    #[test]
    fn a_missing_match_names_the_kernel_modules() {
        let error = failure(
            Family::V4,
            "iptables-restore --noflush --wait=10".to_owned(),
            "exit 2",
            "iptables-restore v1.8.9 (nf_tables): Couldn't load match `owner':No such file or directory\n",
        );
        assert!(
            error
                .to_string()
                .ends_with("load xt_owner, xt_tcpudp and xt_REDIRECT on the node"),
            "{error}"
        );
    }
}
