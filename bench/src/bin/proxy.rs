//! `palisade-bench-proxy`: see [`palisade_bench::proxy`].

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use palisade_bench::{harness, proxy};

fn main() -> ExitCode {
    let args = proxy::Args::parse();
    harness::exit_code("palisade-bench-proxy", proxy::run(args))
}
