//! `palisade-bench-rotation`: see [`palisade_bench::rotation`].

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use palisade_bench::{harness, rotation};

fn main() -> ExitCode {
    let args = rotation::Args::parse();
    harness::exit_code("palisade-bench-rotation", rotation::run(args))
}
