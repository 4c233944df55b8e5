//! `palisade-bench-discovery`: see [`palisade_bench::discovery`].

#![forbid(unsafe_code)]

use std::{alloc::System, process::ExitCode};

use clap::Parser;
use palisade_bench::{discovery, harness};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

/// The system allocator, counting: the memory of one sidecar's discovery
/// state is read from it.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn main() -> ExitCode {
    let args = discovery::Args::parse();
    harness::exit_code("palisade-bench-discovery", discovery::run(args, GLOBAL))
}
