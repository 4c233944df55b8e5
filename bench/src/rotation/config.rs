//! The rotation benchmark's flags.

use clap::Parser;

/// What certificate rotation costs a sidecar: CPU per renewal, and the
/// handshake rate of a rotating pair next to a steady one.
#[derive(Debug, Parser)]
#[command(name = "palisade-bench-rotation")]
pub struct Args {
    /// Alternating measurement rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per handshake-rate window.
    #[arg(long, default_value_t = 8)]
    pub window: u64,
    /// Seconds of the renewal-cost window.
    #[arg(long, default_value_t = 30)]
    pub renewal_window: u64,
    /// Concurrent connecting clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
}
