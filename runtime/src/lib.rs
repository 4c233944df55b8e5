//! What both Palisade binaries run on.
//!
//! - [`watch`]: file change notification for hot reloads.
//! - [`admin`]: the admin server: `/metrics`, `/ready`, `/live`, `/config`.
//! - [`telemetry`]: logging setup.
//! - [`metrics`]: closed label sets as types, and the catalogue of registered
//!   metric families that `docs/metrics.md` is checked against.
//! - [`exit_code`]: how a binary reports a fatal error.

#![forbid(unsafe_code)]

pub mod admin;
pub mod metrics;
pub mod telemetry;
pub mod watch;

/// Turns `main`'s result into an exit code, printing a fatal error as one line
/// with its causes (`{:#}`) rather than a backtrace.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
