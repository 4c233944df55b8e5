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
//!                                            REDIRECT --to-ports 15006
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

pub mod iptables;

pub use iptables::{
    CaptureConfig, CaptureError, Family, INBOUND_CHAIN, OUTPUT_CHAIN, Runner, install,
    install_with, remove, remove_with, rules,
};

#[cfg(test)]
mod tests;
