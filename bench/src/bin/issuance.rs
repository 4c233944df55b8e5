//! `palisade-bench-issuance`: see [`palisade_bench::issuance`].

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use palisade_bench::{harness, issuance};

fn main() -> ExitCode {
    let args = issuance::Args::parse();
    harness::exit_code("palisade-bench-issuance", issuance::run(args))
}
