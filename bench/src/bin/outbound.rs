//! `palisade-bench-outbound`: see [`palisade_bench::outbound`].

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use palisade_bench::{harness, outbound};

fn main() -> ExitCode {
    let args = outbound::Args::parse();
    harness::exit_code("palisade-bench-outbound", outbound::run(args))
}
