//! Traffic capture: the nat rules `palisade-sidecar init` installs so that the
//! pod's TCP passes through the sidecar.
//!
//! Two chains of our own in the `nat` table, one jump into each:
//!
//! ```text
//! nat OUTPUT     -p tcp -> PALISADE_OUTPUT:  RETURN uid 1337 (the sidecar itself)
//!                                            RETURN -o lo (pod-local traffic)
//!                                            RETURN excluded destination ports
//!                                            REDIRECT --to-ports 15001
//! nat PREROUTING -p tcp -> PALISADE_INBOUND: RETURN excluded destination ports
//!                                            REDIRECT --to-ports 15006, for the
//!                                            pod's own addresses only (addrtype LOCAL)
//! ```
//!
//! The same rules go to `ip6tables` unless IPv6 capture is off.
//!
//! # How the rules are applied
//!
//! Each family is read with `iptables-save -t nat` and written with one
//! `iptables-restore --noflush` batch. We chose the batch over a series of
//! `iptables -A` calls because:
//!
//! - it is atomic: the kernel takes the whole batch or none of it, so a failed
//!   install never leaves a chain half filled;
//! - declaring `:PALISADE_OUTPUT - [0:0]` in a `--noflush` batch creates the chain
//!   or empties it, so a second install replaces our rules instead of appending a
//!   second copy;
//! - `--noflush` leaves every other chain alone; the only rules we touch outside
//!   our chains are the jumps into them, which are added only when the preceding
//!   `iptables-save` shows them missing (duplicates left by anyone are deleted).
//!
//! [`remove`] deletes the rules in `OUTPUT` and `PREROUTING` that jump to our
//! chains, then the chains; a namespace without them is left as it was. Rules
//! other software put in the same tables survive install and remove.
//!
//! Install reads every enabled family before it changes any, so a missing
//! `ip6tables` fails the install before the IPv4 rules go in. If the IPv6 batch
//! itself is refused after the IPv4 one was applied (a kernel without IPv6 nat
//! can pass the read and fail the write), install returns the error with the
//! IPv4 rules in place; running it again, or [`remove`], is safe.
//!
//! # Backends
//!
//! The commands run are whatever `iptables` resolves to in the init image
//! (`iptables-nft` on Debian 12 and most current images, or `iptables-legacy`).
//! Both backends hook the same packets, so the image must use the backend the
//! rest of the pod uses; `iptables-nft` warns in its output when legacy tables
//! are present, and we log that warning.
//!
//! # Where things are
//!
//! - `rules.rs`: [`CaptureConfig`], the rule text and the batches that install
//!   and remove it, and the parser of `iptables-save` output: pure functions,
//!   unit-tested beside them.
//! - `runner.rs`: [`Runner`], which finds the tools, runs them (in another
//!   network namespace with `ip netns exec`, if asked) and kills one that
//!   outlives its 30 s deadline.
//! - `error.rs`: [`CaptureError`], and the reading of a tool's stderr that
//!   says what to check.
//! - here: [`install`] and [`remove`], which read every family, plan, then
//!   apply.
//!
//! The tests that run the real tools in network namespaces need root; they are
//! whole-system tests, in `tests/tests/capture.rs`.

mod error;
mod rules;
mod runner;

use tracing::info;

pub use error::CaptureError;
pub use rules::{CaptureConfig, Family, INBOUND_CHAIN, OUTPUT_CHAIN, rules};
pub use runner::Runner;

/// Installs the capture rules in the current network namespace.
pub fn install(config: &CaptureConfig) -> Result<(), CaptureError> {
    install_with(config, &Runner::current())
}

/// Removes the capture rules from the current network namespace.
pub fn remove(config: &CaptureConfig) -> Result<(), CaptureError> {
    remove_with(config, &Runner::current())
}

/// Installs the capture rules, running the iptables tools through `runner`.
pub fn install_with(config: &CaptureConfig, runner: &Runner) -> Result<(), CaptureError> {
    config.validate()?;
    if !config.ipv6 {
        info!("ipv6 capture is off: leaving ip6tables alone");
    }
    // Read every family before writing any, so a missing tool or table fails
    // the install before it changes anything.
    let mut batches = Vec::new();
    for family in config.families() {
        let table = runner.read_nat(family)?;
        batches.push((family, rules::install_batch(config, family, &table)?));
    }
    for (family, batch) in batches {
        runner.apply(family, &batch.script)?;
        info!(
            family = %family,
            outbound_port = config.outbound_port,
            inbound_port = config.inbound_port,
            proxy_uid = config.proxy_uid,
            exclude_outbound_ports = ?config.exclude_outbound_ports,
            exclude_inbound_ports = ?config.exclude_inbound_ports,
            jumps_added = batch.jumps_added,
            duplicate_jumps_removed = batch.jumps_removed,
            netns = runner.netns_name(),
            "installed traffic capture rules"
        );
    }
    Ok(())
}

/// Removes the capture rules, running the iptables tools through `runner`.
///
/// Looks at IPv6 even when `config.ipv6` is off, in case an earlier install had
/// it on; a host without `ip6tables` or IPv6 nat cannot hold our IPv6 rules, so
/// that is not an error here.
pub fn remove_with(config: &CaptureConfig, runner: &Runner) -> Result<(), CaptureError> {
    for family in Family::ALL {
        let table = match runner.read_nat(family) {
            Ok(table) => table,
            Err(error)
                if family == Family::V6
                    && (!config.ipv6
                        || matches!(
                            error,
                            CaptureError::NotInstalled { .. } | CaptureError::NatUnavailable { .. }
                        )) =>
            {
                info!(family = %family, error = %error, "no ipv6 nat table to clean up");
                continue;
            }
            Err(error) => return Err(error),
        };
        let netns = runner.netns_name();
        match rules::remove_batch(&table) {
            None => info!(family = %family, netns, "no traffic capture rules to remove"),
            Some(batch) => {
                runner.apply(family, &batch.script)?;
                info!(
                    family = %family,
                    netns,
                    jumps_removed = batch.jumps_removed,
                    chains_removed = batch.chains_removed,
                    "removed traffic capture rules"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
