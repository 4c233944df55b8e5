//! Palisade's benchmarks, one binary per question, each measured side by side
//! with its reference in the same run; the figures of record go into
//! `BENCHMARKS.md` with the command that produced them.
//!
//! The binaries, each a module with its method in its header:
//!
//! - [`proxy`] (`palisade-bench-proxy`): the data plane against haproxy, nginx
//!   (stream module) and stunnel as mutual-TLS proxy pairs: throughput,
//!   connection rate, latency, idle-connection memory, the TLS check.
//! - [`issuance`] (`palisade-bench-issuance`): certificates per second from the
//!   control plane against the ECDSA ceiling of the machine.
//! - [`rotation`] (`palisade-bench-rotation`): what certificate rotation costs
//!   a sidecar, and whether it slows new connections.
//! - [`discovery`] (`palisade-bench-discovery`): one control plane with
//!   10,000 pods, 1,000 Services and 1,000 sidecar streams: change latency,
//!   a reconnect storm, control-plane and per-sidecar memory.
//! - [`outbound`] (`palisade-bench-outbound`): new connections per second
//!   through a sidecar pair with discovery on and off, in network namespaces
//!   with real capture.
//!
//! What they share:
//!
//! - [`stats`]: the one definition of median, percentile, spread and ratio.
//! - [`crypto`]: the crypto reference, thread-CPU cost of the handshake's and
//!   the issuance's asymmetric operations (aws-lc-rs).
//! - [`certs`]: the certificates and CSRs made for a run (rcgen).
//! - [`process`]: starting processes in their own process groups, readiness,
//!   stopping them; CPU time, memory and sockets from `/proc`
//!   ([`process::procfs`]); the watchdog for a run killed with SIGKILL.
//! - [`control_plane`]: a control plane started for a run (`ca init`, static
//!   tokens, `serve`).
//! - [`load`]: the echo/sink backend and closed-loop connecting clients.
//! - [`harness`]: the runtime, the end on a signal, the exit code.

#![forbid(unsafe_code)]

pub mod certs;
pub mod control_plane;
pub mod crypto;
pub mod discovery;
pub mod harness;
pub mod issuance;
pub mod load;
pub mod outbound;
pub mod process;
pub mod proxy;
pub mod rotation;
pub mod stats;
